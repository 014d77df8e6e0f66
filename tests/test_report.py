"""The report: per-iteration rows (control arm last), report.png, and the per-problem history."""
import json

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
    # iteration 2 as today's code writes it (correct_truncated), iteration 1 as older code did
    two = pq.read_table(run.iter_dir(2) / "problems.parquet")
    pq.write_table(two.append_column("correct_truncated", pa.array([0] * two.num_rows)), run.iter_dir(2) / "problems.parquet")
    summary = write_problem_history(run)
    table = pq.read_table(run.root / "problems.parquet").to_pylist()
    assert [r["correct_truncated"] for r in table] == [None] * 3 + [0] * 3
    first = {r["id"]: r["first_solved"] for r in table}
    assert first == {"a": 2, "b": 1, "c": None} and len(table) == 6
    assert "iteration 1: 1, iteration 2: 1; never: 1 of 3" in summary


def test_iterations_past_the_runs_last_are_left_out(tmp_path, capsys):
    """A finished 2-iteration run resumed with loop.iterations: 1 (or a lower patience) ends at iteration 1: the
    table, report.png and problems.parquet showed iteration 2's scores beside "best iteration: 1"."""
    run = make_run(tmp_path)
    for t in (1, 2):
        pq.write_table(pa.Table.from_pylist([{"id": "a", "iteration": t, "drawn": 4, "correct": t - 1,
                                              "distinct_correct": 1, "kept": 1, "pass_rate": 0.5}]),
                       run.iter_dir(t) / "problems.parquet")
    assert [r["iteration"] for r in iteration_rows(run)] == [0, 1, 2, "control"]
    run.set(last_iteration=1, best_iteration=1)
    assert [r["iteration"] for r in iteration_rows(run)] == [0, 1, "control"]
    print_table(run)
    assert "0.700" not in capsys.readouterr().out  # iteration 2's valid pass@1
    write_problem_history(run)
    table = pq.read_table(run.root / "problems.parquet").to_pylist()
    assert [r["iteration"] for r in table] == [1] and table[0]["first_solved"] is None


def test_the_e_steps_pass_rate_is_not_an_eval_split(tmp_path):
    """With K = 1 the E-step logs "train pass@1", which read as a greedy split in the plot and overwrote the
    scores of an extra eval split named "train" (the train file watched) in the table."""
    run = RunDir(tmp_path / "run")
    run.create("a: 1\n", resume=False)
    run.complete(0, "eval", [{"split": "valid", "pass@1": 0.5}, {"split": "train", "pass@1": 0.25}])
    run.complete(1, "generate", [{"samples": 8, "correct": 3, "train pass@1": 0.375}])
    run.complete(1, "eval", [{"split": "valid", "pass@1": 0.6}, {"split": "train", "pass@1": 0.5}])
    rows = iteration_rows(run)
    assert rows[1]["train pass@1"] == 0.5 and rows[1]["E-step train pass@1"] == 0.375
    import matplotlib.pyplot as plt

    seen = []
    real = plt.Axes.plot
    plt.Axes.plot = lambda self, xs, ys, **kw: seen.append((kw["label"], list(ys))) or real(self, xs, ys, **kw)
    try:
        write_plot(run)
    finally:
        plt.Axes.plot = real
    assert sorted(seen) == [("train", [25.0, 50.0]), ("valid", [50.0, 60.0])]


def test_a_run_without_evals_an_odd_folder_or_a_damaged_table_reports_in_one_piece(tmp_path, capsys):
    """Before its first eval a run has no plot to draw (matplotlib drew an empty one with a warning); a folder
    `iter_old/` is not an iteration (int() raised); a damaged per-problem table is a one-line error."""
    import pytest

    from restem_ray.cli import main
    from restem_ray.errors import UserError

    run = RunDir(tmp_path / "run")
    run.create("seed: 0\n", resume=False)
    run.complete(1, "generate", [{"samples": 8, "correct": 3}])
    assert write_plot(run) is False and not (run.root / "report.png").exists()
    (run.root / "iter_old").mkdir()
    pq.write_table(pa.table({"id": ["a"], "iteration": [1], "correct": [1]}), run.root / "iter_old" / "problems.parquet")
    assert write_problem_history(run) is None
    assert main(["report", str(run.root)]) == 0
    assert "report.png" not in capsys.readouterr().out
    run.iter_dir(1).mkdir(parents=True, exist_ok=True)
    (run.iter_dir(1) / "problems.parquet").write_bytes(b"PAR1" + b"\0" * 40 + b"PAR1")
    with pytest.raises(UserError, match=r"iter_001/problems.parquet: cannot be read \(.*\); remove it to report"):
        write_problem_history(run)


def test_the_adaptive_e_steps_solved_share_is_a_table_column(tmp_path, capsys):
    from restem_ray.report import print_table

    run = RunDir(tmp_path / "run")
    run.create("a: 1\n", resume=False)
    run.complete(0, "eval", [{"split": "valid", "pass@1": 0.5}])
    run.complete(1, "generate", [{"samples": 8, "correct": 3, "train solved": 0.625}])
    assert iteration_rows(run)[1]["E-step train solved"] == 0.625
    print_table(run)
    out = capsys.readouterr().out
    assert "train solved" in out and "0.625" in out


def test_the_report_leaves_out_lines_of_a_phase_the_manifest_does_not_list(tmp_path, capsys):
    """A driver killed between a phase's metrics lines and its manifest commit, not resumed since: the phase is
    done again on resume, so `report` does not show the lines of the try that did not count."""
    run = RunDir(tmp_path / "run")
    run.create("seed: 0\n", resume=False)
    run.complete(0, "eval", [{"split": "valid", "pass@1": 0.25}])
    with open(run.metrics_path, "a") as f:  # iteration 1's eval lines, its commit never written
        f.write(json.dumps({"phase": "eval", "iteration": 1, "time": 5.0, "split": "valid", "pass@1": 0.75}) + "\n")
    assert [m["iteration"] for m in run.committed_metrics()] == [0]
    print_table(run)
    out = capsys.readouterr().out
    assert "0.250" in out and "0.750" not in out
