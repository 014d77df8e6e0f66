"""Crash points for resume tests: `RESTEM_CRASH_AT=1/select` SIGKILLs the driver at that point.

A real SIGKILL (no cleanup handlers, no flushes) at a named place is what the resume tests need to be
deterministic; the points sit just before each commit to the manifest, where a crash is most harmful.
"""
import os
import signal


def crash_point(name: str) -> None:
    if os.environ.get("RESTEM_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
