import pyarrow as pa

from restem_ray.selection import NO_END, problem_stats, select, truncated


def graded(rows):
    return pa.Table.from_pylist([{"id": i, "sample_index": s, "prompt": "p", "completion": c, "reward": r}
                                 for i, s, c, r in rows])


def test_keeps_only_correct_dedups_and_caps():
    rows = [("a", 0, "x", 1.0), ("a", 1, "x", 1.0), ("a", 2, "y", 1.0), ("a", 3, "z", 0.0)]
    rows += [("b", i, f"s{i}", 1.0) for i in range(30)]
    rows += [("c", 0, "w", 0.0)]
    out = select(graded(rows), max_solutions_per_problem=10, dedup=True, seed=0).to_pylist()
    by = {}
    for r in out:
        by.setdefault(r["id"], []).append(r["completion"])
    assert sorted(by["a"]) == ["x", "y"]
    assert len(by["b"]) == 10 and len(set(by["b"])) == 10
    assert "c" not in by


def test_without_dedup_duplicates_stay():
    rows = [("a", 0, "x", 1.0), ("a", 1, "x", 1.0)]
    assert select(graded(rows), max_solutions_per_problem=10, dedup=False).num_rows == 2


def test_capped_choice_is_seeded_and_independent_of_row_order():
    rows = [("b", i, f"s{i}", 1.0) for i in range(30)]
    one = select(graded(rows), max_solutions_per_problem=5, seed=3).to_pylist()
    two = select(graded(list(reversed(rows))), max_solutions_per_problem=5, seed=3).to_pylist()
    other = select(graded(rows), max_solutions_per_problem=5, seed=4).to_pylist()
    assert one == two
    assert one != other


def test_truncated_correct_samples_are_not_kept_unless_asked():
    """A completion that ended on max_tokens may match the answer by chance; by default it is never kept."""
    table = graded([("a", 0, "x", 1.0), ("a", 1, "y", 1.0), ("b", 0, "z", 1.0), ("b", 1, "w", 0.0)])
    table = table.append_column("finish_reason", pa.array(["stop", "length", "length", "length"]))
    assert [(r["id"], r["completion"]) for r in select(table, max_solutions_per_problem=10).to_pylist()] == [("a", "x")]
    kept = select(table, max_solutions_per_problem=10, keep_truncated=True).to_pylist()
    assert [(r["id"], r["completion"]) for r in kept] == [("a", "x"), ("a", "y"), ("b", "z")]
    # kept, a cut completion is trained without an end token (NO_END), a whole one with its own (-1: the default)
    assert [r["stop_token"] for r in kept] == [-1, NO_END, NO_END]
    table = table.append_column("stop_token", pa.array([7, 7, 7, 7], pa.int64()))
    assert [r["stop_token"] for r in select(table, max_solutions_per_problem=10, keep_truncated=True).to_pylist()] \
        == [7, NO_END, NO_END]
    # one text cut at max_tokens first, then finished (the same after rstrip): dedup keeps the finished one
    table = graded([("c", 0, "x = 1", 1.0), ("c", 1, "x = 1\n", 1.0)])
    table = table.append_column("finish_reason", pa.array(["length", "stop"]))
    assert [(r["sample_index"], r["stop_token"]) for r in select(table, max_solutions_per_problem=10,
                                                                 keep_truncated=True).to_pylist()] == [(1, -1)]


def test_a_sample_the_engine_aborted_is_not_kept_either():
    """vLLM also ends a request 'abort' or 'error' (cut off in the engine): graded correct by chance, its partial
    text would be trained with an end token appended, as a finished solution."""
    table = graded([("a", 0, "x", 1.0), ("a", 1, "y", 1.0), ("b", 0, "z", 1.0)])
    table = table.append_column("finish_reason", pa.array(["stop", "abort", "error"]))
    assert truncated(table) == [False, True, True]
    assert [r["completion"] for r in select(table, max_solutions_per_problem=10).to_pylist()] == ["x"]
    # keep_truncated releases max_tokens cuts only: an aborted text is no whole solution under any setting
    assert [r["completion"] for r in select(table, max_solutions_per_problem=10, keep_truncated=True).to_pylist()] == ["x"]
    stats = problem_stats(table, select(table, max_solutions_per_problem=10), 1, keep_truncated=True).to_pylist()
    assert [(s["id"], s["correct"], s["correct_truncated"]) for s in stats] == [("a", 1, 1), ("b", 0, 1)]


def test_samples_without_a_finish_reason_count_as_complete():
    """Shards written before the column existed (or with it null after a schema merge) lose nothing."""
    old = graded([("a", 0, "x", 1.0)])
    assert truncated(old) == [False] and select(old, max_solutions_per_problem=10).num_rows == 1
    merged = old.append_column("finish_reason", pa.array([None], pa.string()))
    assert truncated(merged) == [False] and select(merged, max_solutions_per_problem=10).num_rows == 1


def test_kept_rows_carry_the_token_their_sample_stopped_on():
    """train.parquet keeps each sample's stop token for the M-step (-1 for samples written before it existed)."""
    rows = [("a", 0, "x", 1.0), ("a", 1, "y", 1.0), ("b", 0, "z", 0.0)]
    table = graded(rows).append_column("stop_token", pa.array([107, 1, 107], pa.int64()))
    out = select(table, max_solutions_per_problem=10)
    assert out.schema.field("stop_token").type == pa.int64()
    assert [(r["completion"], r["stop_token"]) for r in out.to_pylist()] == [("x", 107), ("y", 1)]
    assert select(graded(rows), max_solutions_per_problem=10)["stop_token"].to_pylist() == [-1, -1]


def test_a_correct_sample_cut_by_max_tokens_solves_nothing_in_the_problem_stats():
    """select drops it, so it must not mark the problem solved (first_solved) nor make the adaptive E-step's prior
    call the problem easy (pass_rate 1.0 drew it nothing next iteration when the budget bound)."""
    from restem_ray.selection import problem_stats

    samples = pa.Table.from_pylist([
        {"id": "p", "sample_index": 0, "prompt": "q", "completion": "... 72 clips and then", "reward": 1.0,
         "finish_reason": "length"},
        {"id": "p", "sample_index": 1, "prompt": "q", "completion": "no", "reward": 0.0, "finish_reason": "stop"},
        {"id": "q", "sample_index": 0, "prompt": "q", "completion": "#### 5", "reward": 1.0, "finish_reason": "stop"},
        {"id": "q", "sample_index": 1, "prompt": "q", "completion": "#### 5\n", "reward": 1.0, "finish_reason": "stop"}])
    kept = select(samples, max_solutions_per_problem=10)
    stats = {r["id"]: r for r in problem_stats(samples, kept, 1).to_pylist()}
    assert (stats["p"]["correct"], stats["p"]["correct_truncated"], stats["p"]["pass_rate"], stats["p"]["kept"]) == (0, 1, 0.0, 0)
    # a trailing newline makes no second solution: one kept, one distinct
    assert (stats["q"]["correct"], stats["q"]["distinct_correct"], stats["q"]["kept"]) == (2, 1, 1)
    both = {r["id"]: r for r in problem_stats(samples, select(samples, max_solutions_per_problem=10,
                                                              keep_truncated=True), 1, keep_truncated=True).to_pylist()}
    assert (both["p"]["correct"], both["p"]["correct_truncated"], both["p"]["kept"]) == (1, 0, 1)
