"""The M-step on one GPU: restem-ray's `MStep` (the loop Ray Train runs on every rank, driven here without
Ray) against a plain DeepSpeed ZeRO-2 loop on the same batches, in one run.

    bash bench/gpu_mstep.sh                        # the prepared device check (installs what it carries)
    python bench/gpu_mstep.py [--steps 60] [--variants plain,padded,lean,liger,zero3full] [--cudnn-attention]
                              [--step-times] [--profile padded,lean]   # --variants may add fused, compiled, zero3,
                                                                        # packed, unbucketed
    python bench/gpu_mstep.py --cpu-smoke          # tiny shapes on CPU: checks the script, not speed

Model: random-init Qwen2 of Qwen2.5-0.5B's shape (494M parameters, q/k/v biases, vocab 151,936, tied
embeddings), bf16: the architecture the example jobs train, and the one Liger's Qwen2 patches apply to.
Data: `--steps x --micro` rows of 256-1792 random tokens (a 32-token prompt, the rest completion), one
epoch, length-grouped into micro-batches exactly as the M-step plans them (`restem_ray.sft.plan_epoch`).
Each variant runs in a fresh process (its own CUDA context, DeepSpeed groups and compile caches) on the same model folder
and data file:
  plain       a hand-written DeepSpeed ZeRO-2 loop (bf16, torch fused AdamW, clipping 1.0) over the very
              batches `padded` trains on, without their attention mask as MStep: the reference
  padded      MStep, ZeRO-2, length-grouped padded micro-batches (widths rounded up to 64), sdpa
  compiled    padded with every decoder layer compiled (training.compile_layers: torch.compile, dynamic shapes)
  fused       compiled, and Liger's loss computed from the hidden states without materialising the logits
              (training.compile_layers + liger_kernel)
  lean        fused, and DeepSpeed's per-tensor inf/NaN pass before each bf16 step left out
              (training.deepspeed: {bf16: {check_grad_overflow: false}}; clipping's one host read per step stays)
  liger       padded with Liger's Triton kernels (training.liger_kernel: fused norms, RoPE, SwiGLU, and the loss
              without materialising the logits)
  packed      MStep, ZeRO-2, samples packed into rows of 4096 (flash_attention_2 when importable, else sdpa)
              (not in the default list: 0.98x padding under sdpa at 30 steps)
  zero3       MStep, ZeRO-3, padded (not in the default list: 0.677x plain at 30 steps, one GPU)
  zero3full   a correctness check of what the 7B example job runs, never yet on a GPU: ZeRO-3 with gradient
              checkpointing, 2 micro-batches a step (fp32 gradient sums), and validation (ZeRO-3's synced greedy
              decoding on CUDA, graded, every 2 steps; random prompts grade 0, so early stopping, patience 2,
              ends it at step 6 and keeps step 2); its speed is not comparable with the others
  unbucketed  MStep, ZeRO-2, padded to the exact longest row (pad_to_multiple_of 1): what bucketing buys
              (not in the default list: at 30 steps with cuDNN it ran as fast as padded)
Throughput counts real (non-padding) tokens over the training steps, first step included, on both sides. Every
new padded width costs kernel set-up (most of the ~25 widths come in the first 30 steps; `--step-times` records
the plain loop's per-step GPU times with CUDA events, no host syncs, to show it), and compiled layers pay their
compile in the first steps, so short runs measure warm-up more than a long M-step's steady state: the second
half of the steps is also timed on its own (`steady_tokens_per_s`, `steady_mfu`; the plain loop by CUDA events,
the M-step by its own step lines, `observability.log_every_steps`, every 5 of 60 steps, one host read each).
Both sides keep SDPA off cuDNN as the M-step does (`training.cudnn_attention`); `--cudnn-attention` lets both use it.
MFU = real tokens/s x (6 x params + 6 x layers x hidden x s) / peak bf16 FLOP/s (989 TFLOP/s: H100/H200 SXM
dense), s the token-weighted mean sample length (sum of squares over sum: a sample's attention work per token
grows with its length). The whole run keeps to --deadline-s (each variant's process gets what is left, and
the JSON is rewritten after every variant, so an overrun keeps what finished). Each variant's checkpoint
(DeepSpeed state and HF weights, ~8 GB at this shape) is deleted once read. Writes OUT/gpu_mstep.json (OUT:
$OUT or bench/results) and prints a table.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GPU_SHAPE = dict(vocab=151936, hidden=896, layers=24, heads=14, kv=2, ffn=4864)    # Qwen2-0.5B
CPU_SHAPE = dict(vocab=1000, hidden=64, layers=2, heads=2, kv=1, ffn=128)
VARIANTS = {
    "plain": {},
    "padded": {"zero_stage": 2},
    "compiled": {"zero_stage": 2, "compile_layers": True},
    "fused": {"zero_stage": 2, "compile_layers": True, "liger_kernel": True},
    # DeepSpeed 0.19 checks every gradient tensor for inf/NaN before each bf16 step (bf16.check_grad_overflow,
    # default true) and skips the step if one has any: a few kernels per tensor, for a guard bf16 without a loss
    # scale rarely needs (a NaN still shows in the step lines' gradient norm). Gradient clipping still reads the
    # norm's finiteness on the host once per step (DeepSpeed's is_invalid_grad_norm), with or without it.
    "lean": {"zero_stage": 2, "compile_layers": True, "liger_kernel": True,
             "deepspeed": {"bf16": {"check_grad_overflow": False}}},
    "liger": {"zero_stage": 2, "liger_kernel": True},
    "packed": {"zero_stage": 2, "packing": True, "pack_length": 4096},
    "zero3": {"zero_stage": 3},
    "zero3full": {"zero_stage": 3, "gradient_checkpointing": True, "grad_accum": 2, "max_steps": 8,
                  "eval_every_steps": 2, "eval_problems": 4},
    "unbucketed": {"zero_stage": 2, "pad_to_multiple_of": 1},
}
LABELS = {"plain": "plain DeepSpeed ZeRO-2 (same batches)", "padded": "restem-ray ZeRO-2, padded to x64",
          "compiled": "restem-ray ZeRO-2, padded to x64, compiled layers",
          "fused": "restem-ray ZeRO-2, padded to x64, compiled layers + Liger loss",
          "lean": "restem-ray ZeRO-2, padded to x64, compiled layers + Liger loss, no bf16 overflow pass",
          "liger": "restem-ray ZeRO-2, padded to x64, Liger kernels",
          "packed": "restem-ray ZeRO-2, packed rows of 4096", "zero3": "restem-ray ZeRO-3, padded to x64",
          "zero3full": "check: ZeRO-3, grad. checkpointing, 2 micro-batches a step, validation",
          "unbucketed": "restem-ray ZeRO-2, padded exactly"}


def gpu_memory_gib() -> float:
    """GPU 0's memory from nvidia-smi (no CUDA context in this parent process); inf where it cannot tell."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=30).stdout
        return float(out.split()[0]) / 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return float("inf")


def word_tokenizer(vocab: int):
    """One token per word 't<i>': random-token data of an exact length through the real tokenizer path."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def prepare(work: Path, args) -> dict:
    """Model folder (bf16, as real checkpoints come) and data file shared by every variant."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    s = CPU_SHAPE if args.cpu_smoke else GPU_SHAPE
    tok = word_tokenizer(s["vocab"])
    cfg = Qwen2Config(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                      max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    rng = random.Random(0)
    lengths = []  # in tokens, BOS and EOS included
    with open(work / "train.jsonl", "w") as f:
        for _ in range(args.steps * args.micro):
            n = rng.randint(args.min_len, args.max_len)
            lengths.append(n + 2)  # + BOS + EOS
            words = [f"t{rng.randrange(3, s['vocab'])}" for _ in range(n)]
            f.write(json.dumps({"prompt": " ".join(words[:32]), "completion": " ".join(words[32:])}) + "\n")
    with open(work / "valid.jsonl", "w") as f:  # zero3full's validation problems (random prompts: graded 0)
        for i in range(4):
            f.write(json.dumps({"id": f"v{i}", "prompt": " ".join(f"t{rng.randrange(3, s['vocab'])}" for _ in range(24)),
                                "answer": str(i)}) + "\n")
    return {"params": params, "layers": s["layers"], "hidden": s["hidden"],
            "mean_sample_tokens": sum(lengths) / len(lengths),
            "attention_mean_tokens": sum(n * n for n in lengths) / sum(lengths)}


def training_config(args, variant: str):
    from restem_ray.config import TrainingConfig

    gpu = not args.cpu_smoke
    over = dict(VARIANTS[variant])
    if over.get("packing") and gpu:
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():  # the variable-length kernel packing is for (a bare import is not enough)
            over["attn_implementation"] = "flash_attention_2"
    return TrainingConfig(**{"num_workers": 1, "use_gpu": gpu, "dtype": "bf16", "micro_batch_size": args.micro,
                             "max_steps": args.steps, "lr": 1e-4, "max_seq_len": 4096, "warmup_ratio": 0.0,
                             "lr_schedule": "constant", "attn_implementation": "sdpa" if gpu else None,
                             "checkpoint_every_steps": 10**6, "cudnn_attention": args.cudnn_attention, **over})


def run_variant(work: Path, args, variant: str) -> dict:
    """One variant in this (fresh) process; returns its measurements."""
    import torch

    gpu = not args.cpu_smoke
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29600 + list(VARIANTS).index(variant)), RANK="0",
                      LOCAL_RANK="0", WORLD_SIZE="1", DS_ACCELERATOR="cuda" if gpu else "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    if gpu:
        torch.cuda.set_device(0)
        torch.cuda.reset_peak_memory_stats()
    else:
        torch.set_num_threads(os.cpu_count() or 1)
    cfg = training_config(args, "padded" if variant == "plain" else variant)
    if gpu and variant == "plain":  # the M-step sets it in its own setup; both sides run the same kernels
        from restem_ray.training import set_gpu_attention

        set_gpu_attention(cfg.cudnn_attention)
    prof = StepProfiler(args.steps, gpu) if variant in (args.profile or "").split(",") else None
    t = time.perf_counter()
    m = plain_loop(work, cfg, args.step_times, prof) if variant == "plain" else mstep(work, cfg, variant, prof)
    out = {"variant": variant, "steps": m["steps"], "real_tokens": m["real_tokens"],
           "real_tokens_per_s": round(m["tokens_per_s"]), "real_token_fraction": round(m["real_token_fraction"], 4),
           "train_seconds": round(m["train_seconds"], 2), "wall_seconds": round(time.perf_counter() - t, 1),
           "loss": round(m["loss"], 5), "attn": cfg.attn_implementation or "default",
           "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if gpu else None,
           # what the caching allocator held: widths that change every step fragment it (an out-of-memory error
           # comes from this one, not from what tensors use)
           "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 1) if gpu else None,
           **({"best_step": m["best_step"], "valid_reward": m.get("valid_reward")} if cfg.eval_every_steps else {}),
           "steady_tokens_per_s": round(m["steady_tokens"] / m["steady_seconds"]) if m["steady_seconds"] else None,
           **({"widths": m["widths"]} if "widths" in m else {}),
           **({"line_tokens_per_s": m["lines"]} if "lines" in m else {}),
           **({"step_times": m["step_times"]} if m.get("step_times") else {}),
           **({"profile": prof.summary()} if prof else {})}
    if variant != "plain":
        ckpt = work / f"ckpt-{variant}"
        hf = sorted(ckpt.glob("step_*"))[-1] / "hf"
        out["checkpoint_dtype"] = json.loads((hf / "config.json").read_text()).get("dtype")
        shutil.rmtree(ckpt)  # ~8 GB each at the 0.5B shape: five variants would fill most of a 64 GiB disk
    return out


def mstep(work: Path, cfg, variant: str, prof=None) -> dict:
    from restem_ray import sft
    from restem_ray.training import LocalReporter, MStep

    if prof is not None:  # one training forward per step here (grad_accum 1): each marks a step for the profiler
        forward = sft.forward
        sft.forward = lambda model, batch: (prof.step(), forward(model, batch))[1]

    job = {"init_model": str(work / "model"), "train_file": str(work / "train.jsonl"), "seed": 0,
           "cfg": cfg.model_dump(), "valid_file": str(work / "valid.jsonl") if cfg.eval_every_steps else None,
           "verifier": "math", "verification": {},
           "max_new_tokens": 16, "stop": (), "log_every_steps": line_every(cfg.max_steps)}
    reporter = LocalReporter(str(work / f"ckpt-{variant}"))
    m = MStep(job, 0, 1, reporter).run()
    # the second half of the steps, from the M-step's own step lines (each line's window ends in a host read)
    half = [x for x in reporter.step_lines if x["step"] > cfg.max_steps // 2]
    return {**m, "steady_tokens": sum(x["tokens"] for x in half),
            "steady_seconds": sum(x["tokens"] / x["tokens_per_s"] for x in half),
            # per line: where the time went (the first line holds any compile, the early ones most new widths)
            "lines": [[x["step"], round(x["tokens_per_s"])] for x in reporter.step_lines]}


def line_every(steps: int) -> int:
    """Steps per M-step step line: about 6 lines in the second half, whose first step starts a line (5 at 60 steps)."""
    half = steps // 2
    return next(d for d in range(max(1, half // 6), 0, -1) if half % d == 0)


def plain_loop(work: Path, cfg, step_times: bool = False, prof=None) -> dict:
    """What a user writes by hand: a DeepSpeed engine over the batches the M-step would train on (collated
    before the clock starts, so the reference carries none of the host-side batching the M-step times)."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from restem_ray.sft import collate_micro, encode, plan_epoch

    gpu = cfg.use_gpu
    tok = AutoTokenizer.from_pretrained(work / "model")
    rows = [json.loads(line) for line in open(work / "train.jsonl")]
    data = [encode(tok, r["prompt"], r["completion"]) for r in rows]
    plan = plan_epoch([len(x[0]) for x in data], cfg.micro_batch_size, 1, 1, seed=0)  # MStep's epoch 0, seed 0
    batches = [collate_micro([data[i] for i in idx], tok.pad_token_id, multiple=64 if gpu else 1)
               for (idx,) in plan[: cfg.max_steps]]
    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.bfloat16, **kwargs).train()
    ds = {"train_micro_batch_size_per_gpu": cfg.micro_batch_size, "gradient_accumulation_steps": 1,
          "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
          "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "weight_decay": 0.0, "betas": [0.9, 0.95],
                                                    "torch_adam": True, **({"fused": True} if gpu else {})}},
          "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    reals = [int(b.pop("real_tokens")) for b in batches]
    real = sum(reals)
    # Without the mask, as the M-step trains right-padded batches: both sides run the same attention kernels,
    # so the ratio measures the M-step's own overheads, not the mask-free kernel it picks (the runs before
    # 2026-12-05 kept the mask here, as hand-written loops do, which favoured the M-step). On CPUs the smoke
    # test also checks that both sides train on the same batches exactly (with the mask, bf16 attention takes
    # another kernel and rounds differently from the first step).
    for b in batches:
        b.pop("attention_mask")
    tokens = sum(b["input_ids"].numel() for b in batches)
    widths = [b["input_ids"].shape[1] for b in batches]
    # Step boundaries as CUDA events, read after the run, so the loop never waits on the GPU for them (a
    # synchronize per step would slow the reference the M-step is compared with); host clocks on CPUs.
    marks = [Mark(gpu) for _ in range(len(batches) + 1)]
    t = time.perf_counter()
    for i, b in enumerate(batches):
        marks[i].record()
        if prof is not None:
            prof.step()
        loss = engine(**{k: v.to(engine.device) for k, v in b.items()}, use_cache=False).loss
        engine.backward(loss)
        engine.step()
    marks[-1].record()
    if gpu:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t
    h = len(batches) // 2  # the second half, as the M-step's step lines time it
    times = [[w, round(a.seconds_to(z), 4)] for w, a, z in zip(widths, marks, marks[1:])] if step_times else []
    return {"steps": len(batches), "real_tokens": real, "tokens_per_s": real / secs, "train_seconds": secs,
            "real_token_fraction": real / tokens, "loss": loss.item(), "widths": widths, "step_times": times,
            "steady_tokens": sum(reals[h:]), "steady_seconds": marks[h].seconds_to(marks[-1])}


class StepProfiler:
    """--profile: torch.profiler over the 5 steps before the timed second half (fewer when it is short) (after most new widths and any
    compile), summarised as the ops that took the most device time and how busy the device was. The profiled
    variant's whole-run figures include the profiler's overhead; its second half does not."""

    def __init__(self, steps: int, gpu: bool):
        import torch

        half = steps // 2  # the profiler stops before step half + 1, where the timed second half starts
        self.active = min(5, half - 1)
        self.first = max(1, half - self.active)  # 1-based step of the first profiled step
        self.calls, self.prof, self.gpu = 0, None, gpu
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
        self.kwargs = {"activities": acts}

    def step(self) -> None:
        """Called before each training step's forward."""
        import torch

        self.calls += 1
        if self.active < 1:
            return
        if self.calls == self.first:
            if self.gpu:
                torch.cuda.synchronize()
            self.prof = torch.profiler.profile(**self.kwargs)
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif self.calls == self.first + self.active and self.prof is not None:
            if self.gpu:
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)

    def summary(self, top: int = 25) -> dict:
        if self.prof is None or not hasattr(self, "seconds"):
            return {"error": "the profiled steps did not run (--steps under 4)"}
        from torch.autograd import DeviceType

        events = self.prof.key_averages()
        if self.gpu:  # the kernels themselves: a CPU op's self device time counts the kernels it launched again
            events = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
            dev = lambda e: e.self_device_time_total  # noqa: E731
        else:
            dev = lambda e: e.self_cpu_time_total  # noqa: E731
        rows = sorted(events, key=dev, reverse=True)[:top]
        busy = sum(dev(e) for e in events) / 1e6  # seconds of kernels (CPU ops on CPU), overlaps not merged
        return {"steps": [self.first, self.first + self.active - 1], "wall_seconds": round(self.seconds, 3),
                "device_busy_seconds": round(busy, 3),
                "top_ops": [{"name": e.key[:120], "calls": e.count, "self_device_ms": round(dev(e) / 1e3, 2),
                             "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2)} for e in rows]}


class Mark:
    """A point in the step sequence: a CUDA event on GPUs (elapsed time read after the run), the host clock on CPUs."""

    def __init__(self, gpu: bool):
        import torch

        self.event = torch.cuda.Event(enable_timing=True) if gpu else None
        self.t = 0.0

    def record(self) -> None:
        if self.event is not None:
            self.event.record()
        else:
            self.t = time.perf_counter()

    def seconds_to(self, later: "Mark") -> float:
        return self.event.elapsed_time(later.event) / 1000 if self.event is not None else later.t - self.t


def summarize(results: dict, shape: dict, args) -> dict:
    """MFU and the ratio to the plain loop for every finished variant, and the run's facts."""
    flops_per_token = 6 * shape["params"] + 6 * shape["layers"] * shape["hidden"] * shape["attention_mean_tokens"]
    plain = results.get("plain", {}).get("real_tokens_per_s")
    for r in results.values():
        if "real_tokens_per_s" in r:
            r["mfu"] = round(r["real_tokens_per_s"] * flops_per_token / (args.peak_tflops * 1e12), 4)
            r["ratio_to_plain"] = round(r["real_tokens_per_s"] / plain, 3) if plain else None
            steady = r.get("steady_tokens_per_s")
            r["steady_mfu"] = round(steady * flops_per_token / (args.peak_tflops * 1e12), 4) if steady else None
    return {"device": device_name(not args.cpu_smoke), "date": time.strftime("%Y-%m-%d"), "versions": versions(),
            "model_params": shape["params"], "steps": args.steps, "micro_batch": args.micro,
            "sample_tokens": [args.min_len + 2, args.max_len + 2],
            "mean_sample_tokens": round(shape["mean_sample_tokens"], 1),
            "attention_mean_tokens": round(shape["attention_mean_tokens"], 1), "peak_tflops": args.peak_tflops,
            "cudnn_attention": args.cudnn_attention,
            "padded_ratio": results.get("padded", {}).get("ratio_to_plain"),
            "padded_mfu": results.get("padded", {}).get("mfu"), "steady_from_step": args.steps // 2 + 1,
            "variants": results}


def versions() -> dict:
    import deepspeed
    import torch
    import transformers

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "deepspeed": deepspeed.__version__}


def device_name(gpu: bool) -> str:
    if not gpu:
        return f"cpu smoke ({os.cpu_count()} cores)"
    import torch

    return torch.cuda.get_device_name(0)


def save_output(path: Path, stdout, stderr) -> None:
    """A failed variant's output, whole: a device call returns only $OUT's files and the tail of its own output."""
    text = [x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (stdout, stderr)]
    path.write_text(text[0][-20000:] + "\n--- stderr ---\n" + text[1][-200000:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60,
                    help="training steps; most new batch widths come in the first 30, so fewer measure warm-up")
    ap.add_argument("--micro", type=int, help="samples per micro-batch (default 16; 8 on a GPU of under 100 GiB, "
                                              "an H100: the widest 16-sample batch peaks at about 96 GiB)")
    ap.add_argument("--min-len", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=1792)
    ap.add_argument("--variants", help="default: plain,padded,lean,liger,zero3full (--cpu-smoke: "
                                       "plain,padded,compiled,zero3,packed)")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--cudnn-attention", action="store_true",
                    help="let SDPA use cuDNN on both sides (training.cudnn_attention; off by default)")
    ap.add_argument("--step-times", action="store_true", help="record the plain loop's per-step times")
    ap.add_argument("--profile", help="variants to profile (comma-separated): torch.profiler over 5 steps before "
                                      "the second half, the top ops by device time into the JSON")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks the script, not speed")
    ap.add_argument("--deadline-s", type=float, default=420.0,
                    help="the whole run's time limit, start-up included (the device check's call allows 8 minutes)")
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "results")))
    ap.add_argument("--one", help=argparse.SUPPRESS)   # internal: run one variant in this process
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cpu_smoke and args.max_len > 64:
        args.min_len, args.max_len = 16, 48
    if args.one:
        print("RESULT " + json.dumps(run_variant(Path(args.work), args, args.one)), flush=True)
        return
    args.micro = args.micro or (16 if args.cpu_smoke or gpu_memory_gib() >= 100 else 8)
    # (fused = lean with DeepSpeed's overflow pass: on request; each compiled variant compiles cold, and two of
    # them with the plain loop, padded and liger fill the 8 minutes a device call allows. The variants the MFU
    # target rests on run first; zero3full, a correctness check that writes GBs of checkpoints, last: an overrun
    # costs it, not them)
    args.variants = args.variants or ("plain,padded,compiled,zero3,packed" if args.cpu_smoke
                                      else "plain,padded,lean,liger,zero3full")
    variants = args.variants.split(",")
    if args.cpu_smoke and {"liger", "fused", "lean"} & set(variants):
        sys.exit("--variants liger, fused, lean: Liger's kernels are Triton GPU kernels (not with --cpu-smoke)")
    unknown = set(variants) - set(VARIANTS)
    if unknown or "plain" not in variants or "padded" not in variants:
        sys.exit(f"--variants: need plain and padded, from {', '.join(VARIANTS)} (got {args.variants})")
    deadline = time.monotonic() + args.deadline_s
    work = Path(tempfile.mkdtemp(prefix="gpu-mstep-"))
    shape = prepare(work, args)
    out = Path(args.out) / "gpu_mstep.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    for v in variants:
        cmd = [sys.executable, __file__, "--one", v, "--work", str(work), "--steps", str(args.steps),
               "--micro", str(args.micro), "--min-len", str(args.min_len), "--max-len", str(args.max_len)]
        cmd += ["--cpu-smoke"] if args.cpu_smoke else []
        cmd += ["--cudnn-attention"] if args.cudnn_attention else []
        cmd += ["--step-times"] if args.step_times else []
        cmd += ["--profile", args.profile] if args.profile else []
        left = deadline - time.monotonic()
        try:
            if left < 10:
                raise subprocess.TimeoutExpired(cmd, 0)
            # compile caches of its own: every variant compiles cold, as an M-step's first run on a node does
            # (a later M-step there finds the graphs in its cache)
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(work / f"inductor-{v}"),
                       TRITON_CACHE_DIR=str(work / f"triton-{v}"))
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=left, env=env)
        except subprocess.TimeoutExpired as e:
            results[v] = {"variant": v, "error": f"not finished within --deadline-s {args.deadline_s:.0f}"}
            print(f"[gpu_mstep] {v}: {results[v]['error']}", file=sys.stderr, flush=True)
            if e.timeout:  # (it ran: where it was when the deadline came, e.g. still compiling)
                save_output(out.parent / f"{v}.err", e.stdout, e.stderr)
        else:
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode or not line:
                results[v] = {"variant": v, "error": (p.stderr or p.stdout).strip().splitlines()[-1][:300]
                              if (p.stderr or p.stdout).strip() else f"exit {p.returncode}"}
                print(f"[gpu_mstep] {v} failed:\n{p.stderr[-3000:]}", file=sys.stderr, flush=True)
                save_output(out.parent / f"{v}.err", p.stdout, p.stderr)
            else:
                results[v] = json.loads(line[0][len("RESULT "):])
                print(f"[gpu_mstep] {v}: {results[v]['real_tokens_per_s']} real tokens/s", flush=True)
        summary = summarize(results, shape, args)
        out.write_text(json.dumps(summary, indent=1))  # after every variant: an overrun keeps what finished
    shutil.rmtree(work, ignore_errors=True)
    print(f"\n{summary['device']}: {shape['params'] / 1e6:.0f}M params, {args.steps} steps x {args.micro} samples "
          f"of {args.min_len + 2}-{args.max_len + 2} tokens, bf16")
    # the last step's loss on the same batches: a fused kernel that rounds differently (Liger's bf16 gradient
    # sums) shows here beside the plain loop's
    print(f"| variant | real tokens/s | ratio to plain | MFU | second half: tokens/s, MFU | peak GPU memory "
          f"| checkpoint dtype | last loss |")
    print("|---|---|---|---|---|---|---|---|")
    for v, r in results.items():
        if "error" in r:
            print(f"| {LABELS[v]} | failed: {r['error']} | | | | | | |")
            continue
        mem = f"{r['peak_memory_gib']} GiB" if r["peak_memory_gib"] is not None else "-"
        steady = (f"{r['steady_tokens_per_s']:,}, {100 * r['steady_mfu']:.1f}%" if r.get("steady_mfu") is not None
                  else "-")
        print(f"| {LABELS[v]} | {r['real_tokens_per_s']:,} | {r['ratio_to_plain']} | {100 * r['mfu']:.1f}% | {steady} "
              f"| {mem} | {r.get('checkpoint_dtype', '-')} | {r['loss']} |")
    print(f"wrote {out}")
    if any("error" in r for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
