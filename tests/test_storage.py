import json

import pytest

from restem_ray.errors import UserError
from restem_ray.storage import RunDir


def test_manifest_records_phases_and_metrics(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create("seed: 0\n", resume=False)
    assert not run.done(1, "generate")
    run.complete(1, "generate", [{"samples": 8}])
    run.complete(1, "eval", [{"split": "valid", "pass@1": 0.5}, {"split": "test", "pass@1": 0.25}], best_iteration=1)
    assert run.done(1, "generate") and run.done(1, "eval")
    assert run.manifest()["best_iteration"] == 1
    lines = run.metrics()
    assert [(m["phase"], m["iteration"]) for m in lines] == [("generate", 1), ("eval", 1), ("eval", 1)]
    assert lines[1]["split"] == "valid" and lines[1]["pass@1"] == 0.5


def test_stop_after_ends_the_run_once_the_phase_is_committed(tmp_path):
    from restem_ray.errors import StopAfter

    run = RunDir(tmp_path / "run")
    run.create("x: 1\n", resume=False)
    run.stop_after = "1/generate"
    run.complete(0, "eval", [{"split": "valid", "pass@1": 0.5}])
    with pytest.raises(StopAfter, match="1/generate"):
        run.complete(1, "generate", [{"samples": 8}])
    assert run.done(1, "generate") and [m["phase"] for m in run.metrics()] == ["eval", "generate"]  # committed first


def test_resume_drops_metrics_of_unfinished_phases_and_torn_lines(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create("x: 1\n", resume=False)
    run.complete(1, "generate", [{"samples": 8}])
    # a crash after the metrics line of "select" but before its manifest entry, plus a torn line
    with open(run.metrics_path, "a") as f:
        f.write(json.dumps({"phase": "select", "iteration": 1, "time": 1.0, "kept": 3}) + "\n")
        f.write('{"phase": "impr')
    RunDir(tmp_path / "run").create("x: 1\n", resume=True)
    assert [m["phase"] for m in run.metrics()] == ["generate"]


def test_create_refuses_to_overwrite_or_resume_nothing(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(UserError, match="nothing to resume"):
        run.create("", resume=True)
    run.create("", resume=False)
    with pytest.raises(UserError, match="already holds a run"):
        RunDir(tmp_path / "run").create("", resume=False)


def test_unwritable_run_dir_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot create run directory"):
        RunDir(blocker / "run").create("", resume=False)


def test_resume_allows_safe_changes_and_forced_ones(tmp_path):
    import yaml

    run = RunDir(tmp_path / "run")
    old = {"seed": 0, "loop": {"iterations": 3, "patience": 1}, "training": {"lr": 0.001}}
    run.create(yaml.safe_dump(old), resume=False)
    more = {**old, "loop": {"iterations": 5, "patience": 2}}
    RunDir(tmp_path / "run").create(yaml.safe_dump(more), resume=True)  # more iterations: safe
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["loop"]["iterations"] == 5
    changed = {**more, "training": {"lr": 0.01}}
    with pytest.raises(UserError, match=r"training.lr: 0.001 -> 0.01\); only loop"):
        RunDir(tmp_path / "run").create(yaml.safe_dump(changed), resume=True)
    RunDir(tmp_path / "run").create(yaml.safe_dump(changed), resume=True, force=True)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["training"]["lr"] == 0.01


def test_a_run_from_before_a_key_existed_resumes_when_the_key_keeps_its_default(tmp_path):
    """A config key added to restem-ray later is missing from an older run's config.yaml: that run had the key's
    default, so resuming with the default is no change; another value is one."""
    import yaml

    old = {"seed": 0, "sampling": {"stop": ["Q:"]}}
    RunDir(tmp_path / "run").create(yaml.safe_dump(old), resume=False)
    now = {"seed": 0, "sampling": {"stop": ["Q:"], "stop_token_ids": []}}
    RunDir(tmp_path / "run").create(yaml.safe_dump(now), resume=True)
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(old))
    derived = {"seed": 0, "sampling": {"stop": ["Q:"], "stop_token_ids": [151645]}}
    with pytest.raises(UserError, match=r"\(sampling.stop_token_ids: \[\] -> \[151645\]\); only loop"):
        RunDir(tmp_path / "run").create(yaml.safe_dump(derived), resume=True)


def test_resume_refuses_other_train_or_seed_problems(tmp_path):
    """E-step shards are chunks of the train list, and the control arm trains on the seed set: a resume whose data
    files (or their decontamination) give other problems would mix two sets. Ids alone do not tell: files
    without ids number their rows. A run from before the record resumes and gets one."""
    from restem_ray.storage import problem_set

    rows = [{"id": str(i), "prompt": f"Q{i}"} for i in range(10)]
    sets = lambda train, seed=rows[:3]: {"train": problem_set(train), "seed": problem_set(seed)}
    run = RunDir(tmp_path / "run")
    run.create("seed: 0\n", resume=False, problems=sets(rows))
    RunDir(tmp_path / "run").create("seed: 0\n", resume=True, problems=sets(rows))
    with pytest.raises(UserError, match=r"manifest.json: the train problems changed since the run was created "
                                        r"\(10 -> 8 problems, or other ones\)"):
        RunDir(tmp_path / "run").create("seed: 0\n", resume=True, problems=sets(rows[2:]))
    renumbered = [dict(r, prompt=f"Q{(int(r['id']) + 1) % 10}") for r in rows]  # same ids, rows reordered
    with pytest.raises(UserError, match=r"the train problems changed .*\(10 -> 10 problems, or other ones\)"):
        RunDir(tmp_path / "run").validate("seed: 0\n", resume=True, problems=sets(renumbered))
    with pytest.raises(UserError, match=r"the seed problems changed .*\(3 -> 2 problems"):
        RunDir(tmp_path / "run").validate("seed: 0\n", resume=True, problems=sets(rows, rows[:2]))
    RunDir(tmp_path / "run").create("seed: 0\n", resume=True, force=True, problems=sets(rows[2:]))
    assert run.manifest()["problem_sets"] == sets(rows[2:])  # forced: the new sets are the run's now
    m = run.manifest()
    del m["problem_sets"]
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(m))  # a run from before the record
    RunDir(tmp_path / "run").create("seed: 0\n", resume=True, problems=sets(rows))
    assert run.manifest()["problem_sets"] == sets(rows)
    # the prompts as the files hold them: a rendering that stamps the day's date (Llama-3's template) is no change
    dated = [dict(r, raw_prompt=r["prompt"], prompt=f"Today: 05 Dec 2026\n{r['prompt']}") for r in rows]
    assert problem_set([dict(r, prompt=r["prompt"].replace("05", "06")) for r in dated]) == problem_set(rows)


def test_resume_accepts_a_resized_cluster_without_force(tmp_path):
    """Replica and worker counts, placement and observability cannot change what a run computes (per-sample
    seeds): a bigger cluster resumes without --force. The training worker count sets the global batch: refused."""
    import yaml

    old = {"sampling": {"num_replicas": 1, "samples_per_problem": 8}, "verification": {"num_workers": 2},
           "training": {"num_workers": 2, "cpus_per_worker": 1.0}, "observability": {"tensorboard": True}}
    RunDir(tmp_path / "run").create(yaml.safe_dump(old), resume=False)
    bigger = {"sampling": {"num_replicas": 8, "max_replicas": 16, "samples_per_problem": 8},
              "verification": {"num_workers": 32, "max_workers": 64, "resources": {"sandbox": 1}},
              "training": {"num_workers": 2, "cpus_per_worker": 4.0, "resources_per_worker": {"sandbox": 1}},
              "observability": {"tensorboard": False, "mlflow_tracking_uri": "http://mlflow:5000"}}
    RunDir(tmp_path / "run").create(yaml.safe_dump(bigger), resume=True)
    for key, value in (("training", {"num_workers": 4, "cpus_per_worker": 4.0}),
                       ("sampling", {"num_replicas": 8, "samples_per_problem": 16})):
        changed = {**bigger, key: value}
        with pytest.raises(UserError, match=rf"\({key}\.\w+: \d+ -> \d+\); only loop"):
            RunDir(tmp_path / "run").create(yaml.safe_dump(changed), resume=True)


HOLD = """
import sys
from restem_ray.storage import RunDir
RunDir(sys.argv[1]).lock()
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_driver_is_refused_until_the_holder_dies(tmp_path):
    """The lock is the kernel's (flock): held while its process lives, dropped when it is SIGKILLed."""
    import os
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"another driver is running this run \(pid {holder.pid} on "):
            RunDir(tmp_path / "run").lock()
    finally:
        holder.kill()
        holder.wait()
    mine = RunDir(tmp_path / "run")
    mine.lock()  # the dead holder's lock went with it
    assert f"pid {os.getpid()} on" in (tmp_path / "run" / ".driver.lock").read_text()
    with pytest.raises(UserError, match=rf"pid {os.getpid()}"):
        RunDir(tmp_path / "run").lock()  # a second lock in the same process is refused too (flock per open file)
    mine.unlock()
    RunDir(tmp_path / "run").lock()
