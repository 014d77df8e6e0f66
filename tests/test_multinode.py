"""A two-node local Ray cluster (`ray start --head` on 127.0.0.1 plus a second `ray start --address`
node with its own custom resource) in a private network namespace: replicas land on both nodes and the
E-step's rows are exactly those of the one-node reference run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import SMALL

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("two_node_demo.sh")


def rows(path):
    return sorted((r["id"], r["sample_index"], r["completion"], r["reward"]) for r in pq.read_table(path).to_pylist())


def test_replicas_spread_over_two_nodes(tmp_path, small_reference_run):
    out = tmp_path / "run"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONUNBUFFERED="1")
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # that switch forbids multi-node clusters
    env.pop("RAY_ADDRESS", None)
    netns = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--net"]
    r = subprocess.run([*netns, "bash", str(SCRIPT), str(out), *SMALL, "--set", "sampling.num_replicas=2",
                        "--set", "sampling.placement_strategy=STRICT_SPREAD"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    nodes = json.loads((out / "nodes.json").read_text())
    assert len(nodes) == 2 and sum(n["second"] for n in nodes) == 1
    estep = next(m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                 if m["phase"] == "generate")
    assert set(estep["replica_nodes"]) == {n["id"] for n in nodes}  # one replica on each node
    assert rows(out / "iter_001" / "samples") == rows(small_reference_run / "iter_001" / "samples")
