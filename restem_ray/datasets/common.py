"""What every adapter shares: a typed way to reject one field of one row."""
from __future__ import annotations


class BadField(Exception):
    """A row's field is missing or malformed; the loader adds `file:line`."""

    def __init__(self, field: str, why: str = "missing or empty"):
        missing = why == "missing or empty"
        super().__init__(f"missing or empty field {field!r}" if missing else f"field {field!r}: {why}")


def text(row: dict, field: str, *, empty_ok: bool = False) -> str:
    """`row[field]` as a string; missing, non-text or (unless empty_ok) blank is a BadField."""
    value = row.get(field)
    if value is None and empty_ok:
        return ""
    if value is not None and not isinstance(value, str):
        raise BadField(field, f"expected text, got {type(value).__name__}")
    if value is None or (not empty_ok and not value.strip()):
        raise BadField(field)
    return value


def some_id(row: dict, *fields: str) -> dict:
    """{'id': str(first present field)} or {} (the loader then numbers the rows)."""
    for f in fields:
        if row.get(f) is not None and str(row[f]) != "":
            return {"id": str(row[f])}
    return {}
