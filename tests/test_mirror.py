"""A run directory on a URI (restem_ray/mirror.py), on `file://` URIs (the same pyarrow.fs calls as s3://; the
S3 server runs in tests/test_object_storage.py): every commit uploads the phase's files, then the manifest;
unchanged files go once; a resume on a new machine downloads the run, one on the same machine keeps its copy."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from restem_ray.errors import UserError
from restem_ray.mirror import RunMirror
from restem_ray.storage import RunDir


def tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name not in (".driver.lock", ".mirror-state.json")}


def recording(mirror):
    sent = []
    upload = mirror._upload
    mirror._upload = lambda rel, *again: (sent.append(rel), upload(rel, *again))[1]
    return sent


def started(tmp_path, cache="node-a"):
    uri = f"file://{tmp_path}/bucket/runs/x"
    m = RunMirror(uri, cache=tmp_path / cache)
    assert m.check() is False
    m.prepare(resume=False, has_run=False)
    run = RunDir(m.local)
    run.mirror = m
    return uri, m, run


def test_commits_upload_the_phase_then_the_manifest_and_unchanged_files_once(tmp_path):
    uri, m, run = started(tmp_path)
    remote = tmp_path / "bucket" / "runs" / "x"
    assert m.local.name == "x" and m.local.parent.parent == tmp_path / "node-a"  # Ray Train runs are named after it
    sent = recording(m)
    run.create("seed: 0\n", resume=False)
    assert sent == ["config.yaml", "manifest.json"]
    run.lock()
    pq.write_table(pa.table({"id": ["a"], "reward": [1.0]}), run.samples_dir(1) / "part-00000.parquet")
    sent.clear()
    run.complete(1, "generate", [{"samples": 1}])
    assert sorted(sent[:-1]) == ["iter_001/samples/part-00000.parquet", "metrics.jsonl"]
    assert sent[-1] == "manifest.json"  # last
    assert tree(remote) == tree(m.local)
    sent.clear()
    (run.iter_dir(1) / "train.parquet").write_bytes(b"rows")
    run.complete(1, "select", [{"kept": 1}])
    assert sorted(sent) == ["iter_001/train.parquet", "manifest.json", "metrics.jsonl"]  # the shard went once
    # a file the run removed goes from the remote too; links (RUN/best) and temporary names are not mirrored
    (run.iter_dir(1) / "train.parquet").unlink()
    (m.local / "best").symlink_to("iter_001")
    (m.local / "x.tmp").write_text("half")
    run.set(best_iteration=1)
    assert tree(remote) == {k: v for k, v in tree(m.local).items() if k != "x.tmp"}
    assert not (remote / "best").exists() and not (remote / "iter_001" / "train.parquet").exists()
    assert json.loads((remote / "manifest.json").read_text())["best_iteration"] == 1
    run.unlock()


def test_ray_train_storage_and_a_checkpoint_being_assembled_stay_on_this_machine(tmp_path):
    """An M-step's Ray Train folder (every rank's DeepSpeed state) and a `checkpoint.tmp` are not uploaded at the
    next commit, a resume's manifest write included; the finished HF checkpoint is."""
    uri, m, run = started(tmp_path)
    remote = tmp_path / "bucket" / "runs" / "x"
    run.create("seed: 0\n", resume=False)
    run.lock()
    it = run.iter_dir(1)
    for rel in ("mstep-x-iter_001/checkpoint_000000/rank_0/optim.pt", "checkpoint.tmp/model.safetensors",
                "checkpoint/model.safetensors"):
        (it / rel).parent.mkdir(parents=True, exist_ok=True)
        (it / rel).write_bytes(b"w")
    sent = recording(m)
    run.set(last_iteration=1)
    assert sorted(sent) == ["iter_001/checkpoint/model.safetensors", "manifest.json"]
    assert not (remote / "iter_001" / "mstep-x-iter_001").exists()
    assert not (remote / "iter_001" / "checkpoint.tmp").exists()
    run.unlock()


def test_resume_downloads_on_a_new_machine_and_keeps_a_copy_that_is_ahead(tmp_path):
    uri, m, run = started(tmp_path)
    run.create("seed: 0\n", resume=False)
    pq.write_table(pa.table({"id": ["a"]}), run.samples_dir(1) / "part-00000.parquet")
    run.complete(1, "generate", [{"samples": 1}])
    committed = tree(m.local)

    # a new machine: nothing cached; the download is the run, and nothing goes back up
    b = RunMirror(uri, cache=tmp_path / "node-b")
    assert b.check() is True
    with pytest.raises(UserError, match=r"already holds a run \(use --resume"):
        b.prepare(resume=False, has_run=True)
    b.prepare(resume=True, has_run=True)
    assert tree(b.local) == committed
    sent = recording(b)
    b.push()
    assert sent == []

    # the first machine, killed with a finished but uncommitted shard: its copy is ahead, and kept
    (run.samples_dir(1) / "part-00001.parquet").write_bytes(b"uncommitted")
    m2 = RunMirror(uri, cache=tmp_path / "node-a")
    m2.prepare(resume=True, has_run=True)
    assert (m2.local / "iter_001" / "samples" / "part-00001.parquet").read_bytes() == b"uncommitted"

    # machine b commits more; a's copy is now behind and is replaced by the remote one
    rb = RunDir(b.local)
    rb.mirror = b
    rb.complete(1, "select", [{"kept": 1}])
    m3 = RunMirror(uri, cache=tmp_path / "node-a")
    m3.prepare(resume=True, has_run=True)
    assert "1/select" in json.loads((m3.local / "manifest.json").read_text())["completed"]
    assert not (m3.local / "iter_001" / "samples" / "part-00001.parquet").exists()


def test_e_step_shards_go_up_before_their_commit_and_a_resume_elsewhere_keeps_them(tmp_path, capsys):
    uri, m, run = started(tmp_path)
    remote = tmp_path / "bucket" / "runs" / "x"
    run.create("seed: 0\n", resume=False)
    run.complete(0, "eval", [{"split": "valid", "pass@1": 0.5}])
    sent = recording(m)
    shard = run.samples_dir(1) / "part-00000.parquet"
    pq.write_table(pa.table({"id": ["a"], "reward": [1.0]}), shard)
    run.saved(shard)
    assert sent == ["iter_001/samples/part-00000.parquet"]  # at once, alone: no manifest, no metrics
    assert (remote / "iter_001" / "samples" / "part-00000.parquet").read_bytes() == shard.read_bytes()
    assert "1/generate" not in json.loads((remote / "manifest.json").read_text())["completed"]

    # the driver dies here; a new machine resumes from the remote, uncommitted shard included
    b = RunMirror(uri, cache=tmp_path / "node-b")
    b.prepare(resume=True, has_run=True)
    assert (b.local / "iter_001" / "samples" / "part-00000.parquet").read_bytes() == shard.read_bytes()
    # ... and finishes a second shard before it dies too
    rb = RunDir(b.local)
    rb.mirror = b
    second = rb.samples_dir(1) / "part-00001.parquet"
    pq.write_table(pa.table({"id": ["b"], "reward": [0.0]}), second)
    rb.saved(second)
    sent_b = recording(b)
    rb.saved(second)  # unchanged: not sent again
    assert sent_b == []

    # back on machine a, whose copy holds all the remote manifest lists: kept, and given b's shard
    capsys.readouterr()
    a = RunMirror(uri, cache=tmp_path / "node-a")
    a.prepare(resume=True, has_run=True)
    assert (a.local / "iter_001" / "samples" / "part-00001.parquet").read_bytes() == second.read_bytes()
    assert "downloaded 1 E-step shard(s) another machine finished" in capsys.readouterr().out
    sent_a = recording(a)
    ra = RunDir(a.local)
    ra.mirror = a
    ra.complete(1, "generate", [{"samples": 2}])
    assert sorted(sent_a) == ["manifest.json", "metrics.jsonl"]  # both shards are up already
    assert tree(remote) == tree(a.local)


def test_shards_removed_here_are_not_downloaded_again_and_leave_the_store_at_the_next_commit(tmp_path):
    """After a --force resume that changed the E-step, the run asks to remove the iteration's samples folder, here
    and on the store; removed from this copy only, the shards it had uploaded are not brought back."""
    import shutil

    uri, m, run = started(tmp_path)
    remote = tmp_path / "bucket" / "runs" / "x"
    run.create("seed: 0\n", resume=False)
    run.complete(0, "eval", [{"split": "valid", "pass@1": 0.5}])
    shard = run.samples_dir(1) / "part-00000.parquet"
    pq.write_table(pa.table({"id": ["a"]}), shard)
    run.saved(shard)
    assert run.remote_too(run.samples_dir(1)) == f" and {uri}/iter_001/samples"
    shutil.rmtree(run.samples_dir(1))
    a = RunMirror(uri, cache=tmp_path / "node-a")
    a.prepare(resume=True, has_run=True)
    assert not (a.local / "iter_001" / "samples" / "part-00000.parquet").exists()
    ra = RunDir(a.local)
    ra.mirror = a
    ra.complete(0, "select", [])  # the next commit
    assert not (remote / "iter_001" / "samples" / "part-00000.parquet").exists()
    assert RunDir(tmp_path / "elsewhere").remote_too(tmp_path / "elsewhere" / "iter_001") == ""


def test_a_shard_that_cannot_go_up_warns_and_goes_with_the_commit(tmp_path, capsys):
    uri, m, run = started(tmp_path)
    run.create("seed: 0\n", resume=False)
    shard = run.samples_dir(1) / "part-00000.parquet"
    pq.write_table(pa.table({"id": ["a"]}), shard)
    upload = m._upload
    m._upload = lambda rel, *again: (_ for _ in ()).throw(OSError("connection reset"))
    run.saved(shard)  # the E-step goes on
    assert "warning: could not upload iter_001/samples/part-00000.parquet" in capsys.readouterr().out
    m._upload = upload
    sent = recording(m)
    run.complete(1, "generate", [{"samples": 1}])
    assert "iter_001/samples/part-00000.parquet" in sent
    assert tree(tmp_path / "bucket" / "runs" / "x") == tree(m.local)


def test_a_run_being_driven_here_is_not_replaced(tmp_path):
    uri, m, run = started(tmp_path)
    run.create("seed: 0\n", resume=False)
    run.lock()
    try:
        with pytest.raises(UserError, match=r"another driver is running this run \(pid"):
            RunMirror(uri, cache=tmp_path / "node-a").prepare(resume=False, has_run=False)
    finally:
        run.unlock()


def test_uris_that_cannot_hold_a_run_are_one_line_errors(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=r"^--out nosuchscheme://b/run: cannot open \("):
        RunMirror("nosuchscheme://b/run").check()
    with pytest.raises(UserError, match=rf"^--out file://{tmp_path}/afile: is a file, not a run directory$"):
        RunMirror(f"file://{tmp_path}/afile").check()
    with pytest.raises(UserError, match=r"nothing to resume \(no manifest.json\)$"):
        RunMirror(f"file://{tmp_path}/empty", cache=tmp_path / "c").prepare(resume=True, has_run=False)


def test_report_reads_a_run_directory_on_a_uri(tmp_path, capsys, monkeypatch):
    from restem_ray.cli import main

    uri, m, run = started(tmp_path)
    run.create("seed: 0\n", resume=False)
    (run.checkpoint_dir(1)).mkdir(parents=True)
    (run.checkpoint_dir(1) / "model.safetensors").write_bytes(b"weights")
    pq.write_table(pa.table({"id": ["a"], "iteration": [1], "correct": [1]}), run.iter_dir(1) / "problems.parquet")
    run.complete(0, "eval", [{"split": "valid", "pass@1": 0.25}])
    monkeypatch.setenv("RESTEM_RUN_CACHE", str(tmp_path / "node-b"))  # another machine: nothing cached
    assert main(["report", uri]) == 0
    out = capsys.readouterr().out
    local = RunMirror(uri, cache=tmp_path / "node-b").local.with_name("x.report")
    assert "0.250" in out and (local / "report.png").is_file() and (local / "problems.parquet").is_file()
    assert f"reported from a copy of its metrics in {local}" in out
    assert not (local / "iter_001" / "checkpoint").exists()  # the metrics, not the weights (tens of GB at 7B)
    assert main(["report", f"file://{tmp_path}/nothing"]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_a_copy_of_another_run_at_the_uri_is_replaced_and_an_unpushed_run_is_not_deleted(tmp_path):
    # machine a holds an old run's copy (same URI); the remote now holds a new run with nothing completed yet
    uri, m, run = started(tmp_path)
    run.create("seed: 0\n", resume=False)
    run.complete(0, "eval", [{"split": "valid", "pass@1": 0.5}])
    remote = tmp_path / "bucket" / "runs" / "x"
    new = RunDir(remote)
    new._write_manifest({"version": 1, "completed": {}, "created": 1.0})  # another driver's fresh run
    again = RunMirror(uri, cache=tmp_path / "node-a")
    again.prepare(resume=True, has_run=True)
    assert json.loads((again.local / "manifest.json").read_text())["created"] == 1.0  # the remote run, not the old copy

    # a run committed on this machine whose push never happened: a new run at the URI refuses to delete it
    uri2 = f"file://{tmp_path}/bucket/runs/y"
    local = RunMirror(uri2, cache=tmp_path / "node-a")
    RunDir(local.local).create("seed: 0\n", resume=False)  # no mirror attached: never pushed
    with pytest.raises(UserError, match=r"holds a run not yet pushed; --resume continues it"):
        RunMirror(uri2, cache=tmp_path / "node-a").prepare(resume=False, has_run=False)
    assert (local.local / "manifest.json").is_file()


def test_the_local_copy_is_named_without_the_uri_query():
    m = RunMirror("s3://bucket/runs/exp1?endpoint_override=127.0.0.1:9000&scheme=http", cache="/c")
    assert m.local.name == "exp1"


def test_a_cluster_of_several_nodes_needs_a_working_copy_every_node_mounts(tmp_path, monkeypatch):
    import ray

    m = RunMirror(f"file://{tmp_path}/bucket/runs/x", cache=tmp_path / "node-a")
    monkeypatch.delenv("RESTEM_RUN_CACHE", raising=False)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": False}])
    m.check_cluster()  # one live node: its local disk is everyone's
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}])
    with pytest.raises(UserError, match=r"the cluster has 2 nodes, .* set RESTEM_RUN_CACHE to a folder every node"):
        m.check_cluster()
    monkeypatch.setenv("RESTEM_RUN_CACHE", str(tmp_path / "shared"))
    import restem_ray.resources as resources

    checked = []  # whether every node sees it is checked from every node (tests/test_multinode.py)
    monkeypatch.setattr(resources, "check_run_dir_on_every_node", lambda out, **kw: checked.append(out))
    m.check_cluster()
    assert checked == [m.local]


def test_a_remote_run_removed_since_the_last_push_is_uploaded_again_whole(tmp_path, capsys):
    """The remote run directory was removed (or expired) after this machine pushed it: a resume here keeps the
    local copy, and the next commit uploads every file again, not only what changed (the state file said the
    rest was there). A committed E-step whose shards are gone before its selection is an error, not an empty
    table."""
    import shutil

    from restem_ray.errors import RunError

    uri, m, run = started(tmp_path)
    remote = tmp_path / "bucket" / "runs" / "x"
    run.create("seed: 0\n", resume=False)
    pq.write_table(pa.table({"id": ["a"]}), run.samples_dir(1) / "part-00000.parquet")
    run.complete(1, "generate", [{"samples": 1}])
    shutil.rmtree(remote)
    again = RunMirror(uri, cache=tmp_path / "node-a")
    assert again.check() is False
    again.prepare(resume=True, has_run=False)
    assert "no longer holds the run this machine pushed" in capsys.readouterr().out
    resumed = RunDir(again.local)
    resumed.mirror = again
    (resumed.iter_dir(1) / "train.parquet").write_bytes(b"rows")
    resumed.complete(1, "select", [{"kept": 1}])
    assert tree(remote) == tree(again.local)  # the shard and config.yaml included
    pq.write_table(pa.table({"id": ["a"]}), resumed.samples_dir(2) / "part-00000.parquet")
    resumed.complete(2, "generate", [{"samples": 1}])
    for t in (1, 2):
        (resumed.samples_dir(t) / "part-00000.parquet").unlink()
    assert resumed.read_samples(1).num_rows == 0  # selected already: its samples are not needed again
    with pytest.raises(RunError, match="committed E-step of iteration 2 has no samples files"):
        resumed.read_samples(2)


def test_auto_resume_starts_anew_where_the_store_lost_the_run_this_machine_pushed(tmp_path, capsys, monkeypatch):
    """`--auto-resume` (a retried job) continues a run only the store or an unpushed local copy holds: a run this
    machine pushed and someone removed from the store since is not brought back from the stale copy."""
    import shutil
    from types import SimpleNamespace

    from restem_ray.cli import _out_dir

    monkeypatch.setenv("RESTEM_RUN_CACHE", str(tmp_path / "cache"))  # where the CLI's mirror keeps its copy
    uri, m, run = started(tmp_path, cache="cache")
    run.create("seed: 0\n", resume=False)
    run.complete(0, "eval", [{"split": "valid", "pass@1": 0.5}])
    shutil.rmtree(tmp_path / "bucket" / "runs" / "x")
    local, resume, mirror = _out_dir(uri, SimpleNamespace(resume=False, auto_resume=True))
    try:
        assert resume is False and not local.exists()
        assert "no longer holds the run this machine pushed there; a new run starts" in capsys.readouterr().out
        RunDir(local).create("seed: 0\n", resume=False)  # committed here, its push failed: continued
    finally:
        mirror.lease.release()
    local, resume, mirror = _out_dir(uri, SimpleNamespace(resume=False, auto_resume=True))
    mirror.lease.release()
    assert resume is True and (local / "manifest.json").is_file()


def test_a_download_leaves_ray_train_storage_an_earlier_version_uploaded_on_the_store(tmp_path):
    uri, m, run = started(tmp_path)
    run.create("seed: 0\n", resume=False)
    run.complete(0, "eval", [{"split": "valid", "pass@1": 0.5}])
    remote = tmp_path / "bucket" / "runs" / "x"
    for rel in ("iter_001/mstep-x-iter_001/checkpoint_000000/rank_0/optim.pt", "iter_001/checkpoint.tmp/a",
                "iter_001/samples/part-00000.parquet.tmp", "iter_001/samples/part-00000.parquet"):
        (remote / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"id": ["a"]}), remote / rel)
    b = RunMirror(uri, cache=tmp_path / "node-b")
    b.prepare(resume=True, has_run=True)
    assert set(tree(b.local)) == {"config.yaml", "manifest.json", "metrics.jsonl", "iter_001/samples/part-00000.parquet"}


def test_a_uri_with_credentials_shows_none_of_them():
    """pyarrow opens s3://KEY:SECRET@bucket/...: messages, the working copy's name (and the Ray Train run named
    after it) and errors show the URI without them."""
    from restem_ray.remote import check_uri, shown_uri

    assert shown_uri("s3://AKIAX:s3cr3t@bucket/runs/x?secret_key=k") == "s3://bucket/runs/x"
    assert shown_uri("file:///tmp/a@b/run") == "file:///tmp/a@b/run"  # an @ in a path is no user info
    m = RunMirror("s3://AKIAX:s3cr3t@bucket", cache="/c")
    assert m.local.name == "bucket" and m.uri == "s3://bucket" and "s3cr3t" not in str(m.local)
    with pytest.raises(UserError) as e:
        RunMirror("nosuchfs://AKIAX:s3cr3t@bucket/run").check()
    assert "s3cr3t" not in str(e.value) and "nosuchfs://bucket/run" in str(e.value)
    with pytest.raises(UserError) as e:
        check_uri("nosuchfs://AKIAX:s3cr3t@bucket/train.jsonl", "task.train_file", expect_dir=False)
    assert "s3cr3t" not in str(e.value)


def test_a_new_run_at_a_prefix_that_holds_other_files_is_refused(tmp_path):
    """A prefix holding a user's files (or an earlier run's shards, and no manifest) would have its config.yaml
    written over, and the shards taken for this run's."""
    remote = tmp_path / "bucket" / "runs" / "x"
    remote.mkdir(parents=True)
    (remote / "config.yaml").write_text("MY OWN CONFIG")
    m = RunMirror(f"file://{remote}", cache=tmp_path / "node-a")
    assert m.check() is False
    with pytest.raises(UserError, match=r"runs/x: not empty \(config.yaml\) and holds no run"):
        m.prepare(resume=False, has_run=False)
    assert (remote / "config.yaml").read_text() == "MY OWN CONFIG"
    # ... but a start that died between its config and its manifest (one push sends them in that order), with a
    # temporary name left behind, is started again
    from restem_ray.config import RestemConfig, dump_config

    run_config = dump_config(RestemConfig.model_validate({"task": {"train_file": "t", "valid_file": "v"},
                                                          "model": {"base": "m"}}))
    (remote / "config.yaml").write_text(run_config)
    (remote / "metrics.jsonl.tmp").write_text("")
    m.prepare(resume=False, has_run=False)
    # only the top level is listed (at a bucket's root a recursive listing is the whole bucket): a folder there
    # is named as what the prefix holds
    other = tmp_path / "bucket" / "runs" / "y"
    (other / "old" / "iter_001" / "samples").mkdir(parents=True)
    (other / "old" / "iter_001" / "samples" / "part-0.parquet").write_text("x")
    with pytest.raises(UserError, match=r"runs/y: not empty \(old/\) and holds no run"):
        RunMirror(f"file://{other}", cache=tmp_path / "node-a").prepare(resume=False, has_run=False)


def test_a_checkpoint_marker_goes_up_only_after_its_weights(tmp_path):
    """restem_mstep.json says an M-step finished (a resume does not train it again): on the store it must not
    stand beside weights that did not all arrive. A push cut off in the weights sends no marker."""
    uri, m, run = started(tmp_path)
    remote = tmp_path / "bucket" / "runs" / "x"
    run.create("seed: 0\n", resume=False)
    ckpt = run.iter_dir(1) / "checkpoint"
    ckpt.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "config.json"):
        (ckpt / name).write_bytes(b"w" * 100)
    (ckpt / "restem_mstep.json").write_text("{}")
    upload = m._upload

    def cut_off(rel, *again):
        if rel.endswith("00002.safetensors"):
            raise OSError("connection reset")
        return upload(rel, *again)

    m._upload = cut_off
    with pytest.raises(Exception, match="upload failed"):
        run.complete(1, "improve", [{"loss": 1.0}])
    assert not (remote / "iter_001" / "checkpoint" / "restem_mstep.json").exists()
    m._upload = upload
    sent = recording(m)
    run.complete(1, "eval", [{"split": "valid", "pass@1": 0.5}])
    assert sent.index("iter_001/checkpoint/restem_mstep.json") > max(
        sent.index(r) for r in sent if r.endswith(".safetensors"))
    assert (remote / "iter_001" / "checkpoint" / "restem_mstep.json").is_file()


def test_a_cut_off_shard_on_the_store_is_sampled_again_not_adopted(tmp_path, capsys):
    """An uncommitted shard that an older upload left cut off (an object store completes an upload at close, on
    SIGTERM too) is dropped by a resume elsewhere, whole or by its shards alone, instead of failing every resume."""
    uri, m, run = started(tmp_path)
    remote = tmp_path / "bucket" / "runs" / "x"
    run.create("seed: 0\n", resume=False)
    run.complete(0, "eval", [{"split": "valid", "pass@1": 0.5}])
    good = run.samples_dir(1) / "part-00000.parquet"
    pq.write_table(pa.table({"id": ["a"], "reward": [1.0]}), good)
    run.saved(good)
    cut = remote / "iter_001" / "samples" / "part-00001.parquet"
    cut.write_bytes(good.read_bytes()[:-20])  # no footer
    b = RunMirror(uri, cache=tmp_path / "node-b")
    b.prepare(resume=True, has_run=True)  # a new machine: the whole directory is downloaded
    assert (b.local / "iter_001" / "samples" / "part-00000.parquet").is_file()
    assert not (b.local / "iter_001" / "samples" / "part-00001.parquet").exists()
    assert "part-00001.parquet is not a whole Parquet file; its problems are sampled again" in capsys.readouterr().out
    a = RunMirror(uri, cache=tmp_path / "node-a")  # the machine that holds the run: only the missing shards come
    a.prepare(resume=True, has_run=True)
    assert not (a.local / "iter_001" / "samples" / "part-00001.parquet").exists()
    assert "part-00001.parquet is not a whole Parquet file" in capsys.readouterr().out


def test_a_node_local_copy_of_a_uri_follows_what_the_uri_holds(tmp_path):
    """A model or data file given as a URI is copied once per node and then served from that copy: one that was
    made of an earlier upload to the same URI (a re-uploaded checkpoint, a fixed data file) is made again, not
    served stale."""
    import os

    from restem_ray.remote import local_file_copy, local_model_copy, local_model_files

    model = tmp_path / "bucket" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"v": 1}')
    (model / "model.safetensors").write_bytes(b"old weights")
    cache = str(tmp_path / "cache")
    uri = f"file://{model}"
    first = local_model_copy(uri, cache)
    assert open(os.path.join(first, "model.safetensors"), "rb").read() == b"old weights"
    assert local_model_copy(uri, cache) == first  # served from the copy
    (model / "model.safetensors").write_bytes(b"new weights!")
    (model / "config.json").write_text('{"v": 22}')
    again = local_model_copy(uri, cache)
    assert open(os.path.join(again, "model.safetensors"), "rb").read() == b"new weights!"
    assert open(os.path.join(local_model_files(uri, cache), "config.json")).read() == '{"v": 22}'
    # what vLLM and transformers load: not Meta's original/*.pth, a .bin duplicate or a training checkpoint
    (model / "pytorch_model.bin").write_bytes(b"the same weights again")
    for extra in ("original/consolidated.00.pth", "checkpoint-100/model.safetensors"):
        (model / extra).parent.mkdir(exist_ok=True)
        (model / extra).write_bytes(b"more")
    third = local_model_copy(uri, cache)
    assert sorted(os.listdir(third)) == [".complete", "config.json", "model.safetensors"]
    data = tmp_path / "bucket" / "train.jsonl"
    data.write_text('{"id": "1"}\n')
    assert open(local_file_copy(f"file://{data}", cache)).read() == '{"id": "1"}\n'
    data.write_text('{"id": "1"}\n{"id": "2"}\n')
    assert open(local_file_copy(f"file://{data}", cache)).read() == '{"id": "1"}\n{"id": "2"}\n'


def test_each_use_of_a_uri_copy_lists_the_uri_once(tmp_path, monkeypatch):
    """A node-local copy is checked from one listing of the URI, not one per check (the driver resolves a URI model's
    small files several times at start-up, each a LIST request on an object store); a stale one of the model's small
    files is remade from one more, taken under the copy's lock."""
    import restem_ray.remote as remote

    model = tmp_path / "bucket" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"v": 1}')
    (model / "model.safetensors").write_bytes(b"w")
    listings = []
    real = remote._fingerprint
    monkeypatch.setattr(remote, "_fingerprint", lambda uri: listings.append(uri) or real(uri))
    cache, uri = str(tmp_path / "cache"), f"file://{model}"
    for use in (remote.local_model_files, remote.local_model_copy, remote.local_model_files, remote.local_model_copy):
        before = len(listings)
        use(uri, cache)  # first of each: a copy is made; then served from it
        assert len(listings) - before == 1, use
    (model / "config.json").write_text('{"v": 2}')
    before = len(listings)
    assert open(f"{remote.local_model_files(uri, cache)}/config.json").read() == '{"v": 2}'
    assert len(listings) - before == 2  # the full copy's check, then the small files' copy's
