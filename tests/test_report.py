"""The report: per-iteration rows (control arm last), report.png, and the per-problem history."""
import pyarrow as pa
import pyarrow.parquet as pq

from restem_ray.report import iteration_rows, print_table, write_plot, write_problem_history
from restem_ray.storage import RunDir


def make_run(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create("a: 1\n", resume=False)
    for t, (v, te) in enumerate([(0.5, 0.4), (0.6, 0.55), (0.7, 0.62)]):
        if t:
            run.complete(t, "generate", [{"samples": 80, "correct": 40, "seconds": 1.0, "train pass@8": 0.9,
                                          "completion_tokens": 1200 * t}])
            run.complete(t, "select", [{"kept": 30, "kept_false_positive_rate": 0.1}])
            run.complete(t, "improve", [{"seconds": 2.0, "loss": 0.3}])
        run.complete(t, "eval", [{"split": "valid", "pass@1": v}, {"split": "test", "pass@1": te}])
    run.complete("control", "improve", [{"seconds": 2.0, "loss": 0.1, "epochs": 4}])
    run.complete("control", "eval", [{"split": "valid", "pass@1": 0.52, "arm": "control"},
                                     {"split": "test", "pass@1": 0.45, "arm": "control"}])
    return run


def test_rows_put_iterations_in_order_and_the_control_arm_last(tmp_path, capsys):
    run = make_run(tmp_path)
    rows = iteration_rows(run)
    assert [r["iteration"] for r in rows] == [0, 1, 2, "control"]
    assert rows[1]["kept FP"] == 0.1 and rows[3]["test pass@1"] == 0.45
    # the E-step's yield: kept solutions per 1,000 completion tokens (30 kept of 1,200 and of 2,400 tokens)
    assert rows[1]["kept/1k tok"] == 25.0 and rows[2]["kept/1k tok"] == 12.5 and "kept/1k tok" not in rows[0]
    print_table(run)
    out = capsys.readouterr().out
    assert "control" in out and "kept FP" in out and "kept/1k tok" in out and "25.0" in out
    write_plot(run)
    png = (run.root / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_problem_history_tracks_when_each_problem_was_first_solved(tmp_path):
    run = make_run(tmp_path)
    for t, correct in ((1, {"a": 0, "b": 2, "c": 0}), (2, {"a": 3, "b": 1, "c": 0})):
        rows = [{"id": i, "iteration": t, "drawn": 4, "correct": c, "distinct_correct": min(c, 1),
                 "kept": min(c, 1), "pass_rate": c / 4} for i, c in correct.items()]
        pq.write_table(pa.Table.from_pylist(rows), run.iter_dir(t) / "problems.parquet")
    summary = write_problem_history(run)
    table = pq.read_table(run.root / "problems.parquet").to_pylist()
    first = {r["id"]: r["first_solved"] for r in table}
    assert first == {"a": 2, "b": 1, "c": None} and len(table) == 6
    assert "iteration 1: 1, iteration 2: 1; never: 1 of 3" in summary
