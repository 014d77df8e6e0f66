"""The GPU sizing arithmetic, the example GPU jobs and the README's table agree."""
import json
import re
from pathlib import Path

import pytest

from restem_ray.config import load_config
from restem_ray.sizing import SHAPES, Shape, host_gib_per_rank, mstep_gib_per_gpu

ROOT = Path(__file__).resolve().parent.parent
JOBS = {"gsm8k-qwen-0.5b.yaml": "0.5B", "gsm8k-qwen-7b.yaml": "7B"}
README_ROWS = [("0.5B", 1, 2, 16, 1024, False, 1), ("0.5B", 8, 2, 16, 1024, False, 1),  # (the 0.5B job and its
               ("1.5B", 8, 2, 16, 1024, False, 1), ("1.5B", 8, 2, 16, 1024, True, 1),  # 1.5B example, which cite them)
               ("1.5B", 8, 2, 8, 1024, False, 1),
               ("1.5B", 8, 2, 8, 1024, True, 1), ("7B", 8, 2, 4, 2048, True, 4), ("7B", 8, 3, 4, 2048, True, 4),
               ("7B", 8, 2, 8, 1024, False, 1)]


def readme_row(name, gpus, zero, micro, seq, ckpt, accum) -> str:
    r = mstep_gib_per_gpu(SHAPES[name], gpus=gpus, zero_stage=zero, micro_batch=micro, seq_len=seq,
                          gradient_checkpointing=ckpt, grad_accum=accum)
    return (f"| {name} | {gpus} | {zero} | {micro} x {seq} | {accum} | {'yes' if ckpt else 'no'} | "
            f"{r['model_states']:.1f} | "
            f"{r['activations']:.1f} | {r['logits']:.1f} | **{r['total']:.1f}** | "
            f"{host_gib_per_rank(SHAPES[name], zero_stage=zero, gpus=gpus):.1f} |")


def measured_peaks():
    """(micro-batch, tokens, measured GiB, estimated GiB) for the 0.5B shape, ZeRO-2 on one H200: 16 x 1024
    tokens, 55.5 GiB (plain DeepSpeed, docs/measurements.md), and the M-step in bench/gpu_mstep.py, whose
    widest micro-batch is the peak (plain and padded train on the same batches)."""
    r = json.loads((ROOT / "bench" / "results" / "gpu_mstep-60steps.json").read_text())
    widest = max(width for width, _ in r["variants"]["plain"]["step_times"])
    return [(micro, seq, measured, mstep_gib_per_gpu(SHAPES["0.5B"], gpus=1, zero_stage=2, micro_batch=micro,
                                                     seq_len=seq, gradient_checkpointing=False)["total"])
            for micro, seq, measured in ((16, 1024, 55.5),
                                         (r["micro_batch"], widest, r["variants"]["padded"]["peak_memory_gib"]))]


def test_estimate_matches_the_measured_h200_runs():
    for micro, seq, measured, est in measured_peaks():
        assert abs(est / measured - 1) <= 0.03, (micro, seq, est, measured)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("hidden,intermediate,heads,kv_heads", [(64, 160, 4, 2), (96, 256, 6, 6)])
def test_activation_bytes_are_what_a_transformers_decoder_layer_saves_for_backward(arch, hidden, intermediate,
                                                                                    heads, kv_heads):
    """Counted with autograd's saved-tensor hooks on CPU (the same Python layer runs on GPUs), one layer as the
    difference between a 3-layer and a 1-layer model, bf16, SDPA."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokens = 2 * 48

    def saved_bytes(layers):
        config, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
        cfg = config(vocab_size=300, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                     attn_implementation="sdpa")
        model = model_cls(cfg).to(torch.bfloat16)
        weights = {p.data_ptr() for p in model.parameters()}
        saved = {}

        def pack(t):
            if t.data_ptr() not in weights:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(3, 300, (2, tokens // 2))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids, use_cache=False)
        return sum(saved.values())

    shape = Shape(0, hidden, 1, 300, heads=heads, kv_heads=kv_heads, intermediate=intermediate)
    assert saved_bytes(3) - saved_bytes(1) == 2 * tokens * shape.saved_bytes_per_token_per_layer()


@pytest.mark.parametrize("job", JOBS)
def test_example_gpu_jobs_fit_80_gb_gpus_with_a_fifth_to_spare(job):
    cfg = load_config(ROOT / "jobs" / job)
    t = cfg.training
    est = mstep_gib_per_gpu(SHAPES[JOBS[job]], gpus=t.num_workers, zero_stage=t.zero_stage,
                            micro_batch=t.micro_batch_size, seq_len=t.max_seq_len,
                            gradient_checkpointing=t.gradient_checkpointing, grad_accum=t.grad_accum)
    assert t.dtype == "bf16" and t.use_gpu
    assert est["total"] * 1.2 <= 80 * 1e9 / 2**30, est
    cited = [line for line in (ROOT / "jobs" / job).read_text().splitlines() if "README \"GPU sizing\"" in line]
    assert cited and all(f"**{g}**" in (ROOT / "README.md").read_text() for line in cited
                         for g in re.findall(r"(\d+\.\d) GiB per GPU", line)), cited  # (the table holds them)
    # a node's host RAM holds every rank's copy while the model loads (8 ranks per node)
    assert 8 * host_gib_per_rank(SHAPES[JOBS[job]], zero_stage=t.zero_stage, gpus=t.num_workers) <= 64


def test_readme_gpu_sizing_table_is_the_arithmetic():
    readme = (ROOT / "README.md").read_text()
    for row in README_ROWS:
        assert readme_row(*row) in readme, readme_row(*row)
    (_, _, small, est_small), (micro, widest, peak, est_peak) = measured_peaks()
    big = mstep_gib_per_gpu(SHAPES["7B"], gpus=8, zero_stage=2, micro_batch=8, seq_len=1024,
                            gradient_checkpointing=False)["total"]
    text = " ".join(readme.split())
    for quote in (f"within {100 * max(abs(est_small / small - 1), abs(est_peak / peak - 1)):.1f}% of both H200 "
                  f"measurements", f"{small} GiB for 16 x 1024 tokens (estimate {est_small:.1f})",
                  f"{peak} GiB for the M-step's widest batch", f"{micro} x {widest} (estimate {est_peak:.1f})",
                  f"need {big:.1f} GiB per GPU, more than an 80 GB GPU holds"):
        assert quote in text, quote
    assert big > 80 * 1e9 / 2**30
    job = load_config(ROOT / "jobs" / "gsm8k-qwen-7b.yaml").training  # what checkpointing saves there
    acts = [mstep_gib_per_gpu(SHAPES["7B"], gpus=job.num_workers, zero_stage=job.zero_stage,
                              micro_batch=job.micro_batch_size, seq_len=job.max_seq_len,
                              gradient_checkpointing=ckpt)["activations"] for ckpt in (False, True)]
    assert job.gradient_checkpointing and f"held {acts[0]:.1f} GiB of activations per GPU instead of {acts[1]:.1f}" in text


def test_the_small_recipes_own_examples_fit_and_the_readme_says_what_it_would_need_for_7b():
    """The 0.5B job's header suggests a 1.5B model: with its own --set lines it fits 80 GB GPUs with a fifth to
    spare (without gradient checkpointing it needed 77.4 GiB); the README's figure for the recipe at 7B is the
    recipe's arithmetic (it quoted the 8 x 1024 row's 88.7 for the recipe's 16 x 1024)."""
    import re
    import shlex

    job = ROOT / "jobs" / "gsm8k-qwen-0.5b.yaml"
    header = "".join(line[1:] for line in job.read_text().splitlines(keepends=True) if line.startswith("#"))
    example = re.search(r"\n\s*(--set model\.base=\S*1\.5B\S*.*?)(?:\n\s*[^-\s]|\Z)", header, re.S).group(1)
    words = shlex.split(example)
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    t = load_config(job, sets).training
    est = mstep_gib_per_gpu(SHAPES["1.5B"], gpus=t.num_workers, zero_stage=t.zero_stage,
                            micro_batch=t.micro_batch_size, seq_len=t.max_seq_len,
                            gradient_checkpointing=t.gradient_checkpointing, grad_accum=t.grad_accum)
    assert est["total"] * 1.2 <= 80 * 1e9 / 2**30, est
    assert f"{est['total']:.1f} GiB per GPU" in header
    t = load_config(job).training
    big = mstep_gib_per_gpu(SHAPES["7B"], gpus=t.num_workers, zero_stage=t.zero_stage,
                            micro_batch=t.micro_batch_size, seq_len=t.max_seq_len,
                            gradient_checkpointing=t.gradient_checkpointing, grad_accum=t.grad_accum)
    text = " ".join((ROOT / "README.md").read_text().split())
    assert f"the 0.5B recipe's ZeRO-2 would need {big['total']:.1f} GiB per GPU for 7B" in text


QWEN_CONFIGS = {  # the fields of the released config.json files the arithmetic reads
    "0.5B": dict(hidden_size=896, num_hidden_layers=24, vocab_size=151936, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True),
    "7B": dict(hidden_size=3584, num_hidden_layers=28, vocab_size=152064, num_attention_heads=28,
               num_key_value_heads=4, intermediate_size=18944, tie_word_embeddings=False)}


def test_check_says_what_the_m_step_needs_per_gpu_from_the_model_s_config():
    """`check` and a run's start print the M-step's per-GPU estimate for the base model's shape, and warn where an
    80 GB GPU would not hold it with a fifth to spare: before, a 7B model under the 0.5B recipe passed `check` and
    ran out of memory at the first M-step, after a whole E-step."""
    from restem_ray.sizing import mstep_memory_note

    for name, config in QWEN_CONFIGS.items():  # parameters counted from config.json, within 0.5% of the released
        assert abs(Shape.from_config(config).params / SHAPES[name].params - 1) < 0.005
    job = load_config(ROOT / "jobs" / "gsm8k-qwen-0.5b.yaml").training
    small = mstep_memory_note(job, QWEN_CONFIGS["0.5B"])
    est = mstep_gib_per_gpu(SHAPES["0.5B"], gpus=8, zero_stage=2, micro_batch=16, seq_len=1024,
                            gradient_checkpointing=False)["total"]
    assert f"): {est:.1f} GiB (model states" in small and "80 GB" not in small
    big = mstep_memory_note(job, QWEN_CONFIGS["7B"])
    assert "more than an 80 GB GPU holds with the allocator's share: set training.gradient_checkpointing" in big
    fitted = load_config(ROOT / "jobs" / "gsm8k-qwen-7b.yaml").training
    assert "80 GB" not in mstep_memory_note(fitted, QWEN_CONFIGS["7B"])
    # where the arithmetic does not apply: CPU training, LoRA, a mixture of experts
    assert mstep_memory_note(job.model_copy(update={"use_gpu": False}), QWEN_CONFIGS["7B"]) is None
    assert mstep_memory_note(job.model_copy(update={"lora_rank": 8}), QWEN_CONFIGS["7B"]) is None
    assert mstep_memory_note(job, {**QWEN_CONFIGS["7B"], "num_experts": 64}) is None
    assert mstep_memory_note(job.model_copy(update={"offload_optimizer": True}), QWEN_CONFIGS["7B"]) is None
    # sizes that are no sizes (zero heads, infinity, a huge integer, text, a boolean) give no estimate, no traceback
    for bad in ({"num_attention_heads": 0}, {"hidden_size": float("inf")}, {"vocab_size": 10**400},
                {"head_dim": 0}, {"hidden_size": True}, {"hidden_size": "896"}, {"intermediate_size": None}):
        assert mstep_memory_note(job, {**QWEN_CONFIGS["7B"], **bad}) is None, bad
    assert mstep_memory_note(job, [1, 2]) is None
    # a config.json that leaves tie_word_embeddings out takes its model type's default (Gemma's: tied)
    untold = {k: v for k, v in QWEN_CONFIGS["0.5B"].items() if k != "tie_word_embeddings"}
    assert Shape.from_config(untold, tied_by_default=True).params == Shape.from_config(QWEN_CONFIGS["0.5B"]).params
    assert Shape.from_config(untold).params > Shape.from_config(QWEN_CONFIGS["0.5B"]).params
