"""Selection between E-step and M-step: keep reward 1, drop exact duplicates, cap per problem."""
from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)


# stop_token of a kept completion cut at max_tokens (selection.keep_truncated): the M-step appends no end token to
# it (an end token would teach the model to stop mid-solution); -1 is "the M-step's default end", ids are >= 0
NO_END = -2


def unfinished(finish_reason: str | None) -> bool:
    """A completion that did not end on its own: vLLM's finish_reason 'length' (max_tokens), or 'abort' or
    'error' (a request cut off in the engine); not 'stop' (EOS, a stop string or token id) nor a row without one."""
    return finish_reason not in ("stop", None)


def kept_ending(finish_reason: str | None, keep_truncated: bool = False) -> bool:
    """Whether selection may keep a correct completion that ended so: on its own ('stop', or a row from before the
    column existed), or with `keep_truncated` on max_tokens ('length'); never one the engine cut off ('abort',
    'error'), which no setting makes a whole solution."""
    return not unfinished(finish_reason) or (keep_truncated and finish_reason == "length")


def keepable(table: pa.Table, keep_truncated: bool = False) -> list[bool]:
    """`kept_ending` of every row of a samples table."""
    if "finish_reason" not in table.column_names:
        return [True] * table.num_rows
    return [kept_ending(f, keep_truncated) for f in table["finish_reason"].to_pylist()]


def same_solution_key(completion: str) -> str:
    """What `selection.dedup` compares: the completion without trailing whitespace (a sample ended by EOS after
    a newline and one whose stop string vLLM removed are one solution; the M-step appends its end token to either,
    and of a finished copy and one cut at max_tokens, `select` keeps the finished one)."""
    return completion.rstrip()


def truncated(table: pa.Table) -> list[bool]:
    """Rows whose completion did not finish (`unfinished`: mostly those that ended on max_tokens); none in a
    table without the column (samples written before it existed)."""
    if "finish_reason" not in table.column_names:
        return [False] * table.num_rows
    return [unfinished(f) for f in table["finish_reason"].to_pylist()]


def select(graded: pa.Table, *, max_solutions_per_problem: int, dedup: bool = True, seed: int = 0,
           keep_truncated: bool = False) -> pa.Table:
    """Rows of `graded` to train on: correct, distinct per problem, at most N per problem (seeded choice).

    The cap (paper: 10) keeps easy problems from dominating and keeps the data diverse. A completion cut
    off by max_tokens is not kept unless `keep_truncated`: its answer may match by chance ("...72 clips,
    and then she"); kept, it is trained without an end token (`NO_END`: an end token would teach the model to
    stop mid-sentence). One the engine aborted is never kept.
    """
    # samples that carry train_prompt (prompt.train_few_shot: false) are trained on that rendering
    prompt = "train_prompt" if "train_prompt" in graded.column_names else "prompt"
    table = graded.select(["id", "sample_index", prompt, "completion", "reward"]).rename_columns(
        ["id", "sample_index", "prompt", "completion", "reward"])
    stop = graded["stop_token"] if "stop_token" in graded.column_names else None  # (none in early samples: -1)
    if keep_truncated and "finish_reason" in graded.column_names:  # cut at max_tokens: no end token
        cut = pa.compute.equal(graded["finish_reason"], "length").fill_null(False)
        stop = pa.compute.if_else(cut, NO_END, stop if stop is not None else pa.scalar(-1, pa.int64()))
    if stop is not None:
        table = table.append_column("stop_token", stop.cast(pa.int64()))
    # (filtered in Arrow first: an E-step's rows as Python objects were gigabytes of repeated prompts at scale)
    kept = [ok and r >= 1.0 for ok, r in zip(keepable(graded, keep_truncated), graded["reward"].to_pylist())]
    rows = table.filter(pa.array(kept, pa.bool_())).to_pylist()
    rows.sort(key=lambda r: (r["id"], r["sample_index"]))  # order independent of shard completion order
    by_problem: dict[str, list[dict]] = {}
    for r in rows:
        kept = by_problem.setdefault(r["id"], [])
        same = next((i for i, k in enumerate(kept) if same_solution_key(k["completion"]) == same_solution_key(
            r["completion"])), None) if dedup else None
        if same is None:
            kept.append(r)
        elif kept[same].get("stop_token") == NO_END and r.get("stop_token") != NO_END:
            kept[same] = r  # the text once finished and once cut at max_tokens: the finished one, with its end
    out = []
    for pid in sorted(by_problem):
        cands = by_problem[pid]
        if len(cands) > max_solutions_per_problem:
            rng = random.Random(f"{seed}/{pid}")
            cands = sorted(rng.sample(cands, max_solutions_per_problem), key=lambda r: r["sample_index"])
        out += cands
    schema = pa.schema([("id", pa.string()), ("sample_index", pa.int64()), ("prompt", pa.string()),
                        ("completion", pa.string()), ("stop_token", pa.int64())])
    return pa.Table.from_pylist([{k: r.get(k, -1) for k in schema.names} for r in out], schema=schema)


def problem_stats(samples: pa.Table, kept: pa.Table, iteration: int, keep_truncated: bool = False) -> pa.Table:
    """Per problem: samples drawn, correct, distinct correct, kept (which problems the model can solve). Correct
    counts what `select` may keep: a correct sample max_tokens cut is counted apart (`correct_truncated`), so that
    it neither marks the problem solved (`first_solved`) nor makes it look easy to the adaptive E-step's prior."""
    drawn: dict[str, list] = {}
    ok = keepable(samples, keep_truncated)
    for r, keeps in zip(samples.select(["id", "completion", "reward"]).to_pylist(), ok):
        d = drawn.setdefault(r["id"], [0, 0, set(), 0])
        d[0] += 1
        if r["reward"] >= 1.0 and not keeps:
            d[3] += 1
        elif r["reward"] >= 1.0:
            d[1] += 1
            d[2].add(same_solution_key(r["completion"]))
    n_kept: dict[str, int] = {}
    for pid in kept["id"].to_pylist():
        n_kept[pid] = n_kept.get(pid, 0) + 1
    return pa.Table.from_pylist([
        {"id": pid, "iteration": iteration, "drawn": d[0], "correct": d[1], "distinct_correct": len(d[2]),
         "kept": n_kept.get(pid, 0), "pass_rate": d[1] / d[0], "correct_truncated": d[3]}
        for pid, d in sorted(drawn.items())])
