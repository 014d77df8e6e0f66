import json
import time
import types
from pathlib import Path

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


def test_a_resume_that_names_the_same_data_through_a_link_is_no_config_change(tmp_path):
    """config.yaml recorded relative paths resolved through links; they are now recorded as written (the HF
    cache's hash-named blobs kept no file type): a run from before names the same file, and resumes."""
    import yaml

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "train.jsonl").write_text("{}\n")
    (tmp_path / "data").symlink_to(tmp_path / "real")
    run = RunDir(tmp_path / "run")
    run.create(yaml.safe_dump({"task": {"train_file": str(tmp_path / "real" / "train.jsonl")}}), resume=False)
    RunDir(tmp_path / "run").create(yaml.safe_dump({"task": {"train_file": str(tmp_path / "data" / "train.jsonl")}}),
                                    resume=True)
    (tmp_path / "other.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="task.train_file"):
        RunDir(tmp_path / "run").create(yaml.safe_dump({"task": {"train_file": str(tmp_path / "other.jsonl")}}),
                                        resume=True)


def test_where_a_run_runs_may_change_on_resume_what_it_computes_may_not(tmp_path):
    """ray.* keys (the cluster, a local Ray's CPUs and dashboard) are where a run runs: a resume may change them."""
    import yaml

    was = {"seed": 0, "ray": {"address": None, "num_cpus": 2, "include_dashboard": True}}
    RunDir(tmp_path / "run").create(yaml.safe_dump(was), resume=False)
    RunDir(tmp_path / "run").create(yaml.safe_dump({"seed": 0, "ray": {"address": "auto", "num_cpus": 4,
                                                                      "include_dashboard": False}}), resume=True)
    with pytest.raises(UserError, match=r"seed: 0 -> 1"):
        RunDir(tmp_path / "run").create(yaml.safe_dump({**was, "seed": 1}), resume=True)
    # model.trust_remote_code decides which code runs (a folder of a type transformers knows that ships its own
    # code too, Phi-3's, runs that code only when trusted; its checkpoints carry it only then)
    with pytest.raises(UserError, match=r"model.trust_remote_code: False -> True"):
        RunDir(tmp_path / "run").create(yaml.safe_dump({**was, "model": {"trust_remote_code": True}}), resume=True)


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


def test_a_run_from_before_a_key_was_removed_resumes_and_mapping_entries_still_count(tmp_path):
    """A key a later restem-ray removed is in an older run's config.yaml but in no new one: it means nothing now,
    so it is no change; an entry removed from a mapping field (engine_kwargs) still is one."""
    import yaml

    old = {"seed": 0, "sampling": {"stop": ["Q:"], "retired_knob": 3, "engine_kwargs": {"dtype": "bfloat16"}},
           "retired_section": {"a": 1}}
    RunDir(tmp_path / "run").create(yaml.safe_dump(old), resume=False)
    now = {"seed": 0, "sampling": {"stop": ["Q:"], "engine_kwargs": {"dtype": "bfloat16"}}}
    RunDir(tmp_path / "run").create(yaml.safe_dump(now), resume=True)
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(UserError, match=r"\(sampling.engine_kwargs: \{'dtype': 'bfloat16'\} -> \{\}\)"):
        RunDir(tmp_path / "run").create(yaml.safe_dump({**now, "sampling": {"stop": ["Q:"], "engine_kwargs": {}}}),
                                        resume=True)


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


def test_resume_refuses_problems_whose_answers_or_tests_changed(tmp_path):
    """Same ids and prompts, a corrected answer (or test): the iterations before and after would be scored
    against two answer keys. A run recorded before the answers were digested resumes, and records them."""
    from restem_ray.storage import problem_set

    rows = [{"id": str(i), "prompt": f"Q{i}", "answer": str(i), "other": "x"} for i in range(5)]
    run = RunDir(tmp_path / "run")
    run.create("seed: 0\n", resume=False, problems={"eval test": problem_set(rows)})
    RunDir(tmp_path / "run").validate("seed: 0\n", resume=True, problems={  # a column no verifier reads
        "eval test": problem_set([dict(r, other="y") for r in rows])})
    fixed = [dict(r, answer="42") if r["id"] == "3" else r for r in rows]
    with pytest.raises(UserError, match=r"the eval test problems' answers or tests changed since the run was created"):
        RunDir(tmp_path / "run").validate("seed: 0\n", resume=True, problems={"eval test": problem_set(fixed)})
    m = run.manifest()
    m["problem_sets"]["eval test"].pop("graded")  # a run from before the answers were digested
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(m))
    RunDir(tmp_path / "run").create("seed: 0\n", resume=True, problems={"eval test": problem_set(fixed)})
    assert run.manifest()["problem_sets"]["eval test"] == problem_set(fixed)


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


def test_runs_sharing_a_storage_path_have_m_steps_of_their_own(tmp_path):
    """Ray Train resumes whatever run of its name it finds in its storage: with a shared training.storage_path,
    two runs named g1 (or g1 removed and started again) get different M-step names; in a run's own directory
    the name stays readable."""
    import shutil

    from restem_ray.driver import mstep_name

    a, b = RunDir(tmp_path / "x" / "g1"), RunDir(tmp_path / "y" / "g1")
    for run in (a, b):
        run.create("x: 1\n", resume=False)
    assert mstep_name(a, "iter_001", shared=False) == mstep_name(b, "iter_001", shared=False) == "mstep-g1-iter_001"
    first = mstep_name(a, "iter_001", shared=True)
    assert first.startswith("mstep-g1-") and first.endswith("-iter_001")
    assert first != mstep_name(b, "iter_001", shared=True)
    assert first == mstep_name(RunDir(tmp_path / "x" / "g1"), "iter_001", shared=True)  # a resume: the same
    shutil.rmtree(tmp_path / "x" / "g1")
    time.sleep(0.01)
    again = RunDir(tmp_path / "x" / "g1")
    again.create("x: 1\n", resume=False)
    assert mstep_name(again, "iter_001", shared=True) != first


def test_a_finished_m_step_is_found_only_by_the_job_that_trained_it(tmp_path):
    """The finished HF checkpoint's restem_mstep.json: the same job (and training bytes) finds its metrics; a
    job with other settings or other rows trains anew."""
    from restem_ray.training import FINISHED, _finished_m_step, _job_fingerprint

    data = tmp_path / "train.parquet"
    data.write_bytes(b"rows")
    job = {"init_model": "base", "seed": 1, "cfg": {"lr": 1e-5, "cpus_per_worker": 1}, "step_relay": object(),
           "log_every_steps": 5}
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    fp = _job_fingerprint(job, data)
    (ckpt / FINISHED).write_text(json.dumps({"fingerprint": fp, "metrics": {"steps": 4},
                                              "step_lines": [{"step": 2, "loss": 1.5}]}))
    # the step relay (an actor handle) and how often steps are logged do not change the weights
    assert _finished_m_step(ckpt, _job_fingerprint({**job, "step_relay": None, "log_every_steps": 0}, data)) == (
        {"steps": 4}, [{"step": 2, "loss": 1.5}])
    assert _finished_m_step(ckpt, _job_fingerprint({**job, "cfg": {"lr": 1e-5, "cpus_per_worker": 4}}, data))  # where
    assert _finished_m_step(ckpt, _job_fingerprint({**job, "seed": 2}, data)) is None
    assert _finished_m_step(ckpt, _job_fingerprint({**job, "cfg": {"lr": 2e-5, "cpus_per_worker": 1}}, data)) is None
    data.write_bytes(b"other rows")
    assert _finished_m_step(ckpt, _job_fingerprint(job, data)) is None
    assert _finished_m_step(tmp_path / "missing", fp) is None


def test_an_m_step_fingerprint_does_not_depend_on_how_the_run_directory_is_spelt(tmp_path, monkeypatch):
    """A run resumed as --out /abs/runs/x after --out runs/x (or a URI run's copy on another machine, another
    cache folder) finds the M-step it finished; a base model outside the run is keyed as configured."""
    from restem_ray.training import _job_fingerprint

    def fingerprint(root: Path, spelt: str):
        (root / "iter_001").mkdir(parents=True, exist_ok=True)
        (root / "iter_001" / "train.parquet").write_bytes(b"rows")
        job = {"init_model": f"{spelt}/iter_000/checkpoint", "train_file": f"{spelt}/iter_001/train.parquet", "seed": 1,
               "cfg": {"lr": 1e-5}}
        return _job_fingerprint(job, root / "iter_001" / "train.parquet", run_root=(Path(spelt) / "iter_001" / "checkpoint").parent.parent)  # as improve() roots it

    monkeypatch.chdir(tmp_path)
    here = fingerprint(tmp_path / "runs" / "x", "runs/x")
    assert fingerprint(tmp_path / "runs" / "x", str(tmp_path / "runs" / "x")) == here
    assert fingerprint(tmp_path / "cache" / "y", str(tmp_path / "cache" / "y")) == here  # another machine's copy
    job = {"init_model": "/models/base", "train_file": "runs/x/iter_001/train.parquet", "seed": 1, "cfg": {"lr": 1e-5}}
    other = _job_fingerprint({**job, "init_model": "/models/other"}, tmp_path / "runs/x/iter_001/train.parquet",
                             run_root=Path("runs/x"))
    assert other != _job_fingerprint(job, tmp_path / "runs/x/iter_001/train.parquet", run_root=Path("runs/x"))
    # an M-step finished before model.trust_remote_code existed is found; one that ran the folder's code is another
    keyed = [_job_fingerprint({**job, **extra}, tmp_path / "runs/x/iter_001/train.parquet", run_root=Path("runs/x"))
             for extra in ({}, {"trust_remote_code": False}, {"trust_remote_code": True})]
    assert keyed[0] == keyed[1] != keyed[2]


def test_the_best_iteration_is_committed_with_the_eval_it_rests_on(tmp_path):
    """--stop-after T/eval (or a kill right after that commit) must leave the manifest's best_iteration
    naming the best iterate so far: it is written with the eval, not after. The scores here are given (scoring
    is tested with vLLM elsewhere); the manifest is real."""
    import types

    from restem_ray.driver import Driver
    from restem_ray.errors import StopAfter

    run = RunDir(tmp_path / "run")
    run.create("x: 1\n", resume=False)
    valid = {0: 0.25, 1: 0.5, 2: 0.375}
    d = Driver.__new__(Driver)  # the bookkeeping alone: no config, cluster or model
    d.run, d.best, d.eval_sets = run, None, {"valid": []}
    d.cfg = types.SimpleNamespace(evaluation=types.SimpleNamespace(k_for=lambda name: 0),
                                  model=types.SimpleNamespace(base=str(tmp_path / "base")))
    d.samplers = types.SimpleNamespace(get=lambda model: None)
    d._score = lambda pool, problems, k, desc, split: {"pass@1": valid[int(desc.split()[1])]}
    for t in (0, 1, 2):
        run.iter_dir(t).mkdir(parents=True, exist_ok=True)
    run.stop_after = "1/eval"
    with pytest.raises(StopAfter):
        d.evaluate(0, "base")
        d.evaluate(1, "iter_001")
    assert run.manifest()["best_iteration"] == 1 and d.best == {"iteration": 1, "valid": 0.5}
    run.stop_after = None
    assert d.evaluate(2, "iter_002") == {"iteration": 1, "valid": 0.5}  # worse keeps the earlier
    valid[3] = 0.5
    run.iter_dir(3).mkdir(parents=True, exist_ok=True)
    assert d.evaluate(3, "iter_003") == {"iteration": 1, "valid": 0.5}  # and so does a tie
    assert run.manifest()["best_iteration"] == 1
    resumed = Driver.__new__(Driver)  # a resume reads the committed scores back: the same best
    resumed.run, resumed.best = run, None
    assert [resumed.evaluate(t, "m") for t in (0, 1, 2)][-1] == {"iteration": 1, "valid": 0.5}


def test_a_dashboard_that_fails_does_not_end_the_run(tmp_path, capsys):
    """An MLflow server down mid-run: the phase is committed and its lines are in metrics.jsonl; one warning."""
    class Down:
        def log(self, iteration, phase, lines):
            raise ConnectionError("mlflow: 503 Service Unavailable\nretry later")

    run = RunDir(tmp_path / "run", sink=Down())
    run.create("x: 1\n", resume=False)
    run.complete(1, "generate", [{"samples": 8}])
    run.log_steps(1, [{"step": 1, "loss": 2.0}])
    assert run.done(1, "generate") and [m["phase"] for m in run.metrics()] == ["generate", "improve_step"]
    out = capsys.readouterr().out
    assert ("[restem] warning: the dashboards did not take the 1/generate lines (ConnectionError: mlflow: 503 "
            "Service Unavailable); metrics.jsonl holds them") in out and "1/improve_step lines" in out


def test_fixed_k_shards_written_under_other_settings_are_refused(tmp_path):
    """A --force resume that changed sampling.prompts_per_request finds shards chunked another way: the E-step
    would keep some problems' samples twice and others' never. It stops in one line instead. (All shards are
    on disk here, so nothing is sampled; the shards and run directory are real.)"""
    import types

    import pyarrow as pa

    from restem_ray.data import write_parquet
    from restem_ray.driver import Driver
    from restem_ray.errors import RunError

    run = RunDir(tmp_path / "run")
    run.create("x: 1\n", resume=False)
    d = Driver.__new__(Driver)
    d.run, d.train = run, [{"id": str(i), "prompt": f"q{i}"} for i in range(4)]
    d.cfg = types.SimpleNamespace(seed=0, sampling=types.SimpleNamespace(
        adaptive=False, prompts_per_request=2, samples_per_problem=2, temperature=1.0, top_k=-1, top_p=1.0,
        max_tokens=8, stop=[], stop_token_ids=[]))
    row = lambda i, k: {"id": str(i), "sample_index": k, "reward": 1.0, "completion_tokens": 3,  # noqa: E731
                        "finish_reason": "stop", "verdict": "passed", "completion": "x"}
    # written with 3 problems per shard, resumed with 2: shard 0 holds problems 0-2, shard 1 problems 2-3
    write_parquet(run.samples_dir(1) / "part-00000.parquet", pa.Table.from_pylist([row(i, k) for i in range(3) for k in range(2)]))
    write_parquet(run.samples_dir(1) / "part-00001.parquet", pa.Table.from_pylist([row(i, k) for i in (2, 3) for k in range(2)]))
    with pytest.raises(RunError, match="do not hold one sample per"):
        d.generate(1, "model")
    assert not run.done(1, "generate")
    # a --force resume with a train file of as many other problems: every count matches, the ids do not
    for p in run.samples_dir(1).glob("*.parquet"):
        p.unlink()
    for c in range(2):
        write_parquet(run.samples_dir(1) / f"part-{c:05d}.parquet",
                      pa.Table.from_pylist([row(i, k) for i in (2 * c, 2 * c + 1) for k in range(2)]))
    d.train = [{"id": f"other-{i}", "prompt": f"q{i}"} for i in range(4)]
    with pytest.raises(RunError, match="do not hold one sample per"):
        d.generate(1, "model")


def _finished_run(root, valid: list[float]):
    """A run directory as a finished run leaves it (evals committed for iterations 0..len(valid)-1), no Ray."""
    import json as _json

    comp = {"0/eval": 1.0}
    metrics = [{"phase": "eval", "iteration": 0, "split": "valid", "pass@1": valid[0], "time": 1.0}]
    for t in range(1, len(valid)):
        comp |= {f"{t}/{p}": float(t * 10) for p in ("generate", "select", "improve", "eval")}
        metrics.append({"phase": "eval", "iteration": t, "split": "valid", "pass@1": valid[t], "time": float(t * 10)})
    for t, v in enumerate(valid):
        (root / f"iter_{t:03d}").mkdir(parents=True)
        (root / f"iter_{t:03d}" / "eval.json").write_text(_json.dumps({"valid": {"pass@1": v}}))
    best = max(range(len(valid)), key=lambda t: (valid[t], -t))
    (root / "manifest.json").write_text(_json.dumps({"version": 1, "completed": comp, "created": 0,
                                                     "best_iteration": best}))
    (root / "metrics.jsonl").write_text("".join(_json.dumps(m) + "\n" for m in metrics))


def test_the_control_arm_is_sized_by_the_seed_rows_the_m_step_keeps(tmp_path, monkeypatch):
    """Seed solutions longer than training.max_seq_len are dropped by the M-step: an epoch of 12 rows of which
    4 are dropped has 2 optimizer steps of 4, not 3, so matching an M-step of 6 steps (training.max_steps) takes 3
    epochs, not 2.
    (The real control arm runs in tests/test_demo_e2e.py; here train_m_step only records what it was asked.)"""
    import restem_ray.driver as driver_module
    from restem_ray.builtin import build_tokenizer
    from restem_ray.config import config_from_dict
    from restem_ray.driver import Driver

    base = tmp_path / "base"
    build_tokenizer().save_pretrained(base)
    cfg = config_from_dict({"task": {"train_file": "t.jsonl", "valid_file": "v.jsonl", "seed_file": "s.jsonl"},
                            "model": {"base": str(base)}, "control": {"enabled": True},
                            "training": {"num_workers": 1, "micro_batch_size": 4, "grad_accum": 1,
                                         "max_seq_len": 64, "max_steps": 6}})
    run = RunDir(tmp_path / "run")
    run.create("x: 1\n", resume=False)
    run.complete(1, "improve", [{"steps": 6, "rows": 24}])
    d = Driver.__new__(Driver)
    d.cfg, d.run, d.last_iteration, d.eval_sets = cfg, run, 1, {"valid": []}
    d.split_stop, d.end_token_id = {}, None
    d.seed_rows = [{"id": str(i), "prompt": f"Q{i} ", "solution": "x" * (200 if i % 3 == 0 else 10)}
                   for i in range(12)]
    d.samplers = types.SimpleNamespace(close=lambda: None)
    d.evaluate = lambda t, model: None
    asked = {}

    def train(**kw):
        asked.update(kw)
        return {"steps": kw["cfg"].epochs * 2}
    monkeypatch.setattr(driver_module, "train_m_step", train)
    d.control(str(base))
    assert asked["cfg"].epochs == 3 and run.manifest()["control_epochs"] == 3
    # in whole epochs: training.max_steps, which sized the M-step, would have overridden them (control.epochs too)
    assert asked["cfg"].max_steps is None


def test_a_damaged_committed_eval_or_shard_stops_in_one_line_naming_the_file(tmp_path):
    """A committed eval.json or samples shard damaged since (a disk error, a hand edit) is a RunError naming the
    file and how to go on, not a JSONDecodeError or Arrow traceback."""
    import types

    from restem_ray.driver import Driver
    from restem_ray.errors import RunError

    root = tmp_path / "run"
    _finished_run(root, [0.1, 0.2])
    (root / "iter_001" / "eval.json").write_text('{"valid": ')
    d = Driver.__new__(Driver)
    d.run, d.best = RunDir(root), None
    assert d.evaluate(0, "m") == {"iteration": 0, "valid": 0.1}
    with pytest.raises(RunError, match=r"iter_001/eval.json: the committed eval of iteration 1 cannot be read "
                                       r"\(JSONDecodeError: .*remove \"1/eval\" from \"completed\""):
        d.evaluate(1, "m")
    shard = d.run.samples_dir(1) / "part-00000.parquet"
    shard.parent.mkdir(parents=True, exist_ok=True)
    shard.write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")  # the magic at both ends, nothing valid between
    m = d.run.manifest()
    m["completed"].pop("1/select")
    d.run._write_manifest(m, label="test")
    with pytest.raises(RunError, match=r"part-00000.parquet: a damaged run directory \(.*\); restore the file, or "
                                       r"remove it and \"1/generate\" from \"completed\""):
        d.run.read_samples(1)


def test_a_resume_that_covers_fewer_iterations_names_one_best_everywhere(tmp_path, capsys):
    """A finished 3-iteration run resumed with loop.iterations=1 (a resume-safe key) ends on iteration 1: the
    link, the manifest's best_iteration and the printed table must all say 1, not the 3 the last eval
    committed. Nothing is sampled (every phase is done); the run directory and fit() are real."""
    import os
    import types

    from restem_ray.config import config_from_dict, dump_config
    from restem_ray.driver import Driver

    root = tmp_path / "run"
    _finished_run(root, [0.1, 0.2, 0.3, 0.4])
    cfg = config_from_dict({"task": {"train_file": "x.jsonl", "valid_file": "v.jsonl"},
                            "model": {"base": str(tmp_path / "base")}, "loop": {"iterations": 3, "patience": 3}})
    (root / "config.yaml").write_text(dump_config(cfg))
    d = Driver.__new__(Driver)
    d.cfg = cfg.model_copy(update={"loop": cfg.loop.model_copy(update={"iterations": 1})})
    d.run, d.resume, d.force, d.problems = RunDir(root), True, False, {}
    d.train, d.eval_sets, d.seed_rows, d.step_checker = [], {"valid": []}, [], None
    d.samplers = types.SimpleNamespace(get=lambda m: pytest.fail("nothing is left to sample"), close=lambda: None)
    assert d.fit() == {"iteration": 1, "valid": 0.2}
    assert d.run.manifest()["best_iteration"] == 1
    assert os.readlink(root / "best") == "iter_001/checkpoint"
    assert "best iteration by valid pass@1: 1" in capsys.readouterr().out


def test_mixed_seed_rows_are_not_counted_as_kept_samples(tmp_path):
    """problems.parquet says what the E-step gave each problem: human seed rows mixed into the M-step's data
    (training.mix_seed_data) share the train ids when the seed file is the train set, and must not make an
    unsolved problem look solved."""
    import types

    import pyarrow as pa
    import pyarrow.parquet as pq

    from restem_ray.driver import Driver

    run = RunDir(tmp_path / "run")
    run.create("x: 1\n", resume=False)
    run.iter_dir(1).mkdir(parents=True, exist_ok=True)
    d = Driver.__new__(Driver)
    d.run, d.step_checker = run, None
    d.seed_rows = [{"id": "a", "prompt": "qa", "solution": "human a"}, {"id": "b", "prompt": "qb", "solution": "human b"}]
    d.cfg = types.SimpleNamespace(seed=0, selection=types.SimpleNamespace(
        max_solutions_per_problem=10, dedup=True, keep_truncated=False),
        training=types.SimpleNamespace(mix_seed_data=True))
    samples = pa.Table.from_pylist([
        {"id": "a", "sample_index": 0, "prompt": "qa", "completion": "right", "reward": 1.0, "finish_reason": "stop",
         "stop_token": 0},
        {"id": "b", "sample_index": 0, "prompt": "qb", "completion": "wrong", "reward": 0.0, "finish_reason": "stop",
         "stop_token": 0}])
    train = d.select(1, samples)
    assert sorted(pq.read_table(train)["id"].to_pylist()) == ["a", "a", "b"]  # the seed rows are trained on
    stats = {r["id"]: r for r in pq.read_table(run.iter_dir(1) / "problems.parquet").to_pylist()}
    assert (stats["a"]["kept"], stats["b"]["kept"]) == (1, 0)
    assert run.metrics()[-1]["kept"] == 1 and run.metrics()[-1]["seed_rows_mixed"] == 2


def test_a_start_that_died_before_its_manifest_is_started_again(tmp_path):
    """`create` writes config.yaml, then the manifest: a driver killed between the two leaves a folder holding
    only the run's own config (every section written out), which a new start takes; a user's config.yaml there
    is still refused (test_bad_inputs)."""
    from restem_ray.config import RestemConfig, dump_config
    from restem_ray.errors import UserError

    cfg = dump_config(RestemConfig.model_validate({"task": {"train_file": "t", "valid_file": "v"}, "model": {"base": "m"}}))
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    (run.root / "config.yaml").write_text(cfg)
    run.validate(cfg, resume=False)
    (run.root / "config.yaml").write_text("task: {train_file: t}\nmodel: {base: m}\n")
    with pytest.raises(UserError, match="not empty \\(config.yaml\\) and holds no run"):
        run.validate(cfg, resume=False)
