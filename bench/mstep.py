"""M-step throughput: restem-ray's M-step (Ray Train, 2 DeepSpeed workers) against a plain single-process
DeepSpeed loop on the same data, model and optimizer steps, in the same run.

    .venv/bin/python bench/mstep.py [--rows 1024] [--micro 16] [--epochs 2] [--repeats 3] [--out FILE]

Data: worked solutions of the built-in arithmetic task (the demo's M-step data has this form), with the
built-in tiny model. Both sides use ZeRO-2, fp32, torch AdamW, global batch 2 x micro, length-grouped
padded batches and the same number of optimizer steps, trained without an attention mask on both sides (the
M-step drops it for right-padded batches: the same kernels then); the plain loop has the machine's 2 cores as
torch threads, restem-ray one core per worker. Throughput counts real (non-padding) tokens over the training
steps only ("once workers are up"); Ray start, worker-group start and model loading are reported apart.
After one untimed round of each, the two sides alternate (which goes first alternates too) for `--repeats`
rounds; the medians give the ratio and each round's ratio is reported, since these machines are noisy.
Target: ratio >= 0.9. Also reports the real-token fraction of both batching modes on this data.
Writes bench/results/mstep.json (or --out).
"""
import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on loopback
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from restem_ray.builtin import BUILTINS, ensure_builtin  # noqa: E402
from restem_ray.config import TrainingConfig  # noqa: E402
from restem_ray.sft import collate, collate_micro, encode, plan_epoch, warmup_cosine  # noqa: E402


def make_data(path: Path, rows: int) -> None:
    task = BUILTINS["arithmetic"].task
    rng = random.Random(1)
    out = []
    for i in range(rows):
        r = task.render(f"b{i}", *task._draw(rng, transfer=False))
        out.append({"prompt": r["prompt"], "completion": r["solution"]})
    pq.write_table(pa.Table.from_pylist(out), path)


def plain_loop(model_dir: str, data_file: Path, cfg: TrainingConfig, world: int) -> dict:
    """What a user would write by hand: one process, DeepSpeed engine, the same batches and steps."""
    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from restem_ray.training import deepspeed_config

    t = time.perf_counter()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + random.randint(0, 999)), RANK="0",
                      LOCAL_RANK="0", WORLD_SIZE="1")
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(os.cpu_count() or 2)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = pq.read_table(data_file).to_pylist()
    data = [encode(tok, r["prompt"], r["completion"], cfg.max_seq_len) for r in rows]
    lengths = [len(x[0]) for x in data]
    single = cfg.model_copy(update={"micro_batch_size": cfg.micro_batch_size * world})
    plans = [plan_epoch(lengths, single.micro_batch_size, 1, 1, seed=e) for e in range(cfg.epochs)]
    total = sum(len(p) for p in plans)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=list(model.parameters()), config=deepspeed_config(single, 1),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, total // 20)))
    startup = time.perf_counter() - t
    real = 0
    t = time.perf_counter()
    for plan in plans:
        for (idx,) in plan:
            batch = collate([data[i] for i in idx], tok.pad_token_id)
            real += int(batch.pop("attention_mask").sum())  # dropped, as the M-step drops it: the same kernels
            loss = engine(**batch, use_cache=False).loss
            engine.backward(loss)
            engine.step()
    secs = time.perf_counter() - t
    return {"steps": total, "real_tokens": real, "train_seconds": secs, "tokens_per_s": real / secs,
            "startup_seconds": startup, "loss": loss.item()}


def restem_mstep(model_dir: str, data_file: Path, cfg: TrainingConfig, work: Path) -> dict:
    from restem_ray.training import improve

    t = time.perf_counter()
    m = improve(init_model=model_dir, train_file=data_file, out_dir=work / "ckpt", cfg=cfg, seed=0, storage=work,
                name="bench")
    wall = time.perf_counter() - t
    return {"steps": m["steps"], "real_tokens": m["real_tokens"], "train_seconds": m["train_seconds"],
            "tokens_per_s": m["tokens_per_s"], "startup_and_save_seconds": wall - m["train_seconds"],
            "wall_seconds": wall, "loss": m["loss"], "real_token_fraction": m["real_token_fraction"]}


def token_fractions(model_dir: str, data_file: Path, micro: int) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    data = [encode(tok, r["prompt"], r["completion"], 320) for r in pq.read_table(data_file).to_pylist()]
    lengths = [len(x[0]) for x in data]
    out = {}
    for name, packed, pack_length in (("length_grouped", False, None), ("packed_rows_of_320", True, 320),
                                      ("packed_one_row", True, None)):
        real = total = 0
        for step in plan_epoch(lengths, micro, 2, 1, seed=0):
            for idx in step:
                b = collate_micro([data[i] for i in idx], tok.pad_token_id, packed=packed, pack_length=pack_length)
                real += int(b["real_tokens"])
                total += b["input_ids"].numel()
        out[name] = round(real / total, 4)
    rng = random.Random(0)
    order = list(range(len(data)))
    rng.shuffle(order)
    real = sum(lengths)
    padded = sum(max(lengths[i] for i in order[s : s + micro]) * len(order[s : s + micro])
                 for s in range(0, len(order), micro))
    out["random_order_padded"] = round(real / padded, 4)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mstep.json")
    args = ap.parse_args()

    import ray

    root = ensure_builtin()
    model_dir = str(root / "model")
    work = Path(tempfile.mkdtemp(prefix="bench-mstep-"))
    data_file = work / "train.parquet"
    make_data(data_file, args.rows)
    cfg = TrainingConfig(num_workers=2, cpus_per_worker=1, zero_stage=2, micro_batch_size=args.micro,
                         epochs=args.epochs, lr=1e-4, checkpoint_every_steps=10**6)
    t = time.perf_counter()
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    ray_start = time.perf_counter() - t
    # One untimed round first: the first worker group of a fresh Ray (and the first DeepSpeed engine of the
    # process) pays one-off costs (imports into new workers, page cache, the CPU comm op) that measured 0.71x
    # here when counted; the README's figure is for an M-step of a running driver, which has paid them.
    restem_mstep(model_dir, data_file, cfg, work / "warmup")
    plain_loop(model_dir, data_file, cfg, world=2)
    plain, ours, packed = [], [], []
    for r in range(args.repeats):  # alternate which side goes first: drift on a noisy machine hits both
        if r % 2:
            plain.append(plain_loop(model_dir, data_file, cfg, world=2))
        ours.append(restem_mstep(model_dir, data_file, cfg, work / f"r{r}"))
        if not r % 2:
            plain.append(plain_loop(model_dir, data_file, cfg, world=2))
    # restem-ray with packing (one row per micro-batch), for the record: not part of the ratio
    packed.append(restem_mstep(model_dir, data_file, cfg.model_copy(update={"packing": True}), work / "packed"))
    med_plain = sorted(plain, key=lambda x: x["tokens_per_s"])[len(plain) // 2]
    med_ours = sorted(ours, key=lambda x: x["tokens_per_s"])[len(ours) // 2]
    assert med_plain["steps"] == med_ours["steps"], (med_plain["steps"], med_ours["steps"])
    pair_ratios = [round(o["tokens_per_s"] / p["tokens_per_s"], 3) for o, p in zip(ours, plain)]
    best_plain, best_ours = med_plain, med_ours  # the table below shows the medians
    result = {
        "machine": f"{os.cpu_count()} cores, CPU only",
        "rows": args.rows, "micro_batch_per_worker": args.micro, "epochs": args.epochs,
        "optimizer_steps": med_ours["steps"], "repeats": args.repeats,
        "plain_deepspeed": med_plain, "restem_ray": med_ours,
        "ratio": round(med_ours["tokens_per_s"] / med_plain["tokens_per_s"], 3),
        "pair_ratios": pair_ratios, "ratio_min": min(pair_ratios), "ratio_max": max(pair_ratios),
        "ray_start_seconds": round(ray_start, 2),
        "real_token_fraction": token_fractions(model_dir, data_file, args.micro),
        "restem_ray_packed": packed[0],
        "all_runs": {"plain_deepspeed": plain, "restem_ray": ours},
    }
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"{'side':<22}{'steps':>7}{'real tokens/s':>15}{'train s':>9}{'start-up s':>12}")
    print(f"{'plain DeepSpeed (1p)':<22}{best_plain['steps']:>7}{best_plain['tokens_per_s']:>15.0f}"
          f"{best_plain['train_seconds']:>9.1f}{best_plain['startup_seconds']:>12.1f}")
    print(f"{'restem-ray (Ray Train)':<22}{best_ours['steps']:>7}{best_ours['tokens_per_s']:>15.0f}"
          f"{best_ours['train_seconds']:>9.1f}{best_ours['startup_and_save_seconds']:>12.1f}")
    print(f"{'restem-ray, packed':<22}{packed[0]['steps']:>7}{packed[0]['tokens_per_s']:>15.0f}"
          f"{packed[0]['train_seconds']:>9.1f}{packed[0]['startup_and_save_seconds']:>12.1f}")
    print(f"ratio of medians (restem-ray / plain) = {result['ratio']}  (target >= 0.9); per repeat: {pair_ratios}")
    print(f"real-token fraction: {result['real_token_fraction']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
