"""Math grading: verdicts per second per core and agreement with hand-checked MATH answer pairs.

    .venv/bin/python bench/verify_math.py [--gsm8k 4000] [--math 620]

Project side: `restem_ray.verification.grade_math` through `call_with_timeout` (answer extraction,
GSM8K numbers, gold answers wrapped so math-verify parses them, a per-answer time limit). Reference:
plain math-verify, `verify(parse("$" + gold + "$"), parse(completion))` on the same pairs with its
own (signal) timeouts. Both in one process (one core), same run. Agreement is measured against
bench/data/math_pairs.jsonl (62 pairs, each labelled equivalent or not by hand).
Writes bench/results/verify_math.json.
"""
import argparse
import json
import logging
import random
import time
from pathlib import Path

from math_verify import parse, verify

from restem_ray.verification import Verifier, _parse

logging.getLogger("math_verify").setLevel(logging.ERROR)
PAIRS = [json.loads(l) for l in (Path(__file__).parent / "data" / "math_pairs.jsonl").read_text().splitlines()]


def gsm8k_rows(n: int, rng: random.Random) -> list[tuple[dict, str]]:
    rows = []
    for i in range(n):
        gold = rng.randint(0, 50000)
        pred = gold if rng.random() < 0.5 else gold + rng.randint(1, 9)
        text = f"{pred:,}" if rng.random() < 0.3 else str(pred)
        rows.append(({"id": str(i), "answer": str(gold)}, f"She has {rng.randint(1, 9)} more, so {text} in all.\n#### {text}"))
    return rows


def math_rows(n: int) -> list[tuple[dict, str]]:
    return [({"id": str(i), "answer": p["gold"]}, f"So the answer is $\\boxed{{{p['pred']}}}$.")
            for i, p in zip(range(n), PAIRS * (n // len(PAIRS) + 1))]


def time_side(fn, rows) -> tuple[float, list]:
    t = time.process_time()
    out = [fn(p, c) for p, c in rows]
    return time.process_time() - t, out


def reference(problem: dict, completion: str) -> bool:
    """Plain math-verify with the gold answer wrapped in $...$ (unwrapped, many MATH golds do not parse
    at all, which is fast but wrong: see agreement_math_verify_unwrapped_gold)."""
    return bool(verify(parse(f"${problem['answer']}$"), parse(completion)))


def reference_unwrapped(problem: dict, completion: str) -> bool:
    return bool(verify(parse(problem["answer"]), parse(completion)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gsm8k", type=int, default=4000)
    ap.add_argument("--math", type=int, default=620)
    args = ap.parse_args()
    verifier = Verifier("math")

    def ours(p, c):
        # math-verify's parses are cached (a problem's reference is parsed once for its many samples); the rows
        # here repeat the same 62 pairs, whose predictions would be cached too: every grade parses afresh
        _parse.cache_clear()
        return verifier.grade(p, c).reward == 1.0
    rng = random.Random(0)
    sets = {"gsm8k": gsm8k_rows(args.gsm8k, rng), "math": math_rows(args.math)}
    ours(*sets["math"][0]), reference(*sets["math"][0])  # imports and grammar loading outside the timings
    table = {}
    for name, rows in sets.items():
        t_ours, _ = time_side(ours, rows)
        t_ref, _ = time_side(reference, rows)
        table[name] = {"n": len(rows), "restem_per_s": round(len(rows) / t_ours, 1),
                       "math_verify_per_s": round(len(rows) / t_ref, 1), "ratio": round(t_ours / t_ref, 3)}
    agree_ours = sum(ours({"answer": p["gold"]}, f"\\boxed{{{p['pred']}}}") == p["equivalent"] for p in PAIRS)
    agree_ref = sum(reference_unwrapped({"answer": p["gold"]}, f"\\boxed{{{p['pred']}}}") == p["equivalent"] for p in PAIRS)
    result = {"throughput_per_core": table, "pairs": len(PAIRS),
              "agreement_restem": round(agree_ours / len(PAIRS), 3),
              "agreement_math_verify_unwrapped_gold": round(agree_ref / len(PAIRS), 3),
              "note": "ratio = restem CPU seconds / reference CPU seconds (one process, one core)"}
    out = Path(__file__).parent / "results" / "verify_math.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'set':<8}{'n':>6}{'restem/s':>11}{'math-verify/s':>15}{'ratio':>8}")
    for name, r in table.items():
        print(f"{name:<8}{r['n']:>6}{r['restem_per_s']:>11}{r['math_verify_per_s']:>15}{r['ratio']:>8}")
    print(f"agreement with {len(PAIRS)} hand-checked pairs: restem {agree_ours}/{len(PAIRS)}, "
          f"plain math-verify (gold not wrapped) {agree_ref}/{len(PAIRS)}; wrote {out}")


if __name__ == "__main__":
    main()
