"""Metrics shared by deactivation and evaluation (METHOD.md section 7)."""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


def batches_by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding); order does not change results."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(seqs: list[list[int]], pad_id: int, device, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids.to(device), mask.to(device)


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], max_length: int = 512, batch_size: int = 8,
               desc: str = "ppl") -> dict[str, float]:
    """PPL = exp(sum of token NLLs / predicted tokens) over all lines; each line scored on its own,
    its first token not predicted, padding never counted."""
    seqs = tokenize(tokenizer, texts, max_length)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for idx in tqdm(batches_by_length([len(s) for s in seqs], batch_size), desc=desc, leave=False):
        ids, mask = pad_batch([seqs[i] for i in idx], tokenizer.pad_token_id, device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tok_nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        valid = mask[:, 1:].bool()
        nll += float(tok_nll[valid].double().sum())
        count += int(valid.sum())
    return {"ppl": math.exp(nll / count) if count else float("nan"), "tokens": count}
