"""Problem files (JSONL or Parquet) in, validated rows out; atomic JSONL/Parquet writers.

Every problem has `id` and `prompt`; math problems add `answer`; code problems add `test` and
`entry_point` (HumanEval style) or `input_output` (APPS style). Errors name the file and line.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError, first_line, where


def _kind(value) -> str:
    return "NaN" if isinstance(value, float) and not math.isfinite(value) else type(value).__name__


def _scalar(value) -> bool:
    """Text or a finite number (not a bool, not bytes): what an id or a reference answer can be."""
    return (isinstance(value, (str, int, float)) and not isinstance(value, bool)
            and not (isinstance(value, float) and not math.isfinite(value)))


def unicode_text(value) -> bool:
    """Text UTF-8 can hold: JSON allows a lone surrogate ("\\ud800"), which neither a tokenizer nor a Parquet file
    takes."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _not_unicode(value, field: str = "") -> str | None:
    """A field whose text is not valid Unicode (a lone surrogate such as "\\ud800", which JSON allows): the
    tokenizer would fail on it mid-run."""
    todo = [(value, field)]  # (not recursive: JSON allows nesting deeper than Python's stack)
    while todo:
        value, field = todo.pop()
        if isinstance(value, str):
            if not unicode_text(value):
                return f"field '{field}' holds text that is not valid Unicode (a lone surrogate)"
        elif isinstance(value, dict):
            todo += [(v, field or str(k)) for k, v in reversed(value.items())]
        elif isinstance(value, list):
            todo += [(v, field) for v in reversed(value)]
    return None


def _required(row: dict, task_kind: str) -> str | None:
    """Why this row is not a problem of this task kind ("missing or empty field 'x'", ...), else None."""
    missing = "missing or empty field '{}'".format
    for key in ("id", "prompt"):
        if key not in row or row[key] is None:
            return missing(key)
    if not _scalar(row["id"]) or not str(row["id"]).strip():
        return f"field 'id' must be non-empty text or a number (got {_kind(row['id'])} {row['id']!r})"[:200]
    if isinstance(row["prompt"], (bytes, bytearray)):
        return "field 'prompt' is bytes, not text"
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        return missing("prompt")
    if bad := _not_unicode(row):
        return bad
    if task_kind == "math" and (row.get("answer") is None or str(row["answer"]).strip() == ""):
        return missing("answer")
    if task_kind == "math" and (isinstance(row["answer"], (bytes, bytearray, dict)) or (
            isinstance(row["answer"], float) and not math.isfinite(row["answer"]))):  # (a bool is graded as text)
        return f"field 'answer' must be text or a number (got {_kind(row['answer'])})"
    if task_kind == "solutions":  # human-written worked solutions (task.seed_file)
        sol = row.get("solution")
        return None if isinstance(sol, str) and sol.strip() else missing("solution")
    if task_kind == "code":
        from .code_verifier import unusable_code_fields

        return unusable_code_fields(row)
    return None


def _read_rows(path: Path) -> list[tuple[int | None, dict]]:
    if path.suffix == ".parquet":
        try:
            return [(None, r) for r in pq.read_table(path).to_pylist()]
        except (pa.ArrowException, OSError, ValueError, OverflowError) as e:  # (a timestamp Python cannot hold)
            raise UserError(f"{path}: not a readable Parquet file ({first_line(e)})") from None
    if path.suffix not in (".jsonl", ".json"):
        raise UserError(f"{path}: unknown problem file type (use .jsonl, .jsonl.gz, .json or .parquet)")
    rows = []
    try:
        return _read_json_lines(path, rows)
    except OSError as e:  # (unreadable: permissions, an I/O error)
        raise UserError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None


def _read_json_lines(path: Path, rows: list) -> list[tuple[int | None, dict]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{where(path, lineno)}: not UTF-8") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(f"{where(path, lineno)}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise UserError(f"{where(path, lineno)}: JSON nested too deeply") from None
            if not isinstance(row, dict):
                raise UserError(f"{where(path, lineno)}: expected a JSON object")
            rows.append((lineno, row))
    return rows


def load_problems(path: str | Path, task_kind: str = "math", limit: int | None = None) -> list[dict]:
    """Read and validate a problem file; ids are normalised to str."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p}: is a folder, not a problem file")
    if not p.is_file():
        raise UserError(f"{p}: problem file not found")
    rows = _read_rows(p)
    if not rows:
        raise UserError(f"{p}: no problems in file")
    seen: dict[str, int | None] = {}
    out = []
    for i, (lineno, row) in enumerate(rows):
        loc = where(p, lineno if lineno is not None else i + 1) + ("" if lineno else " (row)")
        problem = _required(row, task_kind)
        if problem:
            raise UserError(f"{loc}: {problem}")
        pid = str(row["id"])
        if pid in seen:
            raise UserError(f"{loc}: duplicate id {pid!r}")
        seen[pid] = lineno
        row = dict(row, id=pid)
        out.append(row)
    return out[:limit] if limit else out


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    durable_replace(tmp, p)


def write_parquet(path: str | Path, table: pa.Table) -> None:
    """Write to a temporary name and rename: a reader never sees half a file, and once this returns the file
    survives a machine crash too (a run's manifest commits phases whose files must then be whole)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "wb") as f:
        pq.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())
    durable_replace(tmp, p)


def whole_parquet(path: Path) -> bool:
    """Whether a file ends in a Parquet footer that reads (a missing file, a write cut off by a crash or an
    upload cut off on an object store does not)."""
    try:
        pq.read_metadata(path)
        return True
    except Exception:
        return False


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (a folder about to be renamed into place and committed)."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_folder(Path(folder))


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # (a folder that cannot be opened for reading: its entries stand, unsynced)
        return
    try:
        os.fsync(fd)
    except OSError:  # (some filesystems refuse fsync on a folder)
        pass
    finally:
        os.close(fd)


def durable_replace(tmp: Path, path: Path) -> None:
    """Rename `tmp` (already fsynced) to `path`, and fsync the folder so that the rename survives a crash
    (ext4's delayed allocation can otherwise bring back the old name, or an empty file)."""
    os.replace(tmp, path)
    _fsync_folder(path.parent)


def read_samples(path: str | Path) -> list[tuple[str, dict | None]]:
    """Samples to grade, leniently: a row that cannot be read becomes (location, None) instead of an
    error, so one bad line gets its own verdict rather than stopping a whole grading job."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: samples file not found")
    if p.suffix == ".parquet":
        return [(f"{p}:{i + 1} (row)", r) for i, (_, r) in enumerate(_read_rows(p))]
    if p.suffix not in (".jsonl", ".json"):
        raise UserError(f"{p}: unknown samples file type (use .jsonl, .json or .parquet)")
    with open(p, "rb") as f:
        head = f.read(64)
    if p.suffix == ".json" and head.lstrip().startswith(b"["):  # one JSON array of samples, not JSONL
        try:
            data = json.loads(p.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            line = f":{e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
            raise UserError(f"{p}{line}: not a valid JSON array of samples ({type(e).__name__})") from None
        if not isinstance(data, list):
            raise UserError(f"{p}: not a valid JSON array of samples")
        return [(f"{where(p, i + 1)} (row)", r if isinstance(r, dict) else None) for i, r in enumerate(data)]
    out = []
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                row = None
            out.append((where(p, lineno), row if isinstance(row, dict) else None))
    return out
