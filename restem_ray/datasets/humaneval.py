"""HumanEval (Chen et al. 2021) as released: `task_id`, `prompt` (signature + docstring), `test`
(defines `check(candidate)`), `entry_point`, `canonical_solution`.

`code_prompt` is the released prompt: the grader builds the program from it (and the completion),
whatever the model was shown."""
from __future__ import annotations

from .common import text


def adapt(row: dict) -> dict:
    prompt = text(row, "prompt")
    out = {"id": text(row, "task_id"), "prompt": prompt, "code_prompt": prompt, "test": text(row, "test"),
           "entry_point": text(row, "entry_point")}
    if isinstance(row.get("canonical_solution"), str):  # (also the human solution of a seed file)
        out["canonical_solution"] = out["solution"] = row["canonical_solution"]
    return out
