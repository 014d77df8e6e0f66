import os

import pytest

# Keep every Ray test cluster on the loopback interface: Ray otherwise swaps 127.0.0.1 for the host's
# network address. (Ray reads this when it is imported, so it is set before anything imports ray.)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from helpers import demo  # noqa: E402


@pytest.fixture(scope="session")
def small_reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    rc, log = demo(out)
    assert rc == 0, log[-4000:]
    return out


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
