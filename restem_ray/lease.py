"""One driver per run directory on object storage, across machines: a lease object beside the run.

A local run directory is locked with the kernel's flock (`RunDir.lock`), which a store such as S3 does not have,
and a node-local copy's flock only keeps out a second driver on the same machine. So the driver of a URI run
directory holds `URI/.driver-lease.json` ({owner, host, pid, machine, since, beat, every_s}) and rewrites it with
beat + 1 every `every_s` seconds from a thread. A driver that finds another owner's lease:
- takes it at once if the holder ran on this machine, in this pid namespace (boot id and namespace inode, not
  just the host name: containers on the host network share one), and its pid is gone (a crashed driver's resume);
- otherwise watches it for 3 x the holder's `every_s`: a beat that moves is a live driver, refused in one line;
  one that stays put is a dead driver's (a head node lost, a SIGKILL), and the lease is taken over.
Only beats are compared, never clocks, so clock skew between machines does not matter. Every upload (a commit,
an E-step shard; before the manifest and before deletions too) reads the lease first: a driver whose lease is no
longer its own (it was thought dead: a network partition, a suspended process) stops in one line instead of
overwriting the new driver's run; a lease it cannot read is not uploaded over. The renewal that finds the lease
taken stops the CLI's driver at once (`on_lost`), mid-phase: its M-step's Ray Train workers write checkpoints
without asking the lease. A clean exit deletes the lease.
A lease written over by something else (not a lease) is written again by its holder, at its next beat or upload:
left so, a watching driver would take the run after 3 beats while this one uploads on.
Renewals go on through a store outage (after 3 missed beats another driver may take the run; the next read
says whether it did).

pyarrow's file systems have no create-if-absent, so two drivers starting within the same second could both
write a lease; each reads it back after a pause and the later writer wins, and a loser that read it back too
early finds it taken before its first upload.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid

from .errors import RunError, UserError, first_line

NAME = ".driver-lease.json"
TORN = object()  # a lease that is not one: caught mid-write, or written over by something else
PROCESS = uuid.uuid4().hex  # this process: a lease it wrote itself is its own


def renew_every_s() -> float:
    raw = os.environ.get("RESTEM_LEASE_RENEW_S", "30")
    try:
        every = float(raw)
    except ValueError:
        every = -1.0
    if not 0.1 <= every <= 300:
        raise UserError(f"RESTEM_LEASE_RENEW_S: {raw!r} is not a number of seconds from 0.1 to 300")
    return every


def machine_id() -> str:
    """This machine and pid namespace: where a pid in a lease means the same process."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # not Linux: the host name alone
        return socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class DriverLease:
    def __init__(self, fs, path: str, shown: str, whole_writes: bool):
        self.fs, self.path, self.shown = fs, f"{path}/{NAME}", shown  # shown: the URI, for messages
        self.whole_writes = whole_writes  # an object store: a write shows whole or not at all
        self.owner = uuid.uuid4().hex
        self.every_s = renew_every_s()
        self.beat = 0
        self.lost: str | None = None  # why this driver no longer holds the run
        # called once, from the renewal thread, with `lost_text()`: the CLI stops its driver there and then, so that an
        # M-step or E-step in flight does not go on for hours (Ray Train uploads its own checkpoints)
        self.on_lost = None
        self._outage = False  # the renewals stopped on an unreachable store (not a loss by itself)
        self._period = self.every_s  # seconds between this driver's beats, as measured (written in the lease)
        self._since = None
        self._writing = threading.Lock()  # the renewal thread and an upload's check both restore a torn lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the object ----------------------------------------------------------------------------------------
    def _read(self):
        """The lease (a dict), None when there is none, or TORN when caught mid-write."""
        try:
            with self.fs.open_input_stream(self.path) as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            lease = json.loads(raw)
        except ValueError:
            return TORN
        return lease if isinstance(lease, dict) and "owner" in lease else TORN

    def _write(self) -> None:
        # period_s: how far apart this driver's beats really come (its renewal interval plus a read and a write of
        # the lease), which a watcher waits 3 of: against a slow store, 3 renewal intervals alone can pass between
        # two beats of a live driver
        lease = {"owner": self.owner, "process": PROCESS, "host": socket.gethostname(), "pid": os.getpid(),
                 "machine": machine_id(), "beat": self.beat, "every_s": self.every_s, "since": self._since,
                 "period_s": round(self._period, 3)}
        tmp = self.path if self.whole_writes else f"{self.path}.{self.owner[:8]}.tmp"
        start = time.monotonic()
        with self._writing:
            with self.fs.open_output_stream(tmp) as f:
                f.write(json.dumps(lease).encode())
            if not self.whole_writes:
                self.fs.move(tmp, self.path)  # readers never see half a lease
        # before the first renewal has measured a period: the interval and a read and a write as slow as this one
        self._period = max(self._period, self.every_s + 2 * (time.monotonic() - start))

    @staticmethod
    def describe(lease) -> str:
        if not isinstance(lease, dict):
            return "a lease being written"
        return f"pid {lease.get('pid')} on {lease.get('host')} since {lease.get('since')}"

    # --- taking it -----------------------------------------------------------------------------------------
    def acquire(self, settle_s: float = 2.0) -> None:
        """Hold the lease, or raise a one-line UserError if a live driver holds it (may wait 3 x its renewal)."""
        held = self._read()
        if held is not None and not self._ours_to_take(held):
            raise UserError(f"{self.shown}: another driver is running this run ({self.describe(held)}; its lease "
                            f"{NAME} is being renewed); wait for it to end or stop it, then --resume")
        self._since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
        self._write()
        time.sleep(min(settle_s, self.every_s))  # a driver that read "no lease" at the same moment writes now
        held = self._read()
        if not isinstance(held, dict) or held.get("owner") != self.owner:
            raise UserError(f"{self.shown}: another driver started this run at the same time ({self.describe(held)});"
                            " wait for it to end or stop it, then --resume")
        self._start()
        atexit.register(self.release)

    def _start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name="restem-lease", daemon=True)
        self._thread.start()

    def _ours_to_take(self, held) -> bool:
        if isinstance(held, dict):
            if held.get("process") == PROCESS:
                return True  # this process took it already (e.g. `demo` resuming what it started)
            pid = held.get("pid")
            if held.get("machine") == machine_id() and isinstance(pid, int) and not _pid_alive(pid):
                print(f"[restem] the run's last driver ({self.describe(held)}) is gone: taking its lease")
                return True
        try:  # the holder's beats as they really come (period_s), not only its renewal interval
            every = min(max(float(held.get("every_s", 30)), float(held.get("period_s", 0)), 0.1), 600.0) \
                if isinstance(held, dict) else 30.0
        except (TypeError, ValueError):
            every = 30.0
        window = 3 * every
        print(f"[restem] {self.shown} has a driver lease ({self.describe(held)}): watching it for {window:.0f} s to see "
              "whether that driver still runs", flush=True)
        deadline = time.monotonic() + window
        while time.monotonic() < deadline:
            time.sleep(min(every / 2, max(0.0, deadline - time.monotonic())))
            now = self._read()
            if now is None:
                return True  # released meanwhile
            if now is TORN or held is TORN:
                held = now  # mid-write: someone is writing it; judge by what it becomes
                continue
            if now.get("owner") != held.get("owner") or now.get("beat") != held.get("beat"):
                return False  # renewed (or taken by a third driver): alive
        print(f"[restem] its lease was not renewed for {window:.0f} s: that driver is gone, this one takes the run")
        return True

    # --- holding it ----------------------------------------------------------------------------------------
    def _renew(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.every_s):
            if self.lost:  # an upload's check found it taken first: that check says so
                return
            try:
                held = self._read()
                if held is None:  # once more before giving the run up: a store may answer "not found" briefly
                    self._stop.wait(min(1.0, self.every_s / 4))
                    held = self._read()
                if held is TORN:  # see _restore
                    held = self._restore()
                    if held is TORN:
                        continue
                if held is None or held.get("owner") != self.owner:
                    self.lost = (f"another driver took the run over ({self.describe(held)})" if held
                                 else "its lease was deleted")
                    if self.on_lost is not None:
                        self.on_lost(self.lost_text())
                    return
                self.beat += 1
                if not self._outage and time.monotonic() - last_ok < 2 * self._period + self.every_s:
                    # a beat after a beat (not the first after an outage): its spacing, slow ones remembered
                    self._period = max(self.every_s, time.monotonic() - last_ok, 0.8 * self._period)
                self._write()
                last_ok, self._outage = time.monotonic(), False
            except Exception:  # the store unreachable: keep trying; after 3 beats others may take the run
                self._outage = time.monotonic() - last_ok > 3 * self.every_s

    def check(self, strict: bool = True) -> bool:
        """Before every upload (one small read): a driver whose lease is no longer its own stops instead of
        overwriting the run of the driver that holds it. A lease that cannot be read (three tries) is not
        uploaded over: a RunError (`strict`, a commit) or False (an E-step shard, which its commit sends again)."""
        if not self.lost:
            held, error = TORN, None
            for attempt in range(3):
                try:
                    held, error = self._read(), None
                except Exception as e:
                    error = e
                    time.sleep(0.5 * (attempt + 1))
                    continue
                break
            if held is TORN and error is None:
                try:
                    held = self._restore()
                except Exception as e:
                    error = e
            if held is TORN:  # unreadable three times, or a lease written over that could not be restored
                if strict:
                    raise RunError(f"{self.shown}: cannot read the driver lease {NAME} "
                                   f"({first_line(error) if error else 'not a lease'}); nothing more was uploaded")
                return False
            if held is None or held.get("owner") != self.owner:
                self.lost = (f"another driver took the run over ({self.describe(held)})" if held
                             else "its lease was deleted")
        if self.lost:
            raise RunError(self.lost_text())
        return True

    def _restore(self):
        """A lease that is not one, read by its holder: leases are written whole (a rename, or a store's whole
        objects), so no driver is writing it; something else wrote over it. Left so, it would stop no other
        driver: one watching it would take the run after 3 beats. The holder writes its lease again (a read
        first, as a lease caught mid-write on a store without whole writes is whole a moment later)."""
        time.sleep(min(0.5, self.every_s))
        held = self._read()
        if held is not TORN:
            return held
        print(f"[restem] warning: {self.shown}/{NAME} is not a driver lease (written over?): this driver, its "
              "holder, writes it again", flush=True)
        self._write()
        return self._read()

    def lost_text(self) -> str:
        return f"{self.shown}: this driver no longer holds the run: {self.lost}; it stops here"

    def release(self) -> None:
        """Delete the lease if this driver still holds it (a clean exit: the next driver need not wait)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is None:
            return
        thread.join(timeout=60)  # not mid-write when the lease is deleted
        if self.lost:
            return
        try:
            held = self._read()
            if isinstance(held, dict) and held.get("owner") == self.owner:
                self.fs.delete_file(self.path)
        except Exception:  # leaving it costs the next driver 3 beats of waiting, nothing more
            pass
