"""Grades the infrastructure could not give (issue 19, item 5): counted per kind in the E-step line, and a
shard made mostly of them stops the run with one line (exit 1) instead of being trained on as zeros."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from restem_ray.config import config_from_dict, dump_config
from restem_ray.driver import Driver
from restem_ray.errors import RunError
from restem_ray.storage import RunDir
from restem_ray.verdicts import check_infra_errors, is_infra, verdict_counts

HERE = Path(__file__).parent


def test_infra_verdicts_and_the_threshold():
    assert is_infra("sandbox_error") and is_infra("verifier_error:RuntimeError")
    assert not any(map(is_infra, ["passed", "wrong_answer", "timeout", "runtime_error", "no_answer", "invalid_sample"]))
    ok = ["passed", "wrong_answer", "timeout", "sandbox_error"]
    check_infra_errors(ok, 0.5, "shard 0")                               # 1 of 4
    check_infra_errors(["sandbox_error", "passed"], 0.5, "shard 0")     # exactly the share: allowed
    check_infra_errors(["sandbox_error"] * 3, 1.0, "shard 0")           # 1.0 turns the stop off
    check_infra_errors([], 0.0, "shard 0")
    with pytest.raises(RunError, match=r"shard 7: 2 of 3 grades .*sandbox_error: 1.*max_infra_error_rate=0.5"):
        check_infra_errors(["sandbox_error", "verifier_error:KeyError", "passed"], 0.5, "shard 7")
    with pytest.raises(RunError):
        check_infra_errors(["verifier_error:KeyError", "passed", "passed"], 0.0, "shard 0")
    assert verdict_counts(["passed", "wrong_answer", "passed"]) == {"passed": 2, "wrong_answer": 1}
    # an E-step's shards judged with the grades before them: a late adaptive round's shard of one row, its one
    # grade failed, is not a broken verifier (it stopped the run, and every resume, at rate 1 of 1) ...
    from collections import Counter

    seen = Counter()
    check_infra_errors(["passed"] * 40, 0.5, "shard 0", before=seen)
    check_infra_errors(["sandbox_error"], 0.5, "shard r007", before=seen)
    assert seen == {"sandbox_error": 1, "all": 41}
    fresh = Counter()  # ... nor is it on a resume that starts there: too few grades to judge
    check_infra_errors(["sandbox_error"], 0.5, "shard r007", before=fresh)
    # ... but small shards that keep failing add up, and a large one is judged on its own
    with pytest.raises(RunError, match=r"shard r009: 16 of 16 grades of this E-step are verifier/sandbox failures "
                                       r"\(sandbox_error: 16\)"):
        for _ in range(16):
            check_infra_errors(["sandbox_error"], 0.5, "shard r009", before=fresh)
    with pytest.raises(RunError, match=r"shard 1: 20 of 20 grades are"):
        check_infra_errors(["sandbox_error"] * 20, 0.5, "shard 1", before=Counter({"all": 1000}))


def test_config_default_and_bounds():
    base = {"task": {"train_file": "t", "valid_file": "v"}, "model": {"base": "m"}}
    cfg = config_from_dict(base)
    assert cfg.verification.max_infra_error_rate == 0.5 and cfg.selection.keep_truncated is False
    with pytest.raises(Exception, match="max_infra_error_rate"):
        config_from_dict({**base, "verification": {"max_infra_error_rate": 1.5}})


# ---------------------------------------------------------------- Driver.generate / select without Ray
class FakePool:
    """Stands in for EStepPool: delivers given graded shards through the driver's on_chunk."""
    nodes = ["node-a"]

    def __init__(self, shards):
        self.shards = shards

    def run(self, chunks, spec, *, on_chunk, desc, on_piece=None):
        assert len(chunks) == len(self.shards)
        for i, rows in enumerate(self.shards):
            on_chunk(i, rows)


class FakeSamplers:
    def __init__(self, pool):
        self.pool = pool

    def get(self, model):
        return self.pool


def row(pid, i, verdict, finish="stop"):
    return {"id": pid, "sample_index": i, "prompt": "Q", "completion": f"c{i}", "reward": float(verdict == "passed"),
            "verdict": verdict, "prompt_tokens": 1, "completion_tokens": 3, "finish_reason": finish}


def driver(tmp_path, shards, **sections):
    cfg = config_from_dict({"task": {"train_file": "t", "valid_file": "v"}, "model": {"base": "m"},
                            "sampling": {"prompts_per_request": 1, "samples_per_problem": 3},
                            "observability": {"tensorboard": False}} | sections)
    d = Driver.__new__(Driver)  # the phases alone: no data files, no Ray
    d.cfg, d.run, d.step_checker = cfg, RunDir(tmp_path / "run"), None
    d.train = [{"id": pid, "prompt": "Q", "answer": "1"} for pid in ("a", "b")][: len(shards)]
    d.samplers = FakeSamplers(FakePool(shards))
    d.run.create(dump_config(cfg), resume=False)
    return d


def test_e_step_line_counts_verdicts_and_truncation_and_select_drops_truncated(tmp_path):
    shards = [[row("a", 0, "passed"), row("a", 1, "passed", "length"), row("a", 2, "wrong_answer", "length")],
              [row("b", 0, "passed", "length"), row("b", 1, "sandbox_error"), row("b", 2, "no_answer")]]
    d = driver(tmp_path, shards)
    samples = d.generate(1, "m")
    d.select(1, samples)
    gen, sel = [m for m in d.run.metrics() if m["phase"] in ("generate", "select")]
    assert gen["verdicts"] == {"passed": 3, "wrong_answer": 1, "sandbox_error": 1, "no_answer": 1}
    assert gen["truncated"] == 3 and gen["correct"] == 3
    # two of the three correct were cut: selection can accept one sample of six
    assert gen["correct_truncated"] == 2 and gen["accept_rate"] == pytest.approx(1 / 6)
    assert sel["kept"] == 1 and sel["truncated_correct_dropped"] == 2
    kept = pq.read_table(d.run.iter_dir(1) / "train.parquet").to_pylist()
    assert [(r["id"], r["sample_index"]) for r in kept] == [("a", 0)]


def test_a_step_checker_stuck_on_a_sample_counts_it_as_wrong_steps_and_the_run_goes_on(tmp_path):
    """task.step_checker runs in the driver on every kept sample: bounded by verification.answer_timeout_s as a
    verifier plug-in is, a checker stuck on one completion (sympy on a pathological expression) counts that
    sample's steps as wrong instead of hanging the run; one that raises, likewise."""
    import time

    def checker(problem, completion):
        if completion == "c1":
            time.sleep(60)
        if completion == "c2":
            raise ValueError("cannot read it")
        return 1.0

    d = driver(tmp_path, [[row("a", i, "passed") for i in range(4)]], verification={"answer_timeout_s": 0.5},
               sampling={"prompts_per_request": 1, "samples_per_problem": 4},
               selection={"max_solutions_per_problem": 4})
    d.step_checker = checker
    start = time.monotonic()
    d.select(1, d.generate(1, "m"))
    assert time.monotonic() - start < 20
    (sel,) = [m for m in d.run.metrics() if m["phase"] == "select"]
    assert sel["kept"] == 4 and sel["kept_false_positive_rate"] == 0.5


def test_all_correct_samples_truncated_is_a_clear_stop(tmp_path):
    d = driver(tmp_path, [[row("a", 0, "passed", "length"), row("a", 1, "wrong_answer"), row("a", 2, "passed", "length")]])
    with pytest.raises(RunError, match="all 2 correct samples ended unfinished, most likely on sampling.max_tokens"):
        d.select(1, d.generate(1, "m"))


def test_a_shard_of_infra_errors_stops_the_e_step_before_it_is_saved(tmp_path):
    k = 20  # (a shard of fewer than MIN_GRADES rows is judged with the E-step's grades before it)
    sampling = {"prompts_per_request": 1, "samples_per_problem": k}
    good = [row("a", i, "passed") for i in range(k)]
    broken = [row("b", i, "sandbox_error" if i < 13 else "wrong_answer") for i in range(k)]
    d = driver(tmp_path, [good, broken], sampling=sampling)
    with pytest.raises(RunError, match="iteration 1, E-step shard part-00001: 13 of 20 grades"):
        d.generate(1, "m")
    assert sorted(p.name for p in d.run.samples_dir(1).iterdir()) == ["part-00000.parquet"]  # resume regrades it
    assert not d.run.done(1, "generate")
    d = driver(tmp_path / "tolerant", [good, broken], verification={"max_infra_error_rate": 0.7}, sampling=sampling)
    assert d.generate(1, "m").num_rows == 2 * k
    # three rows, two failed, after a good shard: too few to say the verifier is broken
    small = [row("b", 0, "sandbox_error"), row("b", 1, "sandbox_error"), row("b", 2, "wrong_answer")]
    d = driver(tmp_path / "small", [[row("a", i, "passed") for i in range(3)], small])
    assert d.generate(1, "m").num_rows == 6
    # small shards of failed grades are saved on probation until there are enough grades to judge: when the stop
    # comes, they go too, and the resume regrades them (a broken sandbox's zeros were kept)
    eight = {"prompts_per_request": 1, "samples_per_problem": 8}
    d = driver(tmp_path / "probation", [[row("a", i, "sandbox_error") for i in range(8)],
                                        [row("b", i, "sandbox_error") for i in range(8)]], sampling=eight)
    with pytest.raises(RunError, match="E-step shard part-00001: 16 of 16 grades of this E-step"):
        d.generate(1, "m")
    assert not list(d.run.samples_dir(1).iterdir())



def test_a_shard_on_probation_is_no_shard_until_judged_so_a_killed_driver_regrades_it(tmp_path):
    """A small shard with failed grades waits under a name no reader (nor the mirror) takes: a driver killed then
    leaves no shard that a resume would adopt unjudged. Once the E-step's grades are enough, it is a shard."""
    eight = {"prompts_per_request": 1, "samples_per_problem": 8}
    first = [row("a", i, "sandbox_error" if i < 2 else "passed") for i in range(8)]
    second = [row("b", i, "passed") for i in range(8)]

    class KilledAfterFirst(FakePool):
        def run(self, chunks, spec, *, on_chunk, desc, on_piece=None):
            on_chunk(0, first)
            raise KeyboardInterrupt  # (the driver's process ends here)

    d = driver(tmp_path, [first, second], sampling=eight)
    d.samplers = FakeSamplers(KilledAfterFirst([first, second]))
    with pytest.raises(KeyboardInterrupt):
        d.generate(1, "m")
    assert sorted(p.name for p in d.run.samples_dir(1).iterdir()) == ["part-00000.parquet.probation"]
    resumed = driver(tmp_path / "x", [first, second], sampling=eight)
    resumed.run = d.run  # the same run directory, a new driver process
    seen = []

    class Both(FakePool):
        def run(self, chunks, spec, *, on_chunk, desc, on_piece=None):
            seen.append(len(chunks))
            for i, rows in enumerate((first, second)):
                on_chunk(i, rows)
                names = sorted(p.name for p in resumed.run.samples_dir(1).iterdir())
                assert names == (["part-00000.parquet.probation"] if i == 0 else
                                 ["part-00000.parquet", "part-00001.parquet"]), names

    resumed.samplers = FakeSamplers(Both([first, second]))
    assert resumed.generate(1, "m").num_rows == 16 and seen == [2]  # both chunks sampled: none was adopted
    # a shard of 16 or more grades is judged alone: the ones on probation are judged with all the grades so far
    d = driver(tmp_path / "judged", [[row("a", i, "sandbox_error") for i in range(8)],
                                     [row("b", i, "passed") for i in range(16)]],
               sampling={"prompts_per_request": 1, "samples_per_problem": 16}, verification={"max_infra_error_rate": 0.2})
    with pytest.raises(RunError, match=r"E-step shard part-00000: 8 of 24 grades of this E-step are verifier/sandbox"):
        d.generate(1, "m")
    assert not list(d.run.samples_dir(1).iterdir())  # (the good one waited with it: a later shard always does)


def test_an_evaluation_graded_by_a_broken_verifier_is_not_a_score():
    """score_split (the driver's evaluations and `restem-ray eval`): greedy rows or pass@k samples mostly graded
    by a failing sandbox are a RunError naming the split, not a pass@1 of their zeros."""
    from restem_ray.evaluation import score_split

    problems = [{"id": "a", "prompt": "Q", "answer": "1"}, {"id": "b", "prompt": "Q", "answer": "1"}]
    greedy = [row("a", 0, "passed"), row("b", 0, "sandbox_error")]
    ok = score_split(FakePool([greedy]), problems, max_tokens=8, stop=(), chunk_size=2, max_infra_error_rate=0.5)
    # 1 of 2 is not more than half; the failed grade counts 0, and the verdicts say so
    assert ok == {"pass@1": 0.5, "problems": 2, "verdicts": {"passed": 1, "sandbox_error": 1}}
    with pytest.raises(RunError, match=r"^eval 0 valid: 1 of 2 grades .*sandbox_error: 1.*report their zeros"):
        score_split(FakePool([greedy]), problems, max_tokens=8, stop=(), chunk_size=2, max_infra_error_rate=0.4,
                    desc="eval 0 valid")
    sampled = [row("a", i, "verifier_error:ConnectionError") for i in range(4)] + [row("b", i, "passed") for i in range(2)]

    class TwoRuns(FakePool):
        def run(self, chunks, spec, *, on_chunk, desc, on_piece=None):
            on_chunk(0, greedy if spec.n == 1 else sampled)

    with pytest.raises(RunError, match=r"^eval pass@2: 4 of 6 grades"):
        score_split(TwoRuns([]), problems, max_tokens=8, stop=(), chunk_size=2, k=2, max_infra_error_rate=0.5)


def test_a_replica_that_fails_to_start_is_logged_with_its_cause(monkeypatch, capsys):
    import ray

    from restem_ray import pool as pool_mod

    def failing_get(ref):
        raise ray.exceptions.RayTaskError("ready", "traceback...\nRuntimeError: no CUDA device on this node",
                                          RuntimeError("no CUDA device on this node"))
    killed = []
    monkeypatch.setattr(pool_mod.ray, "get", failing_get)
    monkeypatch.setattr(pool_mod.ray, "kill", killed.append)
    p = pool_mod.EStepPool.__new__(pool_mod.EStepPool)
    removed = []
    monkeypatch.setattr(pool_mod, "remove_placement_group", removed.append)
    group = type("Group", (), {"id": "g1"})()
    placing = type("Group", (), {"id": "g2"})()  # the next one's bundle, being placed meanwhile
    p._starting, p._started_at, p.samplers, p.nodes = {"ref": "replica"}, {"ref": (0.0, group)}, [], []
    p._placing = (placing, "ready-ref", 0.0)
    p.extra_groups, p._add_failed = [group], False
    free = []
    p._started("ref", free)
    assert killed == ["replica"] and free == [] and p.samplers == [] and p._starting == p._started_at == {}
    # its bundle is given back (it held an accelerator until the pool closed), and no other replica is added
    assert removed == [group, placing] and p.extra_groups == [] and p._add_failed and p._placing is None
    assert ("could not start (RuntimeError: no CUDA device on this node) and was dropped; no more are added this "
            "E-step") in capsys.readouterr().out


# ---------------------------------------------------------------- the real thing: CLI, Ray, vLLM
@pytest.mark.slow
def test_a_verifier_that_fails_on_every_row_stops_the_run_with_one_line(tmp_path):
    """`restem-ray run` with a plug-in that raises on every row: exit 1, one line naming the cause and the
    setting, at the base's evaluation, the first grading of the run: nothing committed, no samples (a fixed
    verifier + --resume starts from there). The E-step's own check: the shard test above."""
    from restem_ray.builtin import TinyModelSpec, build_model, build_tokenizer

    model = tmp_path / "tiny"
    tok = build_tokenizer()
    build_model(TinyModelSpec(seed=5), tok).save_pretrained(model)
    tok.save_pretrained(model)
    problems = [{"id": f"p{i}", "prompt": f"Q: {i} + 1\nA:", "answer": str(i + 1)} for i in range(6)]
    valid = [{"id": f"v{i}", "prompt": f"Q: {i} + 2\nA:", "answer": str(i + 2)} for i in range(2)]
    for name, rows in (("train", problems), ("valid", valid)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"task": {"kind": "math", "train_file": "train.jsonl", "valid_file": "valid.jsonl"},
           "model": {"base": str(model)},
           "sampling": {"samples_per_problem": 2, "max_tokens": 8, "prompts_per_request": 3,
                        "engine_kwargs": {"dtype": "float32", "max_model_len": 128}},
           "verification": {"verifier": "broken_verifier:reward", "num_workers": 1},
           "loop": {"iterations": 1}, "observability": {"tensorboard": False}, "ray": {"num_cpus": 4}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, "-m", "restem_ray.cli", "run", str(tmp_path / "cfg.yaml"), "--out",
                        str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=600,
                       start_new_session=True)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    stops = [l for l in p.stderr.splitlines() if l.startswith("restem-ray: run stopped:")]
    assert len(stops) == 1, p.stderr[-3000:]
    assert stops[0].startswith("restem-ray: run stopped: eval 0 valid: 2 of 2 grades are verifier/sandbox failures "
                               "(verifier_error:ConnectionError: 2), more than verification.max_infra_error_rate=0.5; "
                               "stopped rather than report their zeros"), stops[0]
    assert "Traceback" not in p.stderr
    run = RunDir(tmp_path / "run")
    assert not (tmp_path / "run" / "iter_001").exists()
    assert run.manifest()["completed"] == {}


def test_a_calls_rows_are_graded_in_pieces_of_whole_problems_spread_over_the_verifiers():
    from restem_ray.pool import piece_sizes
    from restem_ray.sampling import SampleSpec, with_draw

    spec = SampleSpec(n=32, temperature=1.0, max_tokens=8, seed=0)
    problems = [{"id": str(i), "prompt": "Q"} for i in range(64)]
    assert piece_sizes(problems, spec, verifiers=256) == [2] * 32  # 2,048 samples: 64 a piece (the least)
    assert piece_sizes(problems, spec, verifiers=4) == [16] * 4    # an even share per actor
    assert piece_sizes(problems, spec, verifiers=1) == [64]
    # an adaptive round's draws: whole problems, one drawing more than a piece holds is a piece alone
    drawn = [with_draw(p, 0, n) for p, n in zip(problems[:5], (100, 10, 30, 30, 1))]
    assert piece_sizes(drawn, spec, verifiers=64) == [1, 2, 2]


def test_an_evaluation_gives_every_replica_call_slot_work():
    """A split is cut into calls of at most prompts_per_request problems, fewer where that leaves a replica's call
    slot idle (500 problems in calls of 256 kept 14 of 16 replicas idle)."""
    from restem_ray.evaluation import score_split

    class Sizes:
        def __init__(self):
            self.sizes = []

        def run(self, chunks, spec, *, on_chunk, desc, on_piece=None):
            self.sizes.append([len(c) for c in chunks])
            for i, c in enumerate(chunks):
                on_chunk(i, [row(p["id"], 0, "passed") for p in c])

    problems = [{"id": str(i), "prompt": "Q", "answer": "1"} for i in range(10)]
    for chunk_size, slots, want in ((64, 4, [3, 3, 3, 1]), (2, 4, [2] * 5), (64, 1, [10]), (64, 32, [1] * 10)):
        pool = Sizes()
        assert score_split(pool, problems, max_tokens=8, stop=(), chunk_size=chunk_size, slots=slots)["pass@1"] == 1.0
        assert pool.sizes == [want], (chunk_size, slots)



def test_one_verifier_actors_broken_sandbox_stops_the_e_step_though_its_shard_is_mostly_fine(tmp_path):
    """A call's rows are graded in pieces on several actors: one actor whose sandbox cannot start (sandbox_error
    on all its rows) is a minority of the shard, which its check passes; its piece is judged on its own. A
    plug-in's errors on some rows are the rows' (judged with the shard)."""
    sampling = {"prompts_per_request": 4, "samples_per_problem": 16}
    good = [row(p, i, "passed") for p in "abc" for i in range(16)]
    broken = [row("d", i, "sandbox_error") for i in range(16)]

    class Pieces(FakePool):
        def run(self, chunks, spec, *, on_chunk, desc, on_piece=None):
            for piece in self.shards:  # one chunk, graded in pieces by four actors
                on_piece(0, piece)
            on_chunk(0, [r for piece in self.shards for r in piece])

    d = driver(tmp_path, [[]], sampling=sampling)
    d.train = [{"id": pid, "prompt": "Q", "answer": "1"} for pid in "abcd"]
    d.samplers = FakeSamplers(Pieces([good[:16], good[16:32], good[32:], broken]))
    with pytest.raises(RunError, match=r"iteration 1, E-step shard part-00000: 16 of 16 grades by one verifier "
                                       r"actor are sandbox_error"):
        d.generate(1, "m")
    assert not list(d.run.samples_dir(1).iterdir())
    plugin = [row("d", i, "verifier_error:ValueError") for i in range(16)]
    d = driver(tmp_path / "plugin", [[]], sampling=sampling)
    d.train = [{"id": pid, "prompt": "Q", "answer": "1"} for pid in "abcd"]
    d.samplers = FakeSamplers(Pieces([good[:16], good[16:32], good[32:], plugin]))
    assert d.generate(1, "m").num_rows == 64
