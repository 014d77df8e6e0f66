"""Ray Jobs: `restem-ray demo --quick` submitted to a real `ray start --head` cluster (dashboard on
127.0.0.1, private network namespace) through jobs/submit.py, which streams the logs and returns the
job's status."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import NETNS, SMALL

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("job_submit.sh")


def test_demo_as_a_ray_job_succeeds_and_streams_logs(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONUNBUFFERED="1")
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([*NETNS, "bash", str(SCRIPT), str(out), *SMALL], capture_output=True, text=True,
                       env=env, timeout=900)
    log = r.stdout + r.stderr
    assert r.returncode == 0 and "SUBMIT_EXIT=0" in r.stdout, log[-4000:]
    assert "[restem] done" in r.stdout  # the job's own output, streamed through the submitter
    assert '"status": "SUCCEEDED"' in r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"0/eval", "1/generate", "1/select", "1/improve", "1/eval"} <= set(manifest["completed"])
    assert (out / "iter_001" / "checkpoint" / "model.safetensors").is_file() and (out / "report.png").is_file()


def test_submitter_reports_an_unreachable_cluster_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "jobs" / "submit.py"), "--address",
                        "http://127.0.0.1:9", "--", "restem-ray", "demo"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cannot reach the Ray dashboard" in r.stderr and "Traceback" not in r.stderr
