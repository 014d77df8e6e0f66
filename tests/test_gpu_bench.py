"""bench/gpu_mstep.py, the GPU check, as a CPU smoke test: it must run end to end here so that the one GPU
call a session gets is not spent on a broken script, and its reference must train on the same batches."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_bench_compares_mstep_with_plain_deepspeed_on_the_same_batches(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_mstep.py"), "--cpu-smoke", "--steps", "4",
                        "--variants", "plain,padded,zero3,compiled,zero3full", "--step-times", "--profile", "padded",
                        "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, TMPDIR=str(scratch)))
    assert p.returncode == 0, p.stderr[-3000:]
    # the bench's folder (model, data, every variant's checkpoint: GB each on a GPU) is gone; torch may keep
    # its compile cache beside it
    assert not list(scratch.glob("gpu-mstep-*")), list(scratch.iterdir())
    r = json.loads((tmp_path / "gpu_mstep.json").read_text())
    plain, padded, zero3, compiled = (r["variants"][v] for v in ("plain", "padded", "zero3", "compiled"))
    # the same batches: the same tokens, and from the same initial weights the same training, step for step
    assert plain["steps"] == padded["steps"] == zero3["steps"] == compiled["steps"] == 4
    assert plain["real_tokens"] == padded["real_tokens"] == zero3["real_tokens"] == compiled["real_tokens"]
    # the plain loop's batch widths are recorded (the sizing test reads the widest), and its step times
    assert len(plain["widths"]) == 4 and [w for w, _ in plain["step_times"]] == plain["widths"]
    # the second half (steps 3-4) timed on its own: the plain loop by its step marks, the M-step by its step lines
    assert r["steady_from_step"] == 3
    # --profile: the steps before the second half, their busiest ops (on CPU: CPU time)
    prof = padded["profile"]
    assert prof["steps"] == [1, 1] and "profile" not in plain and prof["device_busy_seconds"] > 0  # before step 3
    assert any(op["name"] == "aten::mm" and op["calls"] > 0 for op in prof["top_ops"]), prof
    for x in (plain, padded, zero3, compiled):
        assert 0 < x["steady_tokens_per_s"] and x["steady_mfu"] is not None, x  # MFU rounds to 0 at CPU shapes
    # the M-step's step lines (one per step at 4 steps) are kept: the first holds any compile
    assert [s for s, _ in compiled["line_tokens_per_s"]] == [1, 2, 3, 4] and "line_tokens_per_s" not in plain
    assert set(r["versions"]) == {"torch", "cuda", "transformers", "deepspeed"}
    # on CPU the reference drops the mask as the M-step does, so the same batches give the same loss exactly
    # (ZeRO-3 partitions its reductions differently: close, not equal)
    assert plain["loss"] == padded["loss"] and abs(plain["loss"] - zero3["loss"]) < 1e-2
    # the correctness check of the 7B job's path: ZeRO-3, checkpointing, 2 micro-batches a step, validation every 2
    # steps (random prompts grade 0: early stopping, patience 2, ends at step 6 and keeps step 2), bf16 weights
    full = r["variants"]["zero3full"]
    assert (full["steps"], full["best_step"], full["valid_reward"], full["checkpoint_dtype"]) == (6, 2, 0.0, "bfloat16")
    assert abs(plain["loss"] - compiled["loss"]) < 1e-2  # compiled kernels round bf16 in another order
    assert padded["checkpoint_dtype"] == zero3["checkpoint_dtype"] == "bfloat16"
    assert r["padded_ratio"] == padded["ratio_to_plain"] > 0
    table = [line for line in p.stdout.splitlines() if line.startswith("| restem-ray ZeRO-2, padded")]
    assert table and f"| {padded['ratio_to_plain']} |" in table[0]


def test_gpu_bench_keeps_to_its_deadline_and_writes_what_it_has(tmp_path):
    """The device call has a hard limit: past --deadline-s no variant starts, each is reported as not finished
    in the JSON (written after every variant), and the exit code says the check is incomplete."""
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_mstep.py"), "--cpu-smoke", "--steps", "2",
                        "--variants", "plain,padded", "--deadline-s", "0", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]
    r = json.loads((tmp_path / "gpu_mstep.json").read_text())
    assert {v: x["error"] for v, x in r["variants"].items()} == {
        "plain": "not finished within --deadline-s 0", "padded": "not finished within --deadline-s 0"}
    assert r["padded_ratio"] is None


def test_gpu_bench_refuses_liger_on_cpu_before_building_anything(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_mstep.py"), "--cpu-smoke", "--variants",
                        "plain,padded,fused", "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.strip() == (
        "--variants liger, fused, lean: Liger's kernels are Triton GPU kernels (not with --cpu-smoke)")
    assert not list(tmp_path.iterdir())
