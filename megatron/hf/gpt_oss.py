"""Hugging Face gpt-oss (`GptOssForCausalLM`, model_type gpt_oss) as our model, and back: the sliding window's rule
(the config and weight converters build on it)."""

from __future__ import annotations


def window_from_hf(sliding_window: int) -> int:
    """Our sliding_window_width for transformers' sliding_window w: theirs lets a query see itself and the w - 1
    keys before it (`kv > q - w`), ours itself and the `width` keys before it (`k >= q - width`), so ours is
    w - 1. A window of 1 (each token alone) has no width of ours (ours is at least 1)."""
    if sliding_window < 2:
        raise ValueError(f"sliding_window {sliding_window}: expected 2 or more (it counts the query itself)")
    return sliding_window - 1


def window_to_hf(sliding_window_width: int) -> int:
    """transformers' sliding_window for our sliding_window_width: the inverse of window_from_hf."""
    return sliding_window_width + 1
