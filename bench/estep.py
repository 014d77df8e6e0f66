"""E-step overhead: restem-ray's E-step (Ray replica -> verifier actors -> Parquet shards) against one
direct `vllm.LLM.generate` call on the same prompts and sampling parameters, in the same run.

    .venv/bin/python bench/estep.py [--problems 512] [--samples 8] [--prompts-per-request 64] [--repeats 2]

The E-step runs twice per repeat: with `sampling.calls_per_replica` 2 (the default: a replica's next call joins
its engine's batch while the last call's longest samples decode) and 1 (one call at a time: the engine drains at
each call's end), on the same replica.

Both engines run with the same arguments (the replicas' CPU defaults: in-process engine core, "uni"
executor) and the same thread count (one: a replica's `cpus_per_replica`). Engine start is excluded on
both sides (both engines are up before timing); the two sides alternate and the best of `--repeats` is
kept, since this 2-core machine is noisy. Target: ratio <= 1.10.
Writes bench/results/estep.json.
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on loopback
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the direct engine runs as the replicas' do
# and with as many threads: Ray gives an actor OMP_NUM_THREADS = its CPUs (sampling.cpus_per_replica = 1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pyarrow as pa  # noqa: E402
import ray  # noqa: E402

from restem_ray.builtin import ensure_builtin  # noqa: E402
from restem_ray.config import SamplingConfig, VerificationConfig  # noqa: E402
from restem_ray.data import load_problems, write_parquet  # noqa: E402
from restem_ray.pool import EStepPool, chunked  # noqa: E402
from restem_ray.sampling import CPU_ENGINE_DEFAULTS, CPU_SINGLE_WORKER, SampleSpec  # noqa: E402

ENGINE = {"max_model_len": 320, "dtype": "float32"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=512)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompts-per-request", type=int, default=64)  # sampling.prompts_per_request's default
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "estep.json"))
    args = ap.parse_args()

    root = ensure_builtin()
    problems = load_problems(root / "data" / "train.jsonl", "math", args.problems)
    spec = SampleSpec(n=args.samples, temperature=1.0, max_tokens=96, seed=1)

    from vllm import LLM, SamplingParams

    t = time.time()
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    ray_start = time.time() - t
    sampling = SamplingConfig(engine_kwargs=ENGINE, prompts_per_request=args.prompts_per_request)
    t = time.time()
    pool = EStepPool(str(root / "model"), sampling, VerificationConfig(), verifier="math")
    pool_start = time.time() - t
    llm = LLM(model=str(root / "model"), seed=0, **(CPU_ENGINE_DEFAULTS | CPU_SINGLE_WORKER | ENGINE))
    params = [SamplingParams(n=spec.n, temperature=spec.temperature, max_tokens=spec.max_tokens,
                             seed=spec.problem_seed(p["id"])) for p in problems]

    def direct():
        start = time.time()
        outs = llm.generate([p["prompt"] for p in problems], params, use_tqdm=False)
        return time.time() - start, sum(len(o.outputs) for o in outs)

    def estep(calls: int):
        pool.sampling = pool.sampling.model_copy(update={"calls_per_replica": calls})  # calls in flight
        with tempfile.TemporaryDirectory() as tmp:
            start = time.time()
            count = 0

            def save(i, rows):
                nonlocal count
                count += len(rows)
                write_parquet(Path(tmp) / f"part-{i:05d}.parquet", pa.Table.from_pylist(rows))
            pool.run(chunked(problems, args.prompts_per_request), spec, on_chunk=save, desc="E-step")
            return time.time() - start, count

    sides = {"direct": direct, "estep": lambda: estep(2), "estep_one_call": lambda: estep(1)}
    runs = {k: [] for k in sides}
    for _ in range(args.repeats):
        for name, fn in sides.items():
            secs, rows = fn()
            assert rows == len(problems) * spec.n, (name, rows)
            runs[name].append(secs)
    pool.close()
    best = {k: min(v) for k, v in runs.items()}
    result = {
        "problems": len(problems), "samples_per_problem": spec.n, "prompts_per_request": args.prompts_per_request,
        "direct_s": round(best["direct"], 3), "estep_s": round(best["estep"], 3),
        "ratio": round(best["estep"] / best["direct"], 3),
        "estep_one_call_s": round(best["estep_one_call"], 3),
        "ratio_one_call": round(best["estep_one_call"] / best["direct"], 3), "all_runs_s": runs,
        "ray_start_s": round(ray_start, 2), "pool_start_s": round(pool_start, 2),
        "machine": f"{os.cpu_count()} cores", "includes": "estep = generation + grading + Parquet shards",
        "calls_per_replica": {"estep": 2, "estep_one_call": 1},
    }
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1))
    print(f"{'side':<16}{'seconds':>10}{'samples/s':>12}")
    for k in sides:
        print(f"{k:<16}{best[k]:>10.2f}{len(problems) * spec.n / best[k]:>12.0f}")
    print(f"ratio estep/direct = {result['ratio']:.3f} (target <= 1.10), one call at a time "
          f"{result['ratio_one_call']:.3f}; wrote {out}")


if __name__ == "__main__":
    main()
