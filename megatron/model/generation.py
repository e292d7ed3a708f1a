"""Sampling from a GPT: logits filtering (temperature, top-k, top-p) and the token loop, with a KV cache or
recomputing the whole sequence each step (the reference the cache must match).

Shape legend: B batch, S prompt, N new tokens, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.model.attention import KVCache
from megatron.model.gpt import GPT


def filter_logits(logits_BV: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
                  ) -> torch.Tensor:
    """Logits divided by the temperature, with -inf outside the k largest (0: no limit) and outside the nucleus:
    the fewest most likely tokens whose probabilities sum to at least top_p (the most likely is always kept)."""
    logits_BV = logits_BV / temperature
    if top_k > 0:
        kth_B1 = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[..., -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        mass_before_BV = probs_BV.cumsum(dim=-1) - probs_BV  # what the more likely tokens already cover
        drop_BV = torch.zeros_like(mass_before_BV, dtype=torch.bool).scatter(-1, order_BV, mass_before_BV >= top_p)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    return logits_BV


def next_token(logits_BV: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None) -> torch.Tensor:
    """[B] token ids: the most likely at temperature 0, else a draw from the filtered distribution."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = F.softmax(filter_logits(logits_BV, temperature, top_k, top_p).float(), dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def pad_batch(rows: list[torch.Tensor], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as one batch [B, S] (S the longest) padded with 0 on `side`, and its
    attention mask (1: a token). `generate` wants left padding: every row's next token follows the last column."""
    width = max(len(row) for row in rows)
    tokens_BS = torch.zeros(len(rows), width, dtype=torch.long)
    mask_BS = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        tokens_BS[b, span], mask_BS[b, span] = torch.as_tensor(row, dtype=torch.long), 1
    return tokens_BS, mask_BS


@torch.no_grad()
def generate(model: GPT, prompt_BS: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, generator: torch.Generator | None = None, use_cache: bool = True,
             vocab_size: int | None = None,
             attention_mask_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt and new tokens [B, S + N], the logits each new token was drawn from [B, N, V]).

    With the cache the prompt runs once (prefill) and then each new token alone; without, the whole sequence
    runs again every step. `vocab_size`: the tokenizer's, so the embedding's padding rows are never drawn.
    `attention_mask_BS`: prompts of different lengths, left-padded (0 for padding), so that every row's next
    token follows the last column."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected at least 1, got {max_new_tokens}")
    if prompt_BS.shape[1] < 1:
        raise ValueError("prompt: expected at least one token")
    limit = model.cfg.max_position_embeddings
    if prompt_BS.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt of {prompt_BS.shape[1]} tokens + max_new_tokens {max_new_tokens} exceed the "
                         f"model's max_position_embeddings {limit}")
    if attention_mask_BS is not None and not bool(attention_mask_BS[:, -1].all()):
        raise ValueError("attention_mask: generation needs left padding (each row's prompt ending in the last column)")
    cache = KVCache(len(model.blocks)) if use_cache else None
    tokens_BS, step_logits, mask_BT = prompt_BS, [], attention_mask_BS
    new_BS = prompt_BS  # what the model has not seen yet
    for step in range(max_new_tokens):
        if mask_BT is not None and step > 0:  # the token drawn last step is a token in every row
            mask_BT = torch.cat([mask_BT, mask_BT.new_ones(mask_BT.shape[0], 1)], dim=1)
        logits_BSV, _ = model(new_BS if use_cache else tokens_BS, cache=cache, attention_mask_BT=mask_BT)
        logits_BV = logits_BSV[:, -1].float()
        if vocab_size is not None:
            logits_BV[:, vocab_size:] = float("-inf")
        step_logits.append(logits_BV)
        new_BS = next_token(logits_BV, temperature, top_k, top_p, generator)[:, None]
        tokens_BS = torch.cat([tokens_BS, new_BS], dim=1)
    return tokens_BS, torch.stack(step_logits, dim=1)
