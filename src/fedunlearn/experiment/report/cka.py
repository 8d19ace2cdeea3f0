"""The CKA figure (the NoT paper's Figure 3): each layer's CKA to the original model, from
the models NoT's results saved."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .aggregation import Group
from .trajectories import _str_list, perturbation_of

CKA_FILE = "cka.png"


def cka_models(entries: Sequence[tuple[Path, dict]]) -> tuple[int, tuple[str, str],
                                                              list[tuple[str, str]]] | None:
    """The NoT paper's Figure 3 for one setting: ``(seed, reference, models)`` with the
    original (pretrained) model as the reference against NoT right after negation
    (``model-round0.pt``, written with ``eval.trajectory``) and at the end, FT (method
    ``ft`` or NoT with ``perturbation=none``) and Retrain at the end, all of one seed (the
    smallest that has NoT's two models); ``None`` when the results hold no such NoT."""
    def model_file(r: dict, name: str = "") -> str | None:
        path = (r.get("model") or {}).get("path")
        if not path:
            return None
        file = Path(path) if not name else Path(path).with_name(name)
        return str(file) if file.exists() else None

    by_seed: dict[int, dict[str, str]] = {}
    pretrained: dict[int, str] = {}
    for _, r in entries:
        seed = int((r.get("config") or {}).get("seed", 0))
        models = by_seed.setdefault(seed, {})
        method = r.get("method")
        if method == "not" and perturbation_of(r) == "negate" and not _str_list(
                (r.get("config") or {}).get("negate_layers")):  # the first layer
            start, end = model_file(r, "model-round0.pt"), model_file(r)
            if start and end:
                models["NoT@0"], models["NoT@end"] = start, end
                path = (r.get("pretrain") or {}).get("path")
                if path and Path(path).exists():
                    pretrained[seed] = path
        elif (method == "ft" or (method == "not" and perturbation_of(r) == "none")) \
                and model_file(r):
            models.setdefault("FT@end", model_file(r))
        elif method == "retrain" and model_file(r):
            models["Retrain@end"] = model_file(r)
    seeds = sorted(s for s, m in by_seed.items() if "NoT@end" in m and s in pretrained)
    if not seeds:
        return None
    seed = seeds[0]
    order = ("NoT@0", "NoT@end", "FT@end", "Retrain@end")
    return seed, ("FT@0 (original)", pretrained[seed]), [
        (name, by_seed[seed][name]) for name in order if name in by_seed[seed]]


def draw_cka(group: Group, entries: Sequence[tuple[Path, dict]], gdir: Path,
             samples: int = 500) -> tuple[str, list[Path]]:
    """Figure 3 (CKA per layer to the original) for a setting whose results hold NoT's
    saved models; ``("", [])`` when they do not."""
    found = cka_models(entries)
    if found is None:
        return "", []
    from ...harness.analysis import run_cka

    seed, reference, models = found
    config = entries[0][1].get("config") or {}
    try:
        result = run_cka(config.get("dataset", "digits"), config.get("model", "cnn"),
                         reference, models, gdir / "cka", samples=samples,
                         root=config.get("data_root", ""))
    except (ValueError, OSError) as err:
        return f"CKA not drawn: {err}\n", []
    png = gdir / "cka" / "cka.png"
    text = (f"CKA of each layer's activations to the original model's, seed {seed}, "
            f"{result['samples']} test images (the NoT paper's Figure 3):\n\n"
            f"{result['table']}\n")
    return text, [png]
