"""Built-in code task: write a one-line Python function from input/output examples (HumanEval style).

    # f(2) == 9
    # f(5) == 12
    def f(x):
        return x + 7

The prompt is everything up to `return`; the completion is the expression. Each problem carries a
HumanEval `test` (`check(candidate)` with held-out inputs) and `entry_point`, so it is graded by the
sandboxed code verifier, never by string match. Families: x + k, x - k, x * k, x * a + b, with small
numbers so a tiny character-level model can learn them from the `seed` split.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

FAMILIES = ("add", "sub", "mul", "affine")


@dataclass(frozen=True)
class FunctionTask:
    seed: int = 0
    n_seed: int = 1500
    n_train: int = 1500
    n_valid: int = 300
    n_test: int = 500
    n_transfer: int = 300
    n_examples: int = 2
    transfer_examples: int = 3    # more examples in the prompt than anything seen in training
    distinct_prompts: bool = True  # no prompt in two problems (a test problem's twin in train is a leak)
    version: int = 2               # of splits()'s draws: part of the built-in's cache key

    def _draw(self, rng: random.Random) -> tuple[str, tuple[int, ...]]:
        fam = rng.choice(FAMILIES)
        if fam == "affine":
            return fam, (rng.randint(2, 5), rng.randint(1, 9))
        return fam, (rng.randint(2, 9) if fam == "mul" else rng.randint(1, 9),)

    @staticmethod
    def expr(fam: str, params: tuple[int, ...]) -> str:
        return {"add": "x + {0}", "sub": "x - {0}", "mul": "x * {0}", "affine": "x * {0} + {1}"}[fam].format(*params)

    def render(self, pid: str, fam: str, params, rng: random.Random, n_examples: int) -> dict:
        expr = self.expr(fam, params)
        f = eval(f"lambda x: {expr}")  # our own generated expression, not model output
        xs = rng.sample(range(0, 10), n_examples + 3)
        shown, held = xs[:n_examples], xs[n_examples:]
        prompt = "".join(f"# f({x}) == {f(x)}\n" for x in shown) + "def f(x):\n    return"
        test = "def check(candidate):\n" + "".join(f"    assert candidate({x}) == {f(x)}\n" for x in shown + held)
        return {"id": pid, "prompt": prompt, "solution": f" {expr}", "test": test, "entry_point": "f"}

    def splits(self) -> dict[str, list[dict]]:
        rng = random.Random(self.seed)
        plan = [("seed", self.n_seed, self.n_examples), ("train", self.n_train, self.n_examples),
                ("valid", self.n_valid, self.n_examples), ("test", self.n_test, self.n_examples),
                ("transfer", self.n_transfer, self.transfer_examples)]
        out = {}
        for n_examples in sorted({n for _, _, n in plan}):
            splits = [(split, count) for split, count, n in plan if n == n_examples]
            want = sum(count for _, count in splits)
            if self.distinct_prompts:
                # One pool of distinct prompts, shuffled, then cut into the splits: drawn split after split, the
                # later splits would get what the earlier ones left (fewer of the likeliest functions)
                pool, seen = [], set()
                while len(pool) < want:
                    row = self.render("", *self._draw(rng), rng, n_examples)
                    if row["prompt"] not in seen:
                        seen.add(row["prompt"])
                        pool.append(row)
                rng.shuffle(pool)
            else:
                pool = [self.render("", *self._draw(rng), rng, n_examples) for _ in range(want)]
            for split, count in splits:
                rows, pool = pool[:count], pool[count:]
                for i, r in enumerate(rows):
                    r["id"] = f"{split}-{i:05d}"
                    if split != "seed":
                        del r["solution"]
                out[split] = rows
        return {split: out[split] for split, _, _ in plan}
