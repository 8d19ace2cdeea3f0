"""NoT's perturbation as a choice (the paper's Figure 5): each built-in one on a
hand-made layer, the refusal that stays for negation, and one registered from outside."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fedunlearn.engine import local_run
from fedunlearn.experiment.config import compose, to_run_config
from fedunlearn.perturbations import (PerturbationContext, list_perturbations, perturb,
                                      register_perturbation)
from fedunlearn.negation import select_negation_params
from fedunlearn import NoT


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.norm1 = nn.GroupNorm(1, 4)
        self.conv2 = nn.Conv2d(4, 2, (3, 2))
        self.fc = nn.Linear(2 * 4 * 5, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv2(torch.relu(self.norm1(self.conv1(x)))), 1))


X = torch.zeros(1, 1, 8, 8)


def _model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def _context(**params) -> PerturbationContext:
    fresh = _model(seed=99).state_dict()
    return PerturbationContext(torch.Generator().manual_seed(5), lambda: fresh, params)


def _perturbed(name: str, layers=("conv1",), **params) -> tuple[Tiny, Tiny]:
    before, after = _model(), _model()
    names = select_negation_params(after, X, list(layers),
                                   refuse_cancelling=name == "negate")
    perturb(after, names, name, _context(**params))
    return before, after


def _others_unchanged(before: Tiny, after: Tiny, changed: set[str]) -> None:
    for key, value in before.state_dict().items():
        if key not in changed:
            assert torch.equal(after.state_dict()[key], value), key


def test_the_builtin_perturbations_are_registered():
    assert {"negate", "none", "reinit", "noise", "flip", "rotate"} <= set(list_perturbations())


def test_negate_flips_signs_and_none_changes_nothing():
    before, after = _perturbed("negate")
    assert torch.equal(after.conv1.weight, -before.conv1.weight)
    assert torch.equal(after.conv1.bias, -before.conv1.bias)
    _others_unchanged(before, after, {"conv1.weight", "conv1.bias"})
    before, after = _perturbed("none")
    _others_unchanged(before, after, set())


def test_reinit_gives_a_fresh_initialisation_of_those_layers_only():
    before, after = _perturbed("reinit")
    fresh = _model(seed=99)
    for key in ("weight", "bias"):
        value = getattr(after.conv1, key)
        assert value.shape == getattr(before.conv1, key).shape
        assert not torch.equal(value, getattr(before.conv1, key))
        assert torch.equal(value, getattr(fresh.conv1, key))
    _others_unchanged(before, after, {"conv1.weight", "conv1.bias"})


def test_flip_and_rotate_are_exact_permutations_of_each_kernel():
    before, after = _perturbed("flip")
    w, f = before.conv1.weight, after.conv1.weight
    for o in range(w.shape[0]):
        for i in range(w.shape[1]):
            assert torch.equal(f[o, i], w[o, i, :, [2, 1, 0]])
    assert torch.equal(after.conv1.bias, before.conv1.bias)  # a vector has no axis to turn
    for degrees, k in ((90, 1), (180, 2), (270, 3)):
        before, after = _perturbed("rotate", rotation=degrees)
        w, r = before.conv1.weight, after.conv1.weight
        assert torch.equal(r, torch.rot90(w, k, dims=(-2, -1)))
        assert torch.equal(torch.sort(r.flatten()).values, torch.sort(w.flatten()).values)
    # 3x2 kernels only turn by 180 degrees
    before, after = _perturbed("rotate", layers=("conv2",), rotation=180)
    assert torch.equal(after.conv2.weight, before.conv2.weight.flip(-1).flip(-2))
    with pytest.raises(ValueError, match="non-square kernels"):
        _perturbed("rotate", layers=("conv2",), rotation=90)


def test_noise_has_the_requested_scale():
    big = nn.Linear(400, 500)
    for scale in (0.5, 2.0):
        value = big.weight.detach().clone()
        context = PerturbationContext(torch.Generator().manual_seed(1), dict, {"noise_scale": scale})
        model = nn.Sequential(nn.Linear(400, 500))
        model[0].weight.data.copy_(value)
        perturb(model, ["0.weight"], "noise", context)
        added = model[0].weight.detach() - value
        ratio = float(added.std() / value.std())
        assert ratio == pytest.approx(scale, rel=0.02)  # 200,000 draws: ~0.2% spread
        assert abs(float(added.mean())) < 0.01 * scale * float(value.std())


def test_the_refusal_of_cancelling_pairs_stays_for_negation_only():
    with pytest.raises(ValueError, match="cancel out"):
        _perturbed("negate", layers=("conv1", "norm1"))
    before, after = _perturbed("noise", layers=("conv1", "norm1"))  # noise does not cancel
    assert not torch.equal(after.conv1.weight, before.conv1.weight)
    # a constant tensor (a fresh norm's scale of ones) has no spread: it gets no noise
    assert torch.equal(after.norm1.weight, before.norm1.weight)


def test_not_takes_the_perturbation_as_a_method_parameter():
    with pytest.raises(ValueError, match="perturbation='bogus' is unknown"):
        NoT(params={"perturbation": "bogus"})
    with pytest.raises(ValueError, match="rotation=45"):
        NoT(params={"rotation": 45})
    with pytest.raises(ValueError, match="noise_scale"):
        NoT(params={"noise_scale": 0.0})
    # Hydra: method.params.perturbation sweeps into the run-config's method-params
    rc = to_run_config(compose(["method=not", "method.params.perturbation=reinit"]))
    assert "not.perturbation=reinit" in rc["method-params"]


@register_perturbation("halve_for_test")
def _halve(name: str, value: torch.Tensor, context: PerturbationContext) -> torch.Tensor:
    return value / 2


def test_a_perturbation_registered_outside_the_package_runs_in_a_job(tmp_path):
    out = tmp_path / "out"
    rc = local_run({"method": "not", "method-params": "not.perturbation=halve_for_test",
                    "dataset.name": "synthetic", "federation.num-clients": 3,
                    "pretrain.rounds": 1, "unlearn.rounds": 1, "output-dir": str(out),
                    "checkpoint-dir": str(tmp_path / "ck"), "eval.mia-max-members": 40},
                   num_supernodes=3, log_file=tmp_path / "job.log", echo=False)
    assert rc == 0, (tmp_path / "job.log").read_text()[-2000:]
    notes = json.loads((out / "not" / "results.json").read_text())["notes"]
    assert notes["perturbation"] == "halve_for_test"
    assert notes["perturbed"] == ["conv1.weight", "conv1.bias"] and "negated" not in notes


def test_vit_layers_for_the_layer_ablation():
    """Figure 4's choices on a timm ViT: the patch projection (first layer), the
    positional embedding (a parameter) and one head's query rows of the first block."""
    from fedunlearn.harness.models import create_model
    from fedunlearn.layers import example_input_for
    from fedunlearn.negation import negate_layers

    torch.manual_seed(0)
    vit = create_model("vit_tiny", num_classes=10, in_channels=1, image_size=8)
    x = example_input_for(1, 8)
    assert select_negation_params(vit, x) == ["patch_embed.proj.weight", "patch_embed.proj.bias"]
    assert select_negation_params(vit, x, ["pos_embed"]) == ["pos_embed"]
    heads, width = vit.blocks[0].attn.num_heads, vit.blocks[0].attn.head_dim
    for head in (0, 1):
        rows = f"[{head * width}:{(head + 1) * width}]"
        assert select_negation_params(vit, x, [f"blocks.0.attn.qkv:q{head}"]) == [
            f"blocks.0.attn.qkv.weight{rows}", f"blocks.0.attn.qkv.bias{rows}"]
    before = vit.blocks[0].attn.qkv.weight.detach().clone()
    negate_layers(vit, x, ["blocks.0.attn.qkv:q1"], include_bias=False)
    after = vit.blocks[0].attn.qkv.weight.detach()
    q1 = slice(width, 2 * width)
    assert torch.equal(after[q1], -before[q1])
    mask = torch.ones(before.shape[0], dtype=torch.bool)
    mask[q1] = False
    assert torch.equal(after[mask], before[mask])  # other heads, keys and values kept
    # reinit of the rows: a fresh model's rows, the rest untouched
    fresh = create_model("vit_tiny", num_classes=10, in_channels=1, image_size=8)
    context = PerturbationContext(torch.Generator(), fresh.state_dict, {})
    names = select_negation_params(vit, x, ["blocks.0.attn.qkv:q0"], include_bias=False)
    kept = vit.blocks[0].attn.qkv.weight.detach().clone()
    perturb(vit, names, "reinit", context)
    now = vit.blocks[0].attn.qkv.weight.detach()
    assert torch.equal(now[:width], fresh.blocks[0].attn.qkv.weight.detach()[:width])
    assert torch.equal(now[width:], kept[width:])
    with pytest.raises(ValueError, match=f"heads 0..{heads - 1}"):
        select_negation_params(vit, x, [f"blocks.0.attn.qkv:q{heads}"])
    with pytest.raises(ValueError, match="not a fused q/k/v projection"):
        select_negation_params(vit, x, ["blocks.0.attn.proj:q0"])


def test_a_sweep_job_finds_a_perturbation_registered_outside(tmp_path):
    """The Hydra runner's job (as ``-m method.params.perturbation=...`` makes it) on the
    in-process engine, with a perturbation this test module registered."""
    import io

    from fedunlearn.experiment import runner

    cfg = compose(["method=not", "method.params.perturbation=halve_for_test",
                   "federation=tiny", "dataset=synthetic", "eval.mia_max_members=40",
                   f"checkpoint_dir={tmp_path / 'ck'}"])
    out = io.StringIO()
    assert runner.run_job(cfg, tmp_path / "job", base_dir=tmp_path, launcher=local_run,
                          out=out), out.getvalue()
    notes = json.loads((tmp_path / "job" / "not" / "results.json").read_text())["notes"]
    assert notes["perturbation"] == "halve_for_test"
