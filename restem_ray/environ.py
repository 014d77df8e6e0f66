"""Environment variables set for a block of code only."""
from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def scoped_environ(values: dict[str, str]):
    """Set `values` in os.environ for the block, then put back what was there (unset stays unset): for settings that
    a library reads while it starts (vLLM's engine processes, an MLflow client) but that must not leak into later
    ones in this process."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        os.environ.update(values)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
