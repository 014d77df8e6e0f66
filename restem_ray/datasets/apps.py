"""APPS (Hendrycks et al. 2021) as released: `problem_id`, `question`, `input_output` (JSON text:
{"inputs", "outputs"} stdin/stdout cases, or call cases with "fn_name", LeetCode `class Solution`
methods included), `starter_code`, `difficulty`, `solutions`, `url`.

The prompt is APPS's own (its generate_gpt_codes.py): QUESTION, the starter code, the I/O format,
ANSWER. Rows without test cases (some APPS rows have an empty `input_output`) are skipped (None),
and counted by the loader. Of `solutions` (megabytes per problem) only the first is kept, as `solution`: a
seed file's human solution.
"""
from __future__ import annotations

import json

from ..sandbox import lift_int_digit_limit
from .common import BadField, some_id, text


def adapt(row: dict) -> dict | None:
    lift_int_digit_limit()  # (cases with integers of thousands of digits: read and written back as JSON)
    io = row.get("input_output")
    if io is None or (isinstance(io, str) and not io.strip()):
        return None
    if isinstance(io, str):
        try:
            io = json.loads(io)
        except ValueError as e:
            raise BadField("input_output", f"not valid JSON ({e})") from None
    if not isinstance(io, dict):
        raise BadField("input_output", "expected a JSON object with inputs and outputs")
    inputs, outputs = io.get("inputs") or [], io.get("outputs") or []
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise BadField("input_output", "inputs and outputs must be lists (one entry per test case)")
    # (an empty fn_name means stdin cases, as the grader and the prompt below read it)
    if io.get("fn_name") and not (isinstance(io["fn_name"], str) and io["fn_name"].isidentifier()):
        raise BadField("input_output", f"fn_name {io['fn_name']!r} is not a function name")
    if not inputs:
        return None
    if len(inputs) != len(outputs):
        raise BadField("input_output", f"{len(inputs)} inputs but {len(outputs)} outputs")
    question = text(row, "question")
    starter = row.get("starter_code") if isinstance(row.get("starter_code"), str) else ""
    prompt = ("\nQUESTION:\n" + question + ("\n" + starter if starter else "")
              + ("\nUse Call-Based format" if io.get("fn_name") else "\nUse Standard Input format") + "\nANSWER:\n")
    extra = {k: row[k] for k in ("difficulty", "url") if row.get(k) is not None}
    first = _first_solution(row.get("solutions"))
    if first:
        extra["solution"] = first
    return {**some_id(row, "problem_id", "id"), "prompt": prompt, "question": question, "starter_code": starter,
            "input_output": json.dumps(io), **extra}


def _first_solution(solutions) -> str | None:
    """The first of `solutions` (a JSON list of programs, as text), decoded alone: the rest can be megabytes."""
    if isinstance(solutions, list):
        return solutions[0] if solutions and isinstance(solutions[0], str) else None
    if not isinstance(solutions, str) or not solutions.lstrip().startswith("["):
        return None
    text = solutions.lstrip()[1:].lstrip()
    try:
        first, _ = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return None
    return first if isinstance(first, str) and first.strip() else None
