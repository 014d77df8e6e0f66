"""Adaptive E-step: sample in rounds, stop sampling a problem once more samples cannot add kept data.

The paper draws a fixed K samples per problem; selection then keeps at most N distinct correct ones. For
an easy problem most of the K are wasted (its N are found early, or it only ever produces the same
chain); for a hard one K may be too few. `RoundPlanner` decides, round by round, which problems draw
how many more samples, from the graded rows of the rounds before (plain data, no Ray: the driver runs
the rounds, tests drive the planner directly).

A problem closes when
- it has `cap` distinct correct samples (what selection keeps anyway): "cap";
- it has a correct sample and its last `close_after_rounds` rounds added no new distinct one: "stale";
- it has drawn `max_per_problem` samples: "max";
- the E-step's `budget` is spent before it got another round: "budget".
Closing stops a problem's sampling, never drops its samples: the M-step restarts from the base, so an
easy problem must keep its solutions in every iteration's data.

Sample i of a problem always has the seed `problem_seed + i` (vLLM gives child i of an n-sample request
`seed + i`), so a round drawing samples k..k+r-1 draws exactly fixed-K's samples k..k+r-1: adaptive
draws a subset of fixed-K's samples when `max_per_problem` is K (on GPUs up to bf16 rounding, which depends
on what else is in the engine's batch). The plan depends only on the rows of
earlier rounds, so a resumed E-step replays the finished rounds from disk and continues.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .selection import kept_ending, same_solution_key


@dataclass
class _Problem:
    drawn: int = 0
    correct: int = 0
    distinct: set = field(default_factory=set)
    stale: int = 0          # rounds in a row without a new distinct correct sample
    closed: str | None = None


@dataclass(frozen=True)
class Draw:
    """One problem's share of a round: samples `offset .. offset + n - 1`."""
    id: str
    offset: int
    n: int


class RoundPlanner:
    def __init__(self, problem_ids: list[str], *, round_size: int, max_per_problem: int, budget: int, cap: int,
                 close_after_rounds: int = 1, prior: dict[str, float] | None = None, dedup: bool = True,
                 keep_truncated: bool = False):
        self.problems = {pid: _Problem() for pid in problem_ids}
        self.round_size, self.max_per_problem, self.budget = round_size, max_per_problem, budget
        self.cap, self.close_after_rounds = cap, close_after_rounds
        self.prior = prior or {}  # pass rate in the previous iteration's E-step (RUN/iter_*/problems.parquet)
        self.dedup, self.keep_truncated = dedup, keep_truncated
        self.rounds = 0
        self.drawn = 0

    # ---------------------------------------------------------------- the loop's two steps
    def next_round(self) -> list[Draw]:
        """The next round's draws, hardest open problem first; [] when every problem is closed."""
        open_ = [pid for pid, p in self.problems.items() if p.closed is None]
        open_.sort(key=self._ease)
        left, draws = self.budget - self.drawn, []
        for pid in open_:
            p = self.problems[pid]
            n = min(self.round_size, self.max_per_problem - p.drawn, left)
            if n <= 0:
                p.closed = "budget"
                continue
            draws.append(Draw(pid, p.drawn, n))
            left -= n
        if draws:
            self.rounds += 1
        return sorted(draws, key=lambda d: d.id)  # shards in a fixed order, whatever the ranking

    def observe(self, draws: list[Draw], rows: list[dict]) -> None:
        """Fold in a finished round's graded rows (id, completion, reward, finish_reason), then close problems."""
        new: dict[str, int] = {}
        for r in rows:
            p = self.problems[r["id"]]
            if r["reward"] >= 1.0 and kept_ending(r.get("finish_reason"), self.keep_truncated):
                p.correct += 1
                key = same_solution_key(r["completion"]) if self.dedup else r["sample_index"]
                if key not in p.distinct:
                    p.distinct.add(key)
                    new[r["id"]] = new.get(r["id"], 0) + 1
        for d in draws:
            p = self.problems[d.id]
            p.drawn += d.n
            self.drawn += d.n
            p.stale = 0 if new.get(d.id) else p.stale + 1
            if len(p.distinct) >= self.cap:
                p.closed = "cap"
            elif p.distinct and p.stale >= self.close_after_rounds:
                p.closed = "stale"
            elif p.drawn >= self.max_per_problem:
                p.closed = "max"

    # ---------------------------------------------------------------- reporting
    def summary(self) -> dict:
        closed: dict[str, int] = {}
        for p in self.problems.values():
            closed[p.closed or "open"] = closed.get(p.closed or "open", 0) + 1
        return {"rounds": self.rounds, "budget": self.budget,
                **{f"closed_{k}": closed.get(k, 0) for k in ("cap", "stale", "max", "budget")},
                "problems_with_kept": sum(bool(p.distinct) for p in self.problems.values())}

    def _ease(self, pid: str) -> tuple:
        """Lower is harder: this E-step's pass rate so far, smoothed towards the last iteration's (0.5 unknown)."""
        p, prior = self.problems[pid], self.prior.get(pid, 0.5)
        return ((p.correct + prior) / (p.drawn + 1), prior, pid)
