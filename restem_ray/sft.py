"""Supervised fine-tuning pieces shared by the base-model build and the M-step.

Loss is on completion tokens only (paper Sec. 3): the prompt is context, labels there are -100.
"""
from __future__ import annotations

import math

import torch

from .selection import NO_END

IGNORE = -100


def _end(tokenizer, end: int | None) -> list[int]:
    """The token a row ends with: `end`, EOS by default, none for a completion cut at max_tokens (NO_END)."""
    return [] if end == NO_END else [tokenizer.eos_token_id if end is None else end]


def encode(tokenizer, prompt: str, completion: str, max_len: int | None = None,
           end: int | None = None, special_tokens_kept: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and labels for prompt+completion+`end` (default: EOS; NO_END: none), prompt masked; left-truncated
    to max_len if given (the M-step gives none: it drops over-long rows instead, since a cut row teaches a headless
    solution). `special_tokens_kept`: the completion was decoded with its special tokens (completion_ids)."""
    p = tokenizer(prompt).input_ids  # with BOS, exactly as vLLM tokenizes the prompt
    c = completion_ids(tokenizer, prompt, p, completion, special_tokens_kept=special_tokens_kept) + _end(tokenizer, end)
    ids, labels = p + c, [IGNORE] * len(p) + c
    return (ids[-max_len:], labels[-max_len:]) if max_len else (ids, labels)


def encode_many(tokenizer, rows: list[tuple[str, str, int | None]], block: int = 1024,
                special_tokens_kept: bool = False) -> list[tuple[list[int], list[int]]]:
    """`encode(tokenizer, prompt, completion, end=end)` of each (prompt, completion, end), the same ids, faster: each
    distinct prompt is tokenized once (a problem's kept solutions share it) and texts go to the tokenizer in
    batches (a fast tokenizer encodes a batch on all cores). The M-step's 75,000 rows took 3.9 ms each, on
    every rank."""
    prompts = list(dict.fromkeys(p for p, _, _ in rows))
    prompt_ids = dict(zip(prompts, _tokenized(tokenizer, prompts, block)))
    out = []
    for at in range(0, len(rows), block):
        part = rows[at: at + block]
        for (p, c, end), whole in zip(part, _tokenized(tokenizer, [p + c for p, c, _ in part], block)):
            head = prompt_ids[p]
            tail = completion_ids(tokenizer, p, head, c, whole=whole,
                                  special_tokens_kept=special_tokens_kept) + _end(tokenizer, end)
            out.append((head + tail, [IGNORE] * len(head) + tail))
    return out


def _tokenized(tokenizer, texts: list[str], block: int) -> list[list[int]]:
    """Each text's input_ids, as `tokenizer(text).input_ids` gives them, asked in batches of `block`."""
    return [ids for at in range(0, len(texts), block) for ids in tokenizer(texts[at: at + block]).input_ids]


def completion_ids(tokenizer, prompt: str, prompt_ids: list[int], completion: str,
                   whole: list[int] | None = None, special_tokens_kept: bool = False) -> list[int]:
    """The completion's tokens as they follow the prompt: the tail of prompt+completion tokenized as one text,
    where its head is the prompt's own tokens. Tokenized alone, a SentencePiece tokenizer (Llama-2, Mistral)
    starts the completion with its word-boundary "▁", so every trained solution would begin with a space or
    a token the model never wrote. Where the two texts merge across the boundary (a prompt that ends in a
    space) or the tokenizer appends a special token, the prompt keeps the tokens vLLM gave it and the completion
    is tokenized after a newline, whose own tokens are then dropped (so not at the start of a text either)."""
    if whole is None:  # (prompt + completion's own ids, where the caller has them)
        whole = tokenizer(prompt + completion).input_ids
    n = len(prompt_ids)
    # A special token's text inside the completion (the model wrote "<|im_end|>" piece by piece; vLLM decodes
    # without special tokens, so a sample holds no real one) stays text: parsed as the token, the M-step would
    # train the end of turn mid-answer. Samples decoded with their special tokens (sampling.skip_special_tokens
    # false: gpt-oss's channels) hold the real ones, which the model writes far likelier than their pieces.
    split = not special_tokens_kept and _holds_special_text(tokenizer, completion)
    if whole[:n] == prompt_ids and not split:
        return whole[n:]
    anchor = tokenizer("\n", add_special_tokens=False).input_ids
    after = tokenizer("\n" + completion, add_special_tokens=False, split_special_tokens=split).input_ids
    if after[:len(anchor)] == anchor:
        return after[len(anchor):]
    # (the newline merged with the completion)
    return tokenizer(completion, add_special_tokens=False, split_special_tokens=split).input_ids


def _holds_special_text(tokenizer, text: str) -> bool:
    return any(t in text for t in _special_texts(tokenizer))


def _special_texts(tokenizer) -> tuple[str, ...]:
    """The texts of the tokenizer's special added tokens, read once per tokenizer (transformers rebuilds
    `added_tokens_decoder` on every access: 86 us a row with Llama-3's 256 reserved tokens). Empty where the
    tokenizer has no such table (mistral_common's backend raises) or cannot split them: its tokens as they are."""
    texts = getattr(tokenizer, "_restem_special_texts", None)
    if texts is None:
        try:
            table = tokenizer.added_tokens_decoder
            texts = tuple(sorted({t.content for t in table.values() if t.special and t.content}))
            tokenizer("x", add_special_tokens=False, split_special_tokens=True)
        except Exception:
            texts = ()
        try:
            tokenizer._restem_special_texts = texts
        except AttributeError:
            pass
    return texts


def pad_id(tokenizer) -> int:
    """The id padded positions get: the tokenizer's pad token, else its EOS (Llama-3's tokenizers have no pad
    token). Padding is masked out of attention and loss, so its id changes nothing."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token")
    return pid


def end_ids(model, tokenizer, extra: tuple[int, ...] = ()) -> list[int]:
    """What generation stops on, as in vLLM: the tokenizer's EOS, every EOS id of the model's generation_config
    (an instruct model's end of turn, e.g. Llama-3's <|eot_id|> beside <|end_of_text|>) and `extra`
    (sampling.stop_token_ids)."""
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return list(dict.fromkeys(eos + ids + list(extra)))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest row rounded up to `multiple`; attention_mask marks real tokens.

    On GPUs a multiple such as 64 keeps the set of shapes small (cuDNN's attention, when on, builds a plan per
    new shape: 12-14 ms of CPU per call measured on an H200) and matmuls prefer aligned sizes."""
    width = round_up(max(len(ids) for ids, _ in batch), multiple)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.as_tensor(x)  # (lists, or the M-step's int32 arrays)
        labels[i, : len(y)] = torch.as_tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def length_grouped_batches(lengths: list[int], batch_size: int, generator: torch.Generator,
                           partial_last: bool = False) -> list[list[int]]:
    """Shuffle, then sort within windows of 50 batches by length so padding stays small. `partial_last`: the one
    partial batch comes last (plan_epoch's): shuffled in among the others, it shifted every later batch of
    plan_epoch's order across two length groups (real tokens 85% of a padded step instead of 96%: 1000 rows, 32 a
    global batch). (The built-in base model's build keeps the order it was built with.)"""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * 50
    batches = []
    for s in range(0, len(order), window):
        chunk = sorted(order[s : s + window], key=lambda i: lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    tail = [batches.pop()] if partial_last and batches and len(batches[-1]) < batch_size else []
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm] + tail


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up then cosine decay to 10% of peak."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def micro_steps_per_epoch(rows: int, micro_batch_size: int, world: int, grad_accum: int) -> int:
    """Micro-steps in an epoch of `rows`: whole global batches (the last one filled), rounded up to whole
    optimizer steps."""
    n_micro = -(-rows // (micro_batch_size * world))
    return -(-n_micro // grad_accum) * grad_accum


def steps_per_epoch(rows: int, micro_batch_size: int, world: int, grad_accum: int) -> int:
    """Optimizer steps in an epoch of `rows`."""
    return micro_steps_per_epoch(rows, micro_batch_size, world, grad_accum) // grad_accum


def plan_epoch(lengths: list[int], micro_batch_size: int, world: int, grad_accum: int, seed: int) -> list[list[list[int]]]:
    """One epoch's micro-steps, each a list of `world` per-rank index lists.

    Length-grouped global batches (little padding), split across ranks; like DistributedSampler(drop_last=False)
    the last global batch is filled by repeating rows and the count is rounded up to whole optimizer steps, so
    every rank takes the same number of steps and no selected sample is dropped. Deterministic in `seed`, so a
    resumed worker replays exactly the micro-steps it had not done.
    """
    g = torch.Generator().manual_seed(seed)
    global_batch = micro_batch_size * world
    order = [i for b in length_grouped_batches(lengths, global_batch, g, partial_last=True) for i in b]
    n_micro = micro_steps_per_epoch(len(order), micro_batch_size, world, grad_accum)
    while len(order) < n_micro * global_batch:
        order += order[: n_micro * global_batch - len(order)]
    steps = []
    for s in range(n_micro):
        idx = order[s * global_batch : (s + 1) * global_batch]
        steps.append([idx[r::world] for r in range(world)])
    return steps


def pack(samples: list[tuple[list[int], list[int]]], pack_length: int) -> list[list[int]]:
    """First-fit decreasing: sample indices per row of at most `pack_length` tokens (a longer sample gets its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(samples)), key=lambda i: -len(samples[i][0])):
        n = len(samples[i][0])
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(pack_length - n)
    return rows


def packed_row_length(attn_implementation: str | None, pack_length: int | None) -> int | None:
    """Tokens per packed row for this attention kernel. transformers' flash-attention path finds sample
    boundaries from the position ids only in a one-row batch (`_is_packed_sequence`: batch size 1); given
    several packed rows it runs causal attention over each whole row, so samples would attend to the ones before
    them. With a flash kernel a micro-batch is therefore one row (its variable-length kernel costs the same);
    other kernels (sdpa, eager) build a block-diagonal mask per row, whose size pack_length bounds."""
    return None if attn_implementation and "flash" in attn_implementation else pack_length


def uses_varlen_kwargs(attn_implementation: str | None) -> bool:
    """Flash-attention kernels take packed samples' boundaries as `cu_seq_lens_q/k` and `max_length_q/k`."""
    return bool(attn_implementation) and "flash" in attn_implementation


def collate_micro(samples: list[tuple[list[int], list[int]]], pad_id: int, packed: bool = False,
                  pack_length: int | None = None, multiple: int = 1, varlen: bool = False) -> dict:
    """A micro-batch as model inputs plus `real_tokens` (non-padding count).

    packed: samples are concatenated into rows with position ids restarting at 0 per sample and no
    attention mask, which transformers turns into block-diagonal attention (no attention across samples;
    flash-attention's variable-length kernel on GPUs). The loss is the same mean over completion tokens as
    the padded batch's.
    varlen (a flash kernel): also the boundaries of every sample in the flattened batch (a padding tail is one
    more sequence) as `cu_seq_lens_q/k` (int32) and the longest as `max_length_q/k` (ints), known here on the
    host. Given only position ids, transformers finds the boundaries again in every attention layer, forward and
    recomputed, with three device-to-host syncs each (`_is_packed_sequence`, `nonzero`, a 0-d tensor as max
    length: transformers 5.19); padded rows too, where a micro-batch is one row (its mask is dropped, and the
    model's own position ids are then checked for packing: one sync per layer).
    """
    real = sum(len(x) for x, _ in samples)
    if not packed:
        out = collate(samples, pad_id, multiple)
        out["real_tokens"] = torch.tensor(real)
        if varlen:  # each row's real tokens are one sequence, its padding tail another
            width = out["input_ids"].shape[1]
            bounds = [0]
            for r, (x, _) in enumerate(samples):
                bounds += [r * width + len(x)] + ([(r + 1) * width] if len(x) < width else [])
            out |= _varlen(bounds)
        return out
    rows = pack(samples, pack_length or real)  # no length given: the whole micro-batch is one row
    width = round_up(max(sum(len(samples[i][0]) for i in row) for row in rows), multiple)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    bounds = [0]  # every sequence's end in the flattened batch (varlen)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            x, y = samples[i]
            ids[r, at : at + len(x)] = torch.as_tensor(x)
            labels[r, at : at + len(y)] = torch.as_tensor(y)
            pos[r, at : at + len(x)] = torch.arange(len(x))
            at += len(x)
            bounds.append(r * width + at)
        pos[r, at:] = torch.arange(width - at)  # the padding tail is one more (masked-out) sequence
        if at < width:
            bounds.append((r + 1) * width)
    out = {"input_ids": ids, "labels": labels, "position_ids": pos, "real_tokens": torch.tensor(real)}
    if varlen:
        out |= _varlen(bounds)
    return out


def _varlen(bounds: list[int]) -> dict:
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def decode_continuation(tokenizer, prompt_ids: list[int], ids: list[int], skip_special_tokens: bool = True) -> str:
    """The text `ids` add after `prompt_ids`, as vLLM's detokenizer gives a sample (it decodes with the prompt
    as context): SentencePiece decoders (Llama-2, Mistral, CodeLlama) strip a leading space from text decoded on
    its own, and a code completion's indentation lost a space (an IndentationError graded wrong)."""
    skip = skip_special_tokens
    head = tokenizer.decode(prompt_ids, skip_special_tokens=skip)
    whole = tokenizer.decode(prompt_ids + ids, skip_special_tokens=skip)
    return whole[len(head):] if whole.startswith(head) else tokenizer.decode(ids, skip_special_tokens=skip)


def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int, stop: tuple[str, ...] = (),
                       synced: bool = False, batch: int = 64, stop_token_ids: tuple[int, ...] = (),
                       skip_special_tokens: bool = True) -> list[str]:
    """Greedy decoding with HF generate (base-model build and in-training validation; runs sample with vLLM).

    synced: DeepSpeed ZeRO-3 gathers parameters inside every forward, so all ranks must keep stepping until
    the slowest finishes (the caller gives every rank the same number of prompts).
    """
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:  # the tokenizer pads only with a pad token (Llama-3 has none): EOS, masked, for this call
        tokenizer.pad_token = tokenizer.eos_token
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ends = end_ids(model, tokenizer, stop_token_ids)
    texts = []
    # vLLM decodes with the SamplingParams it is given; generate would add the model's own generation_config
    # knobs (Qwen2.5-Instruct's repetition_penalty 1.05, ...): validation would pick by another decoder
    from transformers import GenerationConfig

    # (a LoRA PeftModel's generate hands its generation_config to the base model: both are set and restored)
    holders = [model] + ([model.get_base_model()] if hasattr(model, "get_base_model") else [])
    own = [h.generation_config for h in holders]
    for h in holders:
        h.generation_config = GenerationConfig()
    try:
        with torch.no_grad():
            for s in range(0, len(prompts), batch):
                enc = tokenizer(prompts[s : s + batch], return_tensors="pt", padding=True).to(device)
                # stop strings end a row as vLLM's do (a few-shot base model writes the next "Question:" on to
                # max_new_tokens otherwise); the text is still cut at them below
                criteria = ([_StopStrings(tokenizer, stop, enc.input_ids.shape[1], skip_special_tokens)]
                            if any(stop) else None)
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, synced_gpus=synced,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=ends,
                                     stopping_criteria=criteria)
                new = out[:, enc.input_ids.shape[1]:]
                texts += [decode_continuation(tokenizer, ids[mask.bool()].tolist(), _before_end(row.tolist(), ends),
                                              skip_special_tokens)
                          for ids, mask, row in zip(enc.input_ids, enc.attention_mask, new)]
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad
        for h, config in zip(holders, own):
            h.generation_config = config
        model.train(was_training)
    return [_cut(t, stop) for t in texts]


class _StopStrings:
    """A generate stopping criterion: a row is done once its completion holds a stop string. Only the completion
    is looked at, as vLLM does (transformers' own stop_strings also match text that began in the prompt: a prompt
    ending "A:" and the stop "::" stopped at the first ":"), and only its last tokens, enough to hold the
    longest stop string, are decoded at each step."""

    def __init__(self, tokenizer, stop: tuple[str, ...], prompt_len: int, skip_special_tokens: bool = True):
        self.tok, self.stop, self.start = tokenizer, tuple(x for x in stop if x), prompt_len
        self.skip = skip_special_tokens  # (vLLM matches stop strings in the text as it decodes it)
        self.window = max(map(len, self.stop)) + 2  # tokens: every token holds a character or more (or a byte)

    def __call__(self, input_ids, scores, **kwargs):
        tail = input_ids[:, max(self.start, input_ids.shape[1] - 4 * self.window):]
        texts = self.tok.batch_decode(tail, skip_special_tokens=self.skip)
        return torch.tensor([any(x in t for x in self.stop) for t in texts], dtype=torch.bool,
                            device=input_ids.device)


def _before_end(ids: list[int], ends) -> list[int]:
    """A generated row up to its end token, which vLLM leaves out of a sample's text too (and the padding after
    it): what special tokens a decode keeps (sampling.skip_special_tokens false) are the ones the model wrote."""
    ends = {ends} if isinstance(ends, int) else set(ends or ())
    return next((ids[:i] for i, t in enumerate(ids) if t in ends), ids)


def _cut(text: str, stop: tuple[str, ...]) -> str:
    for s in stop:
        if s and s in text:
            text = text[: text.index(s)]
    return text


def forward(model, batch: dict[str, torch.Tensor]):
    """The training forward. use_cache=False matters: with a KV cache transformers ignores the packed
    position ids and lets packed samples attend to each other (measured with transformers 5.19)."""
    return model(**batch, use_cache=False)
