import pytest, torch, json
from tests.test_plugin import fedavg, user_grid, userapp  # noqa

@pytest.mark.parametrize("lr", [0.05, 0.2, 0.5, 1.0, 3.0])
def test_lr(userapp, user_grid, tmp_path, lr):
    from fedunlearn import NoT, FineTune, Recovery, serve
    from fedunlearn.inbox import Inbox
    client_app, task = userapp
    Inbox(str(tmp_path / "i1")).file(scope="class", classes=[2])
    grid = user_grid(client_app.app, inboxes={1: tmp_path / "i1"})
    arrays = fedavg(grid, task, rounds=3)
    testset = task.Blobs(64, seed=999)
    def evaluate(a):
        net = task.Net(); net.load_state_dict(a.to_torch_state_dict())
        return {"test": task.test(net, testset)}
    print("input", evaluate(arrays))
    rec = Recovery(rounds=3, lr=lr)
    out = serve(grid, arrays, [NoT(rec, model_fn=task.Net, example_input=torch.zeros(1,1,8,8)), FineTune(rec)],
                output_dir=tmp_path/"o", evaluate_fn=evaluate)
    print("LR", lr); print(out.table())
