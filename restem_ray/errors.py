"""User-facing errors: the CLI prints them as one line and exits 2 (no traceback)."""


class UserError(Exception):
    """Bad input from the user (config, data file, path, plug-in). The message names the culprit."""


def where(path, line: int | None = None) -> str:
    """`file:line` prefix for messages about data files."""
    return f"{path}:{line}" if line is not None else str(path)


class RunError(Exception):
    """A run cannot go on (e.g. the verifier accepted nothing). Printed as one line, exit code 1."""


class StopAfter(Exception):
    """`--stop-after PHASE` reached: the phase is committed and the run ends cleanly (exit 0); `--resume`
    continues it, e.g. on another cluster or after inspecting the E-step's samples."""
