"""Resume after SIGKILL of the driver at each phase: the resumed run ends with exactly the rows of an
uninterrupted run (per-problem seeds and seeded training make the two comparable row for row)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from helpers import NETNS, SMALL, assert_same_run, demo, rows, tracebacks

pytestmark = pytest.mark.slow


@pytest.fixture
def reference(small_reference_run):
    return small_reference_run


# mstep-run-iter_001/checkpoint: in the middle of the M-step, once Ray Train has registered a checkpoint; the
# next run's M-step continues from it (Ray Train's run snapshot) and must still end with the reference's weights
# byte for byte. 1/improve: after that M-step ended (its Ray Train storage removed), before its commit: the next
# run finds the finished checkpoint and commits it without training again.
# manifest:1/select: mid-commit (select's files written, the new manifest fsynced as manifest.json.tmp, not yet
# renamed over the old one): the state of a kill just before the commit, plus a stray .tmp; on select, not on
# the M-step, so the resume redoes a cheap phase (1/improve is the kill before a commit on the M-step).
CRASH_POINTS = ["1/generate/shard", "manifest:1/select", "mstep-run-iter_001/checkpoint", "1/improve", "1/eval"]
EVERY_STEP = ["--set", "training.checkpoint_every_steps=2"]  # checkpoints only: the weights do not depend on it


# 16 problems per shard: 4 shards of the 64 train problems, so 3 are left for the resumed E-step's two replicas
# (shard size does not change the samples; it is held fixed across the resumes, as a result-changing key)
SHARDS = ["--set", "sampling.prompts_per_request=16"]
# The first run samples on one replica and grades on one verifier; every resume runs on a bigger cluster (#18
# item 5): two of each, in a local Ray of 4 CPUs. Accepted without --force: samples are seeded per problem and
# sample, not per replica, so the resumed run must still end with the one-replica reference's rows.
ONE = ["--set", "sampling.num_replicas=1", "--set", "verification.num_workers=1"]
TWO = ["--set", "sampling.num_replicas=2", "--set", "verification.num_workers=2", "--set", "ray.num_cpus=4"]


def engine_calls(trace):
    """Every engine call a run's replicas made (RESTEM_TRACE): problem ids, samples per problem, replica pid."""
    return [c for c in map(json.loads, trace.read_text().splitlines()) if c["call"] == "generate"] \
        if trace.exists() else []


def test_sigkill_at_every_phase_then_resume_matches_uninterrupted_run(tmp_path, reference, monkeypatch):
    """One run SIGKILLed at each crash point in turn (each resume dies at the next point), then resumed
    to the end: the same rows, weights and scores as the uninterrupted reference. The replicas record their
    engine calls (RESTEM_TRACE), so the resumed E-step is seen to sample only the shards not on disk, on both
    of the resumed run's replicas."""
    out = tmp_path / "run"
    done: dict = {}
    for i, crash_at in enumerate(CRASH_POINTS):
        trace = tmp_path / f"engine-calls-{i}.jsonl"
        monkeypatch.setenv("RESTEM_TRACE", str(trace))
        rc, log = demo(out, *(["--resume", *TWO] if i else ONE), *SHARDS, *EVERY_STEP, crash_at=crash_at)
        assert rc == -signal.SIGKILL, f"{crash_at}: " + log[-4000:]
        if crash_at == "1/generate/shard":  # killed once the first finished shard was written
            (kept_shard,) = (out / "iter_001" / "samples").glob("part-*.parquet")
            on_disk = set(pq.read_table(kept_shard)["id"].to_pylist())
            kept_stat = kept_shard.stat()
        if i and CRASH_POINTS[i - 1] == "1/generate/shard":
            # the resumed E-step sampled each train problem of the missing shard(s) once, none of the shard on
            # disk, and left that shard's file alone (this run's only engine calls: 0/eval was done)
            assert "changed config" not in log and not tracebacks(log)  # the resize needed no --force
            cfg = yaml.safe_load((out / "config.yaml").read_text())
            assert cfg["sampling"]["num_replicas"] == 2 and cfg["verification"]["num_workers"] == 2
            calls = engine_calls(trace)
            train = set(pq.read_table(reference / "iter_001" / "samples")["id"].to_pylist())
            sampled = [pid for c in calls for pid in c["ids"]]
            assert calls and all(c["n"] == 8 for c in calls) and set(sampled) <= train, calls
            assert sorted(sampled) == sorted(train - on_disk)
            assert len({c["pid"] for c in calls}) == 2, calls  # both replicas sampled
            assert kept_shard.stat().st_mtime_ns == kept_stat.st_mtime_ns and kept_shard.stat().st_ino == kept_stat.st_ino
        if i and CRASH_POINTS[i - 1] == "1/improve":
            assert "already holds its finished checkpoint" in log, log[-4000:]  # committed, not trained again
        now = json.loads((out / "manifest.json").read_text())["completed"]
        assert "1/eval" not in now
        for k in done:  # phases finished before this crash were not redone
            assert now[k] == done[k], (crash_at, k)
        done = now

    rc, log = demo(out, "--resume", *TWO, *SHARDS, *EVERY_STEP)
    assert rc == 0, log[-4000:]
    (improve,) = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                  if m["phase"] == "improve"]
    assert 0 < improve["resumed_from_step"] < improve["steps"]  # the committed M-step was a resumed one
    final = json.loads((out / "manifest.json").read_text())["completed"]
    assert set(final) == {"0/eval", "1/generate", "1/select", "1/improve", "1/eval"}
    for k in done:
        assert final[k] == done[k]

    assert_same_run(out, reference)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted((m["iteration"], m["phase"], m.get("split", "")) for m in lines) == sorted(
        (m["iteration"], m["phase"], m.get("split", ""))
        for m in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines()))
    assert not list(out.rglob("*.tmp"))  # no half-written file left behind


ADAPTIVE = ["--set", "sampling.adaptive=true", "--set", "sampling.round_size=2"]  # up to 4 rounds of K=8


def test_adaptive_e_step_killed_mid_round_resumes_to_the_planned_subset_of_fixed_k(tmp_path, reference, monkeypatch):
    """An adaptive E-step SIGKILLed once a shard of its second round is written, then resumed: it samples only
    what is not on disk, and ends with exactly the rows the round planner picks when fed the fixed-K
    reference's own samples (same seeds: adaptive draws a subset of fixed-K's samples), every row once."""
    from restem_ray.adaptive import RoundPlanner

    out, samples = tmp_path / "run", tmp_path / "run" / "iter_001" / "samples"
    rc, log = demo(out, *ADAPTIVE, crash_at="1/generate/part-r002-00000")
    assert rc == -signal.SIGKILL, log[-4000:]
    first = {p.name for p in samples.glob("part-*.parquet")}
    assert {"part-r001-00000.parquet", "part-r001-00001.parquet", "part-r002-00000.parquet"} <= first
    assert first <= {"part-r001-00000.parquet", "part-r001-00001.parquet", "part-r002-00000.parquet",
                     "part-r002-00001.parquet"}
    on_disk = {(r["id"], r["sample_index"]) for p in first for r in pq.read_table(samples / p).to_pylist()}

    trace = tmp_path / "engine-calls.jsonl"
    monkeypatch.setenv("RESTEM_TRACE", str(trace))
    rc, log = demo(out, "--resume", *ADAPTIVE, "--stop-after", "1/generate")
    assert rc == 0, log[-4000:]
    resampled = [(pid, off + i) for c in map(json.loads, trace.read_text().splitlines()) if c["call"] == "generate"
                 and c["draws"] is not None for pid, (off, n) in zip(c["ids"], c["draws"]) for i in range(n)]
    assert resampled and not set(resampled) & on_disk  # nothing on disk was sampled again

    ref = {(r["id"], r["sample_index"]): r for r in rows(reference / "iter_001" / "samples")}
    ids = sorted({pid for pid, _ in ref})
    planner = RoundPlanner(ids, round_size=2, max_per_problem=8, budget=8 * len(ids), cap=10)
    while draws := planner.next_round():
        planner.observe(draws, [ref[(d.id, i)] for d in draws for i in range(d.offset, d.offset + d.n)])
    expected = sorted(k for k in ref if k[0] in ids and k[1] < planner.problems[k[0]].drawn)
    got = rows(samples)
    assert [(r["id"], r["sample_index"]) for r in got] == expected  # every planned row, once
    assert got == [ref[k] for k in expected]  # and each is fixed-K's sample, graded the same
    assert len(got) < len(ref)  # the adaptive E-step drew fewer samples
    (line,) = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if m["phase"] == "generate"]
    assert line["samples"] == len(got) and line["rounds"] == planner.rounds >= 3
    assert line["problems_with_kept"] == len({r["id"] for r in got if r["reward"] >= 1 and r["finish_reason"] != "length"})


def test_resume_refuses_changed_config_unless_safe_or_forced(tmp_path, reference):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out, symlinks=True)
    rc, log = demo(out, "--resume", "--set", "sampling.temperature=0.5")
    assert rc == 2 and "sampling.temperature: 1.0 -> 0.5" in log
    assert not tracebacks(log)
    assert (out / "config.yaml").read_text() == (reference / "config.yaml").read_text()


HEAD_RESTART = Path(__file__).with_name("head_restart_demo.sh")


def test_a_killed_head_then_resume_on_a_new_head_matches_an_uninterrupted_run(tmp_path, reference):
    """The Ray head of a two-node cluster dies mid-run (after the E-step, sampled by one replica on each node, is
    committed, while the M-step is placed or running): the driver loses its cluster and exits non-zero, nothing
    committed is damaged, and the retry on a fresh one-node head, a Ray job submitted through jobs/submit.py with
    --auto-resume (as a RayJob retries), succeeds, streams its logs, and ends with exactly the one-node reference
    run's rows, weights and scores (samples do not depend on where or on how many replicas they are drawn)."""
    out = tmp_path / "run"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONUNBUFFERED="1")
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # that switch forbids `ray start` clusters
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([*NETNS, "bash", str(HEAD_RESTART), str(out), "1/select", *SMALL], capture_output=True,
                       text=True, env=env, timeout=1500)
    first = Path(f"{out}.first.log").read_text() if Path(f"{out}.first.log").exists() else ""
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + first[-3000:]
    assert "first driver exit code: 0" not in r.stdout
    retry = r.stdout[r.stdout.rfind("first driver exit code"):]
    assert "SUBMIT_EXIT=0" in retry and not tracebacks(retry)  # the resumed run is clean
    assert "[restem] done" in retry  # the job's own output, streamed through the submitter
    assert '"status": "SUCCEEDED"' in r.stderr
    final = json.loads((out / "manifest.json").read_text())["completed"]
    assert set(final) == {"0/eval", "1/generate", "1/select", "1/improve", "1/eval"}
    assert (out / "report.png").is_file()
    estep = next(m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if m["phase"] == "generate")
    assert len(set(estep["replica_nodes"])) == 2, estep["replica_nodes"]  # STRICT_SPREAD: one replica per node
    assert_same_run(out, reference)
