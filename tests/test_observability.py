"""TensorBoard view of the metrics: each committed phase line becomes scalars at step = iteration."""
import json
import struct
import sys

import pytest
from tensorboardX.proto import event_pb2

from restem_ray.observability import MetricsSink, scalars
from restem_ray.storage import RunDir


def read_scalars(logdir):
    """Parse TensorBoard event files (TFRecord framing) into {tag: {step: value}}."""
    out = {}
    for f in sorted(logdir.glob("events.out.tfevents.*")):
        data = f.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            ev = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, {})[ev.step] = v.simple_value
    return out


def test_committed_phases_become_tensorboard_scalars(tmp_path):
    run = RunDir(tmp_path / "run", sink=None)
    run.create("a: 1\n", resume=False)
    run.sink = MetricsSink(run.root, tensorboard=True)
    run.complete(0, "eval", [{"split": "valid", "pass@1": 0.25, "problems": 8, "model": "m"},
                             {"split": "test", "pass@1": 0.5, "problems": 8}])
    run.complete(1, "generate", [{"samples": 64, "accept_rate": 0.5, "replica_nodes": ["n1"],
                                  "verdicts": {"passed": 32, "wrong_answer": 30, "verifier_error:KeyError": 2}}])
    run.complete(1, "eval", [{"split": "valid", "pass@1": 0.75, "problems": 8}])
    run.complete("control", "eval", [{"split": "valid", "pass@1": 0.3, "arm": "control"}])
    run.sink.close()
    tags = read_scalars(run.root / "tensorboard")
    assert tags["eval/valid/pass_at_1"] == {0: 0.25, 1: 0.75}
    assert tags["eval/test/pass_at_1"] == {0: 0.5}
    assert tags["generate/samples"] == {1: 64.0}
    assert {t: v for t, v in tags.items() if t.startswith("generate/verdicts/")} == {
        "generate/verdicts/passed": {1: 32.0}, "generate/verdicts/wrong_answer": {1: 30.0},
        "generate/verdicts/verifier_error_KeyError": {1: 2.0}}
    assert tags["control/eval/valid/pass_at_1"] == {0: 0.30000001192092896}
    assert not any("model" in t or "replica_nodes" in t for t in tags)


def test_scalars_keep_numbers_only():
    assert scalars(2, "improve", {"loss": 0.5, "init": "base", "ok": True, "steps": 10}) == \
        {"improve/loss": 0.5, "improve/steps": 10.0}


# ---------------------------------------------------------------- the M-step's live step lines, W&B, MLflow
def step_line(step, loss):
    return {"step": step, "total_steps": 4, "loss": loss, "lr": 1e-3 * step, "grad_norm": 0.5 + step,
            "tokens": 100 * step, "tokens_per_s": 10.0 * step, "time": 1.0 + step}


def wandb_runs(wandb_dir) -> dict[str, list]:
    """The records of each offline W&B run under `wandb_dir`, read from its run-ID.wandb file (W&B's
    LevelDB-style log: 32 KiB blocks of records with a 7-byte header, crc32 + length + type, each a
    protobuf `Record`), keyed by run directory name."""
    import wandb
    from wandb.proto import wandb_internal_pb2 as pb

    wandb.teardown()  # W&B's service process writes the file: its last records are on disk once it has ended
    runs = {}
    for f in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, records, pos, part = f.read_bytes(), [], 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
            part += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE/LAST
                records.append(pb.Record.FromString(part))
                part = b""
        runs[f.parent.name] = records
    return runs


def wandb_history(records) -> list[dict]:
    rows = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]  # less W&B's own _step etc.


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """An MLflow file store's URI (MLflow 3 keeps file stores behind MLFLOW_ALLOW_FILE_STORE), with no run an
    earlier test left active in this process (MLflow's active run is process-wide)."""
    import mlflow

    while mlflow.active_run():
        mlflow.end_run()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return f"file://{tmp_path / 'mlruns'}"


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    wandb.teardown()  # W&B reads its environment once per process: start from this test's
    yield tmp_path / "wb"
    wandb.teardown()


def test_step_lines_reach_metrics_jsonl_tensorboard_and_wandb(tmp_path, wandb_offline):
    run = RunDir(tmp_path / "run")
    run.create("a: 1\n", resume=False)
    run.sink = MetricsSink(run.root, tensorboard=True, wandb_project="restem-test", config={"training": {"lr": 1e-3}})
    run.log_steps(1, [], restart=True)                      # a fresh M-step: nothing from a checkpoint
    run.log_steps(1, [step_line(2, 1.5)])
    run.log_steps(1, [step_line(4, 1.25)])
    run.complete(1, "improve", [{"loss": 1.25, "steps": 4}])
    run.log_steps("control", [], restart=True)
    run.log_steps("control", [step_line(2, 2.0)])
    run.sink.close()

    steps = [m for m in run.metrics() if m["phase"] == "improve_step"]
    assert [(m["iteration"], m["step"], m["loss"], m["time"]) for m in steps] == \
        [(1, 2, 1.5, 3.0), (1, 4, 1.25, 5.0), ("control", 2, 2.0, 3.0)]
    tags = read_scalars(run.root / "tensorboard")
    assert tags["improve_step/iter_001/loss"] == {2: 1.5, 4: 1.25}
    assert tags["improve_step/iter_001/grad_norm"] == {2: 2.5, 4: 4.5}
    assert tags["improve_step/iter_001/tokens_per_s"] == {2: 20.0, 4: 40.0}
    assert tags["control/improve_step/loss"] == {2: 2.0}
    assert tags["improve/loss"] == {1: 1.25}
    assert not any(t.endswith(("/step", "/total_steps", "/time")) for t in tags)

    (records,) = wandb_runs(wandb_offline).values()
    history = wandb_history(records)
    assert [h["improve_step/iter_001/loss"] for h in history if "improve_step/iter_001/loss" in h] == [1.5, 1.25]
    assert [h["improve_step/iter_001/step"] for h in history if "improve_step/iter_001/lr" in h] == [2, 4]
    assert {"improve/loss": 1.25, "improve/steps": 4, "iteration": 1} in history
    assert {"control/improve_step/loss", "control/improve_step/step"} <= set(history[-1])
    # each curve is drawn against its own x-axis: the optimizer step of that M-step, or the iteration
    axes = {r.metric.name: r.metric.step_metric for r in records if r.WhichOneof("record_type") == "metric"}
    assert axes["improve_step/iter_001/loss"] == "improve_step/iter_001/step"
    assert axes["improve/loss"] == "iteration"
    config = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for u in r.config.update}
    assert config["training"] == {"lr": 1e-3}


def test_resumed_run_continues_the_same_wandb_run(tmp_path, wandb_offline):
    run = RunDir(tmp_path / "run")
    run.create("a: 1\n", resume=False)
    run.sink = MetricsSink(run.root, tensorboard=False, wandb_project="restem-test")
    run.complete(0, "eval", [{"split": "valid", "pass@1": 0.25}])
    run.sink.close()
    first = json.loads((run.root / "tracking.json").read_text())["wandb"]["id"]

    resumed = RunDir(tmp_path / "run")
    resumed.create("a: 1\n", resume=True)
    resumed.sink = MetricsSink(resumed.root, tensorboard=False, wandb_project="restem-test")
    resumed.complete(1, "eval", [{"split": "valid", "pass@1": 0.5}])
    resumed.sink.close()

    assert json.loads((run.root / "tracking.json").read_text())["wandb"]["id"] == first
    runs = list(wandb_runs(wandb_offline).values())
    assert len(runs) == 2  # offline, each driver writes its own files; `wandb sync` appends both to one run
    assert [[r.run.run_id for r in records if r.WhichOneof("record_type") == "run"] for records in runs] == \
        [[first], [first]]
    assert [h["eval/valid/pass_at_1"] for records in runs for h in wandb_history(records)] == [0.25, 0.5]


def test_step_lines_of_an_unfinished_m_step_are_replaced_by_the_resumed_one(tmp_path):
    """Resume keeps the step lines of committed M-steps; an M-step that resumes from its checkpoint sends the
    lines that checkpoint holds, which replace its earlier ones (lines the killed driver never received
    included), then continues: each step appears once."""
    run = RunDir(tmp_path / "run")
    run.create("a: 1\n", resume=False)
    run.log_steps(1, [step_line(2, 1.5), step_line(4, 1.25)])
    run.complete(1, "improve", [{"loss": 1.25}])
    run.log_steps(2, [step_line(2, 3.0), step_line(4, 2.5), step_line(6, 2.0)])  # killed after step 6
    with open(run.metrics_path, "a") as f:
        f.write('{"phase": "improve_st')  # torn by the kill
    run = RunDir(tmp_path / "run")
    run.create("a: 1\n", resume=True)
    assert [(m["iteration"], m["step"]) for m in run.metrics() if m["phase"] == "improve_step"] == [(1, 2), (1, 4)]
    run.log_steps(2, [step_line(2, 3.0), step_line(4, 2.5)], restart=True)  # its checkpoint: step 4
    run.log_steps(2, [step_line(6, 2.1)])
    assert [(m["iteration"], m["step"], m["loss"]) for m in run.metrics() if m["phase"] == "improve_step"] == \
        [(1, 2, 1.5), (1, 4, 1.25), (2, 2, 3.0), (2, 4, 2.5), (2, 6, 2.1)]
    assert [m["phase"] for m in run.metrics()].count("improve") == 1


class Recorder:
    """A dashboard that keeps every point it is sent, as MLflow and W&B do (a point cannot be taken back)."""

    def __init__(self):
        self.points = []

    def log(self, iteration, phase, lines):
        self.points += [(iteration, line["step"]) for line in lines if phase == "improve_step"]


def test_dashboards_get_each_step_once_across_a_restarted_worker_group_and_a_resumed_driver(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create("a: 1\n", resume=False)
    run.sink = first = Recorder()
    run.log_steps(1, [], restart=True)
    run.log_steps(1, [step_line(2, 3.0), step_line(4, 2.5), step_line(6, 2.0)])
    run.log_steps(1, [step_line(2, 3.0), step_line(4, 2.5)], restart=True)  # a new worker group, from step 4
    run.log_steps(1, [step_line(6, 2.0), step_line(8, 1.5)])  # step 6 again, then new: the driver is killed
    run = RunDir(tmp_path / "run")
    run.create("a: 1\n", resume=True)
    run.sink = second = Recorder()
    run.log_steps(1, [step_line(2, 3.0), step_line(4, 2.5)], restart=True)  # the checkpoint: step 4 again
    run.log_steps(1, [step_line(6, 2.0), step_line(8, 1.5), step_line(10, 1.0)])
    run.complete(1, "improve", [{"loss": 1.0}])
    run.log_steps(2, [], restart=True)  # the next M-step has curves of its own
    run.log_steps(2, [step_line(2, 3.0)])
    assert first.points + second.points == [(1, 2), (1, 4), (1, 6), (1, 8), (1, 10), (2, 2)]
    assert [m["step"] for m in run.metrics() if m["phase"] == "improve_step"] == [2, 4, 6, 8, 10, 2]


def test_mlflow_gets_step_lines_and_a_resumed_run_continues_its_mlflow_run(tmp_path, monkeypatch, mlflow_store):
    import mlflow  # mlflow-skinny, in the test extra

    uri = mlflow_store  # a file store, not a server (servers are what users point at)
    ids = []
    for resume in (False, True):
        run = RunDir(tmp_path / "run")
        run.create("a: 1\n", resume=resume)
        run.sink = MetricsSink(run.root, tensorboard=False, mlflow_uri=uri)
        run.log_steps(1 + resume, [step_line(2, 1.5 + resume)])
        run.sink.close()
        ids.append(json.loads((run.root / "tracking.json").read_text())["mlflow"]["run_id"])
    assert ids[0] == ids[1]
    client = mlflow.tracking.MlflowClient(uri)
    assert [(m.step, m.value) for m in client.get_metric_history(ids[0], "improve_step/iter_001/loss")] == [(2, 1.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(ids[0], "improve_step/iter_002/loss")] == [(2, 2.5)]
    # the run deleted on the server since: a resume logs to a new run, with a warning, instead of refusing
    client.delete_run(ids[0])
    run = RunDir(tmp_path / "run")
    run.create("a: 1\n", resume=True)
    run.sink = MetricsSink(run.root, tensorboard=False, mlflow_uri=uri)
    run.sink.close()
    assert json.loads((run.root / "tracking.json").read_text())["mlflow"]["run_id"] != ids[0]


def test_step_lines_from_another_thread_reach_the_runs_mlflow_run_and_one_failing_sink_spares_the_others(
        tmp_path, monkeypatch, capsys, mlflow_store):
    """The M-step's live step lines arrive on the StepReceiver's thread: MLflow's active run is per thread, so
    logged by the active run they started a stray run of their own. A dashboard that fails (MLflow down) must not
    keep the others from their lines, nor fail the run when it cannot close."""
    import threading

    import mlflow

    uri = mlflow_store
    run = RunDir(tmp_path / "run")
    run.create("a: 1\n", resume=False)
    run.sink = MetricsSink(run.root, tensorboard=True, mlflow_uri=uri)
    t = threading.Thread(target=run.log_steps, args=(1, [step_line(2, 1.5)]))
    t.start()
    t.join()
    rid = json.loads((run.root / "tracking.json").read_text())["mlflow"]["run_id"]
    client = mlflow.tracking.MlflowClient(uri)
    assert [(m.step, m.value) for m in client.get_metric_history(rid, "improve_step/iter_001/loss")] == [(2, 1.5)]
    assert len(client.search_runs([client.get_run(rid).info.experiment_id])) == 1  # no stray run
    sink = run.sink

    calls = []

    def down(*a, **k):
        calls.append(1)
        raise ConnectionError("http://alice:s3cret@mlflow:5000/api: refused")
    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", down)
    monkeypatch.setattr(sink._mlflow, "end_run", down)
    run.complete(1, "eval", [{"split": "valid", "pass@1": 0.5}, {"split": "test", "pass@1": 0.25}])
    out = capsys.readouterr().out
    assert "the dashboards did not take the 1/eval lines (RuntimeError: MLflow: ConnectionError" in out
    assert list((run.root / "tensorboard").glob("events.*")) and run.done(1, "eval")  # TensorBoard has them
    assert len(calls) == 1  # one request for the commit's points
    # a server that failed is left alone a while: the M-step's hundreds of step lines cost no request each
    run.log_steps(2, [step_line(s, 1.0) for s in range(1, 4)])
    run.complete(2, "eval", [{"split": "valid", "pass@1": 0.5}])
    assert len(calls) == 1
    assert "did not take the 2/eval lines (RuntimeError: MLflow: RuntimeError: not sent: a request failed within the last 10 " \
           "minutes)" in capsys.readouterr().out
    sink.close()  # a warning, not an exception
    assert "MLflow did not close its run (ConnectionError" in capsys.readouterr().out


def test_mlflow_names_runs_ends_and_experiments(tmp_path, monkeypatch, capsys, mlflow_store):
    """An eval split named with characters MLflow refuses ("gsm8k(hard)") is logged under a cleaned name with the
    others (it lost the whole commit's points); a run resumed into another experiment logs to a new MLflow run
    (MLflow refused to continue the old one there, and the resume exited 2); a run stopped by an error ends its
    MLflow run FAILED."""
    import mlflow

    uri = mlflow_store
    run = RunDir(tmp_path / "run")
    run.create("a: 1\n", resume=False)
    run.sink = MetricsSink(run.root, tensorboard=False, mlflow_uri=uri, mlflow_experiment="exp-a")
    run.complete(0, "eval", [{"split": "gsm8k(hard)+x", "pass@1": 0.5}, {"split": "valid", "pass@1": 0.25},
                             {"split": "hard/", "pass@1": 0.125}, {"split": "../up", "pass@1": 0.0}])
    first = json.loads((run.root / "tracking.json").read_text())["mlflow"]["run_id"]
    client = mlflow.tracking.MlflowClient(uri)
    assert set(client.get_run(first).data.metrics) == {"eval/gsm8k_hard__x/pass_at_1", "eval/valid/pass_at_1",
                                                       "eval/hard/pass_at_1", "eval/up/pass_at_1"}
    # a name the server refuses (too long) costs only itself, and pauses nothing: the server is up
    run.complete(1, "eval", [{"split": "x" * 300, "pass@1": 0.5}, {"split": "valid", "pass@1": 0.75}])
    assert "MLflow refused 1 of 2 metrics" in capsys.readouterr().out
    run.complete(2, "generate", [{"accept_rate": 0.5}])
    assert [m.value for m in client.get_metric_history(first, "eval/valid/pass_at_1")] == [0.25, 0.75]
    assert client.get_metric_history(first, "generate/accept_rate")[0].value == 0.5
    # the run deleted on the server meanwhile (MLflow says so with the same code as a refused name): a pause, not
    # a request per metric at every line
    client.delete_run(first)
    run.complete(3, "eval", [{"split": "valid", "pass@1": 0.5}, {"split": "test", "pass@1": 0.5}])
    assert "lifecycle_stage" in capsys.readouterr().out
    run.complete(4, "eval", [{"split": "valid", "pass@1": 0.5}])
    assert "not sent: a request failed within the last 10 minutes" in capsys.readouterr().out
    client.restore_run(first)
    run.sink.close(failed=True)
    assert client.get_run(first).info.status == "FAILED"
    resumed = RunDir(tmp_path / "run")
    resumed.create("a: 1\n", resume=True)
    resumed.sink = MetricsSink(resumed.root, tensorboard=False, mlflow_uri=uri, mlflow_experiment="exp-b")
    resumed.sink.close()
    second = json.loads((run.root / "tracking.json").read_text())["mlflow"]["run_id"]
    assert second != first and client.get_run(second).info.status == "FINISHED"
    assert client.get_experiment(client.get_run(second).info.experiment_id).name == "exp-b"
    assert "the run logs to a new one" in capsys.readouterr().out


def test_a_configured_dashboard_without_its_package_is_one_line(tmp_path, monkeypatch):
    from restem_ray.config import ObservabilityConfig
    from restem_ray.errors import UserError
    from restem_ray.observability import check_sinks

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(UserError, match=r"^observability.wandb_project is set but wandb is not installed \(pip install "
                                        r"'restem-ray\[dashboards\]', or wandb\)$"):
        check_sinks(ObservabilityConfig(wandb_project="p"))
    with pytest.raises(UserError, match="wandb is not installed"):
        MetricsSink(tmp_path, tensorboard=False, wandb_project="p")
    check_sinks(ObservabilityConfig())


def test_an_mlflow_server_that_does_not_answer_fails_before_the_run_is_written(tmp_path, monkeypatch):
    """check_sinks (run by `check` and the driver before the run directory is written) asks the tracking
    server once: a refused port, or a store MLflow refuses, is one line naming the key, in seconds."""
    import socket
    import time

    from restem_ray.config import ObservabilityConfig
    from restem_ray.errors import UserError
    from restem_ray.observability import check_sinks

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(UserError, match=rf"^observability.mlflow_tracking_uri: http://127.0.0.1:{port}: "
                                        r"MlflowException: API request to .* failed"):
        check_sinks(ObservabilityConfig(mlflow_tracking_uri=f"http://127.0.0.1:{port}", tensorboard=False))
    assert time.monotonic() - start < 30  # not MLflow's default seven retries with back-off
    with pytest.raises(UserError) as e:  # the message (a terminal, a CI log) never shows a password the URI has
        check_sinks(ObservabilityConfig(mlflow_tracking_uri=f"http://alice:s3cret@127.0.0.1:{port}", tensorboard=False))
    assert "s3cret" not in str(e.value) and f"http://127.0.0.1:{port}" in str(e.value)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    store = f"file://{tmp_path / 'mlruns'}"
    with pytest.raises(UserError, match=r"^observability.mlflow_tracking_uri: file://.*: MlflowException: The "
                                        r"filesystem tracking backend"):
        check_sinks(ObservabilityConfig(mlflow_tracking_uri=store, tensorboard=False))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_sinks(ObservabilityConfig(mlflow_tracking_uri=store, tensorboard=False))
    assert not (tmp_path / "mlruns").exists()  # a check writes nothing: the store its request made is gone


# ---------------------------------------------------------------- what a dashboard missed is sent later
def scalar_events(logdir) -> dict[str, list]:
    """Every TensorBoard scalar event as {tag: [step, ...]} (sorted), duplicates kept (read_scalars keeps the last)."""
    out = {}
    for f in sorted(logdir.glob("events.out.tfevents.*")):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i: i + 8])
            ev = event_pb2.Event.FromString(data[i + 12: i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append(ev.step)
    return {tag: sorted(steps) for tag, steps in out.items()}


def mlflow_steps(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


KILLED_AFTER_COMMIT = """
import sys
from restem_ray.observability import MetricsSink
from restem_ray.storage import RunDir
run = RunDir(sys.argv[1])
run.create("a: 1\\n", resume=False)
run.sink = MetricsSink(run.root, tensorboard=True, mlflow_uri=sys.argv[2])
run.complete(0, "eval", [{"split": "valid", "pass@1": 0.25}])
run.log_steps(1, [], restart=True)
run.log_steps(1, [step_line(1, 2.0), step_line(2, 1.5)])
run.complete(1, "improve", [{"loss": 1.5, "steps": 2}])  # RESTEM_CRASH_AT=committed:1/improve: SIGKILL
"""


def test_a_phase_committed_by_a_driver_killed_before_its_send_reaches_the_dashboards_on_resume(
        tmp_path, monkeypatch, mlflow_store):
    """A driver SIGKILLed between a commit and the dashboards' copy: before, the phase never reached them (the
    resume skips committed phases). Now the resume sends it, once, and not the step lines that went live."""
    import inspect
    import os
    import subprocess

    import mlflow

    uri = mlflow_store
    script = "def step_line(step, loss):\n" + "\n".join(inspect.getsource(step_line).splitlines()[1:]) + \
        KILLED_AFTER_COMMIT
    env = {**os.environ, "RESTEM_CRASH_AT": "committed:1/improve"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run"), uri], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr[-2000:]
    run = RunDir(tmp_path / "run")
    run.create("a: 1\n", resume=True)
    assert run.done(1, "improve")
    rid = json.loads((run.root / "tracking.json").read_text())["mlflow"]["run_id"]
    client = mlflow.tracking.MlflowClient(uri)
    assert client.get_metric_history(rid, "improve/loss") == []  # the kill came first
    run.sink = MetricsSink(run.root, tensorboard=True, mlflow_uri=uri, committed=run.manifest()["completed"])
    run.catch_up()
    run.complete(1, "eval", [{"split": "valid", "pass@1": 0.5}])
    run.sink.close()
    assert mlflow_steps(client, rid, "improve/loss") == [(1, 1.5)]
    assert mlflow_steps(client, rid, "eval/valid/pass_at_1") == [(0, 0.25), (1, 0.5)]
    assert mlflow_steps(client, rid, "improve_step/iter_001/loss") == [(1, 2.0), (2, 1.5)]  # once: they went live
    events = scalar_events(run.root / "tensorboard")
    assert events["improve/loss"] == [1] and events["eval/valid/pass_at_1"] == [0, 1]
    # (live step lines go to TensorBoard asynchronously: the kill may have cost some, never sent twice)
    steps = events.get("improve_step/iter_001/loss", [])
    assert len(steps) == len(set(steps)) and set(steps) <= {1, 2}
    sent = json.loads((run.root / "tracking.json").read_text())
    assert {"0/eval", "1/improve", "1/improve_step", "1/eval"} <= set(sent["mlflow"]["sent"]) \
        == set(sent["tensorboard"]["sent"])


def test_phases_a_server_did_not_take_are_sent_at_the_next_commit_after_its_pause(
        tmp_path, monkeypatch, capsys, mlflow_store):
    """An MLflow server down for a while: before, the phases committed meanwhile were missing from its run for
    good (metrics.jsonl only). Now the first commit after the pause sends them too, each once; TensorBoard, which
    took them, gets none again."""
    import mlflow

    from restem_ray import observability

    uri = mlflow_store
    run = RunDir(tmp_path / "run")
    run.create("a: 1\n", resume=False)
    run.sink = MetricsSink(run.root, tensorboard=True, mlflow_uri=uri)
    run.complete(0, "eval", [{"split": "valid", "pass@1": 0.25}])
    real = mlflow.MlflowClient.log_batch

    def down(*a, **k):
        raise ConnectionError("refused")
    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", down)
    run.complete(1, "generate", [{"accept_rate": 0.5}])
    run.complete(1, "eval", [{"split": "valid", "pass@1": 0.5}])  # paused: no request, the same warning
    assert capsys.readouterr().out.count("did not take") == 2
    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", real)  # the server is back ...
    run.complete(2, "generate", [{"accept_rate": 0.75}])  # ... but the pause is not over: still nothing
    assert "did not take the 2/generate lines (RuntimeError: MLflow: RuntimeError: not sent" in capsys.readouterr().out
    monkeypatch.setattr(run.sink, "_mlflow_down_until", 0.0)  # (the pause ends)
    run.complete(2, "eval", [{"split": "valid", "pass@1": 0.625}])
    assert "did not take" not in capsys.readouterr().out
    rid = json.loads((run.root / "tracking.json").read_text())["mlflow"]["run_id"]
    client = mlflow.tracking.MlflowClient(uri)
    assert sorted(mlflow_steps(client, rid, "eval/valid/pass_at_1")) == [(0, 0.25), (1, 0.5), (2, 0.625)]
    assert sorted(mlflow_steps(client, rid, "generate/accept_rate")) == [(1, 0.5), (2, 0.75)]
    run.sink.close()
    assert scalar_events(run.root / "tensorboard")["eval/valid/pass_at_1"] == [0, 1, 2]
    assert observability.MLFLOW_PAUSE_S == 600.0


def test_a_dashboard_new_to_a_resumed_run_gets_its_history_and_a_record_of_an_earlier_version_sends_nothing_again(
        tmp_path, monkeypatch, mlflow_store):
    """MLflow configured on resume (or its run deleted there): the new MLflow run gets every committed phase and
    the committed M-steps' step lines, and the checkpoint's lines of the M-step in progress; TensorBoard, which
    had them, gets nothing twice. A tracking.json written before records of what was sent is taken as all sent."""
    import mlflow

    uri = mlflow_store
    run = RunDir(tmp_path / "run")
    run.create("a: 1\n", resume=False)
    run.sink = MetricsSink(run.root, tensorboard=True)
    run.complete(0, "eval", [{"split": "valid", "pass@1": 0.25}])
    run.log_steps(1, [], restart=True)
    run.log_steps(1, [step_line(1, 2.0), step_line(2, 1.5)])
    run.complete(1, "improve", [{"loss": 1.5}])
    run.log_steps(2, [], restart=True)
    run.log_steps(2, [step_line(1, 3.0)])  # the driver is killed in iteration 2's M-step
    run.sink.close()

    run = RunDir(tmp_path / "run")
    run.create("a: 1\n", resume=True)
    run.sink = MetricsSink(run.root, tensorboard=True, mlflow_uri=uri, committed=run.manifest()["completed"])
    run.catch_up()
    run.log_steps(2, [step_line(1, 3.0)], restart=True)  # the resumed M-step, from its checkpoint
    run.log_steps(2, [step_line(2, 2.5)])
    run.complete(2, "improve", [{"loss": 2.5}])
    run.sink.close()
    rid = json.loads((run.root / "tracking.json").read_text())["mlflow"]["run_id"]
    client = mlflow.tracking.MlflowClient(uri)
    assert mlflow_steps(client, rid, "eval/valid/pass_at_1") == [(0, 0.25)]
    assert sorted(mlflow_steps(client, rid, "improve/loss")) == [(1, 1.5), (2, 2.5)]
    assert mlflow_steps(client, rid, "improve_step/iter_001/loss") == [(1, 2.0), (2, 1.5)]
    assert mlflow_steps(client, rid, "improve_step/iter_002/loss") == [(1, 3.0), (2, 2.5)]
    events = scalar_events(run.root / "tensorboard")
    assert events["eval/valid/pass_at_1"] == [0] and events["improve/loss"] == [1, 2]
    assert events["improve_step/iter_001/loss"] == [1, 2] and events["improve_step/iter_002/loss"] == [1, 2]

    # an earlier version's record: ids only. Its dashboards are taken to have every committed phase.
    (run.root / "tracking.json").write_text(json.dumps({"mlflow": {"run_id": rid, "tracking_uri": uri,
                                                                   "experiment": "restem-ray"}}))
    run = RunDir(tmp_path / "run")
    run.create("a: 1\n", resume=True)
    run.sink = MetricsSink(run.root, tensorboard=True, mlflow_uri=uri, committed=run.manifest()["completed"])
    run.catch_up()
    run.complete(2, "eval", [{"split": "valid", "pass@1": 0.5}])
    run.sink.close()
    assert json.loads((run.root / "tracking.json").read_text())["mlflow"]["run_id"] == rid
    assert mlflow_steps(client, rid, "eval/valid/pass_at_1") == [(0, 0.25), (2, 0.5)]
    assert sorted(mlflow_steps(client, rid, "improve/loss")) == [(1, 1.5), (2, 2.5)]
    events = scalar_events(run.root / "tensorboard")
    assert events["eval/valid/pass_at_1"] == [0, 2] and events["improve/loss"] == [1, 2]


def test_an_online_wandb_run_without_credentials_fails_before_the_run_is_written(tmp_path, monkeypatch):
    """W&B online with no API key where the driver runs: before, `wandb.init` failed after the run directory was
    written; now `check` and the driver's start say so in one line. A `wandb login` (.netrc), WANDB_API_KEY or
    offline mode passes; a malformed key is named."""
    wandb = pytest.importorskip("wandb")
    from restem_ray.config import ObservabilityConfig
    from restem_ray.errors import UserError
    from restem_ray.observability import check_sinks

    for k in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", "https://api.wandb.ai")
    wandb.teardown()
    try:
        with pytest.raises(UserError, match=r"^observability.wandb_project: no W&B credentials for https://api.wandb.ai "
                                            r"here \(set WANDB_API_KEY or run `wandb login`"):
            check_sinks(ObservabilityConfig(wandb_project="p"))
        check_sinks(ObservabilityConfig(wandb_project="p", wandb_mode="offline"))
        monkeypatch.setenv("WANDB_MODE", "disabled")
        check_sinks(ObservabilityConfig(wandb_project="p"))
        monkeypatch.delenv("WANDB_MODE")
        (tmp_path / "netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {'a1' * 20}\n")
        check_sinks(ObservabilityConfig(wandb_project="p"))  # what `wandb login` writes
        (tmp_path / "netrc").unlink()
        monkeypatch.setenv("WANDB_API_KEY", "not a key")
        with pytest.raises(UserError, match="W&B credentials for https://api.wandb.ai: AuthenticationError: "
                                            "WANDB_API_KEY invalid"):
            check_sinks(ObservabilityConfig(wandb_project="p"))
        monkeypatch.setenv("WANDB_API_KEY", "b2" * 20)
        check_sinks(ObservabilityConfig(wandb_project="p"))
    finally:
        wandb.teardown()


def test_on_a_uri_run_directory_the_dashboards_files_go_up_before_their_record(tmp_path):
    """The record of what TensorBoard took went up at once while its event file waited for the next commit's
    upload (hours later, after an E-step): a node lost meanwhile left a remote record saying "sent" for a phase the
    remote event files lacked, and the resume elsewhere never sent it."""
    from restem_ray.mirror import RunMirror

    uri = f"file://{tmp_path}/bucket/run"
    m = RunMirror(uri, cache=tmp_path / "node-a")
    m.prepare(resume=False, has_run=False)
    run = RunDir(m.local)
    run.mirror = m
    run.create("a: 1\n", resume=False)
    run.sink = MetricsSink(run.root, tensorboard=True)
    run.complete(0, "eval", [{"split": "valid", "pass@1": 0.25}])
    run.complete(1, "generate", [{"accept_rate": 0.5}])  # node-a is lost during the next phase: no more uploads
    remote = tmp_path / "bucket" / "run"
    assert set(json.loads((remote / "tracking.json").read_text())["tensorboard"]["sent"]) == {"0/eval", "1/generate"}
    assert scalar_events(remote / "tensorboard") == {"eval/valid/pass_at_1": [0], "generate/accept_rate": [1]}
    run.sink.close()
    m2 = RunMirror(uri, cache=tmp_path / "node-b")
    m2.prepare(resume=True, has_run=True)
    run = RunDir(m2.local)
    run.mirror = m2
    run.create("a: 1\n", resume=True)
    run.sink = MetricsSink(run.root, tensorboard=True, committed=run.manifest()["completed"])
    run.catch_up()
    run.complete(1, "select", [{"kept": 3}])
    run.sink.close()
    assert scalar_events(run.root / "tensorboard") == {"eval/valid/pass_at_1": [0], "generate/accept_rate": [1],
                                                       "select/kept": [1]}


def test_one_failing_dashboard_does_not_keep_another_from_catching_up(tmp_path, monkeypatch, capsys, mlflow_store):
    """MLflow missed a phase, then came back; TensorBoard now fails at every commit (a full disk): MLflow's backlog
    still goes (before, any failing dashboard skipped the catch-up of all)."""
    import mlflow

    uri = mlflow_store
    run = RunDir(tmp_path / "run")
    run.create("a: 1\n", resume=False)
    run.sink = sink = MetricsSink(run.root, tensorboard=True, mlflow_uri=uri)
    real = mlflow.MlflowClient.log_batch

    def down(*a, **k):
        raise ConnectionError("refused")
    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", down)
    run.complete(0, "eval", [{"split": "valid", "pass@1": 0.25}])
    assert "did not take the 0/eval lines (RuntimeError: MLflow" in capsys.readouterr().out
    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", real)
    monkeypatch.setattr(sink, "_mlflow_down_until", 0.0)

    def full_disk(points):
        raise OSError("No space left on device")
    monkeypatch.setattr(sink, "_log_tb", full_disk)
    run.complete(1, "eval", [{"split": "valid", "pass@1": 0.5}])
    out = capsys.readouterr().out
    assert out.count("warning") == 1 and "did not take the 1/eval lines (RuntimeError: TensorBoard: OSError" in out
    rid = json.loads((run.root / "tracking.json").read_text())["mlflow"]["run_id"]
    client = mlflow.tracking.MlflowClient(uri)
    assert sorted(mlflow_steps(client, rid, "eval/valid/pass_at_1")) == [(0, 0.25), (1, 0.5)]
    assert sink.unsent(run.manifest()["completed"]) == {"tensorboard": ["1/eval"]}
    sink.close()


def test_a_phase_missed_at_a_runs_last_commit_is_sent_as_it_ends_or_named_with_how_to_send_it(
        tmp_path, monkeypatch, capsys, mlflow_store):
    """No commit follows a run's last one, whose catch-up would send what a dashboard missed there: a run that ended
    without an error tries once more (MLflow not within its pause after a failed request), and any run's end says
    what is still missing and how to send it. After an error it sends nothing (an upload or a request may be what
    failed). M-steps' step lines are counted apart from phases."""
    import mlflow

    run = RunDir(tmp_path / "run")
    run.create("a: 1\n", resume=False)
    run.sink = sink = MetricsSink(run.root, tensorboard=True, mlflow_uri=mlflow_store)
    real = mlflow.MlflowClient.log_batch

    def down(*a, **k):
        raise ConnectionError("refused")
    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", down)
    run.complete(0, "eval", [{"split": "valid", "pass@1": 0.25}])
    run.complete(1, "improve", [{"loss": 0.5}])
    run.complete(1, "eval", [{"split": "valid", "pass@1": 0.5}])
    capsys.readouterr()
    run.say_behind()  # still down, and paused: not asked again; named, with the way to send it, and no other line
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["[restem] warning: MLflow lacks 3 committed phase(s) and the step lines of 1 M-step(s); the next "
                   "--resume of this run directory sends them (on a finished run it does only that; metrics.jsonl "
                   "holds every line)"], out
    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", real)  # back, and its pause over
    monkeypatch.setattr(sink, "_mlflow_down_until", 0.0)
    run.say_behind(send=False)  # a run that stopped on an error: said, not sent
    assert "MLflow lacks 3 committed phase(s)" in capsys.readouterr().out
    run.say_behind()
    assert "lacks" not in capsys.readouterr().out
    rid = json.loads((run.root / "tracking.json").read_text())["mlflow"]["run_id"]
    assert sorted(mlflow_steps(mlflow.tracking.MlflowClient(mlflow_store), rid, "eval/valid/pass_at_1")) == [
        (0, 0.25), (1, 0.5)]
    run.say_behind()  # nothing behind: nothing said
    assert capsys.readouterr().out == ""
    sink.close()


def test_a_dashboard_new_to_a_resumed_m_step_gets_its_steps_trained_again(tmp_path, monkeypatch, mlflow_store):
    """Killed at step 3 with a checkpoint at step 1, resumed with MLflow added: steps 2 and 3 are trained again.
    TensorBoard had them and does not get them twice; MLflow, new, gets them (before: [1, 4])."""
    import mlflow

    uri = mlflow_store
    run = RunDir(tmp_path / "run")
    run.create("a: 1\n", resume=False)
    run.sink = MetricsSink(run.root, tensorboard=True)
    run.log_steps(1, [], restart=True)
    for s in (1, 2, 3):
        run.log_steps(1, [step_line(s, 4.0 - s)])
    run.sink.close()
    run = RunDir(tmp_path / "run")
    run.create("a: 1\n", resume=True)
    run.sink = MetricsSink(run.root, tensorboard=True, mlflow_uri=uri, committed=run.manifest()["completed"])
    run.catch_up()
    run.log_steps(1, [step_line(1, 3.0)], restart=True)  # the checkpoint's line
    for s in (2, 3, 4):
        run.log_steps(1, [step_line(s, 4.0 - s)])
    run.complete(1, "improve", [{"loss": 0.0}])
    run.sink.close()
    rid = json.loads((run.root / "tracking.json").read_text())["mlflow"]["run_id"]
    client = mlflow.tracking.MlflowClient(uri)
    assert [s for s, _ in mlflow_steps(client, rid, "improve_step/iter_001/loss")] == [1, 2, 3, 4]
    assert scalar_events(run.root / "tensorboard")["improve_step/iter_001/loss"] == [1, 2, 3, 4]


def test_a_damaged_tracking_json_is_one_line_and_a_failed_start_leaves_no_unrecorded_event_files(tmp_path, monkeypatch):
    import mlflow

    from restem_ray.errors import UserError

    run = RunDir(tmp_path / "run")
    run.create("a: 1\n", resume=False)
    for text, why in (("{", "not valid JSON"), ("[1]", "not a map of dashboards"),
                      ('{"mlflow": {"sent": [3]}}', "a 'sent' list that is not a list of phase keys")):
        (run.root / "tracking.json").write_text(text)
        with pytest.raises(UserError, match=f"tracking.json: {why}.*remove it"):
            MetricsSink(run.root, tensorboard=True)
    (run.root / "tracking.json").unlink()
    # MLflow's start fails after TensorBoard's was decided: no event file without a record of what it took (a
    # resume would read them as an earlier version's, which took every committed phase)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

    def refused(*a, **k):
        raise ConnectionError("refused")
    monkeypatch.setattr(mlflow, "set_experiment", refused)
    with pytest.raises(UserError, match="observability.mlflow_tracking_uri"):
        MetricsSink(run.root, tensorboard=True, mlflow_uri=f"file://{tmp_path / 'mlruns'}")
    assert not list((run.root / "tensorboard").glob("events.out.tfevents.*"))


def test_a_driver_whose_lease_is_taken_while_the_dashboards_catch_up_stops_there(tmp_path):
    """The push after a commit's dashboards (their files, then tracking.json) found the lease taken by another
    driver: it only warned, and the lease's own check had marked it lost, so the driver ran its next phase beside
    the one that took the run over. It stops there, as at a commit."""
    from restem_ray.errors import RunError
    from restem_ray.mirror import RunMirror

    uri = f"file://{tmp_path}/bucket/run"
    m = RunMirror(uri, cache=tmp_path / "node-a")
    m.check()
    m.hold()
    try:
        m.prepare(resume=False, has_run=False)
        run = RunDir(m.local)
        run.mirror = m
        run.create("a: 1\n", resume=False)
        run.sink = MetricsSink(run.root, tensorboard=True)
        send = run.sink.log
        lease = tmp_path / "bucket" / "run" / m.lease.path.rsplit("/", 1)[-1]

        def taken_meanwhile(*a):  # another driver takes the run while the dashboards are sent to (a slow MLflow)
            send(*a)
            lease.write_text(json.dumps({"owner": "other", "pid": 1, "host": "b"}))
        run.sink.log = taken_meanwhile
        with pytest.raises(RunError, match="another driver"):
            run.complete(0, "eval", [{"split": "valid", "pass@1": 0.25}])
        run.sink.close()
    finally:
        m.lease.release()


def test_a_run_logs_to_a_new_local_mlflow_store_its_start_made_and_check_leaves_none(tmp_path, monkeypatch):
    """`run` with a file:// MLflow store that did not exist yet: its start's check made the store and removed it
    again, and MLflow, which keeps the store it opened per URI, then failed the run's start ("... does not exist").
    A run's checks keep the store; `check` still leaves nothing behind."""
    import mlflow

    from restem_ray.config import ObservabilityConfig
    from restem_ray.observability import check_sinks

    while mlflow.active_run():  # (one an earlier test left open in this process)
        mlflow.end_run()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_sinks(ObservabilityConfig(mlflow_tracking_uri=f"file://{tmp_path}/checked"))
    assert not (tmp_path / "checked").exists()
    o = ObservabilityConfig(mlflow_tracking_uri=f"file://{tmp_path}/mlruns")
    check_sinks(o, keep_new_store=True)  # the CLI's check of a run's inputs
    check_sinks(o, keep_new_store=True)  # the driver's own
    run = RunDir(tmp_path / "run")
    run.create("a: 1\n", resume=False)
    run.sink = MetricsSink(run.root, tensorboard=False, mlflow_uri=o.mlflow_tracking_uri)
    run.complete(0, "eval", [{"split": "valid", "pass@1": 0.25}])
    run.sink.close()
    rid = json.loads((run.root / "tracking.json").read_text())["mlflow"]["run_id"]
    assert mlflow_steps(mlflow.tracking.MlflowClient(o.mlflow_tracking_uri), rid, "eval/valid/pass_at_1") == [(0, 0.25)]
