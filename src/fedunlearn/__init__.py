"""fedunlearn: federated unlearning on Flower.

Server side (a user's ServerApp)::

    from fedunlearn import NoT, Recovery, serve
    outcome = serve(grid, arrays, [NoT(Recovery(rounds=11), model_fn=Net)], output_dir="out")

Node side (a user's ClientApp)::

    from fedunlearn.client import attach
    attach(app, model_fn=Net, data=lambda ctx: load_local(ctx))

Importing :mod:`fedunlearn` loads the server side only (never :mod:`fedunlearn.client`).
The paper's experiment harness (run-config, public-data partitions, model zoo, Retrain
reference, MIA, ``results.json``) is :mod:`fedunlearn.harness`, built on this API; the
library never imports it (but :func:`load_module`, for a model a harness job wrote).
"""

from __future__ import annotations

_SERVER = {"serve": "serving", "ServeOutcome": "serving", "MethodOutcome": "serving",
           "load_model": "serving", "load_module": "loading", "ServeError": "serve_checks",
           "HistoryKeeper": "history_keeper", "HistorySpec": "history",
           "ExcludeForgotten": "strategies.exclude_forgotten",
           "Recovery": "strategies", "Training": "strategies",
           "UnlearningFailed": "strategies", "UnlearningStrategy": "strategies",
           "UnlearningContext": "strategies", "MethodParams": "strategies",
           "get_method": "strategies", "list_methods": "strategies",
           "register_method": "strategies",
           "UnlearningService": "service", "ServiceConfig": "service",
           "ServiceOutcome": "service", "ServiceError": "service", "read_versions": "service",
           "audit_forgetting": "metrics.forgetting", "ForgettingAudit": "metrics.forgetting",
           "model_outputs": "metrics.forgetting", "margins": "metrics.forgetting",
           "klom": "metrics.forgetting", "mean_ci": "metrics.intervals"}
#: Every method class by its registered name (all 16).
_METHODS = {"NoT": "not", "FineTune": "ft", "PUF": "puf", "Retrain": "retrain",
            "MoDE": "mode", "FCU": "fcu", "FedEraser": "federaser", "FUKD": "fukd",
            "PGD": "pgd", "RandL": "randl", "GA": "ga", "BadT": "badt",
            "L1Sparse": "l1_sparse", "SSD": "ssd", "SalUn": "salun",
            "LayerwiseOptimalityCheck": "lwo"}


def __getattr__(name: str):
    import importlib

    if name in _SERVER:
        return getattr(importlib.import_module(f"{__name__}.{_SERVER[name]}"), name)
    if name in _METHODS:
        from .strategies import get_method

        return get_method(_METHODS[name])
    raise AttributeError(f"module 'fedunlearn' has no attribute {name!r}")


__all__ = sorted([*_SERVER, *_METHODS])
