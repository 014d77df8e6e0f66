"""Per-iteration table (terminal) and report.png (pass@1 vs iteration per split) from metrics.jsonl."""
from __future__ import annotations

import re
from collections import defaultdict

from .errors import UserError, first_line
from .storage import RunDir


def last_iteration(run: RunDir) -> int | None:
    """The run's last iteration (the driver records it as it starts one): folders and metrics of later ones were
    left by an earlier invocation that went further (a resume with fewer `loop.iterations` or a lower
    `patience`) and are not this run's. None for runs recorded before it was."""
    return run.manifest().get("last_iteration")


def _in_run(t, last: int | None) -> bool:
    return last is None or not isinstance(t, int) or t <= last


def iteration_rows(run: RunDir) -> list[dict]:
    """One dict per iteration: eval scores per split, E-step/selection counts, seconds per phase."""
    rows: dict = defaultdict(dict)
    last = last_iteration(run)
    for m in run.committed_metrics():
        if not _in_run(m["iteration"], last):
            continue
        r = rows[m["iteration"]]
        if m["phase"] == "eval":
            for key, val in m.items():
                if key.startswith(("pass@", "maj@")):
                    r[f"{m.get('split', '?')} {key}"] = val
            r["eval s"] = m.get("seconds")
        elif m["phase"] == "generate":
            r.update({"samples": m.get("samples"), "correct": m.get("correct"), "generate s": m.get("seconds"),
                      "tokens": m.get("completion_tokens")})
            # (the E-step's pass@K at the sampling temperature: not a split's, which an extra split named "train"
            # reports as "train pass@1")
            r.update({f"E-step {k}": v for k, v in m.items() if k.startswith("train pass@") or k == "train solved"})
        elif m["phase"] == "select":
            r["kept"] = m.get("kept")
            if "kept_false_positive_rate" in m:
                r["kept FP"] = m["kept_false_positive_rate"]
        elif m["phase"] == "improve":
            r.update({"loss": m.get("loss"), "improve s": m.get("seconds")})
    for r in rows.values():  # the E-step's yield: kept solutions per 1,000 generated completion tokens
        if isinstance(r.get("tokens"), (int, float)) and r["tokens"] and isinstance(r.get("kept"), (int, float)):
            r["kept/1k tok"] = 1000 * r["kept"] / r["tokens"]
    order = sorted(rows, key=lambda t: (isinstance(t, str), str(t) if isinstance(t, str) else t))
    return [{"iteration": t, **rows[t]} for t in order]  # iterations 0, 1, ..., then the control arm


def _split_order(col: str) -> tuple:
    split = col.split(" ")[0]
    order = {"E-step": 0, "train": 1, "valid": 2, "test": 3}
    return (order.get(split, 4), col)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if v <= 1.0 else f"{v:.1f}"
    return str(v)


def print_table(run: RunDir) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = iteration_rows(run)
    cols = ["iteration"] + sorted({k for r in rows for k in r if " pass@" in k or " maj@" in k or k == "E-step train solved"},
                                  key=_split_order) + \
        [c for c in ("samples", "correct", "kept", "kept/1k tok", "kept FP", "loss", "generate s", "improve s", "eval s")
         if any(c in r for r in rows)]
    table = Table(title=f"ReST^EM run {run.root}")
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[_fmt(r.get(c)) for c in cols])
    Console(width=200).print(table)
    best = run.manifest().get("best_iteration")
    if best is not None:
        print(f"best iteration by valid pass@1: {best}")


def write_plot(run: RunDir) -> bool:
    """RUN/report.png, greedy pass@1 per eval split and iteration; False (nothing written) before any eval."""
    if not any(m["phase"] == "eval" for m in run.committed_metrics()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = iteration_rows(run)
    loop = [r for r in rows if isinstance(r["iteration"], int)]
    control = next((r for r in rows if r["iteration"] == "control"), None)
    splits = sorted({m.get("split", "?") for m in run.committed_metrics() if m["phase"] == "eval"}, key=_split_order)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for s in splits:
        pts = [(r["iteration"], r[f"{s} pass@1"]) for r in loop if isinstance(r.get(f"{s} pass@1"), (int, float))]
        (line,) = ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=s)
        if control is not None and isinstance(control.get(f"{s} pass@1"), (int, float)):  # the control arm: a dashed level per split
            ax.axhline(100 * control[f"{s} pass@1"], color=line.get_color(), linestyle="--", linewidth=1,
                       label=f"{s} (control: base + more seed training)")
    ax.set_xlabel("ReST^EM iteration (0 = base)")
    ax.set_ylabel("greedy pass@1 (%)")
    ax.set_xticks([r["iteration"] for r in loop])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = run.root / "report.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(run.root / "report.png")
    return True


def problem_history(run: RunDir):
    """All iterations' per-problem statistics in one table (id, iteration, drawn, correct, ...), plus
    `first_solved`: the first iteration whose E-step solved the problem (None: never). Written by
    `restem-ray report` to RUN/problems.parquet, so a user can see which problems the model learned."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    last = last_iteration(run)
    parts = sorted(p for p in run.root.glob("iter_*/problems.parquet")
                   if re.fullmatch(r"iter_\d+", p.parent.name) and _in_run(int(p.parent.name[5:]), last))
    if not parts:
        return None

    def read(p):
        try:
            return pq.read_table(p)
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"{p}: cannot be read ({first_line(e, limit=120)}); remove it to report without it") from None
    # (iterations written before a column existed, correct_truncated: nulls there)
    table = pa.concat_tables([read(p) for p in parts], promote_options="default")
    first: dict[str, int] = {}
    for r in table.select(["id", "iteration", "correct"]).to_pylist():
        if r["correct"] > 0 and (r["id"] not in first or r["iteration"] < first[r["id"]]):
            first[r["id"]] = r["iteration"]
    return table.append_column("first_solved", pa.array([first.get(i) for i in table["id"].to_pylist()], pa.int64()))


def write_problem_history(run: RunDir) -> str | None:
    """Write RUN/problems.parquet; returns a one-line summary (problems first solved per iteration)."""
    from collections import Counter

    from .data import write_parquet

    table = problem_history(run)
    if table is None:
        return None
    write_parquet(run.root / "problems.parquet", table)
    ids = {}
    for r in table.select(["id", "first_solved"]).to_pylist():
        ids[r["id"]] = r["first_solved"]
    counts = Counter(ids.values())
    per_iter = ", ".join(f"iteration {t}: {counts[t]}" for t in sorted(k for k in counts if k is not None))
    return f"train problems first solved by the E-step of {per_iter}; never: {counts.get(None, 0)} of {len(ids)}"
