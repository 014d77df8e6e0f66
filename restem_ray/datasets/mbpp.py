"""MBPP (Austin et al. 2021) as released: `task_id`, `text`, `code`, `test_list`, `test_setup_code`
(the sanitized split says `prompt` and `test_imports` instead).

The prompt states the task and shows the first test, in a docstring (as in the InCoder and bigcode
evaluations; the MBPP paper's own prompt shows all three tests after an instruction); grading runs every test of `test_list`, HumanEval style: `test` = the
setup code + `def check(candidate):` holding the asserts, `entry_point` = the reference `code`'s
function that the asserts call.
"""
from __future__ import annotations

import re
import textwrap

from .common import BadField, some_id, text


def entry_point(code: str, tests: list[str]) -> str:
    """The reference solution's top-level function that the tests call."""
    for name in re.findall(r"^def\s+([A-Za-z_]\w*)\s*\(", code, re.M):
        if any(re.search(rf"\b{name}\s*\(", t) for t in tests):
            return name
    raise BadField("code", "defines no top-level function that test_list calls")


def adapt(row: dict) -> dict:
    task = text(row, "text") if "text" in row else text(row, "prompt")
    code = text(row, "code")
    tests = row.get("test_list")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t.strip() for t in tests):
        raise BadField("test_list", "expected a non-empty list of assert statements")
    setup = text(row, "test_setup_code", empty_ok=True)
    if not setup.strip() and isinstance(row.get("test_imports"), list):
        setup = "\n".join(row["test_imports"])
    prompt = f'"""\n{task}\n{tests[0]}\n"""\n'
    entry = entry_point(code, tests)
    asserts = tests
    keep = ""
    if entry == "check":  # (tasks 56, 349, 899, 967): the harness's own check(candidate) would replace it, and
        # its asserts would call the harness: the program's function is kept under another name for them
        keep = "_mbpp_entry = check\n\n\n"
        asserts = [re.sub(r"\bcheck\s*\(", "_mbpp_entry(", t) for t in tests]
    check = "def check(candidate):\n" + "".join(textwrap.indent(t.strip(), "    ") + "\n" for t in asserts)
    test = (setup.strip() + "\n\n\n" if setup.strip() else "") + keep + check
    # "tests": every assert, one per line, for a template in the MBPP paper's form ("Your code should pass these
    # tests:\n\n{tests}")
    return {**some_id(row, "task_id"), "prompt": prompt, "code_prompt": prompt, "text": task, "test_example": tests[0],
            "tests": "\n".join(t.strip() for t in tests),
            # (solution: a seed file's, for the control arm; the release's code has Windows line ends, 972 of 974
            # rows, which a model trained on it would learn to write)
            "code": code, "solution": code.replace("\r\n", "\n"), "test": test, "entry_point": entry}
