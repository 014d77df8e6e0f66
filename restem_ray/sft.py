"""Supervised fine-tuning pieces shared by the base-model build and the M-step.

Loss is on completion tokens only (paper Sec. 3): the prompt is context, labels there are -100.
"""
from __future__ import annotations

import math

import torch

IGNORE = -100


def encode(tokenizer, prompt: str, completion: str, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels for prompt+completion+eos, prompt masked; left-truncated to max_len."""
    p = tokenizer(prompt).input_ids  # with BOS, exactly as vLLM tokenizes the prompt
    c = tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids, labels = p + c, [IGNORE] * len(p) + c
    return ids[-max_len:], labels[-max_len:]


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; attention_mask marks real tokens."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def length_grouped_batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffle, then sort within windows of 50 batches by length so padding stays small."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * 50
    batches = []
    for s in range(0, len(order), window):
        chunk = sorted(order[s : s + window], key=lambda i: lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up then cosine decay to 10% of peak."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
