"""M-step: supervised fine-tuning on the selected samples with DeepSpeed, run by Ray Train.

`train_loop` is the per-worker function (plain code: it runs unchanged on CPU/gloo and GPU/NCCL);
`improve()` wraps it in a `TorchTrainer` and returns the HF-format checkpoint path that the next
E-step's vLLM engines load. ReST^EM starts every M-step from the base model (`restart_from_base`).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import TrainingConfig


@dataclass(frozen=True)
class MStepJob:
    """What one worker needs: paths and the training slice of the config (never the whole tree)."""
    init_model: str
    train_file: str
    seed: int
    cfg: dict  # TrainingConfig.model_dump()


def deepspeed_config(cfg: TrainingConfig, world_size: int) -> dict:
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.dtype == "bf16"},
        # torch's AdamW: no compiled DeepSpeed op needed (CPU or GPU).
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay,
                                                  "betas": [0.9, 0.95], "torch_adam": True}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(ds, cfg.deepspeed)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def train_loop(job: dict) -> None:
    """Per-worker M-step loop (Ray Train calls it on every rank)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not job["cfg"]["use_gpu"] else "cuda")
    import deepspeed
    import pyarrow.parquet as pq
    import ray.train
    import torch
    from ray.experimental.tqdm_ray import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .sft import collate, encode, length_grouped_batches, warmup_cosine

    cfg = TrainingConfig(**job["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not cfg.use_gpu:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(job["seed"])
    tok = AutoTokenizer.from_pretrained(job["init_model"])
    model = AutoModelForCausalLM.from_pretrained(job["init_model"], dtype=torch.float32)
    rows = pq.read_table(job["train_file"], columns=["prompt", "completion"]).to_pylist()
    data = [encode(tok, r["prompt"], r["completion"], cfg.max_seq_len) for r in rows]
    global_batch = cfg.micro_batch_size * world
    # Like DistributedSampler(drop_last=False): the last global batch is filled by repeating rows, so
    # every rank takes the same number of steps and no selected sample is dropped.
    steps_per_epoch = -(-len(data) // global_batch)
    total = steps_per_epoch * cfg.epochs // cfg.grad_accum
    ds_cfg = deepspeed_config(cfg, world)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, total, int(cfg.warmup_ratio * total))))
    gen = torch.Generator().manual_seed(job["seed"])
    bar = tqdm(total=steps_per_epoch * cfg.epochs, desc="M-step") if rank == 0 else None
    losses, tokens = [], 0
    for epoch in range(cfg.epochs):
        batches = length_grouped_batches([len(x[0]) for x in data], global_batch, gen)
        order = [i for b in batches for i in b]
        while len(order) < steps_per_epoch * global_batch:
            order += order[: steps_per_epoch * global_batch - len(order)]
        for step in range(steps_per_epoch):
            idx = order[step * global_batch : (step + 1) * global_batch]
            mine = idx[rank::world]
            batch = {k: v.to(engine.device) for k, v in collate([data[i] for i in mine], tok.pad_token_id).items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            tokens += int(batch["attention_mask"].sum())
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    _save_and_report(engine, model, tok, cfg, rank, {"loss": sum(losses[-20:]) / len(losses[-20:]),
                                                      "steps": len(losses), "tokens_rank0": tokens})


def _save_and_report(engine, model, tok, cfg: TrainingConfig, rank: int, metrics: dict) -> None:
    import ray.train
    import torch

    # ZeRO-3 shards parameters: every rank must take part in gathering them.
    state = engine._zero3_consolidated_16bit_state_dict() if cfg.zero_stage == 3 else None
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if state is None:
            state = engine.module.state_dict()
        state = {k: v.to(torch.float32).cpu() for k, v in state.items()}
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tok.save_pretrained(tmp)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def improve(*, init_model: str, train_file: Path, out_dir: Path, cfg: TrainingConfig, seed: int,
            storage: Path) -> dict:
    """Run the M-step; the HF checkpoint lands in `out_dir`. Returns the final training metrics."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    job = asdict(MStepJob(init_model=init_model, train_file=str(train_file), seed=seed, cfg=cfg.model_dump()))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(storage_path=str(storage.resolve()), name="mstep"),
    )
    result = trainer.fit()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    result.checkpoint.to_directory(str(tmp))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    shutil.rmtree(storage / "mstep", ignore_errors=True)  # Ray Train's copy; the HF checkpoint is what we keep
    return dict(result.metrics)
