"""The GPU sizing arithmetic, the example GPU jobs and the README's table agree."""
from pathlib import Path

import pytest

from restem_ray.config import load_config
from restem_ray.sizing import SHAPES, host_gib_per_rank, mstep_gib_per_gpu

ROOT = Path(__file__).resolve().parent.parent
JOBS = {"gsm8k-qwen-0.5b.yaml": "0.5B", "gsm8k-qwen-7b.yaml": "7B"}
README_ROWS = [("0.5B", 1, 2, 16, 1024, False), ("1.5B", 8, 2, 8, 1024, False), ("1.5B", 8, 2, 8, 1024, True),
               ("7B", 8, 2, 4, 2048, True), ("7B", 8, 3, 4, 2048, True), ("7B", 8, 2, 8, 1024, False)]


def readme_row(name, gpus, zero, micro, seq, ckpt) -> str:
    r = mstep_gib_per_gpu(SHAPES[name], gpus=gpus, zero_stage=zero, micro_batch=micro, seq_len=seq,
                          gradient_checkpointing=ckpt)
    return (f"| {name} | {gpus} | {zero} | {micro} x {seq} | {'yes' if ckpt else 'no'} | {r['model_states']:.1f} | "
            f"{r['activations']:.1f} | {r['logits']:.1f} | **{r['total']:.1f}** | "
            f"{host_gib_per_rank(SHAPES[name], zero_stage=zero, gpus=gpus):.1f} |")


def test_estimate_matches_the_measured_h200_run_within_the_stated_margin():
    """shared/reference/gpu.md: 0.5B, micro-batch 16 x 1024, one H200: 51.8 GiB (plain torch)."""
    est = mstep_gib_per_gpu(SHAPES["0.5B"], gpus=1, zero_stage=2, micro_batch=16, seq_len=1024,
                            gradient_checkpointing=False)["total"]
    assert est <= 51.8 <= est * 1.2


@pytest.mark.parametrize("job", JOBS)
def test_example_gpu_jobs_fit_80_gb_gpus_with_a_fifth_to_spare(job):
    cfg = load_config(ROOT / "jobs" / job)
    t = cfg.training
    est = mstep_gib_per_gpu(SHAPES[JOBS[job]], gpus=t.num_workers, zero_stage=t.zero_stage,
                            micro_batch=t.micro_batch_size, seq_len=t.max_seq_len,
                            gradient_checkpointing=t.gradient_checkpointing)
    assert t.dtype == "bf16" and t.use_gpu
    assert est["total"] * 1.2 <= 80 * 1e9 / 2**30, est
    # a node's host RAM holds every rank's copy while the model loads (8 ranks per node)
    assert 8 * host_gib_per_rank(SHAPES[JOBS[job]], zero_stage=t.zero_stage, gpus=t.num_workers) <= 64


def test_readme_gpu_sizing_table_is_the_arithmetic():
    readme = (ROOT / "README.md").read_text()
    for row in README_ROWS:
        assert readme_row(*row) in readme, readme_row(*row)
