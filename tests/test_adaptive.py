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


@pytest.mark.parametrize("order", [1, -1])
def test_plan_does_not_depend_on_row_order(order):
    """A resumed E-step replays finished rounds from shards read in file order: the plan must not change."""
    samples = {f"p{j}": [(f"c{(i * j) % 5}", float((i + j) % 2)) for i in range(12)] for j in range(5)}
    plans = []
    for rev in (False, True):
        p = planner(list(samples), max_per_problem=12, budget=40, cap=4)
        rounds = []
        while draws := p.next_round():
            rows = [{"id": d.id, "sample_index": i, "completion": samples[d.id][i][0], "reward": samples[d.id][i][1]}
                    for d in draws for i in range(d.offset, d.offset + d.n)]
            p.observe(draws, rows[::-1] if rev else rows[::order])
            rounds.append(draws)
        plans.append(rounds)
    assert plans[0] == plans[1]
