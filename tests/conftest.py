import fcntl
import os
import shutil

import pytest

# Keep every Ray test cluster on the loopback interface: Ray otherwise swaps 127.0.0.1 for the host's
# network address. (Ray reads this when it is imported, so it is set before anything imports ray.)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Under pytest-xdist two workers' torch processes share the cores, and OpenMP threads that spin while they wait
# (libgomp's default) hold the cores the threads they wait for need: the tiny chat model's build took 197 s
# beside a busy process with spinning, 37 s with passive waiting (idle machine: spinning 20.5 s, passive 24.7 s). Set before
# torch is imported here, and inherited by every process the tests start (Ray's workers, vLLM engines).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from helpers import demo  # noqa: E402


@pytest.fixture(scope="session")
def small_reference_run(tmp_path_factory):
    """The small demo run that resumed, moved and interrupted runs must equal. Under pytest-xdist (`make test` runs
    two workers) a session fixture is made once per worker: the workers share this one instead, in the run's
    common temporary folder, made by the first that needs it while the other waits. (xdist's own grouping,
    `--dist loadgroup`, does not group under pytest 9: it renames items through an attribute pytest 9 no longer reads.)"""
    from filelock import FileLock

    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / "shared-ref"  # pytest-N/, above each worker's popen-gwK/
    else:
        root = tmp_path_factory.mktemp("ref")
    root.mkdir(exist_ok=True)
    out = root / "run"
    with FileLock(str(root / ".lock")):
        if not (root / "DONE").is_file():
            shutil.rmtree(out, ignore_errors=True)  # a failed attempt's
            rc, log = demo(out)
            assert rc == 0, log[-4000:]
            (root / "DONE").write_text("ok\n")
    return out


@pytest.fixture(scope="session")
def numpy_python():
    """A virtualenv of the system's Python holding numpy (a copy of this one's), for `verification.
    sandbox_site_packages`: the sandbox's own uid must read the interpreter (this test run's may sit under /root),
    and not from under /tmp (the sandbox's own /tmp hides it)."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import numpy

    system = "/usr/bin/python3"
    version = subprocess.run([system, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                             text=True, check=True).stdout.strip()
    if version != str(tuple(sys.version_info[:2])):
        pytest.skip(f"{system} is Python {version}: the numpy installed here is built for {sys.version.split()[0]}")
    root = Path(tempfile.mkdtemp(prefix="restem-numpy-venv-", dir="/var/tmp"))
    try:
        root.chmod(0o755)  # (mkdtemp's 0700 would keep the sandbox's uid out)
        subprocess.run([system, "-m", "venv", "--without-pip", str(root)], check=True)
        site = next(root.glob("lib/python3*/site-packages"))
        src = Path(numpy.__file__).parent
        for name in (src.name, src.name + ".libs"):
            if (src.parent / name).is_dir():
                shutil.copytree(src.parent / name, site / name)
        yield str(root / "bin" / "python")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def pytest_collection_modifyitems(items):
    # Under pytest-xdist the longest work goes first, so that no worker is left with a long run at the end: the tests
    # on the reference run (about ten minutes of runs), then the modules without slow tests (while the base model
    # that nearly every slow test needs is built), then the modules with slow tests, each in its own order.
    def module(item):
        return getattr(getattr(item, "module", None), "__name__", "")

    # A `serial` test goes first of all: it waits for the other worker's test in progress to end, and the other
    # worker's first tests are short ones; later it could wait out a run of minutes with one worker idle (measured:
    # 181 s behind the S3 resume test and the reference run it builds).
    slow = {module(item) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: -1 if item.get_closest_marker("serial") is not None
               else 0 if "small_reference_run" in getattr(item, "fixturenames", ())
               else 2 if module(item) in slow else 1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under pytest-xdist, a test marked `serial` (one that measures the machine's time or cores) runs while no
    other worker runs a test: every test holds a shared lock, a serial one the exclusive lock, and a serial test
    waiting for it holds the turnstile so that the other worker's next test waits behind it. The locks cover the
    whole protocol: set-up and tear-down of module and session fixtures (a reference run, a model build) too."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run:
        yield
        return
    serial = item.get_closest_marker("serial") is not None
    # in the run's common temporary folder (pytest-N/, above each worker's popen-gwK/), which pytest prunes
    base = str(item.config._tmp_path_factory.getbasetemp().parent / f"restem-tests-{run}")
    with open(base + ".turn", "a") as turn, open(base + ".lock", "a") as lock:
        fcntl.flock(turn, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if serial else fcntl.LOCK_SH)
        if not serial:
            fcntl.flock(turn, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(turn, fcntl.LOCK_UN)


def _kept_environment():
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


# A Sampler made in pytest's own process (a fast test loading a checkpoint in vLLM) leaves ~15 variables in its
# environment, LD_PRELOAD of torch's libgomp and VLLM_ENABLE_V1_MULTIPROCESSING=0 among them, and every later
# test's subprocesses and Ray clusters inherit them: with them the two-node elastic E-step test took 361 s
# instead of 120 s, and the whole suite ran about 2x slower. Every module and every test gets the environment
# it found.
@pytest.fixture(autouse=True, scope="module")
def _module_environment():
    yield from _kept_environment()


@pytest.fixture(autouse=True)
def _test_environment():
    yield from _kept_environment()
