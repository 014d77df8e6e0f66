"""A run whose base model, data files and Ray Train checkpoints live on an S3-compatible server (moto's
server mode on 127.0.0.1: a real S3 HTTP endpoint, not a mock of pyarrow): it completes, resumes, and ends
with exactly the rows, scores and weights of the same run on local files."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_same_run, demo, tracebacks

from restem_ray.builtin import arithmetic_builtin, ensure_builtin
from restem_ray.errors import UserError

pytestmark = pytest.mark.slow
BUCKET = "restem"


@pytest.fixture(scope="module")
def s3():
    """moto_server on a free loopback port; the AWS variables that point pyarrow (and every Ray worker, which
    inherits the driver's environment) at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield f"s3://{BUCKET}"
    finally:
        server.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def upload(local: Path, uri: str) -> None:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def test_bad_uris_are_one_line_errors(s3, tmp_path, monkeypatch):
    from restem_ray.cli import check_model_dir
    from restem_ray.datasets import read_rows

    with pytest.raises(UserError, match=rf"^model.base: {s3}/nope: not found$"):
        check_model_dir("model.base", f"{s3}/nope")
    (tmp_path / "bad.jsonl").write_text('{"id": "1", "prompt": "q", "answer": "1"}\n{not json\n')
    upload(tmp_path / "bad.jsonl", f"{s3}/bad/bad.jsonl")
    with pytest.raises(UserError, match=rf"^{s3}/bad/bad.jsonl:2: not valid JSON"):
        read_rows(f"{s3}/bad/bad.jsonl")
    with pytest.raises(UserError, match=rf"^problem file: {s3}/bad/missing.jsonl: not found$"):
        read_rows(f"{s3}/bad/missing.jsonl")
    with pytest.raises(UserError, match=r"cannot open"):
        read_rows("nosuchscheme://x/y.jsonl")
    # a URI with options in its query (pyarrow's region=, endpoint_override=): the local copy's name leaves it out
    monkeypatch.setenv("RESTEM_MODEL_CACHE", str(tmp_path / "cache"))  # (this test's copies only)
    (tmp_path / "good.jsonl").write_text('{"id": "1", "prompt": "q", "answer": "1"}\n')
    upload(tmp_path / "good.jsonl", f"{s3}/bad/good.jsonl")
    assert [r["id"] for _, r in read_rows(f"{s3}/bad/good.jsonl?region=us-east-1")] == ["1"]
    # a model folder given with options: its config.json is looked for before the query, not after it
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "tokenizer.json").write_text("{}")
    upload(tmp_path / "m", f"{s3}/models/m")
    check_model_dir("model.base", f"{s3}/models/m?region=us-east-1")


def test_check_reads_a_model_on_the_store_as_it_reads_a_local_one(s3, tmp_path):
    """A model folder on the store got only a config.json check: a shard cut short by an interrupted upload, a shard
    its index names that never went up, or missing tokenizer files passed `check` and failed when replicas and the
    M-step's workers copied the model. Now its listing, config, index and each shard's header and size are read
    (a few KB per shard, never the weights)."""
    import shutil

    from restem_ray.cli import check_model_dir

    model = ensure_builtin(arithmetic_builtin(0)) / "model"
    upload(model, f"{s3}/check/good")
    check_model_dir("model.base", f"{s3}/check/good")
    check_model_dir("model.base", f"{s3}/check/good?region=us-east-1")  # (options after the folder)

    def variant(name, change):
        local = tmp_path / name
        shutil.copytree(model, local)
        change(local)
        upload(local, f"{s3}/check/{name}")
        return f"{s3}/check/{name}"

    def cut(local):  # an upload interrupted: the shard shorter than its header says
        data = (local / "model.safetensors").read_bytes()
        (local / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(UserError, match=rf"^model.base: {s3}/check/cut/model.safetensors: not a whole safetensors "
                                        r"file \(cut short or damaged\)$"):
        check_model_dir("model.base", variant("cut", cut))

    def sharded(local):  # an index naming a second shard that never went up
        (local / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(UserError, match=rf"^model.base: {s3}/check/sharded/model-00002-of-00002.safetensors: a shard "
                                        r"model.safetensors.index.json names is missing$"):
        check_model_dir("model.base", variant("sharded", sharded))

    def no_tokenizer(local):
        for f in local.glob("tokenizer*"):
            f.unlink()
    with pytest.raises(UserError, match=rf"^model.base: {s3}/check/no_tokenizer: no tokenizer files$"):
        check_model_dir("model.base", variant("no_tokenizer", no_tokenizer))
    # credentials in the URI (pyarrow takes them there) stay out of the message
    keyed = f"s3://test:s3cret@{BUCKET}/check/no_tokenizer?region=us-east-1"
    with pytest.raises(UserError, match=rf"^model.base: {s3}/check/no_tokenizer: no tokenizer files$"):
        check_model_dir("model.base", keyed)
    variant("no_config", lambda local: (local / "config.json").unlink())
    for weights in (True, False):
        with pytest.raises(UserError, match=rf"^model.base: {s3}/check/no_config: not an HF model folder"):
            check_model_dir("model.base", keyed.replace("no_tokenizer", "no_config"), weights=weights)

    def no_weights(local):
        (local / "model.safetensors").unlink()
    with pytest.raises(UserError, match=rf"^model.base: {s3}/check/no_weights: no weights"):
        check_model_dir("model.base", variant("no_weights", no_weights))
    check_model_dir("model.base", f"{s3}/check/no_weights", weights=False)  # (`prompt` needs the tokenizer only)


def download(uri: str, local: Path) -> Path:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def test_a_run_all_on_s3_resumes_on_a_new_machine_as_the_local_run(tmp_path, s3, small_reference_run, monkeypatch):
    """Base model, data files, Ray Train checkpoints and the run directory (`--out s3://...`) all in the bucket, as
    on a cloud cluster. The run works in a node-local copy mirrored to the bucket: every commit, and every E-step
    shard as soon as it is written. SIGKILLed once the first shard of its E-step is written (nothing of the
    E-step committed), its node-local copy wiped (a new machine), then resumed from the bucket alone: it samples
    only the shards the bucket lacks, completes, and the bucket holds the run with exactly the local reference
    run's rows, scores and weights. (One run for all of it: a run pays ~90 s here.)"""
    import shutil

    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    root = ensure_builtin(arithmetic_builtin(0))
    upload(root / "model", f"{s3}/models/tiny")
    for name in ("train", "valid", "test", "transfer", "seed"):
        upload(root / "data" / f"{name}.jsonl", f"{s3}/data/{name}.jsonl")
    sets = [f"model.base={s3}/models/tiny", f"task.train_file={s3}/data/train.jsonl",
            f"task.valid_file={s3}/data/valid.jsonl", f"task.test_file={s3}/data/test.jsonl",
            f"task.extra_eval_files.transfer={s3}/data/transfer.jsonl", f"task.seed_file={s3}/data/seed.jsonl",
            f"training.storage_path={s3}/ray-train", "training.keep_checkpoints=true",  # kept: to look at below
            "sampling.prompts_per_request=16"]  # 4 shards of 16 problems (the samples do not depend on it)
    args = [a for s in sets for a in ("--set", s)]
    uri, cache = f"{s3}/runs/q", tmp_path / "node-cache"
    monkeypatch.setenv("RESTEM_RUN_CACHE", str(cache))
    rc, log = demo(uri, *args, crash_at="1/generate/shard")
    assert rc == -signal.SIGKILL, log[-4000:]
    fs, run_root = pafs.FileSystem.from_uri(uri)
    with fs.open_input_stream(f"{run_root}/manifest.json") as f:
        assert set(json.loads(f.read())["completed"]) == {"0/eval"}
    (shard,) = [i.path for i in fs.get_file_info(pafs.FileSelector(f"{run_root}/iter_001/samples"))]
    up = set(pq.read_table(shard, filesystem=fs)["id"].to_pylist())  # went up before its E-step's commit
    assert len(up) == 16

    with fs.open_input_stream(f"{run_root}/.driver-lease.json") as f:  # the killed driver could not free it
        assert json.loads(f.read())["pid"] > 0
    shutil.rmtree(cache)  # a new machine: nothing but the bucket
    trace = tmp_path / "engine-calls.jsonl"
    monkeypatch.setenv("RESTEM_TRACE", str(trace))
    rc, log = demo(uri, *args, "--resume")
    assert rc == 0, log[-4000:]
    assert not tracebacks(log) and f"downloading the run directory {uri}" in log
    assert "is gone: taking its lease" in log  # same host, its pid gone: no wait
    assert f"done: {uri}" in log
    train = set(pq.read_table(small_reference_run / "iter_001" / "samples")["id"].to_pylist())
    calls = [c for c in map(json.loads, trace.read_text().splitlines()) if c["call"] == "generate" and c["n"] == 8]
    assert sorted(pid for c in calls for pid in c["ids"]) == sorted(train - up)  # the shard in the bucket: not again

    run = download(uri, tmp_path / "from-bucket")
    assert set(json.loads((run / "manifest.json").read_text())["completed"]) == {
        "0/eval", "1/generate", "1/select", "1/improve", "1/eval"}
    assert (run / "config.yaml").is_file() and (run / "report.png").is_file()
    assert not list(run.rglob(".driver.lock")) and not list(run.rglob(".mirror-state.json"))
    assert not (run / ".driver-lease.json").exists()  # the SIGKILLed driver's lease was taken, then freed at exit
    assert_same_run(run, small_reference_run)
    phases = lambda r: sorted((m["iteration"], m["phase"], m.get("split", ""))  # noqa: E731
                              for m in map(json.loads, (r / "metrics.jsonl").read_text().splitlines()))
    assert phases(run) == phases(small_reference_run)
    # the M-step's Ray Train checkpoints (DeepSpeed state + HF weights per step) went to the bucket
    fs, path = pafs.FileSystem.from_uri(f"{s3}/ray-train")
    stored = [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))]
    assert any(p.endswith("model.safetensors") for p in stored), stored[:20]


def test_a_run_directory_in_a_missing_bucket_or_unreachable_store_is_one_line(s3, tmp_path, capsys, monkeypatch):
    """Checked before the demo is built or Ray starts: exit 2, one line, nothing written anywhere."""
    from restem_ray.cli import main

    monkeypatch.setenv("RESTEM_RUN_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--quick", "--out", "s3://nosuchbucket/runs/x"]) == 2
    err = capsys.readouterr().err
    assert err == "restem-ray: error: --out s3://nosuchbucket/runs/x: bucket 'nosuchbucket' not found\n", err
    assert main(["demo", "--quick", "--out", f"{s3}/runs/never", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err == f"restem-ray: error: {s3}/runs/never: nothing to resume (no manifest.json)\n", err
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens there
    assert main(["demo", "--quick", "--out", f"{s3}/runs/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"restem-ray: error: --out {s3}/runs/x: cannot open (") and err.count("\n") == 1, err
    assert not (tmp_path / "cache").exists()


def test_an_upload_cut_off_by_sigterm_leaves_no_object_on_s3(s3, tmp_path, monkeypatch):
    """S3 completes a multipart upload at close(), which a `with` runs on SystemExit too (SIGTERM in a driver
    pod that is rescheduled): the part sent so far would stand under the shard's real name, and a resume on
    another machine would take it for a finished shard. The cut-off object is removed (real S3 protocol, moto)."""
    import pyarrow.fs as pafs

    import restem_ray.mirror as mirror_module
    from restem_ray.mirror import RunMirror

    m = RunMirror(f"{s3}/runs/cut", cache=tmp_path / "node")
    m.check()
    rel = "iter_001/samples/part-00000.parquet"
    (m.local / "iter_001" / "samples").mkdir(parents=True)
    (m.local / rel).write_bytes(b"x" * (20 << 20))
    copy = mirror_module.shutil.copyfileobj

    def sigterm_after_a_chunk(src, dst, length):
        dst.write(src.read(length))
        raise SystemExit(15)

    monkeypatch.setattr(mirror_module.shutil, "copyfileobj", sigterm_after_a_chunk)
    with pytest.raises(SystemExit):
        m._upload(rel)
    fs, path = pafs.FileSystem.from_uri(f"{s3}/runs/cut/{rel}")
    assert fs.get_file_info(path).type == pafs.FileType.NotFound
    monkeypatch.setattr(mirror_module.shutil, "copyfileobj", copy)
    assert m._upload(rel) and fs.get_file_info(path).size == 20 << 20

    # an upload whose completion fails (the store refuses the close) sent nothing: the good object there stays
    store = m.fs

    class FailingClose:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            return self.stream.__enter__()

        def __exit__(self, *exc):
            raise OSError("CompleteMultipartUpload: 503 Slow Down")

    class Store:
        type_name = store.type_name

        def __getattr__(self, name):
            return getattr(store, name)

        def open_output_stream(self, p):
            return FailingClose(store.open_output_stream(p + ".never"))

    m.fs = Store()
    (m.local / rel).write_bytes(b"y" * 1024)
    with pytest.raises(OSError, match="Slow Down"):
        m._upload(rel)
    assert fs.get_file_info(path).size == 20 << 20


def test_a_replaced_object_whose_upload_is_cut_off_keeps_its_last_good_copy(s3, tmp_path, monkeypatch):
    """manifest.json and metrics.jsonl go up again at every commit: a SIGTERM mid-upload must not leave the part
    sent so far, nor nothing, where the last good copy was (a resume elsewhere then found no run to resume)."""
    import pyarrow.fs as pafs

    import restem_ray.mirror as mirror_module
    from restem_ray.mirror import RunMirror

    m = RunMirror(f"{s3}/runs/again", cache=tmp_path / "node")
    m.check()
    good = json.dumps({"completed": {"0/eval": 1.0}}).encode() + b" " * (6 << 20)  # (over one multipart part)
    m.local.mkdir(parents=True, exist_ok=True)
    (m.local / "manifest.json").write_bytes(good)
    m.push()
    fs, path = pafs.FileSystem.from_uri(f"{s3}/runs/again/manifest.json")
    assert fs.get_file_info(path).size == len(good)
    copy = mirror_module.shutil.copyfileobj

    def sigterm_after_a_chunk(src, dst, length):
        dst.write(src.read(length))
        raise SystemExit(15)

    (m.local / "manifest.json").write_bytes(good + b"\n" * 1024)
    monkeypatch.setattr(mirror_module.shutil, "copyfileobj", sigterm_after_a_chunk)
    with pytest.raises(SystemExit):
        m.push()
    with fs.open_input_stream(path) as f:
        assert f.read() == good
    assert fs.get_file_info(path + ".tmp").type == pafs.FileType.NotFound
    monkeypatch.setattr(mirror_module.shutil, "copyfileobj", copy)
    m.push()  # the next commit sends it
    assert fs.get_file_info(path).size == len(good) + 1024
