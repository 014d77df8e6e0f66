"""Adaptive E-step against the paper's fixed K, on the same problems in one run (issue #17).

    .venv/bin/python bench/adaptive_estep.py [--problems 500] [--k 32] [--cap 10]

The built-in task's base model (the demo's, seed 0) samples its first `--problems` train problems three ways,
each through restem-ray's own E-step (Driver.generate: replica -> verifier actors -> shards) and selection:
- fixed-K: K samples per problem (the paper; K = 32, cap 10 are its MATH settings);
- adaptive: rounds, at most K per problem (`sampling.adaptive: true`, the default max): only saves samples;
- adaptive, same budget: at most 4K per problem within fixed-K's total (N x K): saved samples go to the
  problems without a solution yet.
Reported per arm: samples and completion tokens drawn, kept rows, problems with at least one kept solution
(coverage), E-step seconds; and the ratios to fixed-K. With max K, adaptive's samples are fixed-K's samples
(same seeds): the bench checks that every adaptive row equals fixed-K's row with the same (id, sample_index).
Writes bench/results/adaptive_estep.json.
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on loopback

import pyarrow.parquet as pq  # noqa: E402

from restem_ray.builtin import arithmetic_builtin, ensure_builtin  # noqa: E402
from restem_ray.cli import demo_config  # noqa: E402
from restem_ray.config import dump_config  # noqa: E402
from restem_ray.driver import Driver, Samplers, init_ray  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "adaptive_estep.json"


def arm(cfg, out: Path, samplers: Samplers) -> dict:
    """One E-step and selection through the driver's own phases; the replicas are shared between arms."""
    d = Driver(cfg, out)
    d.run.create(dump_config(d.cfg), resume=False)
    d.samplers = samplers
    samples = d.generate(1, cfg.model.base)
    kept = pq.read_table(d.select(1, samples))
    (line,) = [m for m in d.run.metrics() if m["phase"] == "generate"]
    (chosen,) = [m for m in d.run.metrics() if m["phase"] == "select"]
    return {"samples": line["samples"], "completion_tokens": line["completion_tokens"], "seconds": line["seconds"],
            "kept": kept.num_rows, "kept_steps_right": round(kept.num_rows * (1 - chosen["kept_false_positive_rate"])), "problems_covered": len(set(kept["id"].to_pylist())),
            "rounds": line.get("rounds"), **{k: v for k, v in line.items() if k.startswith("closed_")},
            "_rows": {(r["id"], r["sample_index"]): r for r in samples.to_pylist()}}


def simulate_settings(fixed_rows: dict, cfg, k: int) -> list[dict]:
    """Other (round_size, close_after_rounds) settings, replayed over fixed-K's samples: exact, because adaptive
    draws fixed-K's samples (checked above on the real arm). Kept rows counted by restem-ray's selection, and
    how many of them also have every step right (the task's step checker)."""
    import pyarrow as pa

    from restem_ray.adaptive import RoundPlanner
    from restem_ray.selection import select
    from restem_ray.tasks.arithmetic import check_steps
    from restem_ray.data import load_problems

    problems = {p["id"]: p for p in load_problems(cfg.task.train_file, "math", None)}
    ids = sorted({pid for pid, _ in fixed_rows})
    out = []
    for round_size, close in [(4, 1), (4, 2), (8, 1), (8, 2), (4, 3), (16, 1)]:
        planner = RoundPlanner(ids, round_size=round_size, max_per_problem=k, budget=k * len(ids),
                               cap=cfg.selection.max_solutions_per_problem, close_after_rounds=close)
        while draws := planner.next_round():
            planner.observe(draws, [fixed_rows[(d.id, i)] for d in draws for i in range(d.offset, d.offset + d.n)])
        drawn = [r for (pid, i), r in fixed_rows.items() if i < planner.problems[pid].drawn]
        kept = select(pa.Table.from_pylist(drawn), max_solutions_per_problem=cfg.selection.max_solutions_per_problem,
                      seed=cfg.seed + 1).to_pylist()
        out.append({"round_size": round_size, "close_after_rounds": close, "samples": len(drawn),
                    "completion_tokens": sum(r["completion_tokens"] for r in drawn), "kept": len(kept),
                    "kept_steps_right": sum(check_steps(problems[r["id"]], r["completion"]) >= 1.0 for r in kept),
                    "problems_covered": len({r["id"] for r in kept})})
    return out


def foresight(fixed_rows: dict, k: int, cap: int, total_tokens: int, keep_pct: int = 95) -> dict:
    """What a rule that knew the future would draw: each solved problem up to its last sample that selection
    keeps (a new distinct correct one, up to the cap), each unsolved one all K (no rule can tell unsolvable
    from hard). Token shares of fixed-K's; the gap to the online rules is the cost of not knowing.

    Also the cheapest foresight plan that keeps 95% of those rows and every solved problem (exact: a knapsack
    over how many tail rows each problem gives up), and why online rules fall short of it: the share of kept
    rows whose text turns up once in a problem's K samples (its position is uniform over the K draws: no
    earlier sample hints at it) and the share first drawn in the second half of the K."""
    by: dict = {}
    for (pid, i), r in fixed_rows.items():
        by.setdefault(pid, {})[i] = r
    unsolved = needed = late = once = 0
    costs = []  # per solved problem: tokens spent by the time of its 1st, 2nd, ... kept row
    for s in by.values():
        seen, spent, at = set(), 0, []
        counts: dict = {}
        for i in range(k):
            counts[s[i]["completion"]] = counts.get(s[i]["completion"], 0) + 1
        for i in range(k):
            r = s[i]
            spent += r["completion_tokens"]
            if r["reward"] >= 1.0 and r["finish_reason"] != "length" and r["completion"] not in seen and len(seen) < cap:
                seen.add(r["completion"])
                at.append(spent)
                late += i >= k // 2
                once += counts[r["completion"]] == 1
        if at:
            needed += at[-1]
            costs.append(at)
        else:
            unsolved += spent
    rows = sum(map(len, costs))
    give_up = rows - -(-keep_pct * rows // 100)  # rows that may go: keep at least keep_pct%, rounded up
    saved = [0] + [-1] * give_up  # saved[g]: most tokens saved by dropping g tail rows in all
    for at in costs:
        # a problem gives up its last t rows (keeping its first): it then stops at its (n - t)-th kept row
        options = [(t, at[-1] - at[-1 - t]) for t in range(len(at))]
        saved = [max((saved[g - t] + gain for t, gain in options if t <= g and saved[g - t] >= 0), default=-1)
                 for g in range(give_up + 1)]
    return {"unsolved_token_share": round(unsolved / total_tokens, 3),
            "tokens_to_keep_every_row": round((unsolved + needed) / total_tokens, 3),
            f"tokens_to_keep_{keep_pct}pct_of_rows": round((unsolved + needed - max(saved)) / total_tokens, 3),
            "rows": rows, "rows_seen_once": round(once / rows, 3), "rows_first_drawn_in_second_half": round(late / rows, 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=500)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--cap", type=int, default=10)
    ap.add_argument("--round-size", type=int, default=None, help="default: the config's")
    ap.add_argument("--close-after-rounds", type=int, default=None, help="default: the config's")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--sweep", action="store_true", help="also replay other round settings over fixed-K's samples")
    args = ap.parse_args()

    root = ensure_builtin(arithmetic_builtin(0))
    common = [f"task.max_train_problems={args.problems}", f"sampling.samples_per_problem={args.k}",
              f"selection.max_solutions_per_problem={args.cap}", "control.enabled=false"]
    tuning = ([f"sampling.round_size={args.round_size}"] if args.round_size else []) + \
        ([f"sampling.close_after_rounds={args.close_after_rounds}"] if args.close_after_rounds else [])
    arms = {
        "fixed_k": common,
        "adaptive": common + ["sampling.adaptive=true"] + tuning,
        "adaptive_same_budget": common + ["sampling.adaptive=true", f"sampling.max_samples_per_problem={4 * args.k}"]
        + tuning,
    }
    cfgs = {name: demo_config(root, False, sets) for name, sets in arms.items()}
    init_ray(None, None)
    samplers = Samplers(cfgs["fixed_k"])
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            samplers.get(str(root / "model"))  # engine start outside the timed arms
            for name, cfg in cfgs.items():
                t = time.time()
                res[name] = arm(cfg, Path(tmp) / name, samplers)
                print(f"{name}: {time.time() - t:.1f} s", flush=True)
        finally:
            samplers.close()
    fixed = res["fixed_k"]
    rows = {name: r.pop("_rows") for name, r in res.items()}
    sweep = simulate_settings(rows["fixed_k"], cfgs["adaptive"], args.k) if args.sweep else []
    same = all(rows["fixed_k"].get(k) == v for k, v in rows["adaptive"].items())
    a, b = res["adaptive"], res["adaptive_same_budget"]
    s = cfgs["adaptive"].sampling
    out = {
        "machine": f"{os.cpu_count()} cores, CPU only", "problems": args.problems, "k": args.k, "cap": args.cap,
        "round_size": s.adaptive_round_size, "close_after_rounds": s.close_after_rounds,
        "arms": res,
        "adaptive_rows_are_fixed_k_rows": same,
        "adaptive_vs_fixed": {"completion_tokens": round(a["completion_tokens"] / fixed["completion_tokens"], 3),
                              "samples": round(a["samples"] / fixed["samples"], 3),
                              "kept": round(a["kept"] / fixed["kept"], 3),
                              "kept_steps_right": round(a["kept_steps_right"] / fixed["kept_steps_right"], 3),
                              "problems_covered": a["problems_covered"] - fixed["problems_covered"],
                              "seconds": round(a["seconds"] / fixed["seconds"], 3)},
        "same_budget_vs_fixed": {"samples": round(b["samples"] / fixed["samples"], 3),
                                 "kept": round(b["kept"] / fixed["kept"], 3),
                                 "problems_covered": b["problems_covered"] - fixed["problems_covered"]},
    }
    out["sweep"] = sweep
    out["foresight"] = foresight(rows["fixed_k"], args.k, args.cap, fixed["completion_tokens"])
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"{'arm':<22}{'samples':>9}{'tokens':>10}{'kept':>7}{'covered':>9}{'seconds':>9}")
    for name, r in res.items():
        print(f"{name:<22}{r['samples']:>9}{r['completion_tokens']:>10}{r['kept']:>7}{r['problems_covered']:>9}"
              f"{r['seconds']:>9.1f}")
    for w in sweep:
        print(f"simulated round_size {w['round_size']}, close_after_rounds {w['close_after_rounds']}: tokens "
              f"{w['completion_tokens']}, kept {w['kept']} (steps right {w['kept_steps_right']}), covered "
              f"{w['problems_covered']}")
    print(f"adaptive / fixed-K: tokens {out['adaptive_vs_fixed']['completion_tokens']}, kept "
          f"{out['adaptive_vs_fixed']['kept']}, coverage {out['adaptive_vs_fixed']['problems_covered']:+d}; "
          f"same budget: coverage {out['same_budget_vs_fixed']['problems_covered']:+d}; rows match fixed-K: {same}")


if __name__ == "__main__":
    main()
