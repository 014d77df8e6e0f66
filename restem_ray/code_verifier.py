"""Grading generated code: HumanEval-style and APPS-style problems, run in the bubblewrap sandbox.

- HumanEval style (`test` defines `check(candidate)`, `entry_point`): the program is built from the
  problem's parts, never from the text the model saw: the code prefix is `code_prompt` when the row has
  one (the original HumanEval prompt, when `prompt` holds a rendered, e.g. chat, text), else `prompt`.
  A completion that defines `entry_point` at top level is a whole answer: the prefix's code before its
  own `def entry_point(` (imports, helpers such as HumanEval/10's `is_palindrome`) + the completion.
  Anything else is a body: prefix + completion, as HumanEval grades it. Then the test and
  `check(entry_point)`, in a namespace of their own with the builtins as they were before the candidate ran;
  it passes only when the harness reports that `check` returned.
- APPS style (`input_output` = {"inputs", "outputs", "fn_name"?}, a dict or its JSON, as published):
  stdin/stdout cases (one fresh process per case, stdout compared line by line, whitespace-trimmed,
  outside the sandbox), or call cases when `fn_name` is given: a module-level function, else a method of
  a LeetCode-style `class Solution` (a fresh instance per case), with LeetCode's implicit imports
  (`List`, `Counter`, `heapq`, ...). Results come back out and are compared here (tuples as lists, an
  expected output wrapped in a one-element list accepted), so expected outputs never enter the sandbox.
Completions: a body that continues the prefix, or unfenced code (not a heading or a line of prose), is graded up
to a closing fence; otherwise the fenced block
that defines the function (else the first python block, else the first block), or the unfenced
completion with prose lines before and after its code dropped. Top-level example usage in an answer
(statements that call the function, `print` or `input`; `if __name__ == "__main__":` blocks) is dropped
in HumanEval and call modes, where it is not part of the answer; stdin programs run as written.
Verdicts: passed, wrong_answer, timeout, memory, runtime_error, syntax_error, sandbox_error, no_code. A stdin
program's cases share one time budget, as call cases do (verification.problem_timeout_s).
"""
from __future__ import annotations

import ast
import decimal
import json
import re
import signal
import textwrap
import time

from .sandbox import RunResult, Sandbox, lift_int_digit_limit
from .verification import after_thinking, seen_prompt

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.S)
_CLOSING_FENCE = re.compile(r"^[ \t]*```", re.M)
# Where an unfenced answer's code may start after prose (lower case: "From the list..." is prose).
_CODE_START = re.compile(r"(?:async\s+def|def|class|import|from|@)\b")
_FUTURE = re.compile(r"^from __future__ import [^\n]*\n?", re.M)
# LeetCode (and APPS's own harness) run call-style answers with these names already imported, so a
# correct `def twoSum(self, nums: List[int], ...)` must not fail on a NameError.
CALL_PRELUDE = ("from typing import *\nimport sys, math, heapq, bisect, itertools, functools, collections, string\n"
                "from collections import Counter, OrderedDict, deque, defaultdict\n"
                "from functools import lru_cache, reduce, cache\nfrom itertools import accumulate, product, "
                "permutations, combinations\nfrom math import sqrt, ceil, floor, gcd, inf, log, log2\n"
                "from heapq import heappush, heappop, heapify\nfrom bisect import bisect_left, bisect_right\n")


def _indented_start(text: str) -> bool:
    """A body that continues the prompt starts indented (2+ spaces or a tab: a lone leading space is a BPE
    artefact before prose or a fence); prose, fences and whole answers start at column 0."""
    first = next((l for l in text.splitlines() if l.strip()), "")
    return first.startswith(("  ", "\t", " \t")) and not first.lstrip().startswith("```")


def _defines_re(name: str, column0: bool = False) -> re.Pattern:
    indent = "" if column0 else r"[ \t]*"
    return re.compile(rf"^{indent}(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", re.M)


def extract_code(completion: str, name: str | None = None, prompt: str = "") -> str:
    """The code to grade (after a reasoning model's </think>): the fenced block that defines `name` (a function or
    method) with more than a stub's body, the largest such definition that parses (not a step-by-step answer's
    pieces: a def cut off mid-body, a base case; not a shorter variant after it), else the first that defines it;
    else a body that continues the prompt, up to a closing fence a base model may add; else unfenced code
    followed by such a closing fence, up to it; else the first python-tagged block (else any block) that reads
    input and prints (a whole stdin program, not a step's piece), else the first that is more than constants;
    else the completion itself. A chosen block gets the functions, classes and imports it uses from the
    answer's other blocks (a helper written in a block of its own)."""
    completion = after_thinking(completion, prompt).replace("\r\n", "\n")  # (a fence tag then \r\n was no fence)
    blocks = [(lang, code) for lang, code in fenced_blocks(completion) if code.strip()]
    tagged = [code for lang, code in blocks if lang.lower() in ("python", "py", "python3")]
    codes = tagged or [code for _, code in blocks]
    if name:
        defining = [c for c in codes if _defines_re(name).search(c)]
        # (a chat answer that first quotes the prompt's stub, then implements it: the implementation)
        defining = [c for c in defining if not _only_a_stub(c, name)] or defining
        if defining:  # (a whole answer indented in its block is that answer at column 0)
            sizes = [_definition_size(textwrap.dedent(c), name) for c in defining]
            chosen = defining[sizes.index(max(sizes))] if max(sizes) > 0 else defining[0]
            whole = textwrap.dedent(chosen)
            if _defines_re(name, column0=True).search(whole):
                return _with_helpers(whole, codes)
            return chosen
    if name and _indented_start(completion):  # (a stdin program continues no prompt: an indented start is prose)
        return _CLOSING_FENCE.split(completion, 1)[0]
    first = _FENCE.search(completion)
    if first:
        before = completion[:first.start()]
        if not first.group(1) and _is_program(before):
            return before  # unfenced code, then the closing fence a base model adds (and whatever follows it)
        if codes and name is None:  # (a stdin program after untagged blocks of sample input: one that does
            whole = (w for c in codes if _reads_and_prints(w := _with_helpers(c, codes)))  # something; a body
            return next(whole, None) or next((c for c in codes if _does_something(c)), codes[0])  # parses never)
        return codes[0] if codes else before
    return completion


def _definition_size(code: str, name: str) -> int:
    """How much the code's `name` function (or method) holds, in syntax nodes; 0 where the code does not parse.
    Of an answer's blocks, the largest definition is its whole answer (EvalPlus's sanitizer takes the longest
    code that parses): not a step's piece, a base case or a skeleton before it, nor a "more concise" variant or
    the one changed part shown again after it."""
    tree = _parse(code)
    if tree is None:
        return 0
    return sum(sum(1 for _ in ast.walk(d)) for d in ast.walk(tree)
               if isinstance(d, (ast.FunctionDef, ast.AsyncFunctionDef)) and d.name == name)


_READS = {"input", "stdin", "open", "read", "readline", "readlines", "buffer"}
_WRITES = {"print", "stdout", "write"}


def _reads_and_prints(code: str) -> bool:
    """A whole stdin program, not one step of it shown alone: it reads its input and writes its output."""
    tree = _parse(code)
    if tree is None:
        return False
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    return bool(names & _READS) and bool(names & _WRITES)


def _with_helpers(code: str, blocks: list[str]) -> str:
    """`code` after the top-level functions, classes and imports of the other blocks that it uses and does not
    bind itself (and what they use in turn), in the answer's order. Of several bindings of a name, the last
    function or class with a body (a stub, or a first attempt the answer then fixed, is not it), else the first
    import (a test block's `from solution import f` comes after the helper it names)."""
    tree = _parse(code)
    if tree is None:
        return code
    bound, wanted = _bound_and_used(tree)
    todo = sorted(wanted - bound - _BUILTINS)
    if not todo:
        return code
    binders: dict[str, list] = {}
    for b, other in enumerate(blocks):
        text = textwrap.dedent(other)
        other_tree = _parse(text) if text != code else None
        for i, node in enumerate(other_tree.body if other_tree is not None else []):
            for name in _top_names(node):
                binders.setdefault(name, []).append((b, i, node, text))
    pieces = {}  # (block index, statement index): source
    while todo:  # (a helper's own imports and helpers, wherever they stand)
        name = todo.pop()
        if name in bound or name not in binders:
            continue
        defs = [c for c in binders[name] if isinstance(c[2], (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                and not _is_stub(c[2])]
        b, i, node, text = defs[-1] if defs else binders[name][0]
        bound |= _top_names(node)
        if (b, i) not in pieces:
            pieces[b, i] = "\n".join(text.split("\n")[_first_line(node) - 1:node.end_lineno])
            todo.extend(sorted(_bound_and_used(node)[1] - bound - _BUILTINS))
    if not pieces:
        return code
    return "\n\n".join(src for _, src in sorted(pieces.items())) + "\n\n" + code


def _first_line(node: ast.stmt) -> int:
    """A statement's first line, its decorators' included (`@lru_cache` on a helper)."""
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])


def _is_stub(node: ast.AST) -> bool:
    """A def or class whose body is only a docstring, `pass` or `...`."""
    return all(isinstance(b, ast.Pass) or (isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant))
               for b in node.body)


def _top_names(node: ast.stmt) -> set[str]:
    """What a top-level def, class or import binds (nothing for other statements: a helper's block may run steps)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names if a.name != "*"}
    return set()


def _bound_and_used(tree: ast.AST) -> tuple[set[str], set[str]]:
    """Every name the code binds anywhere (assignments, parameters, defs, imports, loop targets) and every name
    it reads."""
    bound, used = set(), set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            (used if isinstance(n.ctx, ast.Load) else bound).add(n.id)
        elif isinstance(n, ast.arg):
            bound.add(n.arg)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(n.name)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            bound |= _top_names(n)
    return bound, used


_BUILTINS = set(dir(__import__("builtins")))


def _only_a_stub(code: str, name: str) -> bool:
    """Whether the block's `def name` has no body but a docstring, `pass` or `...` (the prompt's stub quoted)."""
    tree = _parse(textwrap.dedent(code))
    if tree is None:
        return False
    defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name]
    return bool(defs) and all(_is_stub(d) for d in defs)


def _does_something(code: str) -> bool:
    """Python that is more than constants ("3\n1 2 3" is sample input, not a program; nor is what does not parse)."""
    tree = _parse(code)
    return tree is not None and any(
        not (isinstance(n, ast.Expr) and isinstance(n.value, (ast.Constant, ast.UnaryOp, ast.Tuple))) for n in tree.body)


_LIST_MARKER = re.compile(r"[ \t]*(?:[-*+]|\d+[.)])[ \t]+")


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language tag, code) of every fenced block, each less its fence's indentation."""
    return [(m.group(1), _under_fence(text, m)) for m in _FENCE.finditer(text)]


def _under_fence(text: str, m: re.Match) -> str:
    """A fenced block's code less its fence's own indentation: a block inside a markdown list item is indented
    with it, while a function body in a block at column 0 keeps its indentation (it continues the prompt)."""
    indent = text[text.rfind("\n", 0, m.start()) + 1:m.start()]
    code = m.group(2)
    if _LIST_MARKER.fullmatch(indent):
        # "- ```python", "10. ```python": the item's code may be indented as far as its text (a docstring's lines
        # at column 0 included), or written at column 0: the marker's width off the lines that have it where that
        # parses as code starting at column 0; else what every line has, up to that width
        width = " " * len(indent)
        item = "".join(l[len(width):] if l.startswith(width) else l for l in code.splitlines(True))
        if _parse(item) is not None and not _indented_start(item):
            return item
        lines = [l for l in code.splitlines() if l.strip()]
        first = len(lines[0]) - len(lines[0].lstrip(" ")) if lines else 0
        if first - len(width) == 4 and all(l.startswith(width) for l in lines):  # a body, one level in the item
            return item
        k = min([len(indent)] + [len(l) - len(l.lstrip(" ")) for l in lines])
        stripped = "".join(l[k:] if l.startswith(" " * k) else l for l in code.splitlines(True))
        return stripped if k and not _indented_start(stripped) else code
    if not indent or indent.strip():
        return code
    return "".join(line[len(indent):] if line.startswith(indent) else line for line in code.splitlines(True))


def _is_program(text: str) -> bool:
    """Code rather than a heading or a line of prose that happens to parse ("# Solution" is a comment, "Solution
    (Python)" a call): it parses and holds a statement other than a bare expression (an assignment, an import,
    a def, a loop)."""
    tree = _parse(text)
    return tree is not None and any(not isinstance(n, ast.Expr) for n in tree.body)


def _parse(code: str) -> ast.Module | None:
    try:
        return ast.parse(code)
    except Exception:  # SyntaxError, ValueError (NUL bytes), RecursionError/MemoryError (deep nesting)
        return None


def as_module(code: str, paragraphs: bool = False) -> tuple[str, ast.Module] | None:
    """`code` as a Python module: as written, else without prose lines before its first top-level
    def/class/import (with `paragraphs`, any paragraph's first line: a stdin program may start `n = ...`)
    and after its code (an instruct model's unfenced answer). None if neither parses.
    Parsing only, on the host: nothing here runs the code."""
    tree = _parse(code)
    if tree is not None:
        return code, tree
    lines = code.split("\n")
    starts = [i for i, l in enumerate(lines) if _CODE_START.match(l)][:3]
    if paragraphs:
        starts = sorted(set(starts) | {i for i, l in enumerate(lines)
                                       if l[:1] not in ("", " ", "\t") and (i == 0 or not lines[i - 1].strip())})
    for start in starts:
        part = lines[start:]
        if paragraphs and _bare_word(part[0]):  # "Solution" parses as a name: prose, not the program
            continue
        for _ in range(8):
            text = "\n".join(part)
            try:
                return text, ast.parse(text)
            except SyntaxError as e:  # cut at the last column-0 line at or before the error: prose after code
                bad = min(max((e.lineno or 1) - 1, 0), len(part) - 1)
                cut = next((i for i in range(bad, 0, -1) if part[i][:1] not in ("", " ", "\t", "#", ")", "]", "}")), 0)
                if cut == 0:
                    break
                part = part[:cut]
            except Exception:
                return None
    return None


def _bare_word(line: str) -> bool:
    tree = _parse(line)
    return tree is not None and len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr) and isinstance(
        tree.body[0].value, (ast.Name, ast.Constant, ast.Attribute))


def _defines(tree: ast.Module, name: str) -> bool:
    """`name` is defined at top level: a function, a class or an assignment."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return True
    return False


def _is_main_guard(test: ast.expr) -> bool:
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    return (any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides)
            and any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides))


_EXAMPLE_STATEMENTS = (ast.Expr, ast.Assert, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.For, ast.While, ast.With)


def _is_example(node: ast.stmt, calls: set[str], methods: set[str], instances: set[str] = frozenset()) -> bool:
    """A top-level statement that only shows the answer at work: it calls one of `calls`, `doctest.testmod()`, or
    one of `methods` on an object one of `calls` made (`Solution().twoSum(...)`, or `s.twoSum(...)` after
    `s = Solution()`: `instances`), not on any object (`ALPHABET.index(c)` is the answer's own code where the
    answer's function is named `index`)."""
    if isinstance(node, ast.If) and _is_main_guard(node.test):
        return True
    if not isinstance(node, _EXAMPLE_STATEMENTS):
        return False
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            f = n.func
            if isinstance(f, ast.Name) and f.id in calls:
                return True
            if isinstance(f, ast.Attribute) and (
                    (f.attr == "testmod" and isinstance(f.value, ast.Name) and f.value.id == "doctest")
                    or (f.attr in methods and _made_by(f.value, calls, instances))):
                return True
    return False


def _calls_a_driver(node: ast.stmt, drivers: set[str]) -> bool:
    """`main()` alone on its line (not `data = load()`: its result is the program's)."""
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name)
            and node.value.func.id in drivers)


def _reads_stdin(node: ast.AST) -> bool:
    """Whether the code calls input() or uses sys.stdin."""
    return any((isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "input")
               or (isinstance(n, ast.Attribute) and n.attr == "stdin") for n in ast.walk(node))


def _made_by(receiver: ast.expr, calls: set[str], instances: set[str]) -> bool:
    return ((isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Name) and receiver.func.id in calls)
            or (isinstance(receiver, ast.Name) and receiver.id in instances))


def strip_examples(code: str, calls: set[str], methods: set[str] = frozenset()) -> str:
    """Drop top-level example usage (`_is_example`): statements that call one of `calls` (the function, print,
    input), `doctest.testmod()` or a method in `methods` of an object one of `calls` made, and
    `if __name__ == "__main__":` blocks. Code that does not parse, and statements sharing a line with kept code,
    stay as written. A call of a function of the answer's own that reads stdin (a `main()` driver without a
    `__main__` guard) is example usage too: graded, its program has no input, and it ended in an EOFError."""
    tree = _parse(code)
    if tree is None or "\r" in code:  # line numbers below are counted on "\n"
        return code
    drivers = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
               and node.name not in methods and _reads_stdin(node)
               and not any(isinstance(n, (ast.Global, ast.Nonlocal)) for n in ast.walk(node))}  # (one that sets state)
    instances = {t.id for node in tree.body if isinstance(node, ast.Assign) and _made_by(node.value, calls, set())
                 for t in node.targets if isinstance(t, ast.Name)}
    spans = []
    for node in tree.body:
        spans.append((range(_first_line(node) - 1, node.end_lineno), _is_example(node, calls, methods, instances)
                      or _calls_a_driver(node, drivers)))
    kept = {i for span, example in spans if not example for i in span}
    drop = {i for span, example in spans if example and not kept.intersection(span) for i in span}
    if not drop:
        return code
    return "\n".join(l for i, l in enumerate(code.split("\n")) if i not in drop)


def _hoist_future(program: str) -> str:
    """`from __future__` imports must come first; an answer's own ones end up after the prefix or prelude."""
    futures = [f.rstrip("\n") + "\n" for f in _FUTURE.findall(program)]
    return "".join(futures) + _FUTURE.sub("", program) if futures else program


def _imports(prompt: str) -> str:
    return "\n".join(l for l in prompt.splitlines() if l.startswith(("import ", "from ")))


def code_prefix(problem: dict) -> str:
    """The code a HumanEval-style completion continues: `code_prompt` when present, else `prompt`."""
    cp = problem.get("code_prompt")
    return cp if isinstance(cp, str) else problem.get("prompt") or ""


def _context(prefix: str, entry: str) -> str:
    """What a whole answer still needs from the prefix: its code before `def entry(` (imports, helpers), or
    all of it if it is code without that def; a prefix that is not code (today's prose prompts): its imports."""
    m = re.search(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(entry)}[ \t]*\(", prefix, re.M)
    head = prefix[: m.start()] if m else prefix
    return head if _parse(head) is not None else _imports(prefix)


def whole_answer(code: str, entry: str) -> str | None:
    """The completion as a whole answer defining `entry` at top level, or None when it is a body."""
    if _indented_start(code):
        return None
    mod = as_module(code)
    if mod is not None and _defines(mod[1], entry):
        return mod[0]
    if re.search(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(entry)}[ \t]*\(", code, re.M):
        return code  # a whole answer that does not parse: graded as written (syntax_error)
    return None


def humaneval_parts(problem: dict, code: str) -> tuple[str, str, str]:
    """The candidate (prefix and completion), the asserts that run after it, and the prompt's own code before the
    entry point (imports, helpers such as HumanEval/38's encode_cyclic): the sandbox runs the asserts in a namespace
    of their own, with the builtins as they were before the candidate ran and that code run afresh, so that a
    candidate that redefines a helper the asserts use (or shadows a builtin) does not change what they check."""
    entry = problem["entry_point"]
    prefix = code_prefix(problem)
    context = _context(prefix, entry)
    whole = whole_answer(code, entry)
    candidate = prefix + code if whole is None else context + "\n" + whole
    candidate = _hoist_future(strip_examples(candidate, {entry, "print", "input"}))
    return candidate, f"{problem['test']}\n\ncheck({entry})\n", _hoist_future(context)


def humaneval_program(problem: dict, code: str) -> str:
    """The whole program, as one text (what the sandbox runs, in parts: `humaneval_parts`)."""
    candidate, test, _ = humaneval_parts(problem, code)
    return f"{candidate}\n\n{test}"


def call_program(code: str, fn_name: str) -> str:
    """An APPS/LeetCode call-style answer as the program the sandbox runs before calling `fn_name`."""
    mod = as_module(code)
    code = strip_examples(mod[0] if mod else code, {fn_name, "Solution", "print", "input"}, {fn_name})
    # a function the answer does not define must not be the prelude's (fn_name "gcd": math.gcd passed every case
    # for an answer that misnamed its function, or was cut off before it)
    forget = f"del {fn_name}\n" if fn_name in _PRELUDE_NAMES else ""
    return _hoist_future(CALL_PRELUDE + forget + code)


_PRELUDE_NAMES = {a.asname or a.name.split(".")[0] for node in ast.parse(CALL_PRELUDE).body
                  if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names if a.name != "*"}


def verdict_of(result: RunResult, script: bool = False) -> str:
    """How a run ended, as a verdict ('passed' only from the harness's own report, or, for a `script` (stdin
    program, whose output is compared outside), an exit with status 0 as `os._exit(0)` ends it)."""
    if script and result.end == "exit" and result.code == 0:
        return "passed"
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
    if result.end == "memory_limit":
        return "memory"
    return "runtime_error"  # died without a report: os._exit (but a script's os._exit(0)), a signal, the output cap


def _lines(text) -> list[str]:
    if isinstance(text, list):
        text = "\n".join(map(str, text))
    lines = [l.rstrip() for l in str(text).strip().splitlines()]
    return lines


def stdout_matches(got: str, expected) -> bool:
    """APPS stdout cases, as APPS's own checker compares them: line by line (trailing space ignored), else
    token by token, else tokens as numbers within numpy.allclose's default tolerance (rtol 1e-5, atol 1e-8),
    so "0.3333333" matches an expected "0.33333333" and "2.0" matches "2" (two integers must be equal)."""
    if _lines(got) == _lines(expected):
        return True
    exp = "\n".join(map(str, expected)) if isinstance(expected, list) else str(expected)
    a, b = got.split(), exp.split()
    if a == b:
        return True
    return len(a) == len(b) and all(x == y or _close(x, y) for x, y in zip(a, b))


_INTEGER = re.compile(r"[-+]?\d+")


def _close(got: str, expected: str) -> bool:
    """Numbers within allclose's tolerance, unless both are whole numbers: then exactly ("2.0" is 2, and
    1000000000 is not 1000000007, a modular answer, written "1000000000", "1e9" or "1000000000.0", though APPS's
    own checker would take any of them). A float result within allclose's tolerance of an expected integer and
    within 1e-5 of it ("1.9999999999999996" for 2, a binary search's "2.9999999" for 3) is that integer;
    "500000.5" (a / for a //) is not 500000, though within allclose's tolerance. An integer written with a
    leading zero or a plus sign ("0101", a binary string or a fixed-width field; "+3") is text: exactly as
    written."""
    if _INTEGER.fullmatch(expected):
        if re.match(r"[-+]?0\d|\+", expected):
            return got == expected
        if _INTEGER.fullmatch(got):
            return int(got) == int(expected)
        try:
            whole = decimal.Decimal(got)
            if whole.is_finite() and whole == whole.to_integral_value():  # (exact: no float rounding of 10^18)
                return whole == int(expected)
            g, e = float(got), float(expected)
        except (decimal.InvalidOperation, ValueError, OverflowError):
            return False
        return abs(g - e) <= min(1e-8 + 1e-5 * abs(e), 1e-5 + 1e-12 * abs(e))
    try:
        g, e = float(got), float(expected)
    except ValueError:
        return False
    return abs(g - e) <= 1e-8 + 1e-5 * abs(e)


def call_matches(got, expected) -> bool:
    """APPS call cases: expected is often wrapped in a one-element list."""
    got = json.loads(json.dumps(got))
    if got == expected:
        return True
    return isinstance(expected, list) and len(expected) == 1 and got == expected[0]


def _call_args(case) -> list:
    """One APPS call case's arguments: a list of them, or a bare single argument."""
    return case if isinstance(case, list) else [case]


def _input_output(problem: dict) -> dict | None:
    io = problem.get("input_output")
    if isinstance(io, str):
        lift_int_digit_limit()  # (APPS-style cases hold integers of thousands of digits)
        try:
            io = json.loads(io)
        except ValueError:
            return None
    return io if isinstance(io, dict) else None


def unusable_code_fields(problem: dict) -> str | None:
    """The fields that keep a code problem from being graded (what `CodeGrader` would call invalid_problem),
    checked when the file is read; None when it can be graded."""
    if problem.get("input_output"):
        io = _input_output(problem)
        inputs, outputs = (io or {}).get("inputs"), (io or {}).get("outputs")
        if not (isinstance(inputs, list) and isinstance(outputs, list) and inputs and len(inputs) == len(outputs)):
            return "field 'input_output': needs a JSON object with non-empty 'inputs' and 'outputs' lists of one length"
        fn = io.get("fn_name")
        if fn and not (isinstance(fn, str) and fn.isidentifier()):  # (every answer: runtime_error; "": stdin cases)
            return f"field 'input_output': fn_name {fn!r} is not a function name"
        return None
    test, entry = problem.get("test"), problem.get("entry_point")
    if isinstance(test, str) and test.strip() and isinstance(entry, str) and entry.strip() and not entry.isidentifier():
        return f"field 'entry_point': {entry!r} is not a function name"
    if not (isinstance(test, str) and test.strip() and isinstance(entry, str) and entry.isidentifier()):
        return "missing or empty field 'test/entry_point or input_output' (test code and a function name)"
    tree = _parse(test)  # (the harness calls check(entry_point) after it: no answer could pass otherwise)
    if tree is None:
        return "field 'test': not valid Python"
    if not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "check" for n in tree.body):
        return "field 'test': defines no check(candidate), which the harness calls with the entry point"
    return None


# The most one APPS problem may run, all its cases together (each case has timeout_s too): the default of
# verification.problem_timeout_s
MAX_PROBLEM_S = 60.0
# The most one stdin case may print when its own output is larger than the limits' cap (the worker holds it)
MAX_CASE_OUTPUT = 64 << 20


class CodeGrader:
    """Grades code completions in one sandbox (one per verifier actor, created on first use)."""

    def __init__(self, limits, sandbox: Sandbox | None = None, problem_timeout_s: float | None = None):
        self.limits = limits
        self.problem_timeout_s = problem_timeout_s  # (None: MAX_PROBLEM_S)
        self._sandbox = sandbox
        self.last_exc = None
        lift_int_digit_limit()  # (cases, replies and outputs with integers of thousands of digits)

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            self._sandbox = Sandbox(self.limits)
        return self._sandbox

    def grade(self, problem: dict, completion: str) -> str:
        self.last_exc = None  # a HumanEval-style program's exception type (`reference_failures` names it)
        io = _input_output(problem) if problem.get("input_output") else None
        name = (io or {}).get("fn_name") or problem.get("entry_point")
        code = extract_code(completion or "", name if isinstance(name, str) else None, seen_prompt(problem))
        if not code.strip():
            return "no_code"
        if problem.get("input_output"):
            return self._apps(io, code, completion or "") if io is not None else "invalid_problem"
        if problem.get("test") and problem.get("entry_point"):
            candidate, test, context = humaneval_parts(problem, code)
            result = self.sandbox.run(candidate, mode="test", test=test, context=context, entry=problem["entry_point"])
            self.last_exc = (result.report or {}).get("exc")
            return verdict_of(result)
        return "invalid_problem"

    def _apps(self, io: dict, code: str, completion: str) -> str:
        inputs, outputs = io.get("inputs") or [], io.get("outputs") or []
        if not inputs or len(inputs) != len(outputs):
            return "invalid_problem"
        if io.get("fn_name"):
            calls = [_call_args(a) for a in inputs]
            timeout = min(self._problem_s(), self.limits.timeout_s * len(calls))
            res = self.sandbox.run(call_program(code, io["fn_name"]), mode="call", fn_name=io["fn_name"],
                                   calls=calls, timeout_s=timeout)
            verdict = verdict_of(res)
            if verdict != "passed":
                return verdict
            got = res.report.get("results", [])
            ok = len(got) == len(outputs) and all(call_matches(g, e) for g, e in zip(got, outputs))
            return "passed" if ok else "wrong_answer"
        if code not in [c for _, c in fenced_blocks(completion)]:  # unfenced, prose around it: without the prose
            found = as_module(code, paragraphs=True)
            code = found[0] if found else code  # (else it runs as written, and fails as a syntax error)
        # the same budget as call mode's, for all the cases together, besides each case's own limit
        deadline = time.monotonic() + min(self._problem_s(), self.limits.timeout_s * len(inputs))
        for stdin, expected in zip(inputs, outputs):
            stdin = "\n".join(map(str, stdin)) + "\n" if isinstance(stdin, list) else str(stdin)
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            res = self.sandbox.run(code, stdin=stdin, timeout_s=min(self.limits.timeout_s, left),
                                   output_bytes=self._output_cap(expected))
            verdict = verdict_of(res, script=True)
            if verdict != "passed":
                return verdict
            if not stdout_matches(res.stdout, expected):
                return "wrong_answer"
        return "passed"

    def _problem_s(self) -> float:
        return MAX_PROBLEM_S if self.problem_timeout_s is None else self.problem_timeout_s

    def _output_cap(self, expected) -> int:
        """A case's stdout cap: the limit, or room for twice the case's own output where that is larger (a
        Codeforces case printing a permutation of 2e5 numbers holds 1.3 MB: every right answer went over 1 MiB)."""
        size = len(("\n".join(map(str, expected)) if isinstance(expected, list) else str(expected)).encode())
        return max(self.limits.output_bytes, min(2 * size + 4096, MAX_CASE_OUTPUT))

    def close(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None


# A released reference solution, where the format has one: HumanEval's body (EvalPlus's too), MBPP's function;
# APPS's first human solution (the adapter's `solution`) where the row has stdin/call cases
REFERENCE_FIELDS = ("canonical_solution", "code")
APPS_REFERENCE = "solution"


def _reference(problem: dict) -> tuple[str, str] | None:
    fields = REFERENCE_FIELDS + ((APPS_REFERENCE,) if problem.get("input_output") else ())
    return next(((f, problem[f]) for f in fields if isinstance(problem.get(f), str) and problem[f].strip()), None)


def reference_failures(grader: CodeGrader, problems: list[dict], limit: int) -> tuple[int, str, list[str]]:
    """Grade the released reference solutions of the first `limit` problems that have one: (how many, the field,
    "id: verdict (exception)" for each that fails). A reference that fails in the sandbox fails every answer to
    its problem alike (tests that import a package the sandbox's Python lacks, EvalPlus's numpy; limits too tight
    for the problem)."""
    with_ref = [(p, ref) for p in problems if (ref := _reference(p))]
    field = with_ref[0][1][0] if with_ref else ""
    failed = []
    for p, (_, ref) in with_ref[:limit]:
        # (graded as written: not after a reasoning template's <think>, where an answer's code would come after
        # its closing tag)
        verdict = grader.grade({**p, "sampled_prompt": ""}, ref)
        if verdict != "passed":
            exc = grader.last_exc if verdict == "runtime_error" else None  # (which error: a missing module?)
            failed.append(f"{p['id']}: {verdict}" + (f" ({exc})" if exc else ""))
    return min(len(with_ref), limit), field, failed
