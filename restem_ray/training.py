"""M-step: supervised fine-tuning on the selected samples with DeepSpeed, run by Ray Train.

`MStep` is one rank's training loop as a plain class (it runs unchanged on CPU/gloo and GPU/NCCL, and
without Ray: `bench/gpu_mstep.py` drives it directly). `train_loop` is the thin Ray Train entry point
and `improve()` wraps it in a `TorchTrainer` and returns the HF-format checkpoint path that the next
E-step's vLLM engines load. ReST^EM starts every M-step from the base model (`restart_from_base`).

How long to train follows the paper: with `training.eval_every_steps` set, every rank greedily
decodes its share of a validation subset every that many optimizer steps, the rewards are summed
across ranks, and training stops after `training.patience` evaluations without a new best; the best
evaluated step's weights are what the M-step returns (Ray Train keeps that checkpoint by score).
Every checkpoint holds the DeepSpeed state of every rank (so a replaced worker resumes mid-epoch) and
the consolidated HF weights (so any checkpoint can be served by vLLM).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Protocol

from .config import TrainingConfig
from .data import durable_replace, fsync_tree
from .errors import RunError, UserError
from .faults import crash_after_checkpoint
from .remote import local_model_copy
from .selection import NO_END


@dataclass(frozen=True)
class MStepJob:
    """What one worker needs: paths and the config slices it uses (never the whole tree)."""
    init_model: str
    train_file: str
    seed: int
    cfg: dict                          # worker_config(TrainingConfig)
    valid_file: str | None = None      # early stopping: validation problems (a file of problem rows) ...
    valid_problems: list | None = None  # ... or the rows themselves, prompts already rendered (the driver's)
    verifier: str = "math"             # ... graded by this verifier ...
    verification: dict = field(default_factory=dict)  # ... with this VerificationConfig
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    log_every_steps: int = 0           # rank 0's live step lines (observability.log_every_steps); 0: none
    stop_token_ids: tuple[int, ...] = ()  # sampling.stop_token_ids: the first ends every trained completion ...
    end_token_id: int | None = None    # ... without them, the chat template's end of turn the model stops on
    trust_remote_code: bool = False    # model.trust_remote_code: load a model folder's own code (auto_map)
    skip_special_tokens: bool = True   # validation decodes as the samplers do (sampling.skip_special_tokens)


def worker_config(cfg: TrainingConfig) -> dict:
    """`cfg` as the workers rebuild it: a `training.deepspeed` file travels as its contents, read here (its path
    is the driver's, and a worker on another node may not have it)."""
    return cfg.model_copy(update={"deepspeed": cfg.deepspeed_overrides()}).model_dump()


def deepspeed_config(cfg: TrainingConfig, world_size: int) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
    if cfg.zero_stage == 3:
        # Consolidated 16-bit weights are what we save as the HF checkpoint.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.dtype == "bf16"},
        # torch's AdamW: no compiled DeepSpeed op needed (CPU or GPU); with offload DeepSpeed would
        # otherwise insist on its compiled CPU Adam.
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay,
                                                  "betas": [0.9, 0.95], "torch_adam": True,
                                                  # one fused kernel per step instead of a loop over tensors
                                                  # (optimizer state on the GPU only)
                                                  **({"fused": True} if cfg.use_gpu and not cfg.offload_optimizer
                                                     else {})}},
        "zero_force_ds_cpu_optimizer": False,
        # ZeRO-2 and -3 sum a step's micro-batch gradients in the model's dtype unless told otherwise: in bf16 (8
        # bits of mantissa) a step of 4 micro-batches of per-token-scaled gradients loses their low bits. fp32
        # costs 2 bytes per parameter more, sharded. (ZeRO-0/1 would take another optimizer path with it.)
        **({"data_types": {"grad_accum_dtype": "fp32"}}
           if cfg.zero_stage in (2, 3) and cfg.dtype == "bf16" and cfg.grad_accum > 1 else {}),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(ds, cfg.deepspeed_overrides())


def pin_local_rank_to_current_device(use_gpu: bool) -> None:
    """DeepSpeed places its engine, and ZeRO-3's zero.Init the model's shards, on cuda:LOCAL_RANK. Ray Train made
    this worker's own GPU the current device (its place among the GPUs the worker sees), which LOCAL_RANK need not
    be: a worker that sees only its own GPU (RAY_TRAIN_ENABLE_SHARE_CUDA_VISIBLE_DEVICES=0) has it at 0 whatever
    its local rank, and on a node of more than 10 GPUs Ray lists them sorted as strings ("10" before "2"). The
    rank would then train on another worker's GPU, or fail with an invalid device ordinal. (The process group is
    up already: LOCAL_RANK only picks the device from here on.)"""
    import torch

    if use_gpu and torch.cuda.is_available():
        os.environ["LOCAL_RANK"] = str(torch.cuda.current_device())


def import_deepspeed():
    """`import deepspeed` without mlflow. DeepSpeed's autotuner, which the M-step never runs, imports mlflow
    whenever it is installed: 2-4 s of every training worker's start-up on a 2-core machine, each M-step.
    Only that import is kept out: `import mlflow` afterwards works as usual."""
    import sys

    hide = "deepspeed" not in sys.modules and "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # makes `import mlflow` raise ImportError, which DeepSpeed catches
    try:
        import deepspeed
    finally:
        if hide and sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
    return deepspeed


def host_state_dict(state: dict, dtype) -> dict:
    """`state` on the host in `dtype`, for save_pretrained. Entries that share storage (tied input and output
    embeddings) stay one tensor: copied off a GPU one by one they would be two, and save_pretrained, which finds
    tied weights by storage, would write the embedding matrix twice (272 MB more per checkpoint for Qwen2-0.5B)."""
    copies, out = {}, {}
    for k, v in state.items():
        at = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride(), v.dtype)
        if at not in copies:
            copies[at] = v.to(dtype).cpu()
        out[k] = copies[at]
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def sum_over_ranks(values: list[float], *, device) -> list[float]:
    """Sum small per-rank tallies over all ranks: the one collective the M-step calls itself.

    The tensor is made on the engine's device: NCCL reduces only GPU tensors (a CPU tensor fails with "No
    backend type associated with device type cpu"), while gloo on CPUs accepts either, so a CPU run cannot
    show the mistake. tests/test_collectives.py keeps every collective of the package in here."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


class Reporter(Protocol):
    """Where a rank's checkpoints and rank 0's step lines go: Ray Train and the driver's step relay in
    production, a local folder and a list without Ray."""

    def latest_checkpoint(self) -> ContextManager[str | None]: ...  # a folder readable inside the block
    def report(self, metrics: dict, checkpoint_dir: str | None, name: str | None) -> None: ...
    def steps(self, lines: list[dict], restart: bool) -> None: ...  # must not wait for the receiver
    def flush_steps(self) -> None: ...  # before the rank exits: the lines sent so far have arrived


class RayTrainReporter:
    def __init__(self, relay=None, rank: int = 0, every_rank: bool = False):
        self.relay, self._sent = relay, None  # relay: the driver's StepRelay actor (improve())
        self.rank, self.every_rank = rank, every_rank

    @contextlib.contextmanager
    def latest_checkpoint(self):
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with restored_checkpoint(ckpt.filesystem, ckpt.path, self.rank, self.every_rank) as local:
            yield local

    def report(self, metrics, checkpoint_dir, name):
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)

    def steps(self, lines, restart):
        if self.relay is not None:  # fire-and-forget: training never waits on the driver
            self._sent = self.relay.push.remote({"lines": lines, "restart": restart})

    def flush_steps(self):
        if self._sent is not None:  # a process that exits right after .remote() may not have sent the call
            import ray

            try:
                ray.get(self._sent, timeout=30)
            except Exception:  # the driver is gone or slow: metrics never fail an M-step
                pass


_RANK_FILE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_")


@contextlib.contextmanager
def restored_checkpoint(fs, path: str, rank: int, every_rank: bool = False):
    """The files of checkpoint `path` (on pyarrow filesystem `fs`) that this rank resumes from, in a folder of its
    own: state.json, and the DeepSpeed state less the other ranks' ZeRO shards (DeepSpeed reads only its own rank's
    optimizer and, under ZeRO-3, parameter shard), or, for a finished M-step's checkpoint, rank 0's HF weights.
    The whole checkpoint per rank would be every rank's optimizer state, about 106 GB for a 7B model, copied 8 times
    onto each 8-GPU node's disk. A folder per rank: `Checkpoint.to_directory()` without a path shares one per node,
    and a rank that got there after another finished downloaded again over the files that one was still reading
    (seen once in CI: a ZeRO-2 shard read back truncated after a worker was replaced). `every_rank`: DeepSpeed
    set to read every rank's files (zero_optimization.elastic_checkpoint, checkpoint.load_universal)."""
    import pyarrow.fs as pafs

    local = tempfile.mkdtemp(prefix="restem-restore-")
    try:
        root = path.rstrip("/")

        def fetch(rel: str) -> None:
            dst = os.path.join(local, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if fs.type_name == "local":  # storage on this machine's disk: linked, not copied (ZeRO-2's module
                os.symlink(f"{root}/{rel}", dst)  # file is the whole model, which every rank reads)
                return
            pafs.copy_files(f"{root}/{rel}", dst, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())

        fetch("state.json")
        done = json.loads(Path(local, "state.json").read_text()).get("done", False)
        for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
            rel = info.path[len(root):].lstrip("/")
            if info.type != pafs.FileType.File or rel == "state.json":
                continue
            if rel.startswith("hf/"):
                wanted = done and rank == 0
            else:
                m = _RANK_FILE.search(os.path.basename(rel))
                wanted = not done and (m is None or every_rank or int(m.group(1)) == rank)
            if wanted:
                fetch(rel)
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)  # a ZeRO checkpoint holds the optimizer: do not leave it


class LocalReporter:
    """No Ray: checkpoints are moved under `root` (single process, or ranks sharing a filesystem)."""

    def __init__(self, root: str):
        self.root = Path(root)
        self.reports: list[dict] = []
        self.step_lines: list[dict] = []

    @contextlib.contextmanager
    def latest_checkpoint(self):
        done = sorted(self.root.glob("step_*"))
        yield str(done[-1]) if done else None

    def report(self, metrics, checkpoint_dir, name):
        self.reports.append(metrics)
        if checkpoint_dir:  # file by file, moved: a 0.5B model's DeepSpeed checkpoint is ~8 GB; ranks sharing
            for src in sorted(Path(checkpoint_dir).rglob("*")):  # a filesystem each add their own files
                if src.is_file():
                    dst = self.root / name / src.relative_to(checkpoint_dir)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(src, dst)

    def steps(self, lines, restart):
        self.step_lines = list(lines) if restart else self.step_lines + list(lines)

    def flush_steps(self):
        pass


@dataclass
class TrainState:
    """Saved with every checkpoint (rank 0's copy is authoritative; all ranks hold the same values)."""
    step: int = 0                       # optimizer steps done
    best_reward: float | None = None
    best_step: int | None = None
    stale_evals: int = 0                # evaluations since the last new best
    history: list = field(default_factory=list)
    step_lines: list = field(default_factory=list)  # rank 0's live step lines so far, re-sent on a restart
    step_carry: dict = field(default_factory=dict)  # rank 0's steps since the last line (StepLines.save)
    done: bool = False                  # the M-step's last checkpoint: HF weights only, nothing left to train


# A tokenizer's files, as model folders ship them (HF, SentencePiece, tiktoken, Mistral's tekken, a custom
# tokenizer's code), and the licence texts a derived model carries; nothing else travels (weights, exports for
# other runtimes, a copy's marker files)
_TOKENIZER_FILE = re.compile(r"tokenizer.*|tokenization_.*\.py|special_tokens_map\.json|added_tokens\.json|"
                             r"vocab\.(json|txt)|merges\.txt|.*\.(model|tiktoken)|tekken\.json|chat_template\..*|"
                             r"(LICENSE|NOTICE|USE_POLICY).*")


def copy_tokenizer_files(base: str, hf: str, tokenizer) -> None:
    """The base folder's tokenizer files, byte for byte, into the checkpoint `hf` (tokenizer.json and its config,
    chat template, tokenizer.model, tekken.json, special tokens, a custom tokenizer's code): the M-step does not
    change them, and a re-serialized tokenizer names transformers 5's class (TokenizersBackend), which older
    serving stacks cannot load, and drops the files it does not read. A base with none: `tokenizer` saved."""
    names = [n for n in sorted(os.listdir(base)) if _TOKENIZER_FILE.fullmatch(n)
             and os.path.isfile(os.path.join(base, n)) and os.path.getsize(os.path.join(base, n)) < 2**28
             and not os.path.exists(os.path.join(hf, n))]
    for name in names:
        shutil.copy2(os.path.join(base, name), os.path.join(hf, name))
    templates = os.path.join(base, "additional_chat_templates")  # named templates transformers loads from there
    if os.path.isdir(templates) and not os.path.exists(os.path.join(hf, "additional_chat_templates")):
        shutil.copytree(templates, os.path.join(hf, "additional_chat_templates"))
    if not any(n.startswith("tokenizer") or n == "tekken.json" for n in names):
        tokenizer.save_pretrained(hf)


def check_attention(cfg: TrainingConfig) -> None:
    """Refuse a `training.attn_implementation` transformers does not know (its ValueError at the first M-step's
    model load, after a whole E-step). A Hub kernel ("kernels-community/flash-attn") is left to transformers."""
    name = cfg.attn_implementation
    if not name or "/" in name or name.startswith("paged|"):
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if name not in known:
        raise UserError(f"training.attn_implementation: {name!r} is not an attention transformers knows "
                        f"({', '.join(k for k in known if '|' not in k)})")


def check_lora_targets(cfg: TrainingConfig, model: str, trust: bool = False) -> None:
    """Refuse `training.lora_target_modules` that name no module of the model (peft's NoMatchingPeftModuleError at
    the first M-step, after a whole E-step): a list names modules by their last parts, a string is a regular
    expression over whole names (or "all-linear"). The model is built on the meta device: no weights read."""
    targets = cfg.lora_target_modules
    if not cfg.lora_rank or targets == "all-linear":
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .remote import local_model_files

    try:
        config = AutoConfig.from_pretrained(local_model_files(model), trust_remote_code=trust)
        with torch.device("meta"):
            modules = [(n, m) for n, m in AutoModelForCausalLM.from_config(
                config, trust_remote_code=trust).named_modules() if n]
        names = [n for n, _ in modules]
    except Exception:  # (a model the checks before let through but this cannot build: the M-step will say)
        return
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in names):
            raise UserError(f"training.lora_target_modules: {targets!r} matches no module of {model}")
        return
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing or not targets:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules if isinstance(m, torch.nn.Linear)})
        raise UserError(f"training.lora_target_modules: {missing or '[]'} name no module of {model} (its linear "
                        f"layers: {', '.join(linear[:12])}{', ...' if len(linear) > 12 else ''})")


# The share of its GPU an M-step worker waits (bounded) to find free before it allocates: the E-step's replicas
# release theirs as their engines exit, which a killed replica's can outlast by seconds
M_STEP_FREE_GPU = 0.9


def _ended(row: dict, default: int | None, ends: set[int]) -> int | None:
    """The token a training row ends with: the stop token its sample ended on where the policy stops on it too
    (`ends`: a model.sampler of another family has other ids), none for a sample cut at max_tokens (NO_END, kept
    by selection.keep_truncated), else `default`."""
    token = row.get("stop_token")
    return token if token in ends or token == NO_END else default


def rotary_in_fp32(model) -> None:
    """Recompute RoPE's frequency buffers in fp32 outside deepspeed.zero.Init, which casts every float tensor
    made inside it to the training dtype, inv_freq too (transformers 5 builds it with torch.arange(dtype=float)):
    positions rounded to bf16 are 2.4 rad off at position 2047 for Qwen2.5-7B's shape, and vLLM serves fp32
    ones. The same rope functions transformers' own re-initialisation uses (a model with several layer types,
    Gemma3's, has a `{layer_type}_inv_freq` each); DeepSpeed keeps buffers' dtype."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for module in model.modules():
        stale = [n for n, b in module.named_buffers(recurse=False)
                 if n.endswith("inv_freq") and b.is_floating_point() and b.dtype != torch.float32]
        if not stale or not hasattr(module, "config"):
            continue
        fresh: dict = {}
        for name in stale:
            layer_type = name.removesuffix("inv_freq").removesuffix("_").removesuffix("original").removesuffix("_")
            rope_type = getattr(module, "rope_type", "default")
            rope_type = rope_type.get(layer_type) if isinstance(rope_type, dict) else rope_type
            fn = getattr(module, "compute_default_rope_parameters", None) if rope_type == "default" else \
                ROPE_INIT_FUNCTIONS.get(rope_type)
            if fn is None:  # a model's own code: say so rather than refuse it
                print(f"[restem] warning: {type(module).__name__}.{name} ({rope_type!r} rotary frequencies) stays "
                      f"{getattr(module, name).dtype} after ZeRO-3's load; training.zero_stage 2 keeps it fp32",
                      flush=True)
                continue
            if layer_type not in fresh:
                fresh[layer_type] = fn(module.config, **({"layer_type": layer_type} if layer_type else {}))[0]
            value = fresh[layer_type].to(device=getattr(module, name).device, dtype=torch.float32)
            module.register_buffer(name, value.clone(), persistent=False)


def set_gpu_attention(cudnn: bool) -> None:
    """cuDNN's SDPA builds a kernel plan for every new shape, and padded M-step batches change width every step:
    on an H200 it spent 12-14 ms of CPU per attention call, and turning it off took the padded M-step from
    48.1k to 60.9k real tokens/s over 60 steps (bench/results/gpu_mstep*.json). Process-wide, as torch has it;
    a Ray Train worker process only trains."""
    import torch

    torch.backends.cuda.enable_cudnn_sdp(cudnn)


def apply_liger_kernel(model, loss_only: bool = False) -> None:
    """Swap in Liger's fused kernels on this model instance (as transformers' Trainer does with
    use_liger_kernel): in training with labels, its forward returns the loss without logits. `loss_only`
    (compiled layers): the fused loss alone; inside the layers torch.compile fuses the norms, rotary embeddings
    and SwiGLU itself, and Liger's Triton kernels there would be opaque calls in the compiled graph."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        raise RuntimeError("training.liger_kernel: the liger-kernel package is not installed "
                           "(pip install 'restem-ray[gpu]')") from None
    kind = getattr(model.config, "model_type", None)
    if kind not in MODEL_TYPE_TO_APPLY_LIGER_FN:  # Liger itself would only log and train without its kernels
        raise RuntimeError(f"training.liger_kernel: Liger has no kernels for model type {kind!r} "
                           f"(it has: {', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))})")
    _apply_liger_kernel_to_instance(model=model, **({"rope": False, "rms_norm": False, "swiglu": False}
                                                    if loss_only else {}))


def loss_kwargs(cfg) -> dict:
    """Extra forward arguments of the M-step's loss. Liger's fused loss adds up lm_head's gradient over chunks of
    tokens, in the weight's dtype unless told otherwise: in bf16 every one of ~128 chunk sums rounds (Qwen's
    151k-entry vocabulary over 896 hidden units, 8k tokens a micro-batch), on a matrix that is also the input
    embedding where the two are tied. fp32 costs one vocabulary x hidden buffer."""
    import torch

    return {"accum_dtype": torch.float32} if cfg.liger_kernel else {}


def compile_decoder_layers(model) -> int:
    """torch.compile every decoder layer in place (nn.Module.compile keeps the state-dict keys, so checkpoints
    and DeepSpeed see the same parameters). Per layer, not the whole model: the layers share one code object,
    so Dynamo compiles it once for all of them, and the loss stays outside (Liger's, or transformers'). Shapes
    are dynamic: padded widths change from step to step, and a graph per width would recompile past Dynamo's
    limit and fall back to eager. Returns how many layers were compiled."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:  # transformers' decoder layers all derive from it; a custom model may not
        kind = getattr(getattr(model, "config", None), "model_type", None)
        raise RuntimeError(f"training.compile_layers: no decoder layers (transformers' GradientCheckpointingLayer) "
                           f"in model type {kind!r}")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


class MStep:
    """One rank of the M-step. Plain code: Ray Train, a test or a benchmark constructs it."""

    def __init__(self, job: dict, rank: int, world: int, reporter: Reporter):
        self.job, self.rank, self.world, self.reporter = job, rank, world, reporter
        self.cfg = TrainingConfig(**job["cfg"])
        import torch

        self.dtype = torch.bfloat16 if self.cfg.dtype == "bf16" else torch.float32  # also the checkpoints' dtype

    # ---------------------------------------------------------------- set-up
    def _setup(self):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .sft import IGNORE, encode_many, end_ids, packed_row_length, plan_epoch, uses_varlen_kwargs, warmup_cosine

        cfg, job = self.cfg, self.job
        deepspeed = import_deepspeed()
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a "Writing model shards" bar per checkpoint drowns the M-step's own
        if not cfg.use_gpu:
            torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        else:
            set_gpu_attention(cfg.cudnn_attention)
        pin_local_rank_to_current_device(cfg.use_gpu)  # before zero.Init and the engine pick their device
        if cfg.use_gpu:  # the E-step's replicas on these GPUs may still be exiting: a CUDA OOM at the first allocation
            from .sampling import wait_for_gpu_memory

            # (torch's own count, on the device just pinned: this process makes its CUDA context next anyway, and
            # vLLM, whose NVML copy the replicas use, need not be imported into a training worker)
            short = wait_for_gpu_memory(M_STEP_FREE_GPU, who="the M-step", free=lambda: [torch.cuda.mem_get_info()])
            if short:
                print(f"[restem] warning: {short}; the M-step starts anyway", flush=True)
        torch.manual_seed(job["seed"])
        self.init_model = local_model_copy(job["init_model"])  # a URI base: this node's copy, made once
        trust = bool(job.get("trust_remote_code"))
        if trust:  # (every rank of a node loads the model at once)
            from .own_code import cache_own_code

            cache_own_code(self.init_model)
        self.tok = AutoTokenizer.from_pretrained(self.init_model, mistral_format=False,  # (as vLLM's, prompts.py)
                                                 trust_remote_code=trust)
        ds_config = deepspeed_config(cfg, self.world)
        # Loaded in the training dtype: DeepSpeed's bf16 mode casts the module to bf16 anyway (its fp32
        # master copy is made from those), so an fp32 load only doubles host memory on the way.
        kwargs = {"dtype": self.dtype, "trust_remote_code": trust}
        if cfg.use_gpu and cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        zero3_init = None
        if cfg.zero_stage == 3:
            # zero.Init sizes its shards by DeepSpeed's view of the world: let it adopt the process group Ray
            # Train made (otherwise it counts 1 rank, and the batch-size check fails on 2).
            deepspeed.init_distributed()
            # from_pretrained then builds the model inside deepspeed.zero.Init: each rank holds its shard only.
            # Every rank still opens every weight file, and rank 0 copies each tensor before it is scattered; the
            # files are memory-mapped (safetensors), so a node's page cache holds the model once, not once per
            # rank. (Where transformers reads files whole instead, e.g. on a FUSE mount it does not map, each
            # rank would read the whole model into RAM: put models on local disk or a mapped filesystem.)
            from transformers.integrations import HfDeepSpeedConfig

            zero3_init = HfDeepSpeedConfig(ds_config)  # transformers keeps a global weak reference to it
        try:
            model = AutoModelForCausalLM.from_pretrained(self.init_model, **kwargs)
        finally:
            if zero3_init is not None:  # only this load: later loads in the process stay ordinary
                from transformers.integrations.deepspeed import unset_hf_deepspeed_config

                unset_hf_deepspeed_config()
        if zero3_init is not None:
            rotary_in_fp32(model)
        # from_pretrained returns the model in eval mode and DeepSpeed leaves it so; in eval mode transformers
        # skips gradient checkpointing (and dropout), and Liger computes the full logits
        model.train()
        if cfg.liger_kernel:
            apply_liger_kernel(model, loss_only=cfg.compile_layers)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if cfg.lora_rank:
            from peft import LoraConfig, get_peft_model

            if cfg.gradient_checkpointing:
                model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
            model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, task_type="CAUSAL_LM",
                                                     target_modules=cfg.lora_target_modules))
        if cfg.compile_layers:  # after LoRA: its adapters are part of the layers' code
            compile_decoder_layers(model)
        rows = _read_rows(job["train_file"])
        # A sample is trained to end with the stop token id it ended on (vLLM's stop_reason: a stop token id such
        # as a generation_config eos id, Gemma-2-it's <end_of_turn>); rows without one (EOS, human solutions, a
        # stop string) with the first of sampling.stop_token_ids, else the template's end of turn that the
        # model's generation_config stops on (end_token_id), else EOS.
        end = (job.get("stop_token_ids") or (job.get("end_token_id"),))[0]
        stops = tuple(job.get("stop_token_ids") or ())
        # (EOS itself is never a recorded stop token in new samples: vLLM reports it as no stop reason)
        ends = set(end_ids(model, self.tok, stops)) - ({self.tok.eos_token_id} - set(stops))
        # Token ids as int32 arrays, made block by block: as Python lists they took ~40 bytes a token, gigabytes
        # per rank for a large M-step (75,000 rows of 1,500 tokens: 4.5 GB, on each of a node's 8 ranks)
        import numpy as np

        data = []
        kept = not job.get("skip_special_tokens", True)  # (samples that hold the special tokens the model wrote)
        for at in range(0, len(rows), 4096):
            block = [(r["prompt"], r["completion"], _ended(r, end, ends)) for r in rows[at: at + 4096]]
            data += [(np.asarray(x, np.int32), np.asarray(y, np.int32))
                     for x, y in encode_many(self.tok, block, special_tokens_kept=kept)]
        # A row longer than max_seq_len is dropped, not cut: cut from the left it loses the prompt, cut
        # from the right it teaches the model to stop mid-solution.
        self.data = [x for x in data if len(x[0]) <= cfg.max_seq_len]
        self.dropped_too_long = len(data) - len(self.data)
        if not self.data:
            raise ValueError(f"all {len(data)} training rows are longer than training.max_seq_len "
                             f"({cfg.max_seq_len} tokens; the shortest has {min(len(x[0]) for x in data)})")
        # flash-attention kernels see packed samples only in a one-row micro-batch (sft.packed_row_length)
        self.pack_length = packed_row_length(cfg.attn_implementation if cfg.use_gpu else None, cfg.pack_length)
        # ... and take their boundaries from the host rather than find them again in every layer, packed or padded
        # (sft.collate_micro)
        self.varlen = cfg.use_gpu and uses_varlen_kwargs(cfg.attn_implementation)
        lengths = [len(x[0]) for x in self.data]
        # completion tokens each row adds to the loss (labels after the causal shift): the step's loss is one mean
        # over every completion token of the optimizer step, all micro-batches and ranks (see the step loop)
        self.loss_tokens = [int(np.count_nonzero(labels[1:] != IGNORE)) for _, labels in self.data]
        self.plan = lambda epoch: plan_epoch(lengths, cfg.micro_batch_size, self.world, cfg.grad_accum,
                                             seed=job["seed"] * 1000 + epoch)
        self.micro_per_epoch = len(self.plan(0))  # the same count every epoch (same lengths)
        self.steps_per_epoch = self.micro_per_epoch // cfg.grad_accum
        self.total = cfg.max_steps or self.steps_per_epoch * cfg.epochs
        # Default: once per epoch, but at most ~10 checkpoints per M-step: many short epochs (the control
        # arm: 200 seed rows for 189 epochs) would otherwise spend more time saving than training.
        self.checkpoint_every = cfg.checkpoint_every_steps or max(self.steps_per_epoch, -(-self.total // 10))
        warmup = int(cfg.warmup_ratio * self.total)
        schedule = (lambda s: warmup_cosine(s, self.total, warmup)) if cfg.lr_schedule == "cosine" else \
            (lambda s: min(1.0, (s + 1) / max(1, warmup)))
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config, lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        self.model = model
        self.device = self.engine.device  # every tensor a collective or the model sees lives here
        self.state = TrainState()
        self.resumed_from = 0
        self.finished_copy = None  # a finished M-step found again: its last checkpoint's files, to re-report
        with self.reporter.latest_checkpoint() as latest:
            if latest:  # a replaced worker group: continue from the last checkpoint, not from the start
                self.state = TrainState(**json.loads(Path(latest, "state.json").read_text()))
                self.resumed_from = self.state.step
                if self.state.done:  # no DeepSpeed state to load: the engine keeps the base weights
                    self.finished_copy = tempfile.mkdtemp(prefix="restem-finished-")
                    if self.rank == 0:  # rank 0's files, as _checkpoint writes them
                        shutil.copytree(Path(latest, "hf"), Path(self.finished_copy, "hf"))
                        shutil.copy(Path(latest, "state.json"), self.finished_copy)
                else:
                    self.engine.load_checkpoint(os.path.join(latest, "deepspeed"), tag="ckpt")
        self.valid = self._load_valid()
        self.verifier = None
        if self.valid is not None:  # built once per M-step (a code verifier starts its sandbox here)
            from .config import VerificationConfig
            from .verification import Verifier

            self.verifier = Verifier(self.job["verifier"], VerificationConfig(**self.job["verification"]))

    def _load_valid(self) -> list[tuple[dict, float]] | None:
        if not (self.cfg.eval_every_steps and (self.job.get("valid_problems") or self.job.get("valid_file"))):
            return None
        from .data import load_problems

        probs = self.job.get("valid_problems") or load_problems(self.job["valid_file"], "any")
        probs = probs[: self.cfg.eval_problems]
        # Equal shares: under ZeRO-3 every forward gathers parameters with all ranks, so every rank must decode
        # as many prompts. The last shares are filled up with repeated problems, which count 0 (a rank with
        # nothing to decode would leave the others waiting in NCCL until its timeout; rounding down left up to
        # world - 1 problems unscored).
        n = len(probs)
        share = [(probs[i % n], float(i < n)) for i in range(-(-n // self.world) * self.world)]
        return share[self.rank::self.world]  # (problem, weight): each rank decodes its share; rewards are summed

    # ---------------------------------------------------------------- the loop
    def run(self) -> dict:
        self._setup()
        try:
            return self._train()
        finally:
            if self.verifier is not None:
                self.verifier.close()

    def _train(self) -> dict:
        import torch

        from .sft import collate_micro, forward, pad_id

        cfg, st, engine = self.cfg, self.state, self.engine
        multiple = cfg.pad_to_multiple_of or (64 if cfg.use_gpu else 1)
        pad = pad_id(self.tok)
        self.last_metrics = None
        bar, shown = None, 0.0
        if self.rank == 0:
            from tqdm import tqdm
            bar = tqdm(total=self.total, initial=st.step, desc="M-step", unit="step", mininterval=2)
        tokens = real = 0
        t0 = time.perf_counter()
        plan_epoch_idx, plan = -1, None
        stop = False
        lines = StepLines(self, self.job.get("log_every_steps", 0) if self.rank == 0 else 0)
        extra = loss_kwargs(cfg)
        while st.step < self.total and not stop and not st.done:
            epoch, within = divmod(st.step, self.steps_per_epoch)
            if epoch != plan_epoch_idx:
                plan_epoch_idx, plan = epoch, self.plan(epoch)
                # completion tokens per optimizer step, over the epoch (a float all ranks compute alike)
                per_step = max(1.0, sum(self.loss_tokens[i] for micro in plan for part in micro for i in part)
                               / (len(plan) / cfg.grad_accum))
            step_loss = torch.zeros((), device=self.device)
            lr = engine.get_lr()[0] if lines.on else None  # this step's: the scheduler moves at its end
            step_tokens = 0
            # Every completion token of the epoch weighs alike, as in one big batch: each micro-batch's loss is its
            # token sum over N / (grad_accum x world), which DeepSpeed's mean over the micro-batches and ranks turns
            # into the step's sum / N, with N the epoch's mean completion tokens per step (from the plan all ranks
            # share). A mean per micro-batch gave a 58-token solution's tokens 3.6 times the weight of a 458-token
            # one's, and a mean per step still 4.8 times on GSM8K-like data: length grouping puts short solutions
            # in steps of their own, and each step weighed alike whatever its tokens.
            parts = plan[within * cfg.grad_accum:(within + 1) * cfg.grad_accum]
            own_n = max(1, sum(self.loss_tokens[i] for micro in parts for i in micro[self.rank]))
            per_micro = per_step / (cfg.grad_accum * self.world)
            for m in range(cfg.grad_accum):
                if lines.on:  # every rank's real tokens, from the plan all ranks share: no collective
                    step_tokens += sum(len(self.data[i][0]) for part in plan[within * cfg.grad_accum + m]
                                       for i in part)
                micro = plan[within * cfg.grad_accum + m][self.rank]
                batch = collate_micro([self.data[i] for i in micro], pad, packed=cfg.packing,
                                      pack_length=self.pack_length, multiple=multiple, varlen=self.varlen)
                real += int(batch.pop("real_tokens"))  # counted on the host, before the copy: no device sync
                # Right padding under causal attention: no real token can see a pad, so the mask changes no
                # loss term (tests/test_mstep.py checks) but would build a 4D mask per step and keep SDPA off
                # its flash kernel.
                batch.pop("attention_mask", None)
                tokens += batch["input_ids"].numel()
                batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v  # max_length_q/k: ints
                         for k, v in batch.items()}
                loss = forward(engine, batch | extra | {"num_items_in_batch": per_micro}).loss
                engine.backward(loss)
                engine.step()
                # shown: this rank's mean over its own tokens, x grad_accum (the lines divide by it); read back only
                # when shown or saved: .item() per step stalls a GPU
                step_loss += loss.detach() * (per_micro * cfg.grad_accum / own_n)
            st.step += 1
            if bar:
                bar.update(1)
                if time.monotonic() - shown > 5:
                    shown = time.monotonic()
                    bar.set_postfix(loss=f"{float(step_loss) / cfg.grad_accum:.3f}")
            last = st.step == self.total
            lines.add(step_loss, lr, step_tokens)
            if self.valid is not None and (st.step % cfg.eval_every_steps == 0 or last):
                with lines.paused():
                    stop = self._validate()
                if stop:
                    lines.emit()  # the last step's line, before the checkpoint saves the lines
                with lines.paused():
                    lines.save()
                    self._checkpoint(float(step_loss) / cfg.grad_accum, tokens, real, t0, final=stop or last)
            elif st.step % self.checkpoint_every == 0 or last:
                with lines.paused():
                    lines.save()
                    self._checkpoint(float(step_loss) / cfg.grad_accum, tokens, real, t0, final=last)
        if stop and self.rank == 0:
            print(f"[restem] M-step: validation reward has not improved for {cfg.patience} evaluation(s); "
                  f"stopped at step {st.step}, best step {st.best_step} ({st.best_reward:.3f})")
        if bar:
            bar.close()
        if self.last_metrics is None:  # restored at the end (a re-run driver found the finished checkpoints)
            self._checkpoint(float("nan"), 0, 0, t0, final=True)
        self.reporter.flush_steps()
        return self.last_metrics

    def _validate(self) -> bool:
        """Greedy validation reward summed over ranks; returns True when patience is exhausted."""
        from .sft import greedy_completions

        st = self.state
        prompts = [p["prompt"] for p, _ in self.valid]
        # Compiled layers decode eagerly: one-token steps with a KV cache are other graphs, and compiling them
        # would spend Dynamo's recompile limit on a few validation passes.
        import torch

        eager = torch.compiler.set_stance("force_eager") if self.cfg.compile_layers else contextlib.nullcontext()
        with eager:
            # ZeRO-3 gathers parameters inside forward: every rank must run the same number of forwards.
            texts = greedy_completions(self.engine.module, self.tok, prompts, self.job["max_new_tokens"],
                                       stop=tuple(self.job["stop"]), synced=self.cfg.zero_stage == 3,
                                       stop_token_ids=tuple(self.job.get("stop_token_ids") or ()),
                                       skip_special_tokens=self.job.get("skip_special_tokens", True))
        correct = sum(w * self.verifier.grade(p, t).reward for (p, w), t in zip(self.valid, texts))
        correct, n = sum_over_ranks([correct, sum(w for _, w in self.valid)], device=self.device)
        reward = correct / max(1.0, n)
        st.history.append({"step": st.step, "valid_reward": reward})
        if st.best_reward is None or reward > st.best_reward:
            st.best_reward, st.best_step, st.stale_evals = reward, st.step, 0
        else:
            st.stale_evals += 1
        return st.stale_evals >= self.cfg.patience

    def _checkpoint(self, loss: float, tokens: int, real: int, t0: float, final: bool = False) -> None:
        """DeepSpeed state of every rank + consolidated HF weights + TrainState, reported as one checkpoint.
        The final one leaves the DeepSpeed state out: nothing resumes from it (the next M-step starts from
        weights), and it is the optimizer's 12 bytes per parameter, ~85 GiB for a 7B model, every M-step."""
        from deepspeed.accelerator import get_accelerator

        st, engine = self.state, self.engine
        get_accelerator().synchronize()  # GPU work still queued belongs to the timed steps
        elapsed = time.perf_counter() - t0
        real, tokens = sum_over_ranks([real, tokens], device=self.device)  # every rank's batches, this attempt
        metrics = {"step": st.step, "loss": loss, "steps": st.step, "total_steps": self.total,
                   "resumed_from_step": self.resumed_from, "real_tokens": int(real),
                   "real_token_fraction": real / max(1.0, tokens),
                   "train_seconds": elapsed, "tokens_per_s": real / max(1e-9, elapsed),
                   "rows": len(self.data), "rows_dropped_too_long": self.dropped_too_long,  # same on every rank
                   "best_step": st.best_step, "best_reward": st.best_reward}
        if st.history and st.history[-1]["step"] == st.step:
            metrics["valid_reward"] = st.history[-1]["valid_reward"]
            # Ray Train keeps the best checkpoint by this score; ties go to the earlier step, as in TrainState.
            metrics["valid_score"] = metrics["valid_reward"] - 1e-9 * st.step
        elif self.valid is not None:
            metrics["valid_score"] = -1.0  # not evaluated (a re-report after a restore): never the best
        st.done = final
        if self.finished_copy is not None:  # the finished M-step's own files: this engine was never trained
            try:
                self.last_metrics = metrics
                self.reporter.report(metrics, self.finished_copy, f"step_{st.step:07d}")
            finally:
                shutil.rmtree(self.finished_copy, ignore_errors=True)
            return
        # HF weights only where the M-step's result can come from: the last checkpoint, or one validation scored
        # (the others are for resuming; under ZeRO-3 each consolidation holds the whole model in rank 0's RAM)
        chosen = final or "valid_reward" in metrics or self.cfg.keep_checkpoints
        tmp = tempfile.mkdtemp(prefix="restem-ckpt-")
        try:
            if not final:
                engine.save_checkpoint(os.path.join(tmp, "deepspeed"), tag="ckpt")
            # ZeRO-3 shards parameters: every rank must take part in gathering them.
            state = engine._zero3_consolidated_16bit_state_dict() if self.cfg.zero_stage == 3 and chosen else None
            if self.rank == 0 and chosen:
                hf = os.path.join(tmp, "hf")
                if self.cfg.lora_rank:
                    self._save_merged(hf)
                else:
                    if state is None:
                        state = engine.module.state_dict()
                    # In the training dtype (bf16: half the bytes of fp32 to write and for every replica to
                    # read); save_pretrained writes the model's dtype into config.json, so vLLM's "auto"
                    # loads it as trained.
                    state = host_state_dict(state, self.dtype)
                    self.model.save_pretrained(hf, state_dict=state, safe_serialization=True)
                copy_tokenizer_files(self.init_model, hf, self.tok)
            if self.rank == 0:
                Path(tmp, "state.json").write_text(json.dumps(asdict(st)))
            self.last_metrics = metrics
            self.reporter.report(metrics, tmp, f"step_{st.step:07d}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _save_merged(self, hf: str) -> None:
        """LoRA: vLLM gets plain weights, base + merged adapters, built on a CPU copy of the base model."""
        import torch
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
        from transformers import AutoModelForCausalLM

        adapters = {k: v.detach().to(torch.float32).cpu() for k, v in get_peft_model_state_dict(self.model).items()}
        base = AutoModelForCausalLM.from_pretrained(self.init_model, dtype=torch.float32,
                                                    trust_remote_code=bool(self.job.get("trust_remote_code")))
        copy = get_peft_model(base, self.model.peft_config["default"])
        set_peft_model_state_dict(copy, adapters)
        copy.merge_and_unload().to(self.dtype).save_pretrained(hf, safe_serialization=True)


class StepLines:
    """Rank 0's live step lines, one per `every` optimizer steps (and at the last): rank 0's mean loss over
    those steps, the learning rate, DeepSpeed's global gradient norm (before clipping; None where DeepSpeed
    computes none: ZeRO-0 in fp32) and every rank's real (non-padding) tokens per second, validation and
    checkpoint time left out. The loss stays on the device between lines: reading it is the one host sync a
    line adds. The lines and the steps since the last one are saved with each checkpoint (TrainState), so a
    restarted M-step sends the lines up to its checkpoint again (`restart`; the driver's metrics.jsonl then
    holds every step once) and its next line covers the same steps, with the same loss, as without the restart."""

    def __init__(self, mstep: "MStep", every: int):
        self.m, self.every, self.on = mstep, every, every > 0
        self._reset()
        if self.on:
            mstep.reporter.steps(list(mstep.state.step_lines), restart=True)
            carry = mstep.state.step_carry
            if carry.get("steps"):
                import torch

                self.loss = torch.tensor(carry["loss"], device=mstep.device)  # float32, as it was summed
                self.steps, self.tokens, self.carried_s = carry["steps"], carry["tokens"], carry["seconds"]

    def _reset(self) -> None:
        self.loss, self.steps, self.tokens, self.pause_s, self.since = None, 0, 0, 0.0, time.perf_counter()
        self.carried_s = 0.0

    def _seconds(self) -> float:
        return self.carried_s + time.perf_counter() - self.since - self.pause_s

    def save(self) -> None:
        """Before a checkpoint, which waits for the device anyway: the steps since the last line."""
        if self.on:
            self.m.state.step_carry = {"loss": float(self.loss) if self.steps else 0.0, "steps": self.steps,
                                       "tokens": self.tokens, "seconds": self._seconds()}

    def add(self, step_loss, lr: float, tokens: int) -> None:
        """After each optimizer step (`state.step` already counts it)."""
        if not self.on:
            return
        self.loss = step_loss if self.loss is None else self.loss + step_loss
        self.steps, self.tokens, self.lr = self.steps + 1, self.tokens + tokens, lr
        st = self.m.state
        if st.step % self.every == 0 or st.step == self.m.total:
            self.emit()

    @contextlib.contextmanager
    def paused(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.pause_s += time.perf_counter() - start

    def emit(self) -> None:
        if not (self.on and self.steps):
            return
        st, engine = self.m.state, self.m.engine
        loss = float(self.loss) / (self.steps * self.m.cfg.grad_accum)  # the host read: waits for the device
        norm = engine.get_global_grad_norm()  # a float or a device tensor (already computed by now)
        seconds = self._seconds()
        line = {"step": st.step, "total_steps": self.m.total, "loss": loss, "lr": self.lr,
                "grad_norm": None if norm is None else float(norm), "tokens": self.tokens,
                "tokens_per_s": self.tokens / max(1e-9, seconds), "time": round(time.time(), 3)}
        st.step_lines.append(line)
        self.m.reporter.steps([line], restart=False)
        self._reset()


def _read_rows(path: str) -> list[dict]:
    """prompt/completion rows, and the token each sample stopped on where known (`stop_token`), from Parquet
    (what the driver writes) or JSONL (no pyarrow needed)."""
    keys = ("prompt", "completion", "stop_token")
    if path.endswith(".jsonl"):
        with open(path) as f:
            return [{k: r[k] for k in keys if k in r} for r in (json.loads(x) for x in f if x.strip())]
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    return pq.read_table(path, columns=[k for k in keys if k in names]).to_pylist()


def train_loop(job: dict) -> None:
    """Per-worker M-step (Ray Train calls it on every rank)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if job["cfg"]["use_gpu"] else "cpu")
    # DeepSpeed's ZeRO gathers call a deprecated torch alias: one FutureWarning per rank per M-step, for users
    # of DeepSpeed to act on, not of restem-ray
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    import ray.train

    quiet_checkpoint_logs()
    ctx = ray.train.get_context()
    ds = TrainingConfig(**job["cfg"]).deepspeed_overrides()
    every_rank = bool(ds.get("zero_optimization", {}).get("elastic_checkpoint")
                      or ds.get("checkpoint", {}).get("load_universal"))
    MStep(job, ctx.get_world_rank(), ctx.get_world_size(),
          RayTrainReporter(job.get("step_relay"), rank=ctx.get_world_rank(), every_rank=every_rank)).run()


def quiet_checkpoint_logs() -> None:
    """Ray Train logs two INFO lines per checkpoint per rank ("Checkpoint successfully created at ...",
    "Reporting training result ... metrics={...}"): 32 lines for an 8-epoch M-step on 2 ranks, saying what the
    M-step bar already shows. A filter, not a level: Ray Train's dictConfig resets the levels of ray.train's
    child loggers when a worker starts training (before this runs). Ray names the second logger by its
    file's path, built here rather than imported."""
    import logging

    import ray

    for name in ("ray.train.v2._internal.execution.storage",
                 os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")):
        log = logging.getLogger(name)
        if _warnings_only not in log.filters:
            log.addFilter(_warnings_only)


def _warnings_only(record) -> bool:
    return record.levelno >= 30  # logging.WARNING


class StepRelay:
    """A Ray actor near the driver holding rank 0's step lines until the driver takes them: training workers
    may run on nodes that do not see the run directory, and rank 0 must never wait on the driver."""

    def __init__(self):
        self.messages: list[dict] = []

    def push(self, message: dict) -> None:
        self.messages.append(message)

    def take(self) -> list[dict]:
        messages, self.messages = self.messages, []
        return messages


class StepReceiver:
    """Driver side: a StepRelay on the driver's node, and a thread handing its messages to `on_steps(lines,
    restart)` every `every_s` seconds and once more at `close()`. A failing receiver (a full disk, a dashboard
    that refuses a point) costs one warning, never the M-step."""

    def __init__(self, on_steps: Callable[[list[dict], bool], None], every_s: float = 0.5):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self.actor = ray.remote(StepRelay).options(num_cpus=0, scheduling_strategy=here).remote()
        self.on_steps, self.warned = on_steps, False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every_s,), name="mstep-step-lines", daemon=True)
        self._thread.start()

    def _loop(self, every_s: float) -> None:
        while not self._done.wait(every_s):
            self._deliver()

    def _deliver(self) -> None:
        import ray

        try:
            for message in ray.get(self.actor.take.remote()):
                self.on_steps(message["lines"], message["restart"])
        except Exception as e:
            if not self.warned:
                self.warned = True
                print(f"[restem] live M-step metrics: {type(e).__name__}: {str(e).strip()[:200]}")

    def close(self) -> None:
        import ray

        self._done.set()
        self._thread.join()
        self._deliver()  # the workers have ended (flush_steps): whatever they sent is in the relay
        ray.kill(self.actor)


def _mstep_trainer():
    """`TorchTrainer` without Ray Train's `PlacementGroupCleaner`. That detached actor removes the run's
    placement group when the State API does not list the controller, and it reads "no answer" as "dead": a
    cluster without a dashboard asks 127.0.0.1:8265, where another cluster's dashboard answers "no such actor"
    (seen in CI), and a busy head can answer nothing. It then tore down a live M-step, which cost the run one of
    its `max_failures`. Its job (freeing the placement group of a controller that died) is done here by Ray
    itself: a controller that dies fails `fit()` and with it the run, and a job's placement groups go when the
    driver's Ray job ends."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class MStepTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks()
                    if not isinstance(c, PlacementGroupCleanerCallback)]

    return MStepTrainer


def improve(*, init_model: str, train_file: Path, out_dir: Path, cfg: TrainingConfig, seed: int,
            storage: Path | str, name: str = "mstep", valid_file: str | None = None,
            valid_problems: list[dict] | None = None, verifier: str = "math", verification: dict | None = None,
            max_new_tokens: int = 512, stop: tuple[str, ...] = (), stop_token_ids: tuple[int, ...] = (),
            end_token_id: int | None = None, log_every_steps: int = 0, trust_remote_code: bool = False,
            skip_special_tokens: bool = True, on_steps: Callable[[list[dict], bool], None] | None = None) -> dict:
    """Run the M-step; the HF checkpoint of the chosen step lands in `out_dir`. Returns its metrics.
    With `log_every_steps` and `on_steps`, rank 0's step lines reach `on_steps(lines, restart)` in this
    process while the M-step runs (`StepLines`, `StepReceiver`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError

    from .resources import sandbox_resources

    job = asdict(MStepJob(init_model=init_model, train_file=str(train_file), seed=seed, cfg=worker_config(cfg),
                          valid_file=valid_file, valid_problems=valid_problems, verifier=verifier,
                          verification=verification or {}, max_new_tokens=max_new_tokens, stop=tuple(stop),
                          stop_token_ids=tuple(stop_token_ids), end_token_id=end_token_id,
                          trust_remote_code=trust_remote_code, skip_special_tokens=skip_special_tokens,
                          log_every_steps=log_every_steps if on_steps else 0))
    storage_path = cfg.storage_path or str(Path(storage).resolve())
    fingerprint = _job_fingerprint(job, train_file, run_root=Path(out_dir).parent.parent)  # (RUN/iter_t/checkpoint)
    spelt = _job_fingerprint(job, train_file)  # as versions before 2026-12-06 keyed a job: its paths as given
    finished = _finished_m_step(Path(out_dir), fingerprint) or _finished_m_step(Path(out_dir), spelt)
    if finished is not None:  # a driver killed after this M-step ended but before its commit
        print(f"[restem] M-step {name}: {out_dir} already holds its finished checkpoint (trained by a driver "
              "that ended before committing it): not trained again", flush=True)
        metrics, step_lines = finished
        if on_steps and log_every_steps:  # its step lines, as a restarted M-step sends its checkpoint's
            on_steps(step_lines, True)
        if not cfg.keep_checkpoints:  # (killed before it was removed)
            _remove_storage(storage_path, name)
        return metrics
    _same_job_or_afresh(storage_path, name, fingerprint, also=spelt)
    receiver = StepReceiver(on_steps) if on_steps and log_every_steps else None
    job["step_relay"] = receiver and receiver.actor
    scored = bool(cfg.eval_every_steps and (valid_file or valid_problems))
    # Validation of a code task runs the sandbox in every training worker: place them where it can run.
    grading = sandbox_resources((verification or {}).get("resources"), scored and verifier == "code")
    trainer = _mstep_trainer()(
        train_loop,
        train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=cfg.worker_resources() | grading,
                                     placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(
            storage_path=storage_path, name=name,
            # Ray Train retries a worker group that could not start (its timeout is a controller error) without
            # end by default: with a lost node and no room elsewhere the run would wait forever.
            failure_config=FailureConfig(max_failures=cfg.max_failures, controller_failure_limit=cfg.max_failures + 1),
            # The latest checkpoint is always kept (resume); with validation, the best one too.
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="valid_score"
                                               if scored else None, checkpoint_score_order="max")),
    )
    if "://" not in storage_path:
        crash_after_checkpoint(f"{name}/checkpoint", os.path.join(storage_path, name))  # resume tests only
    # Ray Train's controller sees that the workers have finished at its next health check (every 2 s by
    # default, then up to 2 s more): measured 4.6 -> 1.8 s from the last step to fit() returning. A missed
    # check costs nothing until RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S (10 min); Ray Train passes the
    # variable on to its controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.start_timeout_s)  # (passed on likewise)
    try:
        result = trainer.fit()
    except TrainingFailedError as e:  # one line naming the workers' error, not Ray's nested traceback
        causes = getattr(e, "worker_failures", None) or {}
        cause = next(iter(causes.values()), None) or getattr(e, "controller_failure", None) or e
        raise RunError(f"M-step {name} failed: {type(cause).__name__}: {str(cause).strip().splitlines()[-1][:300]}"
                       ) from None
    finally:
        if receiver is not None:
            receiver.close()
    if scored and result.best_checkpoints:
        chosen, metrics = max(result.best_checkpoints, key=lambda cm: cm[1].get("valid_score", -1.0))
    else:
        chosen, metrics = result.checkpoint, result.metrics
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # Only the HF weights leave storage: the DeepSpeed shards (optimizer state, the bulk) are never copied.
    import pyarrow.fs as pafs

    tmp.mkdir(parents=True)
    pafs.copy_files(f"{chosen.path}/hf", str(tmp.resolve()), source_filesystem=chosen.filesystem,
                    destination_filesystem=pafs.LocalFileSystem())
    with result.checkpoint.filesystem.open_input_stream(f"{result.checkpoint.path}/state.json") as f:
        state = json.loads(f.read())
    history = state["history"]
    final = {**result.metrics, "chosen_step": metrics["step"], "valid_history": history,
             **({"valid_reward": metrics.get("valid_reward")} if scored else {})}
    # With the weights, in the same rename: the Ray Train storage goes next, and a driver killed before its
    # commit finds the M-step finished here instead of training it again from step 0.
    (tmp / FINISHED).write_text(json.dumps({"fingerprint": fingerprint, "metrics": final,
                                            "step_lines": state.get("step_lines", [])}, default=str))
    fsync_tree(tmp)  # the weights survive a machine crash before Ray Train's copy goes and the M-step commits
    shutil.rmtree(out_dir, ignore_errors=True)
    durable_replace(tmp, out_dir)
    if not cfg.keep_checkpoints:  # DeepSpeed shards of every step: large; the HF checkpoint is what we keep
        _remove_storage(storage_path, name)
    return final


FINISHED = "restem_mstep.json"  # in an M-step's HF checkpoint: what trained it, and its metrics


# training keys that decide where and how patiently an M-step runs, not its weights (a resume may change them)
_WHERE_NOT_WHAT = {"cpus_per_worker", "gpus_per_worker", "resources_per_worker", "placement_strategy",
                   "max_failures", "start_timeout_s", "storage_path", "keep_checkpoints"}


def _job_fingerprint(job: dict, train_file: Path | str, run_root: Path | None = None) -> str:
    """What decides an M-step's weights: the job (model, data path, seed, training settings, validation) and
    the training rows' bytes. Paths inside the run directory count from its root: a run resumed as
    `--out /abs/runs/x` after `--out runs/x`, or a URI run's local copy on another machine, is the same job."""
    import hashlib

    settings = {k: v for k, v in job.items() if k not in ("step_relay", "log_every_steps")
                and not (k == "end_token_id" and v is None)  # (as M-steps finished before they existed were keyed)
                and not (k == "trust_remote_code" and not v) and not (k == "skip_special_tokens" and v)}
    if run_root is not None:
        for key in ("init_model", "train_file"):
            settings[key] = _in_run(settings.get(key), run_root)
    settings["cfg"] = {k: v for k, v in job["cfg"].items() if k not in _WHERE_NOT_WHAT}
    settings["verification"] = {k: v for k, v in (job.get("verification") or {}).items()
                                if k not in ("num_workers", "max_workers", "cpus_per_worker", "resources")}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    with open(train_file, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _in_run(path, run_root: Path):
    """`path` as RUN/<relative path> when it lies inside the run directory `run_root`, otherwise as given."""
    if not isinstance(path, str) or "://" in path:
        return path
    try:
        return "RUN/" + Path(path).resolve().relative_to(run_root.resolve()).as_posix()
    except (ValueError, OSError):
        return path


def _finished_m_step(out_dir: Path, fingerprint: str) -> tuple[dict, list[dict]] | None:
    """The metrics and step lines of the finished M-step in `out_dir`, if the same job trained it."""
    try:
        saved = json.loads((out_dir / FINISHED).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint:
        return None
    return saved["metrics"], saved.get("step_lines", [])


def _storage(storage_path: str):
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(storage_path) if "://" in storage_path else \
        (pafs.LocalFileSystem(), storage_path)
    return fs, root.rstrip("/")


def _same_job_or_afresh(storage_path: str, name: str, fingerprint: str, also: str | None = None) -> None:
    """Ray Train continues whatever checkpoint it finds under the run's name. One left by an M-step of other
    settings or rows (a --force resume that changed the learning rate, the epochs or the selected data) would be
    continued under the new ones, half one job and half the other: its storage goes, and the M-step starts
    afresh. The job's fingerprint is kept beside the storage (`NAME.job`); storage from before it is continued,
    and so is storage keyed `also` (the same job as an earlier version keyed it), then keyed anew."""
    fs, root = _storage(storage_path)
    marker = f"{root}/{name}.job"
    try:
        with fs.open_input_stream(marker) as f:
            old = f.read().decode()
    except FileNotFoundError:
        old = None
    if old == fingerprint:
        return
    if old is not None and old != also:
        print(f"[restem] M-step {name}: the checkpoints in its storage were trained with other settings or data "
              "(a --force resume): trained afresh", flush=True)
        try:  # (not _remove_storage, which lets a failed delete pass: they would be continued under this job's key)
            fs.delete_dir(f"{root}/{name}")
        except FileNotFoundError:
            pass
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(marker) as f:
        f.write(fingerprint.encode())


def _remove_storage(storage_path: str, name: str) -> None:
    fs, root = _storage(storage_path)
    try:
        fs.delete_dir(f"{root}/{name}")
    except (FileNotFoundError, OSError):
        pass
    try:
        fs.delete_file(f"{root}/{name}.job")
    except (FileNotFoundError, OSError):
        pass
