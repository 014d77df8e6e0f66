"""Test hooks. Crash points for resume tests: `RESTEM_CRASH_AT=1/select` SIGKILLs the driver at that point;
`RESTEM_TRACE=FILE` makes each engine call append a line to FILE (tests count calls, e.g. that a resumed
E-step does not sample its finished shards again); `RESTEM_HOLD_START=FILE` holds a sampler replica's start
while FILE exists (a start that hangs, as vLLM's can in NCCL set-up).

A real SIGKILL (no cleanup handlers, no flushes) at a named place is what the resume tests need to be
deterministic; the points sit just before each commit to the manifest, where a crash is most harmful.
"""
import json
import os
import signal


def crash_point(name: str) -> None:
    if os.environ.get("RESTEM_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def crash_after_checkpoint(name: str, folder: str) -> None:
    """`RESTEM_CRASH_AT=<name>`: SIGKILL the driver while Ray Train runs, once Ray Train has registered a
    checkpoint in `folder` (its run snapshot is written), i.e. in the middle of an M-step."""
    if os.environ.get("RESTEM_CRASH_AT") != name:
        return
    import threading
    import time
    from pathlib import Path

    def watch():
        snapshot = Path(folder, "checkpoint_manager_snapshot.json")
        while not (snapshot.exists() and "step_" in snapshot.read_text()):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


def trace_call(name: str, **detail) -> None:
    """`RESTEM_TRACE=FILE`: append one JSON line {"call": name, ...} to FILE (Ray actors inherit the driver's
    environment on a local cluster). One short write in append mode, so concurrent callers do not interleave."""
    path = os.environ.get("RESTEM_TRACE")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"call": name, "pid": os.getpid(), **detail}) + "\n")


def hold_start() -> None:
    """`RESTEM_HOLD_START=FILE`: wait while FILE exists (a test's stand-in for an engine start that hangs)."""
    import time

    path = os.environ.get("RESTEM_HOLD_START")
    while path and os.path.exists(path):
        time.sleep(0.2)
