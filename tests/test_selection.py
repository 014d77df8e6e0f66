import pyarrow as pa

from restem_ray.selection import select


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
