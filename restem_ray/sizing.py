"""M-step memory arithmetic per GPU (the README's GPU sizing table and the example jobs come from here).

Mixed-precision AdamW holds 16 bytes per trained parameter: bf16 weights (2) and gradients (2), an fp32
master copy (4) and two fp32 moments (8). ZeRO-2 shards gradients and optimizer state over the data-parallel
ranks and keeps the bf16 weights whole on each; ZeRO-3 shards all 16 bytes. Activations: each layer keeps
about 34 x hidden bytes per token (Korthikanti et al. 2022, bf16, with a fused attention kernel such as
SDPA's or flash-attention's, which stores no seq x seq scores); with gradient checkpointing a layer keeps
only its input (2 x hidden bytes per token) and one layer is recomputed at a time. The logits peak at about
12 bytes per token and vocabulary entry (bf16 logits, transformers' fp32 copy for the loss, its fp32
gradient, the bf16 gradient). Checked against one measurement (shared/reference/gpu.md: 0.5B, one H200,
16 x 1024 tokens, plain torch 51.8 GiB, DeepSpeed ZeRO-2 55.5 GiB; this gives 46.4 GiB): allow 10-20% for
the allocator, temporaries and communication buffers.
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Shape:
    params: float       # parameters (embeddings included)
    hidden: int
    layers: int
    vocab: int


# Qwen2.5 shapes (config.json of the released models).
SHAPES = {
    "0.5B": Shape(494e6, 896, 24, 151936),
    "1.5B": Shape(1.54e9, 1536, 28, 151936),
    "7B": Shape(7.62e9, 3584, 28, 152064),
}


def mstep_gib_per_gpu(shape: Shape, *, gpus: int, zero_stage: int, micro_batch: int, seq_len: int,
                      gradient_checkpointing: bool) -> dict[str, float]:
    """GiB per GPU for full fine-tuning in bf16: model states, activations, logits and their sum."""
    p = shape.params
    if zero_stage == 3:
        states = 16 * p / gpus
    elif zero_stage == 2:
        states = 2 * p + 14 * p / gpus
    elif zero_stage == 1:
        states = 4 * p + 12 * p / gpus
    else:
        states = 16 * p
    tokens = micro_batch * seq_len
    layer = tokens * 34 * shape.hidden
    acts = shape.layers * tokens * 2 * shape.hidden + layer if gradient_checkpointing else shape.layers * layer
    logits = tokens * shape.vocab * 12
    out = {"model_states": states / GIB, "activations": acts / GIB, "logits": logits / GIB}
    out["total"] = sum(out.values())
    return out


def host_gib_per_rank(shape: Shape, *, zero_stage: int, gpus: int) -> float:
    """Host RAM a rank needs to load the model: the whole bf16 model, or only its shard under ZeRO-3's
    zero.Init (the M-step loads that way), with safetensors memory-mapped."""
    return 2 * shape.params / (gpus if zero_stage == 3 else 1) / GIB
