"""User-facing errors: the CLI prints them as one line and exits 2 (no traceback)."""

import re


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


def shown_uri(uri: str) -> str:
    """A URI as messages and names show it: without credentials pyarrow accepts in it (s3://KEY:SECRET@bucket/...)
    or a query (?access_key=...&secret_key=...)."""
    uri = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1", str(uri))
    return uri.split("?", 1)[0]


def first_line(e: BaseException, uri: str | None = None, limit: int = 240) -> str:
    """`Type: first line of the message` for one-line errors; a `uri` the message repeats is shown without its
    credentials."""
    text = str(e).strip()
    if uri:
        text = text.replace(uri, shown_uri(uri))
    text = text.splitlines()[0][:limit] if text else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
