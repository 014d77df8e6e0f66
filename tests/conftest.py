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
