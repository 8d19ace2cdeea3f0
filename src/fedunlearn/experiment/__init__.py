"""Hydra experiments: config groups in ``conf/`` -> Flower run-config -> jobs -> report.

* :mod:`.config`: :func:`to_run_config` (composed Hydra config -> run-config, the single
  mapping between the two) and :func:`compose` (compose ``conf/`` outside a Hydra app);
* :mod:`.runner`: ``python -m fedunlearn.experiment`` / ``fedunlearn-experiment``, one
  ``flwr run`` job per Hydra job, sweeps with ``-m``;
* :mod:`.report`: ``fedunlearn-report <dir>``, the paper-style tables and plots.
"""

from .config import RUN_CONFIG_MAP, compose, federation_settings, ratio_clients, to_run_config

__all__ = ["RUN_CONFIG_MAP", "compose", "federation_settings", "ratio_clients", "to_run_config"]
