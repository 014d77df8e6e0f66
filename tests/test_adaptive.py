"""The adaptive E-step's round planner (restem_ray/adaptive.py), driven without Ray: which problems draw which
samples, when they close, where a budget goes. Samples are given by a table of (problem, sample index) ->
completion, as fixed-K sampling would have drawn them (the seeds make adaptive draw the same samples)."""
import pytest

from restem_ray.adaptive import Draw, RoundPlanner


def simulate(planner, samples):
    """Run the planner's rounds over `samples[pid][i] = (completion, reward)`; returns the drawn (pid, i)."""
    drawn = []
    while draws := planner.next_round():
        rows = []
        for d in draws:
            for i in range(d.offset, d.offset + d.n):
                text, reward = samples[d.id][i]
                rows.append({"id": d.id, "sample_index": i, "completion": text, "reward": reward,
                             "finish_reason": "stop"})
                drawn.append((d.id, i))
        planner.observe(draws, rows)
    return drawn


def planner(ids, **kw):
    args = dict(round_size=4, max_per_problem=16, budget=16 * len(ids), cap=3, close_after_rounds=1) | kw
    return RoundPlanner(ids, **args)


def test_closing_rules_cap_stale_max():
    samples = {
        "many": [(f"s{i}", 1.0) for i in range(16)],              # every sample a new correct one: cap after 4
        "same": [("x", 1.0)] + [("x", 1.0)] * 7 + [("y", 1.0)] * 8,  # one chain: no new distinct in round 2
        "late": [("w", 0.0)] * 5 + [("z", 1.0)] + [("w", 0.0)] * 10,  # first correct in round 2, stale in round 3
        "never": [("w", 0.0)] * 16,                                  # never correct: draws the maximum
    }
    p = planner(list(samples))
    drawn = simulate(p, samples)
    per = {pid: sorted(i for q, i in drawn if q == pid) for pid in samples}
    assert per == {"many": [0, 1, 2, 3], "same": list(range(8)), "late": list(range(12)), "never": list(range(16))}
    s = p.summary()
    assert (s["closed_cap"], s["closed_stale"], s["closed_max"], s["closed_budget"]) == (1, 2, 1, 0)
    assert s["problems_with_kept"] == 3 and s["rounds"] == 4


def test_draws_are_a_prefix_of_fixed_k_with_max_k():
    """max_per_problem = K: every problem draws samples 0..m-1 for some m <= K: a subset of fixed-K's."""
    samples = {f"p{j}": [(f"a{i % (j + 1)}", float(i % 3 == 0)) for i in range(8)] for j in range(6)}
    drawn = simulate(planner(list(samples), max_per_problem=8, budget=48, round_size=3), samples)
    for pid in samples:
        idx = sorted(i for q, i in drawn if q == pid)
        assert idx == list(range(len(idx))) and 0 < len(idx) <= 8
    assert len(drawn) == len(set(drawn)) < 48  # each sample once; some saved


def test_a_budget_goes_to_the_hardest_open_problems_first():
    # "easy" is right every time (prior: was easy last iteration), "hard" never: with room for one more round
    # of 4 after round 1, the hard problem gets it
    samples = {"easy": [(f"e{i}", 1.0) for i in range(12)], "hard": [("h", 0.0)] * 12}
    p = planner(["easy", "hard"], cap=10, max_per_problem=12, budget=12, prior={"easy": 0.9, "hard": 0.1})
    drawn = simulate(p, samples)
    assert sorted(i for q, i in drawn if q == "hard") == list(range(8))
    assert sorted(i for q, i in drawn if q == "easy") == list(range(4))
    assert p.summary()["closed_budget"] == 2 and p.drawn == 12


def test_a_partial_last_round_spends_exactly_the_budget():
    samples = {f"p{j}": [("w", 0.0)] * 10 for j in range(3)}
    p = planner(list(samples), budget=10, max_per_problem=10)
    drawn = simulate(p, samples)
    assert len(drawn) == 10 == p.drawn
    assert sorted(len([1 for q, _ in drawn if q == pid]) for pid in samples) == [2, 4, 4]


def test_truncated_correct_samples_do_not_count_unless_kept():
    """Selection drops correct completions cut off by max_tokens: they cannot close a problem either."""
    p = planner(["a"], cap=1, max_per_problem=8, budget=8)
    (d,) = p.next_round()
    p.observe([d], [{"id": "a", "sample_index": i, "completion": "cut", "reward": 1.0, "finish_reason": "length"}
                    for i in range(4)])
    assert p.problems["a"].closed is None and p.next_round() == [Draw("a", 4, 4)]
    q = planner(["a"], cap=1, max_per_problem=8, budget=8, keep_truncated=True)
    (d,) = q.next_round()
    q.observe([d], [{"id": "a", "sample_index": 0, "completion": "cut", "reward": 1.0, "finish_reason": "length"}])
    assert q.problems["a"].closed == "cap"


def test_plan_does_not_depend_on_row_order():
    """A resumed E-step replays finished rounds from shards read in file order: the plan must not change."""
    import random

    samples = {f"p{j}": [(f"c{(i * j) % 5}", float((i + j) % 2)) for i in range(12)] for j in range(5)}
    plans = []
    for shuffle in (None, 1, 2):
        p = planner(list(samples), max_per_problem=12, budget=40, cap=4)
        rounds = []
        while draws := p.next_round():
            rows = [{"id": d.id, "sample_index": i, "completion": samples[d.id][i][0], "reward": samples[d.id][i][1]}
                    for d in draws for i in range(d.offset, d.offset + d.n)]
            if shuffle is not None:
                random.Random(shuffle).shuffle(rows)
            p.observe(draws, rows)
            rounds.append(draws)
        plans.append(rounds)
    assert plans[0] == plans[1] == plans[2] and len(plans[0]) >= 2


# ---------------------------------------------------------------- Driver.generate with sampling.adaptive, no Ray
class TablePool:
    """Stands in for EStepPool: sample i of a problem is TABLE[id][i], graded; honours each problem's draw and
    records the calls. `fail_after` rounds: raise, as a driver killed mid-E-step would stop."""
    nodes = ["node-a"]

    def __init__(self, table, fail_after=None):
        self.table, self.fail_after, self.calls = table, fail_after, []

    def run(self, chunks, spec, *, on_chunk, desc, on_piece=None):
        from restem_ray.sampling import draw_of

        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls.append([(p["id"], *draw_of(p, spec)) for c in chunks for p in c])
        for j, chunk in enumerate(chunks):
            rows = []
            for p in chunk:
                off, n = draw_of(p, spec)
                for i in range(off, off + n):
                    text, reward = self.table[p["id"]][i]
                    rows.append({"id": p["id"], "sample_index": i, "prompt": "Q", "completion": text, "reward": reward,
                                 "verdict": "passed" if reward else "wrong_answer", "prompt_tokens": 1,
                                 "completion_tokens": len(text), "finish_reason": "stop"})
            on_chunk(j, rows)


TABLE = {"easy": [("e", 1.0)] * 8, "varied": [(f"v{i}", 1.0) for i in range(8)], "never": [("n", 0.0)] * 8}


def adaptive_driver(tmp_path, pool, **sampling):
    from restem_ray.config import config_from_dict, dump_config
    from restem_ray.driver import Driver
    from restem_ray.storage import RunDir

    cfg = config_from_dict({"task": {"train_file": "t", "valid_file": "v"}, "model": {"base": "m"},
                            "sampling": {"prompts_per_request": 2, "samples_per_problem": 8, "adaptive": True,
                                         "round_size": 2, **sampling},
                            "selection": {"max_solutions_per_problem": 3}, "observability": {"tensorboard": False}})
    d = Driver.__new__(Driver)  # the phases alone: no data files, no Ray
    d.cfg, d.run, d.step_checker = cfg, RunDir(tmp_path / "run"), None
    d.train = [{"id": pid, "prompt": "Q", "answer": "1"} for pid in TABLE]
    d.samplers = type("S", (), {"get": lambda self, model: pool})()
    if not (tmp_path / "run" / "manifest.json").exists():
        d.run.create(dump_config(cfg), resume=False)
    return d


def test_the_driver_runs_rounds_into_named_shards_and_reports_them(tmp_path):
    pool = TablePool(TABLE)
    samples = adaptive_driver(tmp_path, pool).generate(1, "m")
    got = sorted((r["id"], r["sample_index"]) for r in samples.to_pylist())
    # easy: one chain, stale after round 2; varied: 3 distinct (the cap) in round 2; never: all 8
    assert got == sorted([("easy", i) for i in range(4)] + [("varied", i) for i in range(4)] +
                         [("never", i) for i in range(8)])
    assert [[c[0] for c in call] for call in pool.calls] == [["easy", "never", "varied"]] * 2 + [["never"]] * 2
    names = sorted(p.name for p in (tmp_path / "run" / "iter_001" / "samples").glob("*.parquet"))
    assert names == ["part-r001-00000.parquet", "part-r001-00001.parquet", "part-r002-00000.parquet",
                     "part-r002-00001.parquet", "part-r003-00000.parquet", "part-r004-00000.parquet"]
    (line,) = [m for m in metrics_lines(tmp_path) if m["phase"] == "generate"]
    assert (line["rounds"], line["samples"], line["closed_cap"], line["closed_stale"], line["closed_max"]) == (4, 16, 1, 1, 1)
    assert line["problems_with_kept"] == 2 and line["train solved"] == 2 / 3 and not any("pass@" in k for k in line)


def metrics_lines(tmp_path):
    import json

    return [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_a_resumed_e_step_replays_its_rounds_and_refuses_shards_of_other_settings(tmp_path):
    from restem_ray.errors import RunError

    with pytest.raises(KeyboardInterrupt):  # stopped after two rounds, their shards on disk
        adaptive_driver(tmp_path, TablePool(TABLE, fail_after=2)).generate(1, "m")
    resumed = TablePool(TABLE)
    samples = adaptive_driver(tmp_path, resumed).generate(1, "m")
    assert resumed.calls == [[("never", 4, 2)], [("never", 6, 2)]]  # only rounds 3 and 4 were sampled
    assert samples.num_rows == 16

    other = tmp_path / "other"
    with pytest.raises(KeyboardInterrupt):
        adaptive_driver(other, TablePool(TABLE, fail_after=1)).generate(1, "m")
    with pytest.raises(RunError, match="round-1 shards .* do not hold this plan's samples"):
        adaptive_driver(other, TablePool(TABLE), round_size=3).generate(1, "m")  # as after a --force resume
    with pytest.raises(RunError, match="holds adaptive E-step shards but sampling.adaptive is False"):
        adaptive_driver(other, TablePool(TABLE), adaptive=False).generate(1, "m")


def test_the_benchs_foresight_plan_is_the_cheapest_that_keeps_a_share_of_the_rows():
    """bench/adaptive_estep.py's "tokens to keep 95% of rows" (a knapsack over tail rows) equals brute force over
    every choice of where each solved problem stops, on small random tables (keeping 70%, so that several rows
    may go)."""
    import importlib.util
    import itertools
    import random
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "adaptive_estep.py"
    spec = importlib.util.spec_from_file_location("adaptive_estep_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng, dropped = random.Random(0), 0
    for _ in range(30):
        k, cap, rows = 6, 3, {}
        for pid in range(4):
            for i in range(k):
                rows[(pid, i)] = {"completion": rng.choice(["a", "b", f"u{pid}{i}"]), "finish_reason": "stop",
                                  "reward": float(pid != 0 and rng.random() < 0.7),
                                  "completion_tokens": rng.randint(1, 9)}
        total = sum(r["completion_tokens"] for r in rows.values())
        got = bench.foresight(rows, k, cap, total, keep_pct=70)
        # brute force: each solved problem stops at one of its kept rows (its first at least)
        plans, unsolved = [], 0
        for pid in range(4):
            seen, spent, at = set(), 0, []
            for i in range(k):
                r = rows[(pid, i)]
                spent += r["completion_tokens"]
                if r["reward"] >= 1 and r["completion"] not in seen and len(seen) < cap:
                    seen.add(r["completion"])
                    at.append(spent)
            if at:
                plans.append([(j + 1, at[j]) for j in range(len(at))])
            else:
                unsolved += spent
        n = sum(len(p) for p in plans)
        best = min(sum(c for _, c in choice) for choice in itertools.product(*plans)
                   if sum(j for j, _ in choice) * 100 >= 70 * n)
        assert got["rows"] == n
        assert got["tokens_to_keep_70pct_of_rows"] == round((unsolved + best) / total, 3)
        dropped += got["tokens_to_keep_70pct_of_rows"] < got["tokens_to_keep_every_row"]
        assert got["tokens_to_keep_every_row"] == round((unsolved + sum(p[-1][1] for p in plans)) / total, 3)
    assert dropped >= 20  # most tables had rows worth dropping: the knapsack was exercised


def test_rounds_on_probation_wait_for_later_rounds_to_be_judged(tmp_path):
    """A round's shards with failed grades, while the E-step has too few grades to judge, wait on probation
    through the next rounds (the planner reads them), and go when the judgement comes: a round's end promoted
    them unjudged, and a resume replayed a broken sandbox's zeros."""
    from restem_ray.errors import RunError
    from restem_ray.sampling import draw_of

    class Broken(TablePool):  # every grade a sandbox_error
        def run(self, chunks, spec, *, on_chunk, desc, on_piece=None):
            for j, chunk in enumerate(chunks):
                on_chunk(j, [{"id": p["id"], "sample_index": i, "prompt": "Q", "completion": "c", "reward": 0.0,
                              "verdict": "sandbox_error", "prompt_tokens": 1, "completion_tokens": 1,
                              "finish_reason": "stop"}
                             for p in chunk for i in range(draw_of(p, spec)[0], sum(draw_of(p, spec)))])

    with pytest.raises(RunError, match=r"16 of 16 grades of this E-step are verifier/sandbox failures"):
        adaptive_driver(tmp_path, Broken(TABLE)).generate(1, "m")
    assert not list((tmp_path / "run" / "iter_001" / "samples").iterdir())  # rounds 1-2 went with the stop
    # one failed grade in round 1: its shard waits on probation, the planner reads it, and it stands at the end

    class OneFailed(TablePool):
        def run(self, chunks, spec, *, on_chunk, desc, on_piece=None):
            def failing(j, rows):
                on_chunk(j, [dict(r, verdict="sandbox_error") if (r["id"], r["sample_index"]) == ("never", 0) else r
                             for r in rows])
            super().run(chunks, spec, on_chunk=failing, desc=desc)

    samples = adaptive_driver(tmp_path / "one", OneFailed(TABLE)).generate(1, "m")
    assert samples.num_rows == 16
    names = sorted(p.name for p in (tmp_path / "one" / "run" / "iter_001" / "samples").iterdir())
    assert len(names) == 6 and all(n.endswith(".parquet") for n in names), names


def test_a_resume_after_a_round_on_probation_samples_it_and_every_later_round_again(tmp_path):
    """Once a shard waits on probation, every later one waits with it: a driver killed then leaves only whole
    earlier rounds, and the resume's plan (which rests on them) meets no shard of a plan it no longer makes."""
    class FlakyFirstRound(TablePool):  # easy's first grades: a sandbox that failed, then the driver is killed
        def run(self, chunks, spec, *, on_chunk, desc, on_piece=None):
            first = not self.calls

            def graded(j, rows):
                on_chunk(j, [dict(r, verdict="sandbox_error", reward=0.0) if first and r["id"] == "easy" else r
                             for r in rows])
            super().run(chunks, spec, on_chunk=graded, desc=desc)

    with pytest.raises(KeyboardInterrupt):
        adaptive_driver(tmp_path, FlakyFirstRound(TABLE, fail_after=2)).generate(1, "m")
    left = sorted(p.name for p in (tmp_path / "run" / "iter_001" / "samples").iterdir())
    assert left == [f"part-r00{r}-0000{c}.parquet.probation" for r in (1, 2) for c in (0, 1)], left
    resumed = TablePool(TABLE)
    samples = adaptive_driver(tmp_path, resumed).generate(1, "m")  # (it refused: "settings changed")
    assert samples.num_rows == 16 and resumed.calls[0] == [("easy", 0, 2), ("never", 0, 2), ("varied", 0, 2)]
