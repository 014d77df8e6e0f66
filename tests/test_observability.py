"""TensorBoard view of the metrics: each committed phase line becomes scalars at step = iteration."""
import struct

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
    run.complete(1, "generate", [{"samples": 64, "accept_rate": 0.5, "replica_nodes": ["n1"]}])
    run.complete(1, "eval", [{"split": "valid", "pass@1": 0.75, "problems": 8}])
    run.complete("control", "eval", [{"split": "valid", "pass@1": 0.3, "arm": "control"}])
    run.sink.close()
    tags = read_scalars(run.root / "tensorboard")
    assert tags["eval/valid/pass_at_1"] == {0: 0.25, 1: 0.75}
    assert tags["eval/test/pass_at_1"] == {0: 0.5}
    assert tags["generate/samples"] == {1: 64.0}
    assert tags["control/eval/valid/pass_at_1"] == {0: 0.30000001192092896}
    assert not any("model" in t or "replica_nodes" in t for t in tags)


def test_scalars_keep_numbers_only():
    assert scalars(2, "improve", {"loss": 0.5, "init": "base", "ok": True, "steps": 10}) == \
        {"improve/loss": 0.5, "improve/steps": 10.0}
