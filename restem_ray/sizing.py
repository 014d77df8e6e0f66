"""M-step memory arithmetic per GPU (the README's GPU sizing table and the example jobs come from here).

Mixed-precision AdamW holds 16 bytes per trained parameter: bf16 weights (2) and gradients (2), an fp32
master copy (4) and two fp32 moments (8). ZeRO-2 shards gradients and optimizer state over the data-parallel
ranks and keeps the bf16 weights whole on each; ZeRO-3 shards all 16 bytes. With gradient accumulation the
M-step sums a step's micro-batches into fp32 gradients at both stages: 2 bytes per parameter more, sharded. Activations: what transformers'
Llama/Qwen2 decoder layer saves for backward under SDPA, per token (tests/test_sizing.py counts it with
autograd's saved-tensor hooks): each of the two RMSNorms its fp32 input, its bf16 normalised input and its
scaled output, which the next projections read (8h each); q and the attention output (4h); k and v (4h x
kv_heads/heads); fp32 row statistics (4 x heads + 8); the MLP's gate, up, SiLU and product outputs (8 x
intermediate) -- about 64 x hidden bytes for Qwen2 shapes, nearly twice the 34 x hidden of fused GeLU
layers (Korthikanti et al. 2022). With gradient checkpointing a layer keeps only its input (2 x hidden
bytes per token) and one layer is recomputed at a time. The logits peak at 12 bytes per token and
vocabulary entry at the start of backward: log-softmax's saved fp32 output, its fp32 gradient and the
gradient of the fp32 upcast (the bf16 logits are gone by then: the M-step keeps only the loss). Checked
against two H200 runs of the 0.5B shape, ZeRO-2 on one GPU: 16 x 1024 tokens, 55.5 GiB measured (plain
DeepSpeed, docs/measurements.md); the M-step's widest batch, 16 x 1856 in bench/gpu_mstep.py, 95.2 GiB
(bench/results/gpu_mstep-60steps.json); this gives 56.2 and 95.9. Allow 10-20% more for the allocator's
cache and fragmentation.
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
    heads: int
    kv_heads: int
    intermediate: int

    @classmethod
    def from_config(cls, config: dict, tied_by_default: bool = False) -> "Shape | None":
        """A dense Llama/Qwen/Mistral-style decoder's shape from its config.json (parameters counted from it: the
        embeddings, once when tied, and per layer the attention and SwiGLU projections); None for a config this
        arithmetic does not describe (mixture of experts, a multimodal model, fields missing or not sizes).
        `tied_by_default`: the model type's default where config.json leaves tie_word_embeddings out (Gemma's)."""
        def size(key: str, default=None) -> int:
            value = config.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e9:
                raise ValueError(key)  # (missing, null, text, zero or absurd: not a shape to estimate)
            return int(value)
        try:
            h, n, v = size("hidden_size"), size("num_hidden_layers"), size("vocab_size")
            heads, inter = size("num_attention_heads"), size("intermediate_size")
            kv = size("num_key_value_heads", heads) if config.get("num_key_value_heads") is not None else heads
            hd = size("head_dim") if config.get("head_dim") is not None else h // heads
        except ValueError:
            return None
        if hd < 1 or any(k in config for k in ("num_experts", "num_local_experts", "n_routed_experts", "text_config")):
            return None
        attention = h * heads * hd * 2 + h * kv * hd * 2
        tied = config.get("tie_word_embeddings", tied_by_default)
        params = v * h * (1 if tied else 2) + n * (attention + 3 * h * inter + 2 * h) + h
        return cls(params, h, n, v, heads=heads, kv_heads=kv, intermediate=inter)

    def saved_bytes_per_token_per_layer(self) -> float:
        """What one decoder layer keeps for backward per token (see the module's docstring)."""
        h = self.hidden
        return 20 * h + 4 * h * self.kv_heads / self.heads + 8 * self.intermediate + 4 * self.heads + 8


# Qwen2.5 shapes (config.json of the released models).
SHAPES = {
    "0.5B": Shape(494e6, 896, 24, 151936, heads=14, kv_heads=2, intermediate=4864),
    "1.5B": Shape(1.54e9, 1536, 28, 151936, heads=12, kv_heads=2, intermediate=8960),
    "7B": Shape(7.62e9, 3584, 28, 152064, heads=28, kv_heads=4, intermediate=18944),
}


def mstep_gib_per_gpu(shape: Shape, *, gpus: int, zero_stage: int, micro_batch: int, seq_len: int,
                      gradient_checkpointing: bool, grad_accum: int = 1) -> dict[str, float]:
    """GiB per GPU for full fine-tuning in bf16: model states, activations, logits and their sum."""
    p = shape.params
    if zero_stage == 3:
        states = (18 if grad_accum > 1 else 16) * p / gpus
    elif zero_stage == 2:
        states = 2 * p + (16 if grad_accum > 1 else 14) * p / gpus
    elif zero_stage == 1:
        states = 4 * p + 12 * p / gpus
    else:
        states = 16 * p
    tokens = micro_batch * seq_len
    layer = tokens * shape.saved_bytes_per_token_per_layer()
    acts = shape.layers * tokens * 2 * shape.hidden + layer if gradient_checkpointing else shape.layers * layer
    logits = tokens * shape.vocab * 12
    out = {"model_states": states / GIB, "activations": acts / GIB, "logits": logits / GIB}
    out["total"] = sum(out.values())
    return out


def host_gib_per_rank(shape: Shape, *, zero_stage: int, gpus: int) -> float:
    """Host RAM a rank needs to load the model: the whole bf16 model, or only its shard under ZeRO-3's
    zero.Init (the M-step loads that way). Every rank maps every weight file, and rank 0 copies each tensor to
    scatter it: with safetensors memory-mapped, a node's page cache holds the files once (not counted per
    rank here); a filesystem transformers does not map (some FUSE mounts) would cost the whole model per rank."""
    return 2 * shape.params / (gpus if zero_stage == 3 else 1) / GIB


def mstep_memory_note(training, config: dict, tied_by_default: bool = False) -> str | None:
    """What `check` and a run's start say about the M-step's GPU memory (`training`: TrainingConfig; `config`: the
    base model's config.json): this module's estimate for full bf16 fine-tuning on GPUs, and a warning where it
    leaves an 80 GB GPU less than a fifth to spare (the first M-step would fail after a whole E-step). None where
    the arithmetic does not apply (CPU, fp32, LoRA, Liger's chunked loss, offloading, a DeepSpeed config of the
    user's, a shape it does not describe)."""
    if not isinstance(config, dict) or not training.use_gpu or training.dtype != "bf16" or training.lora_rank \
            or training.liger_kernel or training.offload_optimizer or training.offload_params or training.deepspeed:
        return None
    shape = Shape.from_config(config, tied_by_default)
    if shape is None:
        return None
    est = mstep_gib_per_gpu(shape, gpus=training.num_workers, zero_stage=training.zero_stage,
                            micro_batch=training.micro_batch_size, seq_len=training.max_seq_len,
                            gradient_checkpointing=training.gradient_checkpointing, grad_accum=training.grad_accum)
    note = (f"M-step GPU memory per worker, estimated for the widest batch ({shape.params / 1e9:.2f}B parameters, "
            f"ZeRO-{training.zero_stage} over {training.num_workers}, {training.micro_batch_size} x "
            f"{training.max_seq_len} tokens, gradient checkpointing {'on' if training.gradient_checkpointing else 'off'}): "
            f"{est['total']:.1f} GiB (model states {est['model_states']:.1f}, activations {est['activations']:.1f}, "
            f"logits {est['logits']:.1f}; README 'GPU sizing')")
    if est["total"] * 1.2 > 80e9 / GIB:
        note += ("; more than an 80 GB GPU holds with the allocator's share: set training.gradient_checkpointing, "
                 "a smaller training.micro_batch_size (more grad_accum) or zero_stage 3, unless the GPUs are larger")
    return note
