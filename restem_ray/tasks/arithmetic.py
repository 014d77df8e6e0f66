"""Built-in task: multi-step add/subtract word problems with GSM8K-style worked solutions.

    Q: Ann has 15 coins, finds 08, loses 29. How many now?
    A: 15 + 08 = 131 . 131 - 29 = 93 . #### 93

Numbers are written least-significant digit first ("15" is fifty-one) when `reverse_digits` is on:
a tiny character-level model then writes carries in the order it needs them, which is what lets it
learn to add at all (shared/reference/demo-calibration.md, round 2). Answers are stored in the same
notation, so the generic `#### N` verifier grades them unchanged.

Splits are disjoint (no two share the same numbers and operations): `seed` has worked solutions
(the "human data"), `train` has answers only (ReST^EM's E-step input), `valid`/`test` for
evaluation, and `transfer` has more steps than anything seen in training.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = ["Ann", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Ida"]
THINGS = ["coins", "apples", "cards", "stamps", "shells", "books"]
ADD = ["finds {n}", "gets {n}", "buys {n}"]
SUB = ["loses {n}", "gives {n}", "sells {n}"]


@dataclass(frozen=True)
class ArithmeticTask:
    """Sizes of the built-in task. Defaults follow the calibrated round-2 recipe."""
    seed: int = 0
    n_seed: int = 2000
    n_train: int = 3000
    n_valid: int = 500
    n_test: int = 1000
    n_transfer: int = 500
    steps: tuple[int, int] = (2, 3)
    transfer_steps: int = 4
    low: int = 10
    high: int = 99
    reverse_digits: bool = True

    def num(self, n: int) -> str:
        return str(n)[::-1] if self.reverse_digits else str(n)

    def _draw(self, rng: random.Random, n_steps: int) -> tuple[int, tuple[tuple[str, int], ...]]:
        start = rng.randint(self.low, self.high)
        ops, value = [], start
        for _ in range(n_steps):
            n = rng.randint(self.low, self.high)
            op = "-" if (rng.random() < 0.5 and value - n >= 0) else "+"
            value = value + n if op == "+" else value - n
            ops.append((op, n))
        return start, tuple(ops)

    def render(self, pid: str, start: int, ops, rng: random.Random) -> dict:
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        verbs = [rng.choice(ADD if op == "+" else SUB).format(n=self.num(n)) for op, n in ops]
        story = f"{name} has {self.num(start)} {thing}, " + ", ".join(verbs) + ". How many now?"
        steps, value = [], start
        for op, n in ops:
            new = value + n if op == "+" else value - n
            steps.append(f"{self.num(value)} {op} {self.num(n)} = {self.num(new)} .")
            value = new
        answer = self.num(value)
        return {
            "id": pid,
            "prompt": f"Q: {story}\nA:",
            "answer": answer,
            "solution": " " + " ".join(steps) + f" #### {answer}",
        }

    def splits(self) -> dict[str, list[dict]]:
        """All splits, deterministic in `seed`, pairwise disjoint."""
        rng = random.Random(self.seed)
        seen: set = set()
        plan = [("seed", self.n_seed, None), ("train", self.n_train, None), ("valid", self.n_valid, None),
                ("test", self.n_test, None), ("transfer", self.n_transfer, self.transfer_steps)]
        out: dict[str, list[dict]] = {}
        for split, count, fixed_steps in plan:
            rows = []
            while len(rows) < count:
                n_steps = fixed_steps or rng.randint(*self.steps)
                start, ops = self._draw(rng, n_steps)
                if (start, ops) in seen:
                    continue
                seen.add((start, ops))
                rows.append(self.render(f"{split}-{len(rows):05d}", start, ops, rng))
            if split != "seed":
                for r in rows:
                    del r["solution"]  # the E-step sees answers only
            out[split] = rows
        return out
