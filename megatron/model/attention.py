"""Causal self-attention (multi-head and grouped-query, optional sliding window on all layers or by a pattern,
QK-norm, attention sinks), its KV cache for generation and the padding masks of batched generation.

Shape legend: B batch, S sequence (the new tokens), T keys (cached and new), D hidden, H query heads,
K key/value heads, Dh head dim, G query heads per key/value head (H / K).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron.model.rope import Rotary

if TYPE_CHECKING:
    from megatron.model.gpt import GPTConfig


class KVCache:
    """Every layer's keys and values of the tokens seen so far ([B, K, T, Dh] each, rotated), so that generation
    runs each new token alone through the model. Grows by concatenation; a sliding window masks, not trims."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def length(self, layer: int = 0) -> int:
        """Tokens this layer has seen: the position of the next one."""
        k = self.keys[layer]
        return 0 if k is None else k.shape[2]

    def extend(self, layer: int, k_BKSDh: torch.Tensor, v_BKSDh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends the new tokens' keys and values; returns all of them, [B, K, T, Dh]."""
        if self.keys[layer] is not None:
            k_BKSDh = torch.cat([self.keys[layer], k_BKSDh], dim=2)
            v_BKSDh = torch.cat([self.values[layer], v_BKSDh], dim=2)
        self.keys[layer], self.values[layer] = k_BKSDh, v_BKSDh
        return k_BKSDh, v_BKSDh


@dataclass
class Padding:
    """Padded rows (Hugging Face's attention_mask): each new token's position within its own row, and which
    keys hold tokens, so that padding neither shifts positions nor is attended to."""

    positions_BS: torch.Tensor
    keys_valid_BT: torch.Tensor  # bool: the cached keys, then the new ones

    @classmethod
    def from_mask(cls, attention_mask_BT: torch.Tensor, num_new: int) -> Padding:
        valid_BT = attention_mask_BT.bool()
        positions_BT = (valid_BT.long().cumsum(dim=-1) - 1).clamp(min=0)
        return cls(positions_BT[:, -num_new:], valid_BT)


def band_mask(num_queries: int, num_keys: int, window: int | None, device: torch.device,
              padding: Padding | None = None, always: bool = False) -> torch.Tensor | None:
    """Which keys each query sees, [S, T] bool: the queries are the last S of T positions; causal, and with a
    window only the `window` keys before a query (and itself), GPT-NeoX's flash window (w, 0) and Mistral's.
    With `padding`, [B, 1, S, T]: and only keys that hold tokens (a padding query sees itself, so that no row
    of the softmax is empty). None when plain causal attention over the whole sequence is meant (sdpa's
    is_causal path), unless `always`."""
    start = num_keys - num_queries
    if window is None and start == 0 and padding is None and not always:
        return None
    query_S1 = torch.arange(start, num_keys, device=device)[:, None]
    key_1T = torch.arange(num_keys, device=device)[None, :]
    allowed_ST = key_1T <= query_S1
    if window is not None:
        allowed_ST = allowed_ST & (key_1T >= query_S1 - window)
    if padding is None:
        return allowed_ST
    return (allowed_ST & padding.keys_valid_BT[:, None, None, :]) | (key_1T == query_S1)


def head_width(settings) -> int:
    """Each attention head's width: head_dim, or hidden_size split over the heads when it is unset. `settings`: a
    GPTConfig or the config's args (the fields have the same names in both)."""
    return settings.head_dim or settings.hidden_size // settings.num_attention_heads


class Attention(nn.Module):
    """Causal self-attention; with num_kv_heads < H, grouped-query: query head h reads K/V head h // (H / K).

    The fused projection's columns are [q (H Dh) | k (K Dh) | v (K Dh)], so K = H is the layout of multi-head
    checkpoints (`view(B, S, 3, H, Dh)`), and GPT-NeoX's GQA split."""

    def __init__(self, cfg: GPTConfig, layer_idx: int = 0):
        super().__init__()
        d, self.num_heads = cfg.hidden_size, cfg.num_attention_heads
        self.num_kv_heads = cfg.num_kv_heads or self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads {self.num_heads} is not divisible by num_kv_heads "
                             f"{self.num_kv_heads}")
        self.head_dim = head_width(cfg)  # H Dh may differ from D (gpt-oss)
        self.layer_idx = layer_idx  # its slot in a KVCache
        kv_width = self.num_kv_heads * self.head_dim
        q_width = self.num_heads * self.head_dim
        self.qkv = nn.Linear(d, q_width + 2 * kv_width, bias=cfg.use_bias_in_attn_linear)
        self.dense = nn.Linear(q_width, d, bias=cfg.use_bias_in_attn_linear)
        self.rotary = (
            Rotary(self.head_dim, cfg.rotary_pct, cfg.rotary_emb_base, cfg.max_position_embeddings, cfg.rope_scaling)
            if cfg.pos_emb == "rotary"
            else None
        )
        self.window = layer_window(cfg, layer_idx)
        # attention sinks (gpt-oss): one learned logit per query head, a softmax column with no value, so a head
        # may attend to nothing. Zero at init (transformers draws N(0, 0.02), as good as zero beside logits of
        # order 1): no random draw, so every other weight is the one the same seed gives without sinks
        self.sinks = nn.Parameter(torch.zeros(self.num_heads)) if cfg.attention_sinks else None
        if cfg.attention_sinks and cfg.attention_impl == "flash":
            raise ValueError("attention_sinks: true needs attention_impl: sdpa (flash-attn's kernel has no sink "
                             "logit)")
        # per-head RMSNorm of queries and keys (one weight of head_dim shared by the heads): bounds the attention
        # logits, as Qwen3 does; the norm's epsilon is the model's
        self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.dropout_p = cfg.attention_dropout
        self.use_flash = cfg.attention_impl == "flash"

    def forward(self, x_BSD: torch.Tensor, cache: KVCache | None = None,
                padding: Padding | None = None) -> torch.Tensor:
        B, S, D = x_BSD.shape
        H, K, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv(x_BSD).split([H * Dh, K * Dh, K * Dh], dim=-1)
        q_BHSDh = q.view(B, S, H, Dh).transpose(1, 2)
        k_BKSDh, v_BKSDh = k.view(B, S, K, Dh).transpose(1, 2), v.view(B, S, K, Dh).transpose(1, 2)
        if self.q_norm is not None:
            q_BHSDh, k_BKSDh = self.q_norm(q_BHSDh), self.k_norm(k_BKSDh)
        start = 0 if cache is None else cache.length(self.layer_idx)
        if self.rotary is not None:
            positions_BS = None if padding is None else padding.positions_BS
            q_BHSDh, k_BKSDh = self.rotary(q_BHSDh, start, positions_BS), self.rotary(k_BKSDh, start, positions_BS)
        if cache is not None:  # from here on T keys: the cached ones, then these S
            k_BKSDh, v_BKSDh = cache.extend(self.layer_idx, k_BKSDh, v_BKSDh)
        dropout_p = self.dropout_p if self.training else 0.0
        if self.sinks is not None:
            mask_ST = band_mask(S, k_BKSDh.shape[2], self.window, x_BSD.device, padding, always=True)
            out_BHSDh = attention_with_sinks(q_BHSDh, k_BKSDh, v_BKSDh, self.sinks, mask_ST, dropout_p)
            out_BSHDh = out_BHSDh.transpose(1, 2)
        elif self.use_flash and cache is None and padding is None:
            out_BSHDh = flash_attention(q_BHSDh, k_BKSDh, v_BKSDh, dropout_p, self.window)
        else:
            mask_ST = band_mask(S, k_BKSDh.shape[2], self.window, x_BSD.device, padding)
            out_BHSDh = F.scaled_dot_product_attention(q_BHSDh, k_BKSDh, v_BKSDh, attn_mask=mask_ST,
                                                       dropout_p=dropout_p, is_causal=mask_ST is None,
                                                       enable_gqa=K != H)
            out_BSHDh = out_BHSDh.transpose(1, 2)
        return self.dense(out_BSHDh.reshape(B, S, H * Dh))


def layer_window(cfg: GPTConfig, layer_idx: int) -> int | None:
    """The sliding window of layer `layer_idx`: sliding_window_width, unless sliding_window_pattern, repeated over
    the layers, makes this one a "full" layer (gpt-oss's layer_types alternate sliding and full)."""
    pattern = cfg.sliding_window_pattern
    if pattern is not None and any(kind not in ("sliding", "full") for kind in pattern):
        raise ValueError(f"sliding_window_pattern: {list(pattern)} (expected a list of 'sliding' and 'full')")
    if cfg.sliding_window_width is None or (pattern and pattern[layer_idx % len(pattern)] == "full"):
        return None
    return cfg.sliding_window_width


def attention_with_sinks(q_BHSDh: torch.Tensor, k_BKTDh: torch.Tensor, v_BKTDh: torch.Tensor, sinks_H: torch.Tensor,
                         allowed: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Softmax attention whose every row has one more logit, its head's sink, which takes probability mass and
    contributes no value (sdpa has no place for it). `allowed`: band_mask's [S, T] or [B, 1, S, T]. Query head
    h = k G + g reads K/V head k (G = H / K), so the heads are viewed as [K, G] and K/V are never repeated.
    The softmax is in fp32; returns [B, H, S, Dh] in the values' dtype."""
    B, H, S, Dh = q_BHSDh.shape
    K, T = k_BKTDh.shape[1], k_BKTDh.shape[2]
    G = H // K
    q_BKGSDh = q_BHSDh.view(B, K, G, S, Dh)
    scores_BKGST = (q_BKGSDh @ k_BKTDh.unsqueeze(2).transpose(-1, -2)).float() * Dh ** -0.5
    allowed_BKGST = allowed if allowed.dim() == 2 else allowed.unsqueeze(2)  # [B, 1, S, T] -> [B, 1, 1, S, T]
    scores_BKGST = scores_BKGST.masked_fill(~allowed_BKGST, float("-inf"))
    sink_BKGS1 = sinks_H.float().view(1, K, G, 1, 1).expand(B, K, G, S, 1)
    probs_BKGST = torch.cat([scores_BKGST, sink_BKGS1], dim=-1).softmax(dim=-1)[..., :T]
    probs_BKGST = F.dropout(probs_BKGST, dropout_p) if dropout_p else probs_BKGST
    out_BKGSDh = probs_BKGST.to(v_BKTDh.dtype) @ v_BKTDh.unsqueeze(2)
    return out_BKGSDh.reshape(B, H, S, Dh)


def flash_attention(q, k, v, dropout_p: float, window: int | None = None) -> torch.Tensor:
    """The optional flash-attn kernel (CUDA only), imported on first use; it takes fewer K/V heads as they are."""
    if not q.is_cuda:
        raise RuntimeError("attention_impl: flash needs CUDA; use attention_impl: sdpa on this device")
    try:
        from flash_attn import flash_attn_func
    except ImportError as err:
        raise RuntimeError("attention_impl: flash needs the flash-attn package (pip install flash-attn)") from err
    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, causal=True,
                           window_size=(-1, -1) if window is None else (window, 0))
