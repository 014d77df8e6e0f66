"""One driver per run directory on a URI, across machines (restem_ray/lease.py). Drivers are real processes
(Python subprocesses holding the lease of a `file://` run directory, the same pyarrow.fs calls as s3://); a
driver on "another machine" is a lease object naming another host. Renewal every 0.2 s keeps the waits short."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from restem_ray.errors import RunError, UserError
from restem_ray.mirror import RunMirror
from restem_ray.storage import RunDir

HOLD = """
import sys, time
from restem_ray.errors import UserError
from restem_ray.mirror import RunMirror
m = RunMirror(sys.argv[1], cache=sys.argv[2])
try:
    m.check()  # as `run` does: the folder exists, and takes writes
    m.hold()
except UserError as e:
    print("refused:", e, flush=True)
    sys.exit(2)
print("held", flush=True)
time.sleep(float(sys.argv[3]))
print("lost" if m.lease.lost else "kept", flush=True)
"""


@pytest.fixture(autouse=True)
def fast_beats(monkeypatch):
    monkeypatch.setenv("RESTEM_LEASE_RENEW_S", "0.5")


def driver(uri, cache, seconds):
    return subprocess.Popen([sys.executable, "-c", HOLD, uri, str(cache), str(seconds)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def put_lease(tmp_path, lease):
    """Another driver's lease, written whole (a temporary name, then a rename), as drivers write theirs."""
    tmp = tmp_path / "bucket" / "run" / ".lease.tmp"
    tmp.write_text(json.dumps(lease))
    tmp.rename(tmp_path / "bucket" / "run" / ".driver-lease.json")


def lease_of(tmp_path):
    return json.loads((tmp_path / "bucket" / "run" / ".driver-lease.json").read_text())


def test_a_live_driver_is_refused_a_dead_ones_lease_is_taken_and_a_clean_exit_frees_it(tmp_path, capsys):
    uri = f"file://{tmp_path}/bucket/run"
    other = driver(uri, tmp_path / "node-a", 60)
    assert other.stdout.readline().strip() == "held"
    held = lease_of(tmp_path)
    assert held["pid"] == other.pid and held["host"] == socket.gethostname()

    # a live driver (its lease renewed while we watch): refused in one line naming it
    with pytest.raises(UserError) as e:
        RunMirror(uri, cache=tmp_path / "node-b").hold()
    msg = str(e.value)
    assert msg.startswith(f"{uri}: another driver is running this run (pid {other.pid} on {socket.gethostname()}")
    assert "\n" not in msg and lease_of(tmp_path)["pid"] == other.pid

    # SIGKILLed (no clean-up): its lease stays, and this host sees its pid gone, so it is taken at once
    other.send_signal(signal.SIGKILL)
    other.wait()
    assert lease_of(tmp_path)["pid"] == other.pid
    capsys.readouterr()
    t0 = time.monotonic()
    mine = RunMirror(uri, cache=tmp_path / "node-b")
    mine.check()
    mine.hold()
    assert "is gone: taking its lease" in capsys.readouterr().out and time.monotonic() - t0 < 5
    assert lease_of(tmp_path)["pid"] == os.getpid()
    beat = lease_of(tmp_path)["beat"]
    for _ in range(100):  # renewed while held
        if lease_of(tmp_path)["beat"] > beat:
            break
        time.sleep(0.1)
    assert lease_of(tmp_path)["beat"] > beat

    # a clean exit deletes it: the next driver need not wait
    mine.lease.release()
    assert not (tmp_path / "bucket" / "run" / ".driver-lease.json").exists()
    done = driver(uri, tmp_path / "node-c", 0)
    assert done.communicate(timeout=60)[0].split() == ["held", "kept"] and done.returncode == 0
    assert not (tmp_path / "bucket" / "run" / ".driver-lease.json").exists()


def test_the_lease_of_a_driver_on_a_lost_machine_is_taken_once_it_stops_beating(tmp_path, capsys):
    uri = f"file://{tmp_path}/bucket/run"
    (tmp_path / "bucket" / "run").mkdir(parents=True)
    silent = {"owner": "x", "host": "head-0-gone", "pid": 1, "beat": 41, "every_s": 0.2, "since": "yesterday"}
    put_lease(tmp_path, silent)
    t0 = time.monotonic()
    m = RunMirror(uri, cache=tmp_path / "node-b")
    m.hold()
    waited = time.monotonic() - t0
    out = capsys.readouterr().out
    assert "has a driver lease (pid 1 on head-0-gone since yesterday): watching it for 1 s" in out
    assert "not renewed for 1 s: that driver is gone, this one takes the run" in out
    assert 0.6 <= waited < 10, waited  # it watched 3 beats of the holder's interval, no more
    assert lease_of(tmp_path)["host"] == socket.gethostname()
    m.lease.release()


def test_a_driver_whose_run_was_taken_over_stops_at_its_next_upload(tmp_path):
    uri = f"file://{tmp_path}/bucket/run"
    m = RunMirror(uri, cache=tmp_path / "node-a")
    assert m.check() is False
    m.hold()
    m.prepare(resume=False, has_run=False)
    run = RunDir(m.local)
    run.mirror = m
    run.create("seed: 0\n", resume=False)
    # another machine thought this driver dead (a network partition) and took the run; this driver's renewals
    # are held meanwhile (as a suspended process's are), so only the read before each upload can notice
    m.lease._stop.set()
    m.lease._thread.join()
    taker = {"owner": "y", "host": "head-1", "pid": 7, "beat": 0, "every_s": 0.2, "since": "now"}
    put_lease(tmp_path, taker)
    remote = (tmp_path / "bucket" / "run" / "manifest.json").read_text()
    with pytest.raises(RunError, match=r"no longer holds the run: another driver took the run over \(pid 7 on head-1"):
        run.complete(0, "eval", [{"split": "valid", "pass@1": 0.5}])
    shard = run.samples_dir(1) / "part-00000.parquet"
    shard.write_bytes(b"rows")
    with pytest.raises(RunError, match="no longer holds the run"):
        run.saved(shard)
    assert (tmp_path / "bucket" / "run" / "manifest.json").read_text() == remote  # nothing overwritten
    assert not (tmp_path / "bucket" / "run" / "iter_001").exists()
    m.lease.release()
    assert json.loads((tmp_path / "bucket" / "run" / ".driver-lease.json").read_text())["owner"] == "y"  # not ours


def test_the_renewal_that_finds_the_run_taken_calls_on_lost_once(tmp_path):
    uri = f"file://{tmp_path}/bucket/run"
    m = RunMirror(uri, cache=tmp_path / "node-a")
    m.check()
    m.hold()
    calls = []
    m.lease.on_lost = calls.append
    for _ in range(100):
        # written again until seen: a renewal that read its own lease just before this write would write over it
        put_lease(tmp_path, {"owner": "y", "host": "head-1", "pid": 7, "beat": 0, "every_s": 0.5, "since": "now"})
        if calls:
            break
        time.sleep(0.1)
    time.sleep(1.2)  # two more renewal periods: no second call
    assert calls == [f"{uri}: this driver no longer holds the run: another driver took the run over (pid 7 on head-1 "
                     "since now); it stops here"] and m.lease.lost == "another driver took the run over (pid 7 on head-1 since now)"
    m.lease.release()
    assert lease_of(tmp_path)["owner"] == "y"


def test_a_lease_the_store_misses_once_is_kept_and_one_deleted_is_lost(tmp_path):
    """A store that answers "not found" for a moment (some S3-compatible ones) must not end a live driver: the
    renewal reads again first. A lease that stays deleted is lost."""
    uri = f"file://{tmp_path}/bucket/run"
    m = RunMirror(uri, cache=tmp_path / "node-a")
    m.check()
    m.hold()
    calls, read, missed = [], m.lease._read, []
    m.lease.on_lost = calls.append

    def flaky():
        if not missed:
            missed.append(1)
            return None
        return read()
    m.lease._read = flaky
    time.sleep(1.5)  # three renewals
    assert missed and not calls and m.lease.lost is None
    (tmp_path / "bucket" / "run" / ".driver-lease.json").unlink()
    for _ in range(50):
        if calls:
            break
        time.sleep(0.1)
    assert m.lease.lost == "its lease was deleted" and len(calls) == 1
    m.lease.release()


def test_a_lease_written_over_by_something_else_is_restored_by_its_holder(tmp_path, capsys):
    """A lease that is not one (a user's edit, a tool writing over it): the holder's uploads went on and its
    renewals skipped it, so another driver watching it would take the run while this one still wrote."""
    uri = f"file://{tmp_path}/bucket/run"
    m = RunMirror(uri, cache=tmp_path / "node-a")
    m.check()
    m.hold()
    try:
        m.lease._stop.set()  # the upload's check alone first
        m.lease._thread.join()
        put_lease(tmp_path, {"not": "a lease"})
        assert m.lease.check() is True
        assert lease_of(tmp_path)["owner"] == m.lease.owner
        assert "is not a driver lease (written over?)" in capsys.readouterr().out
        m.lease._start()  # ... and the renewals
        (tmp_path / "bucket" / "run" / ".driver-lease.json").write_text("{half a le")
        for _ in range(50):
            time.sleep(0.1)
            try:
                if lease_of(tmp_path)["owner"] == m.lease.owner:
                    break
            except ValueError:
                pass
        assert lease_of(tmp_path)["owner"] == m.lease.owner and m.lease.lost is None
    finally:
        m.lease.release()


def test_two_drivers_started_together_end_with_one_holding_the_run(tmp_path):
    uri = f"file://{tmp_path}/bucket/run"
    (tmp_path / "bucket" / "run").mkdir(parents=True)
    a, b = driver(uri, tmp_path / "node-a", 2), driver(uri, tmp_path / "node-b", 2)
    outs = [p.communicate(timeout=60)[0] for p in (a, b)]
    holding = [o for o in outs if o.split()[-1:] == ["kept"]]
    assert len(holding) == 1, outs  # the other was refused, or found itself overtaken within a beat
    assert all("\nrefused: " in "\n" + o or o.split()[-1] in ("kept", "lost") for o in outs), outs


def test_a_same_named_host_is_not_this_machine_and_an_outage_only_pauses_the_lease(tmp_path, capsys):
    """Containers on the host network share a host name but not a pid namespace: a lease naming this host but
    another machine id is watched, not taken because its pid is not running here. Renewals go on through a store
    that takes no writes and beat again once it answers; a lease caught mid-write is nobody's loss, and one that
    cannot be read is not uploaded over."""
    import subprocess as sp

    uri = f"file://{tmp_path}/bucket/run"
    (tmp_path / "bucket" / "run").mkdir(parents=True)
    dead = sp.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    other = {"owner": "z", "host": socket.gethostname(), "machine": "another-boot/4026531836", "pid": dead.pid,
             "beat": 3, "every_s": 0.2, "since": "earlier"}
    put_lease(tmp_path, other)
    m = RunMirror(uri, cache=tmp_path / "node-a")
    m.check()
    m.hold()
    out = capsys.readouterr().out
    assert "is gone: taking its lease" not in out and "not renewed for 1 s: that driver is gone, this one takes" in out

    lease = m.lease
    write, read = lease._write, lease._read
    lease._write = lambda: (_ for _ in ()).throw(OSError("store unreachable"))
    for _ in range(100):
        if lease._outage:
            break
        time.sleep(0.1)
    assert lease._outage and not lease.lost
    lease._write = write  # the store answers again: the renewals, which never stopped, beat again
    beat = lease_of(tmp_path)["beat"]
    for _ in range(100):
        if lease_of(tmp_path)["beat"] > beat and not lease._outage:
            break
        time.sleep(0.1)
    assert lease_of(tmp_path)["beat"] > beat and not lease._outage and not lease.lost
    m.prepare(resume=False, has_run=False)
    run = RunDir(m.local)
    run.mirror = m
    lease._stop.set()  # hold the renewals while the lease file is played with below
    lease._thread.join()
    (tmp_path / "bucket" / "run" / ".driver-lease.json").write_text('{"owner": "')  # mid-write
    assert lease.check()  # nobody's loss
    (tmp_path / "bucket" / "run" / ".driver-lease.json").unlink()
    lease._write()  # whole again (as the store shows it once the write is done)
    lease._read = lambda: (_ for _ in ()).throw(OSError("503 Slow Down"))
    shard = run.samples_dir(1) / "part-00000.parquet"
    shard.write_bytes(b"rows")
    run.saved(shard)  # a lease it cannot read is not uploaded over: the shard waits for its commit
    assert "could not read the driver lease" in capsys.readouterr().out
    assert not (tmp_path / "bucket" / "run" / "iter_001").exists()
    with pytest.raises(RunError, match=r"cannot read the driver lease \.driver-lease\.json \(OSError: 503 Slow Down\)"):
        run.create("seed: 0\n", resume=False)  # a commit: one line
    lease._read = read
    lease._start()
    lease.release()
    assert not (tmp_path / "bucket" / "run" / ".driver-lease.json").exists()


def test_a_bad_renewal_interval_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("RESTEM_LEASE_RENEW_S", "soon")
    m = RunMirror(f"file://{tmp_path}/bucket/run", cache=tmp_path / "node-a")
    m.check()
    with pytest.raises(UserError, match=r"^RESTEM_LEASE_RENEW_S: 'soon' is not a number of seconds from 0.1 to 300$"):
        m.hold()


@pytest.mark.slow
def test_a_driver_whose_run_is_taken_mid_m_step_stops_there_in_one_line(tmp_path, monkeypatch):
    """The renewal that finds the lease taken stops the driver mid-phase: its M-step's Ray Train workers upload
    checkpoints without asking the lease, so waiting for the phase's commit to notice would let a stale driver
    train (and write) for the rest of its M-step."""
    import psutil
    from helpers import SMALL, tracebacks

    monkeypatch.setenv("RESTEM_RUN_CACHE", str(tmp_path / "cache"))
    uri = f"file://{tmp_path}/bucket/run"
    # a long M-step (100 epochs: minutes) that the takeover must cut short
    p = subprocess.Popen([sys.executable, "-m", "restem_ray.cli", "demo", *SMALL, "--out", uri,
                          "--set", "training.epochs=100", "--set", "task.test_file=null",
                          "--set", "task.extra_eval_files={}", "--set", "evaluation.k_splits=[]"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        log = []
        for line in p.stdout:
            log.append(line)
            if "M-step:" in line and "/" in line.split("M-step:")[1]:
                break  # the training workers are stepping
        assert p.poll() is None, "".join(log[-40:])
        workers = lambda: [q for q in psutil.process_iter(["cmdline"])  # noqa: E731
                           if "RayTrainWorker" in " ".join(q.info["cmdline"] or []) and _session(q) == p.pid]
        assert workers()  # seen in the driver's session: their end below is seen too
        taker = {"owner": "y", "host": "head-1", "pid": 7, "beat": 0, "every_s": 0.5, "since": "now"}
        t0 = time.monotonic()
        out = []
        reader = threading.Thread(target=lambda: out.append(p.stdout.read()), daemon=True)
        reader.start()
        while p.poll() is None and time.monotonic() - t0 < 120:
            # written again until the driver ends: a renewal that read its own lease just before this write would
            # write over it (a taker's next renewal would then find the run taken back)
            put_lease(tmp_path, taker)
            time.sleep(0.2)
        p.wait(timeout=10)
        stopped_s = time.monotonic() - t0
        reader.join(timeout=60)  # the output ends once the driver's Ray processes, which share it, have ended too
        assert not reader.is_alive()
        rest = "".join(out)
        for _ in range(60):  # the local Ray, its training workers with it, ends with the driver
            if not workers():
                break
            time.sleep(0.5)
        assert not workers()
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert p.returncode == 1, rest[-3000:]
    # one line says why (Ray's log monitor may still forward a worker's last lines after it)
    ours = [line for line in rest.splitlines() if line.startswith("restem-ray:")]
    assert ours == [f"restem-ray: run stopped: {uri}: this driver no longer holds the run: another driver took "
                    "the run over (pid 7 on head-1 since now); it stops here"], rest[-3000:]
    assert not tracebacks(rest), rest[-3000:]
    assert stopped_s < 30, stopped_s  # within a few renewals, not at the end of the M-step
    manifest = json.loads((tmp_path / "bucket" / "run" / "manifest.json").read_text())
    assert "1/improve" not in manifest["completed"] and "1/select" in manifest["completed"]
    assert lease_of(tmp_path)["owner"] == "y"  # the taker's lease stays


def _session(proc) -> int | None:
    try:
        return os.getsid(proc.pid)
    except OSError:
        return None


def test_a_driver_far_from_its_store_is_not_taken_for_dead(tmp_path, monkeypatch):
    """Against a slow store a live driver's beats come further apart than its renewal interval (a read and a
    write each time): a watcher that waited 3 intervals took its run while it ran. The lease says how far apart
    its beats really come (period_s), and a watcher waits 3 of those."""
    import pyarrow.fs as pafs

    import restem_ray.lease as lease_module

    monkeypatch.setenv("RESTEM_LEASE_RENEW_S", "0.1")
    root = tmp_path / "bucket" / "run"
    root.mkdir(parents=True)
    local = pafs.LocalFileSystem()

    class Far:  # every request 120 ms away (another region)
        def __getattr__(self, name):
            call = getattr(local, name)
            return lambda *a, **kw: (time.sleep(0.12), call(*a, **kw))[1]

    holder = lease_module.DriverLease(Far(), str(root), "uri", whole_writes=False)
    holder.acquire(settle_s=0.1)
    try:
        time.sleep(1.0)  # a few beats: the lease says how far apart they come
        assert lease_of(tmp_path)["period_s"] > 0.3
        monkeypatch.setattr(lease_module, "machine_id", lambda: "another-machine")
        monkeypatch.setattr(lease_module, "PROCESS", "another-process")
        watcher = lease_module.DriverLease(local, str(root), "uri", whole_writes=False)
        with pytest.raises(UserError, match="another driver is running this run"):
            watcher.acquire(settle_s=0.1)
        assert holder.lost is None
    finally:
        holder._stop.set()
        holder._thread.join()
