"""Grading generated code: HumanEval-style and APPS-style problems, run in the bubblewrap sandbox.

- HumanEval style (`test` defines `check(candidate)`, `entry_point`): the program is prompt + completion
  (or the completion alone when it defines the entry point, with the prompt's imports), then the test,
  then `check(entry_point)`. It passes only when the harness reports that `check` returned.
- APPS style (`input_output` = {"inputs", "outputs", "fn_name"?}, a dict or its JSON): stdin/stdout cases
  (one fresh process per case, stdout compared line by line, whitespace-trimmed, outside the sandbox),
  or call cases when `fn_name` is given (the results come back out and are compared here, so expected
  outputs never enter the sandbox).
A completion holding a fenced code block is graded on the code in the first fence.
Verdicts: passed, wrong_answer, timeout, memory, runtime_error, syntax_error, sandbox_error, no_code.
"""
from __future__ import annotations

import json
import re
import signal

from .sandbox import RunResult, Sandbox

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(completion: str) -> str:
    """The code in the first fenced block (python-tagged preferred), else the completion itself."""
    blocks = _FENCE.findall(completion)
    if blocks:
        tagged = [code for lang, code in blocks if lang.lower() in ("python", "py", "python3")]
        return (tagged or [code for _, code in blocks])[0]
    return completion


def _imports(prompt: str) -> str:
    return "\n".join(l for l in prompt.splitlines() if l.startswith(("import ", "from ")))


def humaneval_program(problem: dict, code: str) -> str:
    entry = problem["entry_point"]
    if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.M):
        body = _imports(problem.get("prompt", "")) + "\n" + code
    else:
        body = problem.get("prompt", "") + code
    return f"{body}\n\n{problem['test']}\n\ncheck({entry})\n"


def verdict_of(result: RunResult) -> str:
    """How a run ended, as a verdict ('passed' only from the harness's own report)."""
    if result.end == "report":
        rep = result.report or {}
        if rep.get("status") == "ok":
            return "passed"
        if rep.get("status") == "syntax_error":
            return "syntax_error"
        exc = rep.get("exc")
        return {"MemoryError": "memory", "AssertionError": "wrong_answer"}.get(exc, "runtime_error")
    if result.end == "timeout" or (result.end == "signal" and result.code == signal.SIGXCPU):
        return "timeout"
    if result.end == "sandbox_error":
        return "sandbox_error"
    return "runtime_error"  # died without a report: os._exit, a signal, the output cap


def _lines(text) -> list[str]:
    if isinstance(text, list):
        text = "\n".join(map(str, text))
    lines = [l.rstrip() for l in str(text).strip().splitlines()]
    return lines


def stdout_matches(got: str, expected) -> bool:
    if _lines(got) == _lines(expected):
        return True
    exp = "\n".join(map(str, expected)) if isinstance(expected, list) else str(expected)
    return got.split() == exp.split()


def call_matches(got, expected) -> bool:
    """APPS call cases: expected is often wrapped in a one-element list."""
    got = json.loads(json.dumps(got))
    if got == expected:
        return True
    return isinstance(expected, list) and len(expected) == 1 and got == expected[0]


class CodeGrader:
    """Grades code completions in one sandbox (one per verifier actor, created on first use)."""

    def __init__(self, limits, sandbox: Sandbox | None = None):
        self.limits = limits
        self._sandbox = sandbox

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            self._sandbox = Sandbox(self.limits)
        return self._sandbox

    def grade(self, problem: dict, completion: str) -> str:
        code = extract_code(completion or "")
        if not code.strip():
            return "no_code"
        if problem.get("input_output"):
            return self._apps(problem, code)
        if problem.get("test") and problem.get("entry_point"):
            return verdict_of(self.sandbox.run(humaneval_program(problem, code), mode="test"))
        return "invalid_problem"

    def _apps(self, problem: dict, code: str) -> str:
        io = problem["input_output"]
        if isinstance(io, str):
            try:
                io = json.loads(io)
            except ValueError:
                return "invalid_problem"
        inputs, outputs = io.get("inputs") or [], io.get("outputs") or []
        if not inputs or len(inputs) != len(outputs):
            return "invalid_problem"
        if io.get("fn_name"):
            calls = [a if isinstance(a, list) else [a] for a in inputs]
            timeout = min(60.0, self.limits.timeout_s * len(calls))
            res = self.sandbox.run(code, mode="call", fn_name=io["fn_name"], calls=calls, timeout_s=timeout)
            verdict = verdict_of(res)
            if verdict != "passed":
                return verdict
            got = res.report.get("results", [])
            ok = len(got) == len(outputs) and all(call_matches(g, e) for g, e in zip(got, outputs))
            return "passed" if ok else "wrong_answer"
        for stdin, expected in zip(inputs, outputs):
            stdin = "\n".join(map(str, stdin)) + "\n" if isinstance(stdin, list) else str(stdin)
            res = self.sandbox.run(code, stdin=stdin)
            verdict = verdict_of(res)
            if verdict != "passed":
                return verdict
            if not stdout_matches(res.stdout, expected):
                return "wrong_answer"
        return "passed"

    def close(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None
