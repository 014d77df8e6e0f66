"""GPU readiness of the M-step loop: restem-ray's `MStep` (the code Ray Train runs on every rank), driven
without Ray on one GPU, on a random-init Llama-shaped 0.5B model (Qwen2-0.5B's shape), bf16 DeepSpeed ZeRO-2,
with sequence packing. Reports real tokens/s and MFU; writes bench/results/gpu_mstep.json.

    bash bench/gpu_mstep.sh             # on a GPU machine (installs nothing; see the .sh for deepspeed)
    python bench/gpu_mstep.py --steps 30 --packing 1 --attn sdpa

MFU counts 6 x params x tokens plus causal attention (6 x layers x hidden x mean sample length per token,
fwd+bwd) over the GPU's dense bf16 peak (989 TFLOP/s for H100/H200 SXM). Reference
(shared/reference/gpu.md): plain DeepSpeed ZeRO-2 without packing 24% on an H200; target >= 35%.
"""
import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cuda")


def word_tokenizer(vocab: int):
    """One token per word 't<i>': random-token data of an exact length through the real tokenizer path."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro", type=int, default=16, help="samples per micro-batch")
    ap.add_argument("--min-len", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=1792)
    ap.add_argument("--packing", type=int, default=1)
    ap.add_argument("--pack-length", type=int, default=4096)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks the script, not speed")
    args = ap.parse_args()
    gpu = not args.cpu_smoke
    if not gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from restem_ray.config import TrainingConfig
    from restem_ray.training import LocalReporter, MStep

    vocab, hidden, layers, heads, kv, ffn = (151936, 896, 24, 14, 2, 4864) if gpu else (1000, 64, 2, 2, 1, 128)
    work = Path(tempfile.mkdtemp(prefix="gpu-mstep-"))
    tok = word_tokenizer(vocab)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    del model
    rng = random.Random(0)
    n_rows = args.steps * args.micro
    lengths = []
    with open(work / "train.jsonl", "w") as f:
        for _ in range(n_rows):
            n = rng.randint(args.min_len, args.max_len)
            lengths.append(n + 2)  # + BOS + EOS
            words = [f"t{rng.randrange(3, vocab)}" for _ in range(n)]
            f.write(json.dumps({"prompt": " ".join(words[:32]), "completion": " ".join(words[32:])}) + "\n")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29511", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    if gpu:
        torch.cuda.set_device(0)
        torch.cuda.reset_peak_memory_stats()
    tc = TrainingConfig(num_workers=1, use_gpu=gpu, dtype="bf16" if gpu else "fp32", zero_stage=args.zero, micro_batch_size=args.micro,
                        max_steps=args.steps, lr=1e-4, max_seq_len=4096, packing=bool(args.packing),
                        pack_length=args.pack_length, attn_implementation=args.attn, checkpoint_every_steps=10**6)
    job = {"init_model": str(work / "model"), "train_file": str(work / "train.jsonl"), "seed": 0,
           "cfg": tc.model_dump(), "valid_file": None, "verifier": "math", "verification": {},
           "max_new_tokens": 16, "stop": ()}
    t = time.perf_counter()
    m = MStep(job, 0, 1, LocalReporter(str(work / "ckpts"))).run()
    wall = time.perf_counter() - t
    mean_len = sum(lengths) / len(lengths)
    flops_per_token = 6 * params + 6 * layers * hidden * mean_len  # dense + causal attention (half of L^2)
    mfu = m["tokens_per_s"] * flops_per_token / (args.peak_tflops * 1e12)
    result = {"device": torch.cuda.get_device_name(0) if gpu else "cpu (smoke)", "params": params, "steps": m["steps"],
              "micro_batch": args.micro, "mean_sample_tokens": round(mean_len, 1), "packing": bool(args.packing),
              "pack_length": args.pack_length, "attn": args.attn, "zero_stage": args.zero,
              "real_tokens_per_s": round(m["tokens_per_s"]), "real_token_fraction": round(m["real_token_fraction"], 4),
              "mfu": round(mfu, 4), "train_seconds": round(m["train_seconds"], 1), "wall_seconds": round(wall, 1),
              "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if gpu else None,
              "loss": m["loss"]}
    out = Path(os.environ.get("OUT", Path(__file__).parent / "results")) / "gpu_mstep.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
