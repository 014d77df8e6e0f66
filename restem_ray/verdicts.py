"""E-step verdict bookkeeping: counts per kind, and the stop when grading itself failed (issue 19).

A failed grade is data (a verdict), but a grade the infrastructure could not give (a sandbox that died
and could not restart, a plug-in that raises) says nothing about the sample: its reward 0 is not the
model's. A few are tolerated; a shard made mostly of them means the verifier is broken, and training on
its zeros would quietly teach the M-step nothing (or the wrong thing), so the run stops instead.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

from .errors import RunError


def is_infra(verdict: str) -> bool:
    """Verdicts of the grading machinery, not of the sample."""
    return verdict == "sandbox_error" or verdict.startswith("verifier_error:")


def verdict_counts(verdicts: Iterable[str]) -> dict[str, int]:
    """{"passed": n, "wrong_answer": n, ...}, most frequent first."""
    return dict(Counter(verdicts).most_common())


TRAINING = "stopped rather than train on their zeros (fix the verifier, then --resume: the shard was not saved)"
SCORING = "stopped rather than report their zeros as the model's score (fix the verifier, then run it again)"


# Fewer grades than this say nothing about the verifier: one failed grade of a late adaptive round's shard of
# one row would stop the run, and stop its resume again (the same seed redraws the same sample).
MIN_GRADES = 16


def check_infra_errors(verdicts: list[str], max_rate: float, where: str, then: str = TRAINING,
                       before: Counter | None = None) -> None:
    """Raise RunError when more than `max_rate` of `verdicts` are infrastructure failures. `before`: the counts of
    the same phase's earlier grades ("all", and each failure verdict), updated with these; a shard of fewer than
    MIN_GRADES grades is judged with them, and not before there are MIN_GRADES."""
    infra = Counter(v for v in verdicts if is_infra(v))
    n, total = sum(infra.values()), len(verdicts)
    if before is not None:
        before.update(infra)
        before["all"] += total
        if total < MIN_GRADES:
            infra = Counter({k: c for k, c in before.items() if k != "all"})
            n, total = sum(infra.values()), before["all"]
            if total < MIN_GRADES:
                return
    if total and n / total > max_rate:
        kinds = ", ".join(f"{k}: {c}" for k, c in infra.most_common(3))
        raise RunError(f"{where}: {n} of {total} grades{' of this E-step' if total > len(verdicts) else ''} are "
                       f"verifier/sandbox failures ({kinds}), more than "
                       f"verification.max_infra_error_rate={max_rate:g}; {then}")


def check_one_actors_grades(verdicts: list[str], max_rate: float, where: str, then: str = TRAINING) -> None:
    """A piece of a sampler call graded by one verifier actor (restem_ray/pool.py): raise RunError when more than
    `max_rate` of its grades are `sandbox_error`, a sandbox that died and could not start again. The pieces of one
    call go to several actors, so one actor's broken sandbox (a node whose kernel refuses bubblewrap's namespaces)
    is a minority of a shard's grades and would pass the shard's check, its zeros kept. Only sandbox_error: a
    plug-in's errors belong to the rows it fails on (an odd answer format of one problem), judged per shard."""
    n = sum(v == "sandbox_error" for v in verdicts)
    if len(verdicts) >= MIN_GRADES and n / len(verdicts) > max_rate:
        raise RunError(f"{where}: {n} of {len(verdicts)} grades by one verifier actor are sandbox_error (its sandbox "
                       f"died and could not start again), more than verification.max_infra_error_rate={max_rate:g}; "
                       f"{then}")
