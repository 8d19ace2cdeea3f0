"""The Hydra runner without Flower: run-config hand-off, failures, progress, resources."""

from __future__ import annotations

import io
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedunlearn import launch
from fedunlearn.experiment import runner
from fedunlearn.experiment.config import compose

ROOT = Path(__file__).resolve().parents[1]
LOG_LINES = [
    "\x1b[92mINFO \x1b[0m:      Starting Flower Simulation\n",
    "\x1b[92mINFO \x1b[0m:      [pretrain] round 2/2  test accuracy 90.50%\n",
    '\x1b[92mINFO \x1b[0m:      fedunlearn-progress {"kind": "round", "phase": "pretrain", '
    '"round": 2, "rounds": 2, "test": 90.5}\n',
    "\x1b[92mINFO \x1b[0m:      aggregate_train: Received 3 results and 0 failures\n",
    "\x1b[92mINFO \x1b[0m:      [not] negated conv1.weight, conv1.bias\n",
    "\x1b[92mINFO \x1b[0m:      [measure] original: retain 92.27\n",
    "\x1b[92mINFO \x1b[0m:      Results written to /somewhere\n",
]


class FakeLauncher:
    """Stands in for flwr_run: echoes a log, optionally writes results, returns rc."""

    def __init__(self, rc=0, write_results=True):
        self.rc, self.write_results, self.calls = rc, write_results, []

    def __call__(self, run_config, *, num_supernodes, num_cpus, num_gpus, log_file, echo,
                 finished_marker):
        self.calls.append(dict(run_config=run_config, num_supernodes=num_supernodes,
                               num_cpus=num_cpus, num_gpus=num_gpus,
                               finished_marker=finished_marker))
        with open(log_file, "a") as log:
            for line in LOG_LINES + (["Traceback: boom\n", "ValueError: bad\n"] if self.rc else []):
                log.write(line)
                if echo:
                    sys.stdout.write(line)
        if self.write_results:
            out = Path(run_config["output-dir"])
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text("{}")
        return self.rc


def test_job_hands_the_flattened_config_to_flower(tmp_path):
    cfg = compose(["method=not", "federation=tiny", "forget.ratio=0.5",
                   "federation.client_resources.num_gpus=0.5", "checkpoint_dir=ckpt",
                   "dataset=cifar10", "dataset.root=data"])
    fake, out = FakeLauncher(), io.StringIO()
    job = tmp_path / "job"
    assert runner.run_job(cfg, job, base_dir=tmp_path, launcher=fake, out=out, tag="[t]")
    call = fake.calls[0]
    rc = call["run_config"]
    assert rc["method"] == "not" and rc["forget.clients"] == "0,1"
    assert rc["output-dir"] == str(job.resolve())
    assert rc["checkpoint-dir"] == str(tmp_path / "ckpt")  # relative to where we started
    assert rc["dataset.root"] == str(tmp_path / "data")
    assert (call["num_supernodes"], call["num_cpus"], call["num_gpus"]) == (3, 1, 0.5)
    # A ServerApp that dies without its closing line fails the job, whatever flwr run says.
    assert call["finished_marker"].search("Results written to /x")
    saved = json.loads((job / runner.RUN_CONFIG_FILE).read_text())
    assert saved["run_config"] == rc and saved["federation"]["num_gpus"] == 0.5
    shown = out.getvalue()
    # Round lines and progress events drive the progress bar; they are not printed.
    assert "[t] [not] negated" in shown
    assert "round 2/2" not in shown and "fedunlearn-progress" not in shown
    assert "[measure] original" in shown and "Results written" in shown
    assert "aggregate_train" not in shown and "Starting Flower" not in shown
    assert "\x1b[" not in shown
    full = (job / runner.LOG_FILE).read_text()
    assert "aggregate_train" in full and "[pretrain] round 2/2" in full  # full log kept
    assert not (job / runner.ERROR_FILE).exists()


def test_failed_flower_run_writes_error_and_returns(tmp_path):
    cfg = compose(["method=retrain", "federation=tiny"])
    out = io.StringIO()
    job = tmp_path / "job"
    assert not runner.run_job(cfg, job, launcher=FakeLauncher(rc=1), out=out)
    error = (job / runner.ERROR_FILE).read_text()
    assert "exit code 1" in error and "ValueError: bad" in error  # tail of the log
    assert "FAILED" in out.getvalue() and "ValueError: bad" in out.getvalue()


def test_run_without_results_is_a_failure(tmp_path):
    cfg = compose(["federation=tiny"])
    job = tmp_path / "job"
    (job).mkdir()
    (job / "no-request.json").write_text("{}")
    assert not runner.run_job(cfg, job, launcher=FakeLauncher(write_results=False),
                              out=io.StringIO())
    assert "no valid unlearning request" in (job / runner.ERROR_FILE).read_text()


@pytest.mark.parametrize("override,match", [
    ("federation.batch_size=0", "federation.batch-size"),
    ("federation.partitioning=bogus", "federation.partitioning"),
    ("federation.num_supernodes=4", "num_supernodes"),
    ("federation.client_resources.num_cpus=0.5", "num_cpus"),
    ("service.rounds=5", "service mode (service.rounds > 0) serves with one method"),
])
def test_bad_config_fails_before_flower_starts(tmp_path, override, match):
    fake = FakeLauncher()
    job = tmp_path / "job"
    assert not runner.run_job(compose([override]), job, launcher=fake, out=io.StringIO())
    assert not fake.calls
    assert match in (job / runner.ERROR_FILE).read_text()


def test_a_service_mode_job_is_refused_by_the_sweep_runner_but_dry_runs(tmp_path):
    fake = FakeLauncher()
    cfg = compose(["method=not", "federation=tiny", "service.rounds=5"])
    assert not runner.run_job(cfg, tmp_path / "job", launcher=fake, out=io.StringIO())
    assert not fake.calls
    assert "service mode is a federation" in (tmp_path / "job" / runner.ERROR_FILE).read_text()
    assert runner.run_job(cfg, tmp_path / "dry", launcher=fake, out=io.StringIO(),
                          dry_run=True)
    written = json.loads((tmp_path / "dry" / runner.RUN_CONFIG_FILE).read_text())
    assert written["run_config"]["service.rounds"] == 5


def test_num_gpus_reaches_flowers_federation_config(tmp_path, monkeypatch):
    """The real flwr_run, with the flwr process faked: the command line it builds."""
    seen = {}

    class FakePopen:
        def __init__(self, cmd, env, **kwargs):
            seen["cmd"], seen["env"] = cmd, env
            out = Path(cmd[cmd.index("--run-config") + 1].split('output-dir="')[1].split('"')[0])
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text("{}")
            self.stdout = iter(["INFO :      [ft] round 1/1\n",
                                f"INFO :      Results written to {out}\n"])

        def wait(self):
            return 0

    monkeypatch.setattr(launch.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(launch, "superlink_pids", lambda port: [])
    cfg = compose(["method=ft", "federation=tiny", "federation.client_resources.num_gpus=0.25",
                   "federation.client_resources.num_cpus=2"])
    shown = io.StringIO()
    assert runner.run_job(cfg, tmp_path / "job", out=shown)
    # the job's console says Flower is starting (20-80 s before its first line)
    assert ("[j] starting Flower: a simulation of 3 SuperNodes (the first round follows" in
            shown.getvalue().replace("[job]", "[j]"))
    cmd = seen["cmd"]
    federation = cmd[cmd.index("--federation-config") + 1]
    assert federation == ("num-supernodes=3 client-resources-num-cpus=2 "
                          "client-resources-num-gpus=0.25")
    assert cmd[1:3] == ["run", str(launch.project_root())] and "--stream" in cmd
    assert 'method="ft"' in cmd[cmd.index("--run-config") + 1]
    # flwr run starts flower-superlink from PATH: this Python's bin dir is on it
    assert str(Path(sys.executable).parent) in seen["env"]["PATH"].split(os.pathsep)
    # each job gets its own SuperLink ports
    assert seen["env"]["FLWR_LOCAL_CONTROL_API_PORT"] != seen["env"]["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]


def test_phase_filter_verbose_passes_everything():
    out = io.StringIO()
    filt = runner.PhaseFilter(out, "[j]", ("[not]",), verbose=True)
    filt.write("a\nb")
    filt.write("c\n")
    assert out.getvalue() == "a\nbc\n"
    out = io.StringIO()
    filt = runner.PhaseFilter(out, "[j]", ("[not]",))
    filt.write("\x1b[91mERROR \x1b[0m:     ServerApp crashed\nINFO :   noise\n")
    assert "ServerApp crashed" in out.getvalue() and "noise" not in out.getvalue()


def test_method_comma_list_outside_multirun():
    assert runner.rewrite_method_list(["x", "method=retrain,not", "seed=1"]) == [
        "x", "method=compare", "method.name='retrain,not'", "seed=1"]
    argv = ["x", "-m", "method=retrain,not"]
    assert runner.rewrite_method_list(argv) == argv
    assert runner.rewrite_method_list(["x", "method=not"]) == ["x", "method=not"]


def test_sweep_size():
    assert runner.sweep_size(["p", "-m", "method=retrain,ft,not", "forget.ratio=0.1,0.5,0.9",
                              "seed=0,1,2", "hydra.sweep.dir=/tmp/x"]) == 27
    assert runner.sweep_size(["p", "-m", "seed=range(0,4)", "method=ft"]) == 4
    assert runner.sweep_size(["p", "method=ft"]) == 1


def test_hydra_sweep_goes_on_after_failed_jobs(tmp_path):
    """A real multirun (no Flower started: both configs are invalid): every job runs, each
    failure is recorded in its job dir, and the command exits 1."""
    env = dict(os.environ, HYDRA_FULL_ERROR="1", FLWR_HOME=str(tmp_path / "flwr"))
    proc = subprocess.run(
        [sys.executable, "-m", "fedunlearn.experiment", "-m", "federation.batch_size=0,-1",
         "federation=tiny", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = sorted((tmp_path / "sweep").rglob(runner.ERROR_FILE))
    assert len(errors) == 2
    assert "=== job 1/2, 1 after this one" in proc.stdout
    assert "=== job 2/2, 0 after this one" in proc.stdout
    assert "2 job(s) failed" in proc.stdout
    assert all("federation.batch-size" in e.read_text() for e in errors)


def test_dry_run_writes_the_run_config_and_starts_nothing(tmp_path):
    fake, out = FakeLauncher(), io.StringIO()
    cfg = compose(["method=not", "forget.ratio=0.5", "dry_run=true"])
    assert runner.run_job(cfg, tmp_path / "job", dry_run=True, launcher=fake, out=out)
    assert not fake.calls
    saved = json.loads((tmp_path / "job" / runner.RUN_CONFIG_FILE).read_text())
    assert saved["run_config"]["forget.clients"] == "0,1,2,3,4"
    arg = saved["run_config_arg"]
    assert 'method="not"' in arg and 'forget.clients="0,1,2,3,4"' in arg and "seed=0" in arg
    assert arg in out.getvalue()


def test_results_from_an_earlier_run_do_not_count(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    old = job / "results.json"
    old.write_text("{}")
    os.utime(old, (1_000_000, 1_000_000))
    assert not runner.run_job(compose(["federation=tiny"]), job,
                              launcher=FakeLauncher(write_results=False), out=io.StringIO())
    assert "without writing results.json" in (job / runner.ERROR_FILE).read_text()


def test_a_job_on_the_in_process_engine(tmp_path):
    """``engine=local``: the runner's job runs in this process (no flwr run), with its
    results, log and closing lines as under Flower."""
    cfg = compose(["method=ft", "federation=tiny", "engine=local", "dataset=synthetic",
                   f"checkpoint_dir={tmp_path / 'ck'}", "eval.mia_max_members=40"])
    assert runner.launcher_for(cfg.engine) is not launch.flwr_run
    out = io.StringIO()
    assert runner.run_job(cfg, tmp_path / "job", base_dir=tmp_path, out=out,
                          launcher=runner.launcher_for(cfg.engine))
    res = json.loads((tmp_path / "job" / "ft" / "results.json").read_text())
    assert res["method"] == "ft" and res["cost"]["rounds"] == 1
    assert "Results written to" in (tmp_path / "job" / runner.LOG_FILE).read_text()
    with pytest.raises(ValueError, match="engine='ray'; choose from"):
        runner.launcher_for("ray")


def test_batch_clients_reaches_the_in_process_engine(tmp_path):
    """``engine=local batch_clients=N``: the job trains its rounds in the batched mode
    (its log counts the batched messages); with engine=flower it is refused."""
    cfg = compose(["method=ft", "federation=tiny", "engine=local", "batch_clients=4",
                   "dataset=synthetic", f"checkpoint_dir={tmp_path / 'ck'}",
                   "eval.mia_max_members=40"])
    assert runner.run_job(cfg, tmp_path / "job", base_dir=tmp_path, out=io.StringIO(),
                          launcher=runner.launcher_for(cfg.engine, cfg.batch_clients))
    log = (tmp_path / "job" / runner.LOG_FILE).read_text()
    batched = re.search(r"batched engine: (\d+) of \d+ messages trained batched", log)
    assert batched and int(batched.group(1)) > 0
    with pytest.raises(ValueError, match="batch_clients=4 is the in-process engine's"):
        runner.launcher_for("flower", 4)
    with pytest.raises(ValueError, match="batch_clients=-1"):
        runner.launcher_for("local", -1)
