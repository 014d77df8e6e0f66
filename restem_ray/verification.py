"""Grading: a binary reward and a verdict per sample. Plain classes; `pool.py` hosts them in Ray actors.

A failed grade is data (a verdict), never an exception: one bad row must not stop an E-step.
"""
from __future__ import annotations

import importlib
import math
import re
import threading
from dataclasses import dataclass
from typing import Callable

from .errors import UserError

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


@dataclass(frozen=True)
class Grade:
    reward: float  # 0.0 or 1.0
    verdict: str   # passed, wrong_answer, no_answer, verifier_error, ...


def _boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(completion: str) -> str | None:
    """Final answer: text after the last `####`, else the last \\boxed{}, else the last number."""
    if "####" in completion:
        ans = completion.rsplit("####", 1)[1].strip().splitlines()
        return ans[0].strip() if ans and ans[0].strip() else None
    boxed = _boxed(completion)
    if boxed is not None:
        return boxed.strip()
    nums = _NUM.findall(completion)
    return nums[-1] if nums else None


def _as_number(text: str) -> float | None:
    t = text.strip().replace(",", "").replace("$", "").rstrip(".").strip()
    try:
        if "/" in t:
            a, b = t.split("/", 1)
            return float(a) / float(b)
        return float(t)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(gold: str, pred: str) -> bool:
    """Numeric comparison when both are numbers; LaTeX equivalence through math-verify otherwise."""
    g, p = _as_number(gold), _as_number(pred)
    if g is not None and p is not None:
        return math.isclose(g, p, rel_tol=1e-9, abs_tol=1e-9)
    from math_verify import parse, verify
    # math-verify's timeouts use SIGALRM, which only the main thread may use.
    kw = {} if threading.current_thread() is threading.main_thread() else {"parsing_timeout": None}
    vkw = {} if not kw else {"timeout_seconds": None}
    gold_p = parse(gold if "$" in gold or "\\boxed" in gold else f"${gold}$", **kw)
    pred_p = parse(pred if "$" in pred or "\\boxed" in pred else f"${pred}$", **kw)
    return bool(gold_p and pred_p and verify(gold_p, pred_p, **vkw))


def grade_math(problem: dict, completion: str) -> Grade:
    pred = extract_answer(completion)
    if pred is None:
        return Grade(0.0, "no_answer")
    return Grade(1.0, "passed") if answers_match(str(problem["answer"]), pred) else Grade(0.0, "wrong_answer")


def load_plugin(spec: str) -> Callable[[dict, str], float]:
    """`module:function` -> callable(problem_row, completion) -> reward in [0, 1]."""
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise UserError(f"verification.verifier: {spec!r} is not 'math' or 'module:function'")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # any import-time failure of user code is a user error
        raise UserError(f"verification.verifier: cannot import {mod_name!r} ({type(e).__name__}: {e})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise UserError(f"verification.verifier: {spec!r} is not a callable")
    return fn


class Verifier:
    """Grades rows that carry the problem's fields plus `completion`."""

    def __init__(self, verifier: str = "math", threshold: float = 0.5):
        self.name = verifier
        self.threshold = threshold
        self._plugin = None if verifier == "math" else load_plugin(verifier)

    def grade(self, problem: dict, completion: str) -> Grade:
        try:
            if self._plugin is None:
                return grade_math(problem, completion)
            score = float(self._plugin(problem, completion))
            return Grade(1.0, "passed") if score >= self.threshold else Grade(0.0, "wrong_answer")
        except Exception as e:  # a crash on one row is that row's verdict
            return Grade(0.0, f"verifier_error:{type(e).__name__}")

    def grade_batch(self, rows: list[dict]) -> list[dict]:
        out = []
        for r in rows:
            g = self.grade(r, r["completion"])
            out.append({**r, "reward": g.reward, "verdict": g.verdict})
        return out


def resolve_verifier(name: str, task_kind: str) -> str:
    if name != "auto":
        return name
    if task_kind == "math":
        return "math"
    raise UserError("verification.verifier: task.kind 'code' needs a code verifier, not available yet; "
                    "give a plug-in 'module:function'")
