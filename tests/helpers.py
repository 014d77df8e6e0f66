"""Helpers shared by the slow end-to-end tests."""
import os
import signal
import subprocess
import sys

# A small `demo --quick` (64 train problems x 8 samples, 16 problems per eval split): the reference that
# the resume and multi-node tests compare against, row for row.
# greedy pass@1 only and 2 epochs: the runs built on SMALL check phases, resumption and pass@1, not the
# demo's pass@4/maj@4 or its gain (the resume test's M-step checkpoints every 2 steps: half the steps, half the saves)
SMALL = ["--quick", "--set", "task.max_train_problems=64", "--set", "task.max_eval_problems=16",
         "--set", "evaluation.k=0", "--set", "training.epochs=2"]


def demo(out, *extra, crash_at=None, timeout=900):
    """Run `restem-ray demo` with SMALL in its own session; returns (exit code, combined output)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RESTEM_CRASH_AT", None)
    if crash_at:
        env["RESTEM_CRASH_AT"] = crash_at
    p = subprocess.Popen([sys.executable, "-m", "restem_ray.cli", "demo", *SMALL, "--out", str(out), *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         start_new_session=True)
    try:
        log, _ = p.communicate(timeout=timeout)
    finally:
        try:  # Ray's agents outlive a SIGKILLed driver for a while; they are in its session
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return p.returncode, log
