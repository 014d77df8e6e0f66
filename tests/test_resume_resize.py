"""`--resume` on a bigger cluster (#18 item 5): an E-step killed on one sampler replica and one verifier is resumed
without --force on two of each; both replicas draw, and the iteration's samples are exactly those of the
uninterrupted one-replica reference run (samples are seeded per problem and sample, not per replica)."""
import json
import signal

import pyarrow.parquet as pq
import pytest
import yaml
from helpers import demo

pytestmark = pytest.mark.slow

# 16 problems per shard: 4 shards of the 64 train problems, so 3 are left for the two replicas after the kill
# (shard size does not change the samples either; it is held fixed across the resume, as a result-changing key)
SHARDS = ["--set", "sampling.prompts_per_request=16"]


def samples(run):
    return sorted((r["id"], r["sample_index"], r["completion"], r["reward"])
                  for r in pq.read_table(run / "iter_001" / "samples").to_pylist())


def test_resume_with_more_replicas_and_verifiers_gives_the_same_samples(tmp_path, small_reference_run, monkeypatch):
    out = tmp_path / "run"
    rc, log = demo(out, *SHARDS, "--set", "sampling.num_replicas=1", "--set", "verification.num_workers=1",
                   crash_at="1/generate/shard")  # SIGKILLed once the E-step's first shard is written
    assert rc == -signal.SIGKILL, log[-4000:]
    (kept,) = (out / "iter_001" / "samples").glob("part-*.parquet")
    on_disk, kept_mtime = set(pq.read_table(kept)["id"].to_pylist()), kept.stat().st_mtime_ns

    trace = tmp_path / "engine-calls.jsonl"
    monkeypatch.setenv("RESTEM_TRACE", str(trace))
    rc, log = demo(out, "--resume", *SHARDS, "--set", "sampling.num_replicas=2", "--set", "verification.num_workers=2",
                   "--set", "ray.num_cpus=4", "--stop-after", "1/generate")  # room for both replicas
    assert rc == 0, log[-4000:]  # accepted without --force
    assert "changed config" not in log and "Traceback" not in log
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["sampling"]["num_replicas"] == 2 and cfg["verification"]["num_workers"] == 2
    calls = [c for c in map(json.loads, trace.read_text().splitlines()) if c["call"] == "generate"]
    assert len({c["pid"] for c in calls}) == 2, calls  # both replicas sampled
    train = {s[0] for s in samples(small_reference_run)}
    assert sorted(pid for c in calls for pid in c["ids"]) == sorted(train - on_disk)  # only what was missing
    assert kept.stat().st_mtime_ns == kept_mtime
    assert samples(out) == samples(small_reference_run)
