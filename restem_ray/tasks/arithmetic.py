"""Built-in task: multi-step addition/subtraction with GSM8K-style worked solutions.

    Q: 360 - 510 + 570 + 840
    A: 360 - 510 = 840 . 840 + 570 = 321 . 321 + 840 = 171 . #### 171

Every number is written with 3 digits, least-significant digit first ("360" is 63, "171" is 171):
reversed digits let a tiny character-level model produce carries in the order it needs them, and the
fixed width puts the digits to add at fixed distances, which is what lets a 1M-parameter model learn
the arithmetic at all (measured: unpadded, 2,000 worked solutions gave ~1% greedy accuracy; padded,
95%; see README "The built-in demo"). Answers are stored in the same notation, so the generic
`#### N` verifier grades them unchanged (it compares the strings as numbers).

Splits are disjoint (no two share the same numbers and operations): `seed` has worked solutions (the
"human data"), `train` has answers only (ReST^EM's E-step input), `valid`/`test` for evaluation, and
`transfer` has more steps than anything seen in training. `check_steps` is a step-checking verifier:
it accepts a completion only if every equation is right and follows the question.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ArithmeticTask:
    """Sizes of the built-in task."""
    seed: int = 0
    n_seed: int = 320
    n_train: int = 3000
    n_valid: int = 500
    n_test: int = 1000
    n_transfer: int = 500
    steps: tuple[int, int] = (2, 3)
    transfer_steps: int = 4
    low: int = 10
    high: int = 99
    width: int = 3

    def num(self, n: int) -> str:
        return str(n).zfill(self.width)[::-1]

    def _draw(self, rng: random.Random, n_steps: int) -> tuple[int, tuple[tuple[str, int], ...]]:
        start = rng.randint(self.low, self.high)
        ops, value = [], start
        for _ in range(n_steps):
            n = rng.randint(self.low, self.high)
            op = "-" if (rng.random() < 0.5 and value - n >= 0) else "+"
            value = value + n if op == "+" else value - n
            ops.append((op, n))
        return start, tuple(ops)

    def render(self, pid: str, start: int, ops) -> dict:
        question = self.num(start) + "".join(f" {op} {self.num(n)}" for op, n in ops)
        steps, value = [], start
        for op, n in ops:
            new = value + n if op == "+" else value - n
            steps.append(f"{self.num(value)} {op} {self.num(n)} = {self.num(new)} .")
            value = new
        answer = self.num(value)
        return {"id": pid, "prompt": f"Q: {question}\nA:", "answer": answer,
                "solution": " " + " ".join(steps) + f" #### {answer}"}

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
                rows.append(self.render(f"{split}-{len(rows):05d}", start, ops))
            if split != "seed":
                for r in rows:
                    del r["solution"]  # the E-step sees answers only
            out[split] = rows
        return out


_NUMBER = r"(\d+)"
_EQUATION = re.compile(rf"{_NUMBER} ([+-]) {_NUMBER} = {_NUMBER} \.")


def _value(reversed_digits: str) -> int | None:
    return int(reversed_digits[::-1]) if reversed_digits.isdigit() else None


def check_steps(problem: dict, completion: str) -> float:
    """1.0 if the completion's equations follow the question's operations, each is arithmetically right,
    and the final answer is the last result; else 0.0. A plug-in verifier (`module:function`)."""
    q = problem["prompt"].split("Q:", 1)[-1].split("\n", 1)[0].split()
    if len(q) < 3 or len(q) % 2 == 0 or any(_value(x) is None for x in q[::2]):
        return 0.0
    start, ops = _value(q[0]), [(q[i], _value(q[i + 1])) for i in range(1, len(q) - 1, 2)]
    body, sep, answer = completion.partition("####")
    eqs = _EQUATION.findall(body)
    if not sep or len(eqs) != len(ops):
        return 0.0
    value = start
    for (a, op, b, c), (want_op, want_n) in zip(eqs, ops):
        new = value + want_n if want_op == "+" else value - want_n
        if (_value(a), op, _value(b), _value(c)) != (value, want_op, want_n, new):
            return 0.0
        value = new
    return 1.0 if answer.strip().split() and _value(answer.strip().split()[0]) == value else 0.0
