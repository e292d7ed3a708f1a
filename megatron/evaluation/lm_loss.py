"""Loss and perplexity of a language model on a prepared corpus (.bin/.idx), for held-out text.

Shape legend: B windows in a batch, S sequence.

The corpus is read as GPT-NeoX lays it out, one stream of tokens in document order (end-of-document
tokens included); window j is `tokens[j*S : j*S + S + 1]`, so consecutive windows share one token and
every token after the first is predicted exactly once. Windows are taken in order from the start, with no
shuffling, so two checkpoints evaluated with the same settings see the same tokens.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from megatron.data.indexed_dataset import MMapIndexedDataset


def window_count(num_tokens: int, seq_length: int) -> int:
    return max(0, (num_tokens - 1) // seq_length)


@torch.no_grad()
def corpus_loss(model: nn.Module, prefix: str, seq_length: int, batch_size: int, batches: int | None,
                vocab_size: int) -> dict[str, float]:
    """{"loss" (mean nats per predicted token), "ppl", "tokens", "windows"} over the first `batches` x
    `batch_size` windows (all of them when `batches` is None)."""
    tokens = MMapIndexedDataset(prefix).tokens
    available = window_count(len(tokens), seq_length)
    wanted = available if batches is None else min(available, batches * batch_size)
    if wanted == 0:
        raise ValueError(f"{prefix}: {len(tokens)} tokens, fewer than one window of seq_length {seq_length} + 1")
    top = int(np.max(tokens[:wanted * seq_length + 1]))
    if top >= vocab_size:
        raise ValueError(f"{prefix}: token id {top} >= the model's vocabulary {vocab_size} (another tokenizer's data?)")
    total, count = 0.0, 0
    model.eval()
    for start in range(0, wanted, batch_size):
        rows = range(start, min(start + batch_size, wanted))
        batch_BS1 = torch.from_numpy(np.stack([tokens[j * seq_length:j * seq_length + seq_length + 1]
                                               for j in rows]).astype(np.int64))
        mean_loss, _ = model(batch_BS1[:, :-1], batch_BS1[:, 1:])  # the model's own loss path (model/loss.py)
        total += float(mean_loss) * batch_BS1[:, 1:].numel()
        count += batch_BS1[:, 1:].numel()
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count, "windows": wanted}
