import json
import os
import socket
import subprocess
import sys
import time

import pytest
import yaml

from restem_ray.builtin import build_tokenizer
from restem_ray.config import RestemConfig
from restem_ray.errors import UserError
from restem_ray.resources import _place, check_cluster

BASE = {"task": {"train_file": "t", "valid_file": "v"}, "model": {"base": "m"}}


def cfg(**sections):
    tree = json.loads(json.dumps(BASE))
    for sec, vals in sections.items():
        tree[sec] = vals
    return RestemConfig.model_validate(tree)


def test_replicas_must_fit_on_single_nodes():
    c = cfg(sampling={"use_gpu": True, "num_replicas": 2, "tensor_parallel_size": 2},
            training={"use_gpu": True, "num_workers": 4})
    check_cluster(c, [{"CPU": 16, "GPU": 4}])  # 2 replicas x 2 GPUs, then 4 trainers x 1 GPU
    check_cluster(c, [{"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 2}])
    with pytest.raises(UserError, match=r"E-step: 2 sampler replica\(s\) need CPU 1, GPU 2 each; it holds 1"):
        check_cluster(c, [{"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 2}])
    c = cfg(sampling={"use_gpu": True, "num_replicas": 2, "tensor_parallel_size": 2},
            training={"use_gpu": True, "num_workers": 5})
    with pytest.raises(UserError, match=r"M-step: 5 training worker\(s\).*holds 4 \(cluster total CPU 16, GPU 4\)"):
        check_cluster(c, [{"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 2}])


def test_training_workers_custom_resources_are_checked():
    """The check asks for what Ray Train will: a worker's custom resources, and the sandbox's when validation
    grades code. (Ray Train retries a worker group that cannot be placed without end.)"""
    c = cfg(sampling={"use_gpu": True},
            training={"use_gpu": True, "num_workers": 2, "resources_per_worker": {"H100": 1}})
    with pytest.raises(UserError, match=r"M-step: 2 training worker\(s\) need CPU 1, GPU 1, H100 1 each; it holds 0"):
        check_cluster(c, [{"CPU": 16, "GPU": 8}])
    check_cluster(c, [{"CPU": 16, "GPU": 8, "H100": 8}])
    code = cfg(task={**BASE["task"], "kind": "code"}, training={"num_workers": 2, "eval_every_steps": 5},
               verification={"num_workers": 1})
    with pytest.raises(UserError, match=r"M-step: 2 training worker\(s\) need CPU 1, sandbox 1 each; it holds 1"):
        check_cluster(code, [{"CPU": 8}, {"CPU": 1, "sandbox": 1000}])  # sandbox nodes exist: workers need one
    check_cluster(code, [{"CPU": 8}, {"CPU": 2, "sandbox": 1000}])
    check_cluster(code.model_copy(update={"training": code.training.model_copy(update={"eval_every_steps": None})}),
                  [{"CPU": 8}, {"CPU": 1, "sandbox": 1000}])  # no validation: no grading in the workers


def test_strict_placement_strategies_are_checked_as_ray_places_them():
    """STRICT_PACK puts every bundle of the group on one node and STRICT_SPREAD each on its own node: a
    cluster with enough GPUs in total can still hold neither, and Ray would wait on the group for ever."""
    two_nodes = [{"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 2}]
    packed = cfg(sampling={"use_gpu": True, "num_replicas": 4, "placement_strategy": "STRICT_PACK"},
                 training={"use_gpu": True, "num_workers": 2})
    with pytest.raises(UserError, match=r"E-step: 4 sampler replica\(s\) need CPU 1, GPU 1 each on one node "
                                        r"\(placement_strategy STRICT_PACK\); it holds 2"):
        check_cluster(packed, two_nodes)
    check_cluster(packed, [{"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 4}])  # the second node holds all four
    check_cluster(packed.model_copy(update={"sampling": packed.sampling.model_copy(
        update={"placement_strategy": "PACK"})}), two_nodes)  # soft: spills over to the next node
    spread = cfg(sampling={"use_gpu": True},
                 training={"use_gpu": True, "num_workers": 3, "placement_strategy": "STRICT_SPREAD"})
    with pytest.raises(UserError, match=r"M-step: 3 training worker\(s\) need CPU 1, GPU 1 each on different "
                                        r"nodes \(placement_strategy STRICT_SPREAD\); it holds 2"):
        check_cluster(spread, two_nodes)
    check_cluster(spread, two_nodes + [{"CPU": 4, "GPU": 1}])
    # a strict group that cannot be placed whole holds nothing (Ray reserves all of its bundles or none)
    free = [{"CPU": 4, "GPU": 1}, {"CPU": 4, "GPU": 1}]
    assert _place(free, {"CPU": 1, "GPU": 1}, 2, "STRICT_PACK") == 1
    assert _place(free, {"CPU": 1, "GPU": 1}, 3, "STRICT_SPREAD") == 2
    assert free == [{"CPU": 4, "GPU": 1}, {"CPU": 4, "GPU": 1}]
    assert _place(free, {"CPU": 1, "GPU": 1}, 2, "STRICT_SPREAD") == 2
    assert free == [{"CPU": 3, "GPU": 0}, {"CPU": 3, "GPU": 0}]


def test_verifiers_share_the_e_step_with_samplers():
    c = cfg(verification={"num_workers": 8, "cpus_per_worker": 1})
    with pytest.raises(UserError, match=r"8 verifier\(s\) need CPU 1 each; it holds 3"):
        check_cluster(c, [{"CPU": 4}])  # one CPU goes to the sampler replica


def minimal_run_files(tmp_path):
    """One-problem train/valid files and a model folder that passes the pre-Ray checks (config + tokenizer)."""
    for name in ("train", "valid"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"id": 1, "prompt": f"{name} q", "answer": "1"}) + "\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    build_tokenizer().save_pretrained(tmp_path / "model")


def test_run_asking_for_missing_gpus_fails_fast(tmp_path):
    minimal_run_files(tmp_path)
    tree = {"task": {"train_file": "train.jsonl", "valid_file": "valid.jsonl"}, "model": {"base": "model"},
            "sampling": {"use_gpu": True, "num_replicas": 2}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tree))
    start = time.time()
    r = subprocess.run([sys.executable, "-m", "restem_ray.cli", "run", str(tmp_path / "cfg.yaml"), "--out",
                        str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert time.time() - start < 60
    assert r.returncode == 2, r.stderr[-2000:]
    assert "2 sampler replica(s) need CPU 1, GPU 1 each; it holds 0 (cluster total CPU" in r.stderr
    assert "GPU 0" in r.stderr
    assert not (tmp_path / "run").exists()


def test_run_refuses_a_run_directory_another_driver_holds(tmp_path):
    """Through the CLI: a driver holds RUN (the lock of restem_ray.storage); a second `run` on RUN exits 2 with
    one line naming the holder, before writing anything."""
    from restem_ray.storage import RunDir

    minimal_run_files(tmp_path)
    tree = {"task": {"train_file": "train.jsonl", "valid_file": "valid.jsonl"}, "model": {"base": "model"},
            "ray": {"num_cpus": 4}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tree))
    held = RunDir(tmp_path / "run")
    held.lock()
    try:
        r = subprocess.run([sys.executable, "-m", "restem_ray.cli", "run", str(tmp_path / "cfg.yaml"), "--out",
                            str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    finally:
        held.unlock()
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("restem-ray: error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"restem-ray: error: {tmp_path / 'run'}: another driver is running this run "
        f"(pid {os.getpid()} on {socket.gethostname()} since "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".driver.lock"]
    # a --resume of a run another driver holds is refused before Ray: with a cluster address nothing answers at,
    # the refusal is the lock's, not a connection error
    held.create(yaml.safe_dump(tree), resume=False)
    held.lock()
    try:
        r = subprocess.run([sys.executable, "-m", "restem_ray.cli", "run", str(tmp_path / "cfg.yaml"), "--out",
                            str(tmp_path / "run"), "--resume", "--force"], capture_output=True, text=True,
                           timeout=120, env=dict(os.environ, RAY_ADDRESS="127.0.0.1:1"))
    finally:
        held.unlock()
    assert r.returncode == 2 and "another driver is running this run" in r.stderr, r.stderr[-2000:]


def test_run_reads_and_renders_the_data_once(tmp_path, monkeypatch):
    """`run` checks its inputs before Ray starts, and the driver uses the Task that check rendered: the files
    are read once (a dataset's "skipped N rows" notice is printed once). Stopped where Ray would start."""
    import restem_ray.datasets
    import restem_ray.driver
    import restem_ray.prompts
    from restem_ray.cli import main

    minimal_run_files(tmp_path)
    tree = {"task": {"train_file": "train.jsonl", "valid_file": "valid.jsonl"}, "model": {"base": "model"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tree))
    reads = []
    real = restem_ray.datasets.load_splits

    def counted(*a, **kw):
        reads.append(1)
        return real(*a, **kw)

    def no_ray(*a, **kw):
        raise UserError("stop before Ray")

    monkeypatch.setattr(restem_ray.datasets, "load_splits", counted)
    monkeypatch.setattr(restem_ray.prompts, "load_splits", counted)
    monkeypatch.setattr(restem_ray.driver, "init_ray", no_ray)
    assert main(["run", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]) == 2
    assert len(reads) == 1
