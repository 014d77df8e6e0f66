"""`ray start` clusters in a private network namespace: a node added mid-E-step gets a replica, and a run
without ray.address starts a Ray of its own beside such a cluster. (Replicas spread over two nodes, with the
E-step's rows equal to the one-node reference run's, is part of test_resume.py's killed-head test.)"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import NETNS, SMALL

pytestmark = pytest.mark.slow
ELASTIC = Path(__file__).with_name("elastic_estep.sh")


def test_node_joining_mid_e_step_gets_a_replica(tmp_path):
    """A worker node added while the E-step runs is used: the pool grows a replica on it (up to
    sampling.max_replicas), and the E-step still yields exactly one row per (problem, sample)."""
    out = tmp_path / "run"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONUNBUFFERED="1")
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    env.pop("RAY_ADDRESS", None)
    problems = 640
    r = subprocess.run([*NETNS, "bash", str(ELASTIC), str(out), *SMALL, "--set", f"task.max_train_problems={problems}",
                        "--set", "sampling.prompts_per_request=8", "--set", "sampling.max_replicas=2",
                        "--stop-after", "1/generate"],
                       capture_output=True, text=True, env=env, timeout=1200)
    log = (tmp_path / "run.log").read_text() if (tmp_path / "run.log").exists() else ""
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:] + log[-3000:]
    nodes = json.loads((out / "nodes.json").read_text())
    second = next(n["id"] for n in nodes if n["second"])
    estep = next(m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if m["phase"] == "generate")
    assert second in estep["replica_nodes"] and len(set(estep["replica_nodes"])) == 2, estep["replica_nodes"]
    samples = pq.read_table(out / "iter_001" / "samples").to_pylist()
    assert len({(s["id"], s["sample_index"]) for s in samples}) == len(samples) == problems * 8


def test_a_replica_whose_node_is_lost_without_a_replacement_stops_the_e_step_in_one_line(tmp_path):
    """The only node with room for the sampler replica dies mid-E-step and none replaces it: Ray would keep the
    replica's restart (and its calls) waiting forever; the E-step stops after sampling.placement_timeout_s with
    one line naming the key, and the shards finished before stay on disk."""
    import time

    out = tmp_path / "run"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONUNBUFFERED="1")
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    r = subprocess.run([*NETNS, "bash", str(Path(__file__).with_name("node_loss_estep.sh")), str(out), *SMALL,
                        "--set", "sampling.num_replicas=1", "--set", "sampling.cpus_per_replica=2",
                        "--set", "verification.num_workers=1", "--set", "sampling.placement_timeout_s=15",
                        "--set", "sampling.prompts_per_request=4", "--stop-after", "1/generate"],
                       capture_output=True, text=True, env=env, timeout=900)
    log = (tmp_path / "run.log").read_text() if (tmp_path / "run.log").exists() else ""
    assert "LOST_AT=" in r.stdout and "DEMO_RC=1" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:] + log[-3000:]
    lost = float(r.stdout.split("LOST_AT=")[1].split()[0])
    errors = [line for line in log.splitlines() if line.startswith("restem-ray: run stopped:")]
    assert errors and "lost a node and found no room to restart" in errors[-1], log[-3000:]
    assert "sampling.placement_timeout_s 15" in errors[-1] and "Traceback" not in log
    assert time.monotonic() - t0 < 600 and lost > 0
    assert not json.loads((out / "manifest.json").read_text())["completed"].get("1/generate")
    assert list((out / "iter_001" / "samples").glob("part-*.parquet"))  # the shards finished before the loss


def test_a_run_without_ray_address_starts_its_own_ray_beside_a_ray_start_cluster(tmp_path):
    """With a `ray start` cluster on the machine and no ray.address, a run starts its own local Ray of
    ray.num_cpus CPUs, as documented. Before, ray.init joined that cluster (found through the file `ray start`
    leaves in Ray's temp folder) and refused the CPU count there with a ValueError traceback."""
    temp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths live under it
    bin_dir = Path(sys.executable).parent
    script = f"""
set -euo pipefail
ip link set lo up
export RAY_TMPDIR={temp} RAY_AUTH_MODE=disabled
trap '"{bin_dir}/ray" stop --force >/dev/null 2>&1 || true' EXIT
"{bin_dir}/ray" start --head --port=6379 --num-cpus=3 --node-ip-address=127.0.0.1 --include-dashboard=false \\
  --disable-usage-stats >/dev/null
test -s {temp}/ray/ray_current_cluster  # the file a plain ray.init() would follow
"{sys.executable}" -c "
import ray
from restem_ray.driver import init_ray
init_ray(None, 2)
print('local CPUs', ray.cluster_resources()['CPU'], 'nodes', len(ray.nodes()))
ray.shutdown()"
"""
    r = in_netns(script, temp)
    assert "local CPUs 2.0 nodes 1" in r.stdout, r.stdout[-2000:]


def test_a_local_run_directory_a_node_does_not_mount_is_refused_in_one_line(tmp_path):
    """A local --out on a cluster must be a folder every node mounts. The second node of this `ray start`
    cluster runs in a mount namespace where the run directory's folder is an empty tmpfs, as on a node without
    the shared volume: the check reads its marker from there and refuses, naming how many nodes miss it; a
    folder both nodes see passes. A URI --out's working copy (in RESTEM_RUN_CACHE) is checked the same way."""
    temp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths live under it
    hidden, shared = tmp_path / "hidden", tmp_path / "shared"
    hidden.mkdir()
    shared.mkdir()
    bin_dir = Path(sys.executable).parent
    script = f"""
set -euo pipefail
ip link set lo up
export RAY_TMPDIR={temp} RAY_AUTH_MODE=disabled
common=(--node-ip-address=127.0.0.1 --disable-usage-stats --include-dashboard=false)
trap '"{bin_dir}/ray" stop --force >/dev/null 2>&1 || true' EXIT
"{bin_dir}/ray" start --head --port=6379 --num-cpus=1 "${{common[@]}}" >/dev/null
unshare --mount --propagation private bash -c 'mount -t tmpfs tmpfs {hidden} && \\
  "{bin_dir}/ray" start --address=127.0.0.1:6379 --num-cpus=1 --node-ip-address=127.0.0.1 \\
  --disable-usage-stats >/dev/null'
"{sys.executable}" -c "
import ray
from restem_ray.errors import UserError
from restem_ray.resources import check_run_dir_on_every_node
ray.init(address='127.0.0.1:6379')
print('nodes', len([n for n in ray.nodes() if n['Alive']]))
check_run_dir_on_every_node('{shared}/run')
print('shared ok')
try:
    check_run_dir_on_every_node('{hidden}/run')
except UserError as e:
    print('refused:', e)
import os
from restem_ray.mirror import RunMirror
os.environ['RESTEM_RUN_CACHE'] = '{hidden}/runs'  # set, but not on every node
try:
    RunMirror('file://{shared}/bucket/x').check_cluster()
except UserError as e:
    print('refused:', e)
ray.shutdown()"
"""
    r = in_netns(script, temp)
    lines = [x for x in r.stdout.splitlines() if x.startswith(("nodes", "shared", "refused"))]
    assert lines[:2] == ["nodes 2", "shared ok"], r.stdout[-2000:]
    assert lines[2].startswith(f"refused: --out {hidden}/run: 1 of the cluster's 2 nodes do not see it (e.g. "
                               f"127.0.0.1); "), lines
    # a run directory on a URI: its working copy's folder (RESTEM_RUN_CACHE) is checked the same way
    assert lines[3].startswith(f"refused: RESTEM_RUN_CACHE {hidden}/runs: 1 of the cluster's 2 nodes do not see it "
                               f"(e.g. 127.0.0.1), and file://{shared}/bucket/x's working copy"), lines
    assert not list(shared.iterdir()) and not list(hidden.iterdir())  # the markers are gone


def in_netns(script: str, temp: str) -> subprocess.CompletedProcess:
    """Run a bash script that starts `ray start` nodes in a private network namespace, without the caller's Ray
    address; `temp` (its RAY_TMPDIR) is removed after. The script must succeed."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    try:
        r = subprocess.run([*NETNS, "bash", "-c", script], capture_output=True, text=True, env=env, timeout=300)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r
