"""Built-in task: continue an additive sequence (each term is the sum of the two before it), with
GSM8K-style worked solutions.

    Q: 360 510 next 3
    A: 360 + 510 = 870 . 510 + 870 = 390 . 870 + 390 = 171 . #### 171

Every number is written with 3 digits, least-significant digit first ("360" is 63, "171" is 171):
reversed digits let a tiny character-level model produce carries in the order it needs them, and the
fixed width puts the digits to add at fixed distances, which is what lets a 1M-parameter model learn
the arithmetic at all. Answers are stored in the same notation, so the generic `#### N` verifier grades
them unchanged (it compares the strings as numbers).

Why this task and not chains of `+`/`-` over numbers given in the question (the previous built-in task):
there, the model learnt to add all the question's numbers in one pass while writing the answer, so its
equations were decorative and 36-78% of the samples with the right answer had wrong equations (false
positives that the paper's answer-only reward keeps). Here every term depends on the two terms the
solution has just written, so a right answer mostly comes with right steps (15-29% of the demo's
right-answer samples have a wrong equation, mostly a mis-copied operand), and ReST^EM's kept samples are
worked solutions worth learning from.

Splits are disjoint (no two share the same starting numbers and length): `seed` has worked solutions
(the "human data"), `train` has answers only (ReST^EM's E-step input), `valid`/`test` for evaluation,
and `transfer` starts from numbers below the range seen in training (one or both of 1-9).
`check_steps` is a step-checking verifier: it accepts a completion only if every equation is right.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ArithmeticTask:
    """Sizes of the built-in task."""
    seed: int = 0
    n_seed: int = 200
    n_train: int = 3000
    n_valid: int = 500
    n_test: int = 1000
    n_transfer: int = 500
    steps: tuple[int, int] = (2, 3)
    low: int = 10            # starting numbers of every split but transfer
    high: int = 99
    transfer_low: int = 1    # transfer: at least one starting number in transfer_low..low-1
    width: int = 3

    def num(self, n: int) -> str:
        return str(n).zfill(self.width)[::-1]

    def _draw(self, rng: random.Random, transfer: bool) -> tuple[int, int, int]:
        k = rng.randint(*self.steps)
        if not transfer:
            return rng.randint(self.low, self.high), rng.randint(self.low, self.high), k
        a, b = rng.randint(self.transfer_low, self.low - 1), rng.randint(self.transfer_low, self.high)
        return (a, b, k) if rng.random() < 0.5 else (b, a, k)

    def render(self, pid: str, a: int, b: int, k: int) -> dict:
        prompt = f"Q: {self.num(a)} {self.num(b)} next {k}\nA:"
        steps = []
        for _ in range(k):
            steps.append(f"{self.num(a)} + {self.num(b)} = {self.num(a + b)} .")
            a, b = b, a + b
        answer = self.num(b)
        return {"id": pid, "prompt": prompt, "answer": answer, "solution": " " + " ".join(steps) + f" #### {answer}"}

    def splits(self) -> dict[str, list[dict]]:
        """All splits, deterministic in `seed`, pairwise disjoint."""
        rng = random.Random(self.seed)
        seen: set = set()
        plan = [("seed", self.n_seed), ("train", self.n_train), ("valid", self.n_valid), ("test", self.n_test),
                ("transfer", self.n_transfer)]
        out: dict[str, list[dict]] = {}
        for split, count in plan:
            rows = []
            while len(rows) < count:
                problem = self._draw(rng, split == "transfer")
                if problem in seen:
                    continue
                seen.add(problem)
                rows.append(self.render(f"{split}-{len(rows):05d}", *problem))
            if split != "seed":
                for r in rows:
                    del r["solution"]  # the E-step sees answers only
            out[split] = rows
        return out


_QUESTION = re.compile(r"Q: (\d+) (\d+) next (\d+)\n")
_EQUATION = re.compile(r"(\d+) \+ (\d+) = (\d+) \.")


def _value(reversed_digits: str) -> int:
    return int(reversed_digits[::-1])


def check_steps(problem: dict, completion: str) -> float:
    """1.0 if the completion writes the question's sequence term by term, every equation right, and the
    final answer is the last term; else 0.0. A plug-in verifier (`module:function`)."""
    # the question is the prompt's last: a few-shot prompt's exemplars come first
    q = ([None] + list(_QUESTION.finditer(problem.get("raw_prompt") or problem["prompt"])))[-1]
    if not q:
        return 0.0
    a, b, k = _value(q.group(1)), _value(q.group(2)), int(q.group(3))
    body, sep, answer = completion.partition("####")
    eqs = _EQUATION.findall(body)
    if not sep or len(eqs) != k:
        return 0.0
    for x, y, z in eqs:
        if (_value(x), _value(y), _value(z)) != (a, b, a + b):
            return 0.0
        a, b = b, a + b
    words = answer.split()
    return 1.0 if words and words[0].isdigit() and _value(words[0]) == b else 0.0
