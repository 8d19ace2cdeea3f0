"""The public API as a Flower user reaches it: what ``fedunlearn.__all__`` and
``fedunlearn.client.__all__`` export, run from a package outside fedunlearn."""

from __future__ import annotations

import subprocess
import sys
import textwrap

METHOD_CLASSES = {"NoT": "not", "FineTune": "ft", "PUF": "puf", "Retrain": "retrain",
                  "MoDE": "mode", "FCU": "fcu", "FedEraser": "federaser", "FUKD": "fukd",
                  "PGD": "pgd", "RandL": "randl", "GA": "ga", "BadT": "badt",
                  "L1Sparse": "l1_sparse", "SSD": "ssd", "SalUn": "salun",
                  "LayerwiseOptimalityCheck": "lwo"}


def test_every_method_class_and_the_authoring_api_are_exported(tmp_path):
    """Every registered method has its class in ``fedunlearn.__all__``; every exported
    name resolves, and none comes from the experiment harness."""
    user = tmp_path / "userpkg"
    user.mkdir()
    (user / "__init__.py").write_text("")
    (user / "check.py").write_text(textwrap.dedent('''
        import fedunlearn, fedunlearn.client
        from fedunlearn.strategies import list_methods
        out = {}
        for module in (fedunlearn, fedunlearn.client):
            for name in module.__all__:
                obj = getattr(module, name)
                out[f"{module.__name__}.{name}"] = getattr(obj, "__module__", "") or ""
        print(repr((out, {n: getattr(fedunlearn, n).name for n in fedunlearn.__all__
                          if isinstance(getattr(fedunlearn, n), type)
                          and issubclass(getattr(fedunlearn, n), fedunlearn.UnlearningStrategy)
                          and n != "UnlearningStrategy"}, list_methods())))
    '''))
    done = subprocess.run([sys.executable, "-m", "userpkg.check"], cwd=tmp_path,
                          capture_output=True, text=True, check=True)
    modules, method_names, registered = eval(done.stdout.strip().splitlines()[-1])
    assert method_names == METHOD_CLASSES
    assert sorted(method_names.values()) == sorted(registered)
    for api in ("UnlearningStrategy", "MethodParams", "register_method", "Recovery",
                "UnlearningContext", "serve", "UnlearningService", "ServiceConfig"):
        assert f"fedunlearn.{api}" in modules, api
    for api in ("attach", "register_action", "ActionJob", "ActionResult", "NodeView"):
        assert f"fedunlearn.client.{api}" in modules, api
    harness = [name for name, module in modules.items()
               if module.startswith(("fedunlearn.harness", "fedunlearn.experiment"))]
    assert harness == []
    assert "fedunlearn.create_method" not in modules
