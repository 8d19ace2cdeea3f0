import sys, pytest, torch
from pathlib import Path
EX = Path(__file__).resolve().parents[1] / "examples" / "quickstart-pytorch-unlearning"

@pytest.mark.parametrize("lr", [0.05, 0.2, 0.5, 1.0])
def test_lr(local_grid, server_identity, single_thread, tmp_path, monkeypatch, lr):
    monkeypatch.syspath_prepend(str(EX))
    from unlearningexample.client_app import app
    from unlearningexample.server_app import evaluate
    from unlearningexample.task import Net
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg
    from fedunlearn import NoT, FineTune, Recovery, serve
    rc = {"local-epochs": 1, "inbox-root": str(tmp_path/"inb"), "forget-partition": 0,
          "forget-scope": "client", "forget-classes": "3"}
    grid = local_grid(app, 3, rc, arrival="sent")
    torch.manual_seed(0)
    arrays = FedAvg(fraction_train=1.0, fraction_evaluate=0.0).start(grid, ArrayRecord(Net().state_dict()), num_rounds=5, train_config=ConfigRecord({"lr": 0.05})).arrays
    print("input", evaluate(arrays))
    rec = Recovery(rounds=3, lr=lr)
    out = serve(grid, arrays, [NoT(rec, model_fn=Net, example_input=torch.zeros(1,1,8,8)), FineTune(rec)],
                output_dir=tmp_path/"o", evaluate_fn=evaluate)
    print("LR", lr); print(out.table())
