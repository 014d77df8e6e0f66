"""Models and data files given as URIs (s3://, gs://, hdfs://, file://: anything `pyarrow.fs` opens).

They are copied to node-local disk once per node and read from there: vLLM, transformers and the data
readers read local files, and many replicas or training ranks reading one object store at once is slow.
Copies are keyed by URI and record what the URI held (sizes and modification times, one listing per use):
a model re-uploaded to the same URI is copied again, not served stale. They are made under a per-node file
lock, into a temporary name renamed when complete, so concurrent processes on one node copy once and never
read half a copy. A run directory on a URI is mirrored (restem_ray/mirror.py).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile

from .errors import UserError, first_line, shown_uri


def is_uri(path: str) -> bool:
    return "://" in str(path)


def _cache_root(cache_dir: str | None) -> str:
    return cache_dir or os.environ.get("RESTEM_MODEL_CACHE") or os.path.join(tempfile.gettempdir(), "restem-models")


def _cache_dir_of(key: str, cache_dir: str | None) -> str:
    return os.path.join(_cache_root(cache_dir), hashlib.sha256(key.encode()).hexdigest()[:16])


def _fingerprint(uri: str) -> str | None:
    """What the object or prefix at `uri` holds, as sizes and modification times (one listing): a copy made of
    something else (the model re-uploaded to the same URI) is not taken for it. None when it cannot be listed."""
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(path)
        infos = [info] if info.type == pafs.FileType.File else fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except Exception:  # unreachable for a moment: the copy this node has serves
        return None
    return json.dumps(sorted((i.path, i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File))


def _made_of(dest: str) -> str | None:
    """The fingerprint a whole copy at `dest` was made of; None when there is no whole copy."""
    try:
        with open(os.path.join(dest, ".complete")) as f:
            return f.read()
    except OSError:
        return None


def _fresh(dest: str, now: str | None) -> bool:
    """`dest` is a whole copy of what the URI, fingerprinted `now`, holds."""
    made_of = _made_of(dest)
    return made_of is not None and (now is None or now == made_of)


def _copy_once(uri: str, cache_dir: str | None, copy, key: str | None = None) -> str:
    import pyarrow.fs as pafs

    root = _cache_root(cache_dir)
    dest = _cache_dir_of(key or uri, cache_dir)
    os.makedirs(root, exist_ok=True)
    with open(dest + ".lock", "w") as lock:  # processes on one node copy once
        fcntl.flock(lock, fcntl.LOCK_EX)
        now = _fingerprint(uri)  # (under the lock: what the copy another process just made holds is compared)
        if not _fresh(dest, now):
            fs, path = pafs.FileSystem.from_uri(uri)
            tmp = dest + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            try:
                copy(fs, path, tmp)
                with open(os.path.join(tmp, ".complete"), "w") as f:
                    f.write(now or "")
            except BaseException:  # (a full disk: what was copied goes, not left to fill it until the next try)
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
    return dest


def local_model_copy(model: str, cache_dir: str | None = None) -> str:
    """A model folder given as a URI, as a node-local folder of what vLLM and transformers load: its top-level
    files, and of its weights the safetensors where there are some (not Meta's `original/*.pth` beside them, a
    second copy of the model, nor `.bin` duplicates or training checkpoints in subfolders). Plain paths are
    returned unchanged."""
    if not is_uri(model):
        return model

    def keep(name: str, names: list[str]) -> bool:
        safetensors = any(n.endswith(".safetensors") for n in names)
        return not (safetensors and name.endswith(WEIGHT_SUFFIXES) and not name.endswith(".safetensors"))

    return _copy_once(model, cache_dir, lambda fs, path, tmp: _copy_top_level(fs, path, tmp, keep))


def _copy_top_level(fs, path: str, tmp: str, keep) -> None:
    """The files directly in `path` (no subfolders) for which `keep(name, all names)` holds, copied into `tmp`."""
    import pyarrow.fs as pafs

    files = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=False)) if i.type == pafs.FileType.File]
    names = [i.base_name for i in files]
    for info in files:
        if keep(info.base_name, names):
            with fs.open_input_stream(info.path) as src, open(os.path.join(tmp, info.base_name), "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)


# what a model folder holds besides its configs and tokenizer: never needed to read those
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")


def local_model_files(model: str, cache_dir: str | None = None) -> str:
    """A model folder given as a URI, as a node-local folder of its top-level files without the weights (config,
    tokenizer, chat template, generation config): what the driver reads, where a 70B model's weights would be
    140 GB on a head node's small disk. A full copy made on this node already serves; plain paths are
    returned unchanged."""
    if not is_uri(model):
        return model
    full = _cache_dir_of(model, cache_dir)
    if _made_of(full) is not None and _fresh(full, _fingerprint(model)):
        return full
    return _copy_once(model, cache_dir, lambda fs, path, tmp: _copy_top_level(
        fs, path, tmp, lambda name, names: not name.endswith(WEIGHT_SUFFIXES)), key=model + "#no-weights")


def local_file_copy(uri: str, cache_dir: str | None = None) -> str:
    """A file given as a URI, as a node-local file of the same name; plain paths are returned unchanged."""
    if not is_uri(uri):
        return uri
    import pyarrow.fs as pafs

    name = shown_uri(uri).rstrip("/").rsplit("/", 1)[-1]  # not `train.jsonl?endpoint_override=...` (nor credentials)
    # (the name in the key: a copy an earlier version cached under another name is not taken for this one)
    return os.path.join(_copy_once(uri, cache_dir, lambda fs, path, tmp: pafs.copy_files(
        path, os.path.join(tmp, name), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()),
        key=f"{uri}#{name}"), name)


def check_uri(uri: str, what: str, expect_dir: bool) -> None:
    """One line when a URI cannot be opened, does not exist or is the wrong kind (a folder for a model, a
    file for data): the same checks a local path gets, before any cluster work."""
    import pyarrow.fs as pafs

    shown = shown_uri(uri)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(path)
    except Exception as e:  # unknown scheme, bad credentials, unreachable endpoint
        raise UserError(f"{what}: {shown}: cannot open ({first_line(e, uri)})") from None
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"{what}: {shown}: not found")
    if expect_dir and info.type != pafs.FileType.Directory:
        raise UserError(f"{what}: {shown}: not a folder")
    if not expect_dir and info.type != pafs.FileType.File:
        raise UserError(f"{what}: {shown}: not a file")
