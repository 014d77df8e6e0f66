"""jobs/submit.py's errors. A job submitted through it to a real `ray start --head` cluster, its logs streamed and
its status returned, is the retry in test_resume.py's killed-head test."""
import subprocess
import sys
from pathlib import Path


def test_submitter_reports_an_unreachable_cluster_in_one_line():
    r = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "jobs" / "submit.py"), "--address",
                        "http://127.0.0.1:9", "--", "restem-ray", "demo"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cannot reach the Ray dashboard" in r.stderr and "Traceback" not in r.stderr
