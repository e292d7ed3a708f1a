"""Multi-head latent attention (MLA, DeepSeek-V2/V3): keys and values come from one small per-token latent, and
each head's query and key are split into a part without position (`nope`) and a rotary part whose key is one
vector shared by all heads. Generation caches only the normalised latent and the rotated shared key, so a token
costs (kv_lora_rank + qk_rope_head_dim) numbers per layer instead of every head's key and value,
H (qk_nope_head_dim + qk_rope_head_dim + v_head_dim).

Shape legend: B batch, S sequence (the new tokens), T keys (cached and new), D hidden, H heads,
C kv_lora_rank (the key/value latent), Q q_lora_rank (the query latent), N qk_nope_head_dim,
R qk_rope_head_dim, V v_head_dim, E a query/key head (N + R), W a head of kv_up's output (N + V).

Parameters (torch Linear weights are [out, in]):
    q_proj   [H (N + R), D]           the query, when q_lora_rank is None; no bias
    q_down   [Q, D]                   the query's down-projection, when q_lora_rank is set; bias with
                                      use_bias_in_attn_linear
    q_norm   [Q]                      RMSNorm of the query latent (eps: LATENT_NORM_EPS)
    q_up     [H (N + R), Q]           the query's up-projection; no bias
    kv_down  [C + R, D]               rows [latent (C) | shared rope key (R)]; bias with use_bias_in_attn_linear
    kv_norm  [C]                      RMSNorm of the latent (eps: LATENT_NORM_EPS)
    kv_up    [H (N + V), C]           rows per head [key nope part (N) | value (V)]; no bias
    dense    [D, H V]                 the output projection; bias with use_bias_in_attn_linear
Each head's query rows are [nope (N) | rope (R)], and the rope rows (of the query and of kv_down) are in the
rotate-half layout of rope.py: dims i and i + R/2 form a rotated pair. Transformers' DeepseekV3Attention names
these q_proj, q_a_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj, and its
attention_bias gives biases to exactly q_a_proj, kv_a_proj_with_mqa and o_proj; with rope_interleave its rope rows
are interleaved pairs (megatron/hf/deepseek_v3.py permutes them into ours).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron.model.attention import KVCache, Padding, band_mask, layer_window
from megatron.model.rope import Rotary

# the latents' RMSNorm epsilon, whatever the model's norm_eps: DeepSeek's own code and transformers' DeepseekV3 use
# this for q_a_layernorm and kv_a_layernorm in every model (Moonlight's rms_norm_eps is 1e-5, its latents' 1e-6)
LATENT_NORM_EPS = 1e-6

if TYPE_CHECKING:
    from megatron.model.gpt import GPTConfig


@dataclass(frozen=True)
class MLAConfig:
    """The latent widths and per-head dims of multi-head latent attention (DeepSeek-V3: 512, 1536, 128, 64, 128)."""

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None  # None: the query is one projection of the hidden state

    def __post_init__(self):
        for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "q_lora_rank"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key}: expected a positive width, got {value}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim: expected an even number of dims (rotary pairs), got "
                             f"{self.qk_rope_head_dim}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


def mla_config(kv_lora_rank: int | None, q_lora_rank: int | None, qk_nope_head_dim: int | None,
               qk_rope_head_dim: int | None, v_head_dim: int | None) -> MLAConfig | None:
    """The MLAConfig the keys describe; None without kv_lora_rank (then the head dims ask for nothing here:
    megatron/config/needs.py refuses them)."""
    if kv_lora_rank is None:
        return None
    dims = {"qk_nope_head_dim": qk_nope_head_dim, "qk_rope_head_dim": qk_rope_head_dim, "v_head_dim": v_head_dim}
    missing = [key for key, value in dims.items() if value is None]
    if missing:
        raise ValueError(f"kv_lora_rank: multi-head latent attention needs qk_nope_head_dim, qk_rope_head_dim and "
                         f"v_head_dim; missing {', '.join(missing)}")
    return MLAConfig(kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, q_lora_rank)


def check_mla_settings(settings: Any) -> None:
    """The settings of the rest of the attention that MLA cannot honour, each refused in one line naming it.
    `settings`: a GPTConfig or the config's args (the fields read have the same names in both)."""
    pos_emb, rotary_pct = settings.pos_emb, settings.rotary_pct
    if pos_emb != "rotary":
        raise ValueError(f"pos_emb: {pos_emb!r} with multi-head latent attention (kv_lora_rank), whose shared key "
                         "part is the rotary one; expected rotary")
    if rotary_pct != 1.0:
        raise ValueError(f"rotary_pct: {rotary_pct} with multi-head latent attention (kv_lora_rank), which rotates "
                         "all qk_rope_head_dim dims and none of qk_nope_head_dim; expected 1.0")
    if settings.qk_norm:
        raise ValueError("qk_norm: true with multi-head latent attention (kv_lora_rank), which normalises its "
                         "latents instead; expected false")
    if settings.num_kv_heads is not None:
        raise ValueError(f"num_kv_heads: {settings.num_kv_heads} with multi-head latent attention (kv_lora_rank), "
                         "whose every head has its own key and value from the shared latent; expected it unset")
    if getattr(settings, "head_dim", None) is not None:
        raise ValueError(f"head_dim: {settings.head_dim} with multi-head latent attention (kv_lora_rank), whose "
                         "heads are qk_nope_head_dim + qk_rope_head_dim wide (values v_head_dim); expected it unset")
    if getattr(settings, "attention_sinks", False):
        raise ValueError("attention_sinks: true with multi-head latent attention (kv_lora_rank): not built for it; "
                         "expected false")
    if settings.attention_impl == "flash":
        raise ValueError("attention_impl: flash with multi-head latent attention (kv_lora_rank), whose value "
                         "heads differ in width from its query/key heads; use attention_impl: sdpa")


def softmax_scale(qk_head_dim: int, rope_scaling: Any) -> float:
    """(N + R)^-1/2, times what the rope scaling asks of MLA: YaRN's mscale(factor, mscale_all_dim)^2 when it sets
    mscale_all_dim (DeepSeek-V3; rope.py), as transformers' DeepseekV3Attention scales its softmax."""
    correction = getattr(rope_scaling, "mla_softmax_scale_factor", None)
    return qk_head_dim ** -0.5 * (correction() if correction is not None else 1.0)


class MultiHeadLatentAttention(nn.Module):
    """Causal MLA with the interface of attention.Attention: `forward(x, cache, padding)`, a `rotary` and a
    `layer_idx`, its slot in a cache. The cache's two tensors per layer are the normalised latent [B, 1, T, C]
    and the rotated shared key [B, 1, T, R] (KVCache's keys and values, or a transformers Cache's, which holds
    them as one-head keys and values); the heads' keys and values are rebuilt from them at each call."""

    def __init__(self, cfg: GPTConfig, layer_idx: int = 0):
        super().__init__()
        mla: MLAConfig = cfg.mla
        check_mla_settings(cfg)
        d, H, bias = cfg.hidden_size, cfg.num_attention_heads, cfg.use_bias_in_attn_linear
        self.num_heads, self.mla, self.layer_idx = H, mla, layer_idx
        if mla.q_lora_rank is None:
            self.q_proj = nn.Linear(d, H * mla.qk_head_dim, bias=False)
        else:
            self.q_down = nn.Linear(d, mla.q_lora_rank, bias=bias)
            self.q_norm = nn.RMSNorm(mla.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_up = nn.Linear(mla.q_lora_rank, H * mla.qk_head_dim, bias=False)
        self.kv_down = nn.Linear(d, mla.kv_lora_rank + mla.qk_rope_head_dim, bias=bias)
        self.kv_norm = nn.RMSNorm(mla.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_up = nn.Linear(mla.kv_lora_rank, H * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False)
        self.dense = nn.Linear(H * mla.v_head_dim, d, bias=bias)
        self.rotary = Rotary(mla.qk_rope_head_dim, 1.0, cfg.rotary_emb_base, cfg.max_position_embeddings,
                             cfg.rope_scaling)
        self.scale = softmax_scale(mla.qk_head_dim, cfg.rope_scaling)
        self.window = layer_window(cfg, layer_idx)  # sliding_window_width, by sliding_window_pattern if set
        self.dropout_p = cfg.attention_dropout

    def query(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """[B, S, H (N + R)]."""
        if self.mla.q_lora_rank is None:
            return self.q_proj(x_BSD)
        return self.q_up(self.q_norm(self.q_down(x_BSD)))

    def expand(self, latent_B1TC: torch.Tensor, k_rope_B1TR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every head's keys [B, H, T, N + R] and values [B, H, T, V] from what the cache holds: the latent's
        up-projection, and the shared rotated key beside each head's nope part."""
        mla, H = self.mla, self.num_heads
        B, _, T, _ = latent_B1TC.shape
        N, R, V = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        kv_BHTW = self.kv_up(latent_B1TC[:, 0]).view(B, T, H, N + V).transpose(1, 2)
        k_nope_BHTN, v_BHTV = kv_BHTW.split([N, V], dim=-1)
        return torch.cat([k_nope_BHTN, k_rope_B1TR.expand(B, H, T, R)], dim=-1), v_BHTV

    def forward(self, x_BSD: torch.Tensor, cache: KVCache | None = None,
                padding: Padding | None = None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        mla, H = self.mla, self.num_heads
        C, N, R, V = mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        q_BHSE = self.query(x_BSD).view(B, S, H, N + R).transpose(1, 2)
        q_nope_BHSN, q_rope_BHSR = q_BHSE.split([N, R], dim=-1)
        latent_BSC, k_rope_BSR = self.kv_down(x_BSD).split([C, R], dim=-1)
        latent_B1SC, k_rope_B1SR = self.kv_norm(latent_BSC)[:, None], k_rope_BSR[:, None]
        start = 0 if cache is None else cache.length(self.layer_idx)
        positions_BS = None if padding is None else padding.positions_BS
        q_rope_BHSR = self.rotary(q_rope_BHSR, start, positions_BS)
        k_rope_B1SR = self.rotary(k_rope_B1SR, start, positions_BS)
        latent_B1TC, k_rope_B1TR = latent_B1SC, k_rope_B1SR  # T keys: the cached ones, then these S
        if cache is not None:
            latent_B1TC, k_rope_B1TR = cache.extend(self.layer_idx, latent_B1SC, k_rope_B1SR)
        k_BHTE, v_BHTV = self.expand(latent_B1TC, k_rope_B1TR)
        q_BHSE = torch.cat([q_nope_BHSN, q_rope_BHSR], dim=-1)
        mask_ST = band_mask(S, k_BHTE.shape[2], self.window, x_BSD.device, padding)
        out_BHSV = F.scaled_dot_product_attention(q_BHSE, k_BHTE, v_BHTV, attn_mask=mask_ST,
                                                  dropout_p=self.dropout_p if self.training else 0.0,
                                                  is_causal=mask_ST is None, scale=self.scale)
        return self.dense(out_BHSV.transpose(1, 2).reshape(B, S, H * V))
