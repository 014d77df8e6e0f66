"""Problem files in a released format -> the problem rows the rest of restem-ray uses.

    rows = load_split("gsm8k/test.jsonl", kind="math", dataset="gsm8k")

`task.dataset` names the format (one module each: gsm8k, hendrycks_math, humaneval, mbpp, apps); without
one, rows are today's format (id, prompt, answer / test + entry_point / input_output). `task.columns`
renames columns first; a `task.adapter` plug-in ('module:function', row -> dict or None) replaces the
built-in adapters. A file whose rows carry no id numbers them: the 0-based row number, as a string.
JSONL (also gzipped, as HumanEval ships), a .json array of rows (sanitized MBPP) and Parquet (as dataset
repositories publish). Errors name `file:line` and the field.
"""
from __future__ import annotations

import gzip
import json
import random
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..data import _read_rows, _required
from ..errors import UserError, where
from ..remote import check_uri, is_uri, local_file_copy, shown_uri
from . import apps, gsm8k, hendrycks_math, humaneval, mbpp
from .common import BadField

ADAPTERS: dict[str, Callable[[dict], dict | None]] = {
    "gsm8k": gsm8k.adapt, "math": hendrycks_math.adapt, "humaneval": humaneval.adapt, "mbpp": mbpp.adapt,
    "apps": apps.adapt}
# task.dataset -> (exemplars as (question, answer), their few-shot text format)
STANDARD_SHOTS = {"gsm8k": (gsm8k.STANDARD_SHOTS, gsm8k.SHOT_FORMAT),
                  "math": (hendrycks_math.STANDARD_SHOTS, hendrycks_math.SHOT_FORMAT)}
SKIP_REASON = {"apps": "no test cases in input_output"}


def read_rows(path: str | Path, what: str = "problem file") -> list[tuple[str, dict]]:
    """(location, row) per row: `file:line` for JSONL, `file:N (row)` for Parquet. A URI (s3://, gs://, ...)
    is read from a node-local copy (restem_ray/remote.py); its locations and errors name the URI."""
    if is_uri(path):
        uri = str(path)
        check_uri(uri, what, expect_dir=False)
        local, shown = local_file_copy(uri), shown_uri(uri)  # (locations without credentials in the URI)
        try:
            return [(loc.replace(local, shown, 1), row) for loc, row in read_rows(local, what)]
        except UserError as e:
            raise UserError(str(e).replace(local, shown)) from None
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p}: is a folder, not a {what}")
    if not p.is_file():
        raise UserError(f"{p}: {what} not found")
    if p.name.endswith(".jsonl.gz"):
        return _read_gzip_jsonl(p)
    try:
        array = p.suffix == ".json" and _head(p).lstrip().startswith(b"[")
    except OSError as e:
        raise UserError(f"{p}: cannot read ({e.strerror or type(e).__name__})") from None
    if array:
        return _read_json_array(p)
    return [(where(p, line) if line is not None else f"{where(p, i + 1)} (row)", row)
            for i, (line, row) in enumerate(_read_rows(p))]


def _head(p: Path) -> bytes:
    with open(p, "rb") as f:  # (not the whole file: APPS's test split is 1.3 GB)
        return f.read(64)


def _read_gzip_jsonl(p: Path) -> list[tuple[str, dict]]:
    out = []
    try:
        lines = gzip.decompress(p.read_bytes()).splitlines()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: corrupt compressed data
        raise UserError(f"{p}: not a readable gzip file ({e})") from None
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise UserError(f"{where(p, lineno)}: not valid JSON ({type(e).__name__})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where(p, lineno)}: expected a JSON object")
        out.append((where(p, lineno), row))
    return out


def _read_json_array(p: Path) -> list[tuple[str, dict]]:
    """A .json file holding one array of objects (MBPP's sanitized-mbpp.json, for one)."""
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{p}: not UTF-8") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{where(p, e.lineno)}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise UserError(f"{p}: JSON nested too deeply") from None
    if not isinstance(data, list):
        raise UserError(f"{p}: expected a JSON array of objects")
    bad = next((i for i, r in enumerate(data) if not isinstance(r, dict)), None)
    if bad is not None:
        raise UserError(f"{where(p, bad + 1)} (row): expected a JSON object")
    return [(f"{where(p, i + 1)} (row)", r) for i, r in enumerate(data)]


def load_split(path: str | Path, *, kind: str, dataset: str | None = None, columns: dict[str, str] | None = None,
               adapter: str | None = None, need: tuple[str, ...] = (), limit: int | None = None,
               rows: list[tuple[str, dict]] | None = None) -> list[dict]:
    """Read, adapt and validate one problem file; `need` = fields the prompt template uses; `rows`: the file's
    rows where the caller has read them (read_rows)."""
    rows = read_rows(path) if rows is None else rows
    if not rows:
        raise UserError(f"{path}: no problems in file")
    if adapter:
        from ..verification import load_plugin

        plugin, name = load_plugin(adapter, "task.adapter"), f"task.adapter {adapter}"
    else:
        plugin, name = ADAPTERS.get(dataset) if dataset else None, f"task.dataset {dataset}"
    adapted, skipped = [], 0
    for index, (loc, row) in enumerate(rows):
        out = _adapt(row, loc, columns or {}, plugin, name)
        if out is None:
            skipped += 1
        else:
            adapted.append((index, loc, out))
    if skipped:
        why = SKIP_REASON.get(dataset, f"{name} returned None")
        print(f"[data] {path}: skipped {skipped} of {len(rows)} rows ({why})")
    if not adapted:
        raise UserError(f"{path}: no problems in file ({skipped} rows skipped)")
    with_id = next((loc for _, loc, r in adapted if r.get("id") is not None), None)
    numbered = with_id is None  # a file without ids: row numbers
    seen, out, unsolved = set(), [], 0
    for index, loc, r in adapted:
        if numbered:
            r = {"id": str(index), **r}
        if kind == "solutions" and plugin is not None and not r.get("solution"):
            unsolved += 1  # a released problem without a human solution (APPS has some): no seed row
            continue
        problem = _required(r, kind)
        if problem:
            if r.get("id") is None and problem.startswith("missing or empty field 'id'"):  # (a stray id elsewhere)
                problem += (f" ({with_id.rsplit('/', 1)[-1]} has one: give every row an id, or none, to number "
                            "them by row)")
            raise UserError(f"{loc}: {problem}")
        missing = next((f for f in need if r.get(f) is None), None)
        if missing:
            raise UserError(f"{loc}: prompt.template uses field '{missing}', which this row lacks "
                            f"(fields: {', '.join(sorted(r))})")
        pid = str(r["id"])
        if pid in seen:
            raise UserError(f"{loc}: duplicate id {pid!r}")
        seen.add(pid)
        out.append(dict(r, id=pid))
    if unsolved:
        print(f"[data] {path}: {unsolved} problems have no solution to train on")
    if not out:
        raise UserError(f"{path}: no rows with a solution")
    return out[:limit] if limit else out


def _adapt(row: dict, loc: str, columns: dict[str, str], plugin, name: str) -> dict | None:
    if columns:
        gone = next((c for c in columns.values() if c not in row), None)
        if gone is not None:
            target = next(t for t, c in columns.items() if c == gone)
            raise UserError(f"{loc}: task.columns.{target}: no column {gone!r} (columns: {', '.join(row)})")
        row = {**row, **{target: row[c] for target, c in columns.items()}}
    if plugin is None:
        return dict(row)
    try:
        out = plugin(row)
    except BadField as e:
        raise UserError(f"{loc}: {e}") from None
    except (Exception, SystemExit) as e:  # user code: any failure names the row (sys.exit too: not a silent exit)
        raise UserError(f"{loc}: {name}: {type(e).__name__}: {e}") from None
    if out is not None and not isinstance(out, dict):
        raise UserError(f"{loc}: {name} returned {type(out).__name__}, expected a dict (or None to skip)")
    return out


@dataclass
class Splits:
    """The problems of one config, unrendered: train, and each eval split by name (valid first)."""
    train: list[dict]
    evals: dict[str, list[dict]]
    seed_rows: list[dict] = field(default_factory=list)


def load_splits(task, need: tuple[str, ...] = ()) -> Splits:
    """Every problem file of `task` (a TaskConfig), adapted, validated, with valid_split carved out."""
    opts = dict(kind=task.kind, dataset=task.dataset, columns=task.columns, adapter=task.adapter, need=need)

    def load(name: str, path: str) -> list[dict]:
        if name in task.eval_datasets:  # a split in another released format (e.g. a transfer set)
            return load_split(path, kind=task.kind, dataset=task.eval_datasets[name], need=need)
        return load_split(path, **opts)

    train = load_split(task.train_file, **opts)
    if task.valid_split is not None:
        train, valid = carve(train, task.valid_split, task.valid_split_seed, task.train_file)
    else:
        valid = load("valid", task.valid_file)
    files = ({"test": task.test_file} if task.test_file else {}) | task.extra_eval_files
    evals = {"valid": valid} | {n: load(n, f) for n, f in files.items()}
    # (an extra split that is the train file itself watches train pass@1: it is meant to hold train problems)
    held_out = {n: rows for n, rows in evals.items()
                if n not in task.extra_eval_files or not _same_file(task.extra_eval_files[n], task.train_file)}
    ngram = task.decontamination_ngram
    train = leave_out_eval_problems(train, held_out, task.train_file, "task.train_file", need, ngram)
    lim = task.max_eval_problems
    seed = load_seed(task, need) if task.seed_file else []
    if seed:  # the control arm's data (and the M-step's with mix_seed_data): solutions of eval problems leak too
        seed = leave_out_eval_problems(seed, held_out, task.seed_file, "task.seed_file", need, ngram)
    return Splits(train[: task.max_train_problems] if task.max_train_problems else train,
                  {n: rows[:lim] if lim else rows for n, rows in evals.items()}, seed)


def load_seed(task, need: tuple[str, ...] = ()) -> list[dict]:
    """task.seed_file's human solutions: rows of id, prompt, solution as they are, or a file in the task's own
    released format (GSM8K's or MATH's train file, whose worked solutions are the paper's human data) through
    its adapter (task.dataset, task.columns, task.adapter)."""
    rows = read_rows(task.seed_file, "seed file")
    ours = not rows or {"prompt", "solution"} <= rows[0][1].keys()
    if ours or not (task.dataset or task.adapter or task.columns):
        return load_split(task.seed_file, kind="solutions", need=need, rows=rows)
    try:
        return load_split(task.seed_file, kind="solutions", dataset=task.dataset, columns=task.columns,
                          adapter=task.adapter, need=need, rows=rows)
    except UserError as e:  # its first row lacks prompt/solution: read as the task's format, which failed too
        raise UserError(f"{e} (task.seed_file: rows of id, prompt, solution, or the task's released format where "
                        "it has worked solutions: task.dataset gsm8k, math, humaneval, mbpp or apps)") from None


def _same_file(a: str, b: str) -> bool:
    """Two config paths name one file (a `--set` path may be relative, or go through a link)."""
    if is_uri(a) or is_uri(b):
        return a == b
    return Path(a).resolve() == Path(b).resolve()


def _statement(row: dict, need: tuple[str, ...]) -> str:
    """What a problem asks, for comparing splits: its prompt and the fields the prompt template reads, case and
    spacing ignored."""
    return " ".join(" ".join(str(row.get(f) or "").lower().split()) for f in ("prompt", *need))


def _identities(row: dict, need: tuple[str, ...]) -> list[str]:
    """What makes two rows one problem: its statement; for a code problem also its tests (a copy whose wording
    was edited keeps them: MBPP's sanitized release rewords prompts of the full one's tasks), and for an MBPP
    row its task text without the example test (the sanitized release corrected some tests, which the prompt
    shows)."""
    out = [_statement(row, need)]
    tests = row.get("test") or row.get("input_output")
    if isinstance(tests, str) and tests.strip():
        out.append("tests: " + " ".join(tests.split()))
    if row.get("test_example") and isinstance(row.get("text"), str) and row["text"].strip():  # (mbpp.adapt)
        out.append("task: " + " ".join(row["text"].lower().split()))
    return out


def leave_out_eval_problems(rows: list[dict], evals: dict[str, list[dict]], source: str, key: str,
                            need: tuple[str, ...] = (), ngram: int | None = None) -> list[dict]:
    """`rows` (train problems or seed solutions) without those that are also in an eval split (by statement, or
    by tests or task text where a released code format has them: `_identities`): one trained on would inflate
    the score that picks the iteration (valid) or is reported (test). With `ngram`, also those that share at
    least half their runs of `ngram` words with one eval problem (a near-duplicate with a number or a name
    changed). Said on one line; a file that is all eval problems (the same file twice, MBPP's one-file release)
    is an error."""
    split_of: dict[str, str] = {}  # identity -> its eval split
    statement_split: dict[str, str] = {}  # the statements alone (near-duplicates are looked for among them)
    for name, eval_rows in evals.items():
        for r in eval_rows:
            for i, ident in enumerate(_identities(r, need)):
                split_of.setdefault(ident, name)
                if i == 0:
                    statement_split.setdefault(ident, name)
    for d in (split_of, statement_split):
        d.pop(_statement({}, need), None)
    identities = [_identities(r, need) for r in rows]
    statements = [i[0] for i in identities]
    twin = [next((split_of[i] for i in ids if i in split_of), None) for ids in identities]
    found = Counter(t for t in twin if t)
    near = (_near_duplicates([st for st, t in zip(statements, twin) if not t], statement_split, ngram)
            if ngram else {})
    found.update(near.values())
    kept = [r for r, st, t in zip(rows, statements, twin) if not t and st not in near]
    if len(kept) == len(rows):
        return rows
    where_ = ", ".join(f"{name} ({n})" for name, n in found.items())
    what = "seed solutions" if key == "task.seed_file" else "train problems"
    if not kept:
        raise UserError(f"{key}: {source}: all {len(rows)} of its problems are also in {where_}: give "
                        "train and eval problems from different files (MBPP's mbpp.jsonl holds every split: use "
                        "the released train, validation and test files)")
    how = f" (or shares half its {ngram}-word runs with a problem there)" if ngram else ""
    code = " (or tests)" if len(identities[0]) > 1 else ""
    print(f"[restem] {source}: left out {len(rows) - len(kept)} {what} whose problem statement{code} is also in "
          f"{where_}{how}", flush=True)
    return kept


def _grams(statement: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", statement)
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _near_duplicates(statements: list[str], split_of: dict[str, str], n: int) -> dict[str, str]:
    """statement -> the eval split of the one eval problem it shares at least half its n-word runs with. A run
    found in many eval problems is boilerplate ("the first line of the input contains"), no sign of a twin:
    it counts on neither side, and looking it up in every problem would cost their number per run."""
    holders: dict[tuple[str, ...], list[int]] = {}
    eval_statements = list(split_of)
    for j, st in enumerate(eval_statements):
        for g in _grams(st, n):
            holders.setdefault(g, []).append(j)
    common = max(8, len(eval_statements) // 1000)
    out = {}
    for st in statements:
        grams = [holders.get(g) for g in _grams(st, n)]
        grams = [h for h in grams if h is None or len(h) <= common]
        shared = Counter(j for h in grams if h for j in h)
        if shared:
            j, count = shared.most_common(1)[0]
            if 2 * count >= len(grams):
                out[st] = split_of[eval_statements[j]]
    return out


def carve(rows: list[dict], size: float | int, seed: int, source: str) -> tuple[list[dict], list[dict]]:
    """A seeded validation split out of `rows`: (train without it, valid), both in file order."""
    n = round(size * len(rows)) if isinstance(size, float) else size
    if not 1 <= n < len(rows):
        raise UserError(f"task.valid_split: {size} of the {len(rows)} problems in {source} leaves "
                        f"{'no validation' if n < 1 else 'no train'} problems")
    chosen = set(random.Random(seed).sample(range(len(rows)), n))
    return ([r for i, r in enumerate(rows) if i not in chosen], [r for i, r in enumerate(rows) if i in chosen])
