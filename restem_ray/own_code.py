"""Model folders that ship their own code (config.json's and tokenizer_config.json's `auto_map`), run only with
`model.trust_remote_code`: checked before any cluster work, and loaded into transformers' module cache once per
node before the processes of a phase load them together."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from .errors import UserError, first_line

# what the driver, the samplers and the M-step load through a folder's auto_map
_MODEL_KEYS = ("AutoConfig", "AutoModelForCausalLM")


def _auto_map(folder: str | Path, file: str) -> dict:
    try:
        data = json.loads(Path(folder, file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    amap = data.get("auto_map") if isinstance(data, dict) else None
    return amap if isinstance(amap, dict) else {}


def _references(folder: str | Path) -> list[tuple[str, str]]:
    """(where, class reference) of the code a folder's loads run: its config and causal-LM classes, its
    tokenizer's (tokenizer_config.json names a slow and a fast class, either may be null)."""
    refs = [(f"config.json auto_map.{k}", v) for k, v in _auto_map(folder, "config.json").items()
            if k in _MODEL_KEYS]
    tok = _auto_map(folder, "tokenizer_config.json").get("AutoTokenizer")
    refs += [("tokenizer_config.json auto_map.AutoTokenizer", v)
             for v in (tok if isinstance(tok, (list, tuple)) else [tok]) if v is not None]
    return refs


@contextlib.contextmanager
def _modules_lock():
    """transformers copies a folder's code into its module cache guarded by a thread lock only: the processes of
    one node (a node's M-step ranks, replicas starting together) could import a file another is still writing. A
    copy that is already there and equal is not written again, so one warm load under this lock is enough."""
    from transformers.utils import HF_MODULES_CACHE

    os.makedirs(HF_MODULES_CACHE, exist_ok=True)
    with open(os.path.join(HF_MODULES_CACHE, ".restem-ray.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _load(ref: str, folder: str) -> None:
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    get_class_from_dynamic_module(ref, folder)


def check_own_code(name: str, folder: str, shown: str, config: dict) -> None:
    """With model.trust_remote_code: the classes a folder's auto_map names exist and import here, and a model type
    transformers lacks names the config and causal-LM classes the M-step loads; otherwise the first M-step (vLLM
    may serve the architecture with its own implementation) would fail after a whole E-step."""
    amap = config.get("auto_map")
    if amap is not None and not isinstance(amap, dict):
        raise UserError(f"{name}: {shown}/config.json: auto_map must be a mapping of auto class -> class reference")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    kind = config.get("model_type")
    if kind not in CONFIG_MAPPING:
        for key in _MODEL_KEYS:
            if key not in (amap or {}):
                raise UserError(f"{name}: {shown}: model type {kind!r} is the folder's own code, but config.json's "
                                f"auto_map names no {key} (the M-step loads the model through it)")
    for where, ref in _references(folder):
        if not isinstance(ref, str) or "." not in ref:
            raise UserError(f"{name}: {shown}: {where} {ref!r} is not a module.Class reference")
        if "--" in ref:  # (Hub syntax: repo--module.Class)
            raise UserError(f"{name}: {shown}: {where} {ref!r} names code in another Hub repository, which is not "
                            "downloaded: copy its module into the model folder and name it module.Class")
        try:
            with _modules_lock():
                _load(ref, folder)
        except Exception as e:  # a missing file, a syntax error, a package the code imports that is not installed
            raise UserError(f"{name}: {shown}: {where} {ref!r} does not load ({first_line(e)})") from None


def cache_own_code(folder: str) -> None:
    """Load the code a model folder ships into this node's transformers module cache, once, under a node-wide lock,
    before this process loads the model alongside others (no-op for a folder without auto_map)."""
    refs = [ref for _, ref in _references(folder) if isinstance(ref, str)]
    if refs:
        with _modules_lock():
            for ref in refs:
                _load(ref, folder)
