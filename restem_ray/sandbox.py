"""A bubblewrap OS sandbox for model-generated programs (docs/measurements.md has the why).

    with Sandbox(SandboxLimits()) as box:
        result = box.run("print(input())", stdin="hi\\n")

One `Sandbox` is one long-lived sandbox holding a warm worker (`sandbox_worker.py`) that forks a fresh
child per program. The sandbox is:
- a non-root uid outside it (as root: a uid of its own per sandbox, leased with a lock file, because
  RLIMIT_NPROC is per uid and not enforced for uid 0), no new privileges, no supplementary groups;
- new user, PID, network, IPC, UTS and cgroup namespaces; no network at all; the worker is PID 1;
- a read-only root holding only /usr (the interpreter), its own /proc (none where a container's masked /proc
  forbids a new one) and a size-capped /tmp; no host paths (the run directory, credentials, home) exist
  inside; an environment of one variable (MALLOC_ARENA_MAX; with site_packages, native thread pools' sizes too);
- limits: processes (whole sandbox), and per program address space, CPU time, file size, open files,
  no core files; the memory of a program's processes together (polled); a wall-clock kill; an output cap.
Never run in-process, never a silent fall-back: without bubblewrap (or without the kernel features
it needs) constructing a `Sandbox` raises `SandboxUnavailable` with the reason.
"""
from __future__ import annotations

import fcntl
import functools
import json
import os
import re
import secrets
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

WORKER = Path(__file__).with_name("sandbox_worker.py")
UID_BASE = 1_900_000_000  # far above any real account; setpriv needs no passwd entry
UID_SLOTS = 4096
# A start is bubblewrap plus one Python importing the worker: 0.1-0.5 s idle, far more on a node whose cores a vLLM
# engine and a training job share; a restart mid-E-step that waited too little graded its program 'sandbox_error'.
SANDBOX_START_S = 60.0


def lift_int_digit_limit() -> None:
    """No limit on an int's decimal digits in this process (Python 3.11's is 4,300): APPS's cases and correct
    answers hold integers of thousands of digits, which its judges' Pythons printed and parsed. Set where code
    problems are read and graded (the driver reading APPS, a verifier process, the sandbox worker); the sandbox's
    time limits bound the conversions."""
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)


# The kernel's key-management calls, per audit architecture: a sandbox shares its uid's user keyring (across
# programs and sandbox restarts: a channel from one graded program to the next) and inherits the verifier's session
# keyring (a container's or a login's keys). Refused with EPERM, as Docker's default seccomp profile does.
_KEY_SYSCALLS = {  # AUDIT_ARCH_*: (add_key, request_key, keyctl)
    0xC000003E: (248, 249, 250, 0x40000000 + 248, 0x40000000 + 249, 0x40000000 + 250),  # x86_64, and its x32 ABI
    0x40000003: (286, 287, 288),  # i386 (int 0x80 from a 64-bit process)
    0xC00000B7: (217, 218, 219),  # aarch64
    0x40000028: (309, 310, 311),  # arm
}


def key_syscall_filter() -> bytes:
    """A classic-BPF seccomp program (bwrap --seccomp) that makes the key syscalls fail with EPERM and allows the
    rest: for each architecture, a jump over its block unless the call is of it, then its syscall numbers."""
    ld_abs, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    allow, deny = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW; SECCOMP_RET_ERRNO | EPERM
    prog = [(ld_abs, 0, 0, 4)]  # seccomp_data.arch
    denials = []  # indices of the jumps to the final deny
    for arch, numbers in _KEY_SYSCALLS.items():
        prog.append((jeq, 0, len(numbers) + 2, arch))  # not this architecture: past ld, its numbers and ret
        prog.append((ld_abs, 0, 0, 0))  # seccomp_data.nr
        for n in numbers:
            denials.append(len(prog))
            prog.append((jeq, 0, 0, n))
        prog.append((ret, 0, 0, allow))
    prog.append((ret, 0, 0, allow))  # another architecture
    prog.append((ret, 0, 0, deny))
    end = len(prog) - 1
    for i in denials:
        code, _, jf, k = prog[i]
        prog[i] = (code, end - i - 1, jf, k)
    return b"".join(struct.pack("<HBBI", *ins) for ins in prog)


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot be created on this machine (message says why and what to do)."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0          # wall clock per program run
    memory_mb: int = 1024           # address space per process, and memory of a program's processes together
    max_processes: int = 64         # processes + threads in the whole sandbox (per uid)
    tmpfs_mb: int = 64              # /tmp size
    output_bytes: int = 1 << 20     # stdout cap per run
    python: str = "/usr/bin/python3"
    site_packages: bool = False     # the interpreter's installed packages too (not only the standard library)


@dataclass(frozen=True)
class RunResult:
    end: str                 # report | exit | signal | timeout | output_limit | memory_limit | sandbox_error
    report: dict | None      # the harness's report (status ok/error/syntax_error, exc, results)
    code: int | None         # exit status or signal number when there was no report
    stdout: str
    stderr: str


def _count_tasks(uid: int) -> int:
    """The threads (every process's, the kernel's count for RLIMIT_NPROC) this uid runs, as far as /proc shows:
    counting processes gave a torch or vLLM worker's uid (hundreds of threads) a limit bubblewrap's own start
    was already over."""
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/status") as f:
                    uid_line = threads = None
                    for line in f:
                        if line.startswith("Uid:"):
                            uid_line = line
                        elif line.startswith("Threads:"):
                            threads = int(line.split()[1])
                            break
                if uid_line is not None and int(uid_line.split()[1]) == uid:
                    n += threads or 1
            except (OSError, ValueError):
                pass
    return n


class _UidLease:
    """An exclusive uid for one sandbox on this host (a flock on a file; freed when the process dies)."""

    def __init__(self):
        lock_dir = Path(tempfile.gettempdir()) / "restem-sandbox-uids"
        lock_dir.mkdir(mode=0o700, exist_ok=True)
        start = secrets.randbelow(UID_SLOTS)
        for i in range(UID_SLOTS):
            uid = UID_BASE + (start + i) % UID_SLOTS
            fd = os.open(lock_dir / f"{uid}.lock", os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.uid, self._fd = uid, fd
            return
        raise SandboxUnavailable(f"all {UID_SLOTS} sandbox uids on this host are in use")

    def release(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_warned_unprivileged = False
_proc_mountable = True  # False once bubblewrap was refused a new /proc here (a container's masked /proc)


BWRAP_NEEDED = (0, 8)  # --disable-userns


@functools.lru_cache(maxsize=4)
def check_bwrap_version(bwrap: str) -> None:
    """Refuse a bubblewrap older than the sandbox's options need, in one line: Ubuntu 22.04's 0.6.1 fails every
    sandbox start on --disable-userns, mid-run, on whichever node has it."""
    try:
        out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return  # (the start that follows reports what is wrong)
    m = re.search(r"(\d+)\.(\d+)", out)
    if m and (int(m.group(1)), int(m.group(2))) < BWRAP_NEEDED:
        raise SandboxUnavailable(f"{bwrap} is bubblewrap {out.split()[-1]}; the sandbox needs "
                                 f"{'.'.join(map(str, BWRAP_NEEDED))} or later (--disable-userns): install a newer "
                                 "one (docker/Dockerfile.gpu builds 0.11.0 where its base image's is older)")


class Sandbox:
    def __init__(self, limits: SandboxLimits = SandboxLimits()):
        self.limits = limits
        self._proc: subprocess.Popen | None = None
        self._lease: _UidLease | None = None
        self._lock = threading.Lock()
        self.starts = 0
        self.forgets = 0  # starts made only to forget test-mode asserts (`run`)
        self._holds_asserts = False
        self._mount_proc = _proc_mountable
        self._seccomp_fd: int | None = None
        self._bwrap = shutil.which("bwrap")
        if self._bwrap is None:
            raise SandboxUnavailable(
                "bubblewrap (bwrap) is not installed: generated code is only run inside it "
                "(apt-get install bubblewrap, or run scripts/setup.sh)")
        check_bwrap_version(self._bwrap)
        if not os.access(limits.python, os.X_OK):
            raise SandboxUnavailable(f"sandbox interpreter {limits.python} not found (verification.sandbox_python)")
        bound, run = self._bound()
        for path in bound + [run]:
            if path == "/tmp" or path.startswith("/tmp/"):
                raise SandboxUnavailable(f"sandbox interpreter {limits.python}: {path} lies under /tmp, which the "
                                         "sandbox replaces with its own (verification.sandbox_python)")
        if Path(os.path.realpath(limits.python)).parent.parent == Path("/"):  # (its prefix would be the host's root)
            raise SandboxUnavailable(f"sandbox interpreter {limits.python}: an interpreter right in a top-level "
                                     "folder has none of its own to bind; use one installed in a prefix "
                                     "(verification.sandbox_python)")
        self._start()

    # -- life cycle -------------------------------------------------------------------------------
    def _bound(self) -> tuple[list[str], str]:
        """The folders bound read-only into the sandbox for its interpreter, and the path it runs the interpreter by."""
        lim = self.limits
        python = os.path.realpath(lim.python)
        bound = ["/usr"]

        def bind(folder: str) -> None:
            if folder != "/" and not any(folder == b or folder.startswith(b + "/") for b in bound):
                bound.append(folder)  # (never the host's root: an interpreter at /tmp/python3 is refused instead)

        if not python.startswith("/usr/"):
            bind(str(Path(python).parent.parent))  # .../bin/python3 -> ... (a venv or conda prefix)
        venv = Path(os.path.abspath(lim.python)).parent.parent
        if lim.site_packages and (venv / "pyvenv.cfg").is_file():
            # run as named: a virtualenv's bin/python finds its packages by the pyvenv.cfg beside its bin/
            python = os.path.abspath(lim.python)
            bind(str(venv))
        cfg = Path(python).parent.parent / "pyvenv.cfg"  # (a venv's copied interpreter: its base's library too)
        try:
            home = next((line.split("=", 1)[1].strip() for line in cfg.read_text().splitlines()
                         if line.split("=", 1)[0].strip() == "home"), None) if cfg.is_file() else None
        except (OSError, UnicodeDecodeError):
            home = None
        if home and os.path.isabs(home) and os.path.isdir(home):  # (Python ignores a home it cannot use)
            bind(str(Path(os.path.realpath(home)).parent))
        return bound, python

    def _command(self) -> list[str]:
        lim = self.limits
        proc = ["--proc", "/proc"] if self._mount_proc else []
        bound, python = self._bound()
        flags = ["-I", "-S", "-B"]  # (-S: no site, so no installed package is importable)
        packages = []
        if lim.site_packages:
            flags.remove("-S")
            # native thread pools (OpenBLAS, OpenMP) would start a thread per core, each counted by max_processes
            packages = [a for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
                        for a in ("--setenv", k, "1")]
        binds = [a for b in bound for a in ("--ro-bind", b, b)]
        for link in ("lib", "lib64", "bin", "sbin"):
            if os.path.islink(f"/{link}"):
                binds += ["--symlink", os.readlink(f"/{link}"), f"/{link}"]
        bwrap = [
            self._bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
            *(["--seccomp", str(self._seccomp_fd)] if self._seccomp_fd is not None else []),
            "--new-session", "--clearenv", "--as-pid-1", *binds,
            # glibc reserves 64 MiB of address space per malloc arena, one per thread up to 8 per core: under
            # memory_mb's address-space limit a program could start only ~21 threads (a ThreadPoolExecutor of
            # 32 failed). The memory watch, not the reservation, bounds what they use.
            "--setenv", "MALLOC_ARENA_MAX", "2", *packages,
            *proc, "--dev", "/dev", "--size", str(lim.tmpfs_mb << 20), "--tmpfs", "/tmp",
            "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp",
            python, *flags, "-c", WORKER.read_text(),  # source as argv: no host path needed inside
        ]
        nproc = lim.max_processes
        if os.geteuid() == 0:
            self._lease = self._lease or _UidLease()
            uid = self._lease.uid
            pre = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs"]
        else:
            # Without root there is no spare uid: the process limit is per uid (threads included), so it must
            # sit above what this user already runs. The PID namespace and the kill after every run still bound
            # a fork bomb, but it can briefly take this user's spare process slots.
            global _warned_unprivileged
            nproc += _count_tasks(os.getuid())
            pre = []
            if not _warned_unprivileged:
                _warned_unprivileged = True
                warnings.warn("restem-ray sandbox: not running as root, so programs share this user's uid; "
                              "the process limit is relative to this user's other processes", stacklevel=3)
        limits = ["prlimit", f"--nproc={nproc}", "--core=0", "--nofile=256"]
        return pre + limits + bwrap

    def _start(self) -> None:
        # the seccomp program is read by bubblewrap from an inherited descriptor, once per start
        self._seccomp_fd = os.memfd_create("restem-seccomp", 0)
        try:
            os.write(self._seccomp_fd, key_syscall_filter())
            os.lseek(self._seccomp_fd, 0, os.SEEK_SET)
            self._proc = subprocess.Popen(self._command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, env={}, close_fds=True, start_new_session=True,
                                          pass_fds=(self._seccomp_fd,))
        finally:
            os.close(self._seccomp_fd)
            self._seccomp_fd = None
        self.starts += 1
        self._holds_asserts = False
        hello = self._recv(SANDBOX_START_S)
        if not (isinstance(hello, dict) and hello.get("ready")):
            try:  # a worker that ended closed its pipe just before it is reaped
                exited = self._proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                exited = None
            err = self._stop()
            if not err and exited is None:  # bubblewrap refused nothing: the worker inside never said it was ready
                raise SandboxUnavailable(f"the sandbox did not answer within {SANDBOX_START_S:.0f} s of its start")
            if not err:
                raise SandboxUnavailable(f"the sandbox exited at its start (exit code {exited}) without a word")
            if "Can't mount proc" in err and self._mount_proc:
                self._without_proc()
                return self._start()
            if "Resource temporarily unavailable" in err and os.geteuid() != 0:
                raise SandboxUnavailable(
                    f"bubblewrap could not start a sandbox: {err} (this uid's process limit: threads of its other "
                    "processes, some perhaps outside this container, left the sandbox none; run the verifier as "
                    "root, where each sandbox gets a uid of its own)")
            raise SandboxUnavailable(f"bubblewrap could not start a sandbox: {err} (user namespaces "
                                     "must be allowed; in a container, allow unshare in its seccomp profile)")

    def _without_proc(self) -> None:
        """Docker and Kubernetes mask parts of a container's /proc (/proc/kcore, /proc/keys, ...), and the kernel
        then refuses a new procfs in a user namespace ("mount too revealing"). The sandbox runs without /proc
        then: programs see none (stricter), and the worker's watch on a program's processes' memory together,
        which reads /proc, is off (each process keeps its own limit)."""
        global _proc_mountable
        self._mount_proc = _proc_mountable = False
        self.starts -= 1  # (the refused start is not a restart)
        warnings.warn("restem-ray sandbox: this container masks parts of /proc, so the sandbox may not mount its "
                      "own; programs run without /proc, and the limit on a program's processes' memory together "
                      "is off (each process keeps its own). To have it, unmask /proc: docker run --security-opt "
                      "systempaths=unconfined; Kubernetes securityContext.procMount: Unmasked (with hostUsers: "
                      "false), or a privileged container", stacklevel=4)

    def _stop(self) -> str:
        """Kill the sandbox; returns whatever it said on stderr."""
        if self._proc is None:
            return ""
        self._proc.kill()
        try:
            _, err = self._proc.communicate(timeout=5)
        except (subprocess.TimeoutExpired, ValueError, OSError):
            err = b""
        self._proc = None
        lines = (err or b"").decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else ""

    def close(self) -> None:
        self._stop()
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- protocol ---------------------------------------------------------------------------------
    def _recv(self, timeout: float):
        fd = self._proc.stdout.fileno()
        head = self._read(fd, 4, timeout)
        if head is None:
            return None
        body = self._read(fd, struct.unpack(">I", head)[0], timeout)
        return None if body is None else json.loads(body)

    @staticmethod
    def _read(fd: int, n: int, timeout: float) -> bytes | None:
        buf = bytearray()  # (not bytes +=, which copies the whole buffer at every pipe read)
        while len(buf) < n:
            r, _, _ = select.select([fd], [], [], timeout)
            if not r:
                return None
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def run(self, code: str, *, stdin: str = "", mode: str = "script", fn_name: str | None = None,
            calls: list | None = None, timeout_s: float | None = None, test: str = "", context: str = "",
            entry: str | None = None, output_bytes: int | None = None) -> RunResult:
        """Run one program in a fresh child inside the sandbox. Never raises for anything the program does.
        In "test" mode (asserts in the program's process) an audit hook guards the harness's report, and `test`
        (the asserts) runs after `code`, in a namespace of its own with the builtins as they were before `code`:
        the program's names less those that shadow a builtin (`entry` kept), then `context` (the prompt's own code
        before the entry point) run afresh there. `output_bytes`: this run's stdout cap, instead of the limits'."""
        lim = self.limits
        job = {"code": code, "mode": mode, "test": test, "context": context, "entry": entry, "stdin": stdin,
               "fn_name": fn_name, "calls": calls or [],
               "timeout": timeout_s or lim.timeout_s, "memory": lim.memory_mb << 20,
               "output_cap": output_bytes or lim.output_bytes, "nonce": secrets.token_hex(16)}
        with self._lock:
            if mode != "test" and self._holds_asserts and self._proc is not None:
                # The worker has read test-mode jobs, whose asserts hold their expected answers, and freed memory
                # keeps their text: a forked stdin or call-mode child (no fresh interpreter) could read it in its
                # own copy of the worker's memory. A fresh sandbox holds none (the cost, one start, is paid where
                # a grader turns from test mode to the other modes; test-mode children exec anew and see none).
                self._stop()
                self.forgets += 1
            for attempt in range(2):  # a sandbox that died is replaced once; the run is retried on it
                if self._proc is None:
                    try:
                        self._start()
                    except SandboxUnavailable as e:
                        return RunResult("sandbox_error", None, None, "", str(e))
                self._holds_asserts |= mode == "test"
                try:
                    data = json.dumps(job).encode()
                    self._proc.stdin.write(struct.pack(">I", len(data)) + data)
                    self._proc.stdin.flush()
                    reply = self._recv(job["timeout"] + 10.0)
                except (OSError, ValueError):
                    reply = None
                if reply is None:
                    self._stop()
                    continue
                if not reply["clean"]:
                    self._stop()  # /tmp could not be emptied: the next program gets a fresh sandbox
                report = reply["report"]
                if report is not None:
                    report = {k: v for k, v in report.items() if k != "nonce"}
                return RunResult(reply["end"], report, reply["code"], reply["stdout"], reply["stderr"])
            return RunResult("sandbox_error", None, None, "", "the sandbox stopped answering")
