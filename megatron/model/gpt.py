"""The GPT-NeoX decoder: embeddings, pre-norm blocks (attention + MLP or MoE), final norm, LM head.

Shape legend: B batch, S sequence (the new tokens), T keys (cached and new), D hidden, H query heads,
K key/value heads, Dh head dim, V vocabulary, F MLP width, M multi-token prediction modules.

Every feed-forward block (dense or MoE) returns `(y, aux)`; `aux` is None for a dense MLP and a
`MoEAux` for an MoE layer. The model hands the per-layer aux objects back to its caller, which owns
the loss: nothing is stashed in globals. For generation, `forward(tokens, cache=KVCache(...))` runs only the
new tokens, attending to the keys and values the cache holds from earlier calls; `attention_mask_BT` (1 for
a token, 0 for padding, over the cached and new tokens) lets rows of a batch be padded on either side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron.model.activations import Activation, is_gated, up_width
from megatron.model.attention import Attention, KVCache, Padding
from megatron.model.loss import lm_loss
from megatron.model.mla import MLAConfig, MultiHeadLatentAttention
from megatron.model.moe import MoEArchitecture, MoEAux, MoELayer, MoERuntime
from megatron.model.mtp import MTPModule, mtp_losses
from megatron.model.rope import Llama3RopeScaling, YarnRopeScaling


@dataclass
class GPTConfig:
    vocab_size: int  # already padded
    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    head_dim: int | None = None  # each head's width; None: hidden_size // num_attention_heads (gpt-oss: 64 heads
    # of 64 over a 2880 residual stream)
    num_kv_heads: int | None = None  # grouped-query attention: K/V heads, each shared by H/K query heads; None: H
    sliding_window_width: int | None = None  # a query sees itself and the w keys before it (Mistral); None: all
    qk_norm: bool = False  # RMSNorm over each head's query and key before rotary (Qwen3, OLMo-2 style)
    attention_sinks: bool = False  # a learned logit per query head that takes softmax mass and has no value (gpt-oss)
    # "sliding"/"full" per layer, repeated cyclically (gpt-oss: ("sliding", "full")); None: every layer uses the window
    sliding_window_pattern: tuple[str, ...] | None = None
    intermediate_size: int | None = None
    mlp_multiple_of: int = 1
    use_bias_in_mlp: bool = True
    max_position_embeddings: int = 128
    pos_emb: str = "rotary"
    rotary_pct: float = 1.0
    rotary_emb_base: int = 10000
    rope_scaling: Llama3RopeScaling | YarnRopeScaling | None = None
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    use_bias_in_norms: bool = True
    use_bias_in_attn_linear: bool = True
    activation: str = "gelu"
    swiglu_alpha: float = 1.702  # activation clamped_swiglu (gpt-oss): the gate's sigmoid slope
    swiglu_limit: float = 7.0  # ... and the clamp of gate (above) and value (both sides)
    gpt_j_residual: bool = False
    tie_embeddings: bool = True
    init_method: str = "normal"
    output_layer_init_method: str = "scaled_normal"
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    checkpoint_activations: bool = False
    attention_impl: str = "sdpa"
    mla: MLAConfig | None = None  # multi-head latent attention (DeepSeek-V3) in place of Attention's projections
    moe: MoEArchitecture | None = field(default=None)  # how this run computes it is GPT's moe_runtime
    mtp_num_modules: int = 0  # multi-token prediction modules after the last block (mtp.py); 0: none

    @property
    def ffn_size(self) -> int:
        return mlp_width(self.activation, self.intermediate_size, self.hidden_size, self.mlp_multiple_of)

    @property
    def act(self) -> Activation:
        """The feed-forward activation with its parameters, handed to every block that applies it."""
        return Activation(self.activation, self.swiglu_alpha, self.swiglu_limit)


def mlp_width(activation: str, intermediate_size: int | None, hidden_size: int, multiple_of: int = 1) -> int:
    """The dense MLP's width F (the down-projection's input) by GPT-NeoX's rule (ParallelMLP): intermediate_size,
    4 d if unset, is the up-projection; a gated one is scaled by 2/3, so its three matrices hold about the two of
    a plain MLP, and F is half of it. The up-projection is rounded up to 2 x multiple_of and F to multiple_of."""
    size = intermediate_size or 4 * hidden_size
    up = down = size
    if is_gated(activation):
        up = 2 * size // 3  # NeoX's int(size * 2 / 3), in exact integers
        down = up // 2
    up, down = -(-up // (2 * multiple_of)) * 2 * multiple_of, -(-down // multiple_of) * multiple_of
    if up != up_width(activation, down):  # NeoX rounds the two separately and then fails on the shapes
        raise ValueError(f"intermediate_size {size} ({activation}, mlp_multiple_of {multiple_of}): GPT-NeoX's "
                         f"rule gives a {up}-column up-projection but a {down}-wide down-projection, which cannot be "
                         f"built; a gated width F needs 3 F ({3 * size} if {size} is meant as the width)")
    return down


def init_std(method: str, base_std: float, hidden_size: int, num_layers: int) -> float:
    """GPT-NeoX's init methods, reduced to the standard deviation of a normal draw."""
    if method == "normal":
        return base_std
    if method == "scaled_normal":
        return base_std / math.sqrt(2.0 * num_layers)
    if method == "small_init":
        return math.sqrt(2.0 / (5.0 * hidden_size))
    if method == "wang_init":
        return 2.0 / (num_layers * math.sqrt(hidden_size))
    raise ValueError(f"init_method: unknown method {method!r} (expected normal, scaled_normal, small_init, wang_init)")


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.use_bias_in_norms)


class MLP(nn.Module):
    """The dense feed-forward block, `down(act(up x))`, or gated `down(value * act(gate))` from one up-projection
    of 2F columns `[value, gate]` (activations.py); returns `(y, None)` to share the MoE layer's interface."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        width = cfg.ffn_size
        self.up = nn.Linear(cfg.hidden_size, up_width(cfg.activation, width), bias=cfg.use_bias_in_mlp)
        self.down = nn.Linear(width, cfg.hidden_size, bias=cfg.use_bias_in_mlp)
        self.act = cfg.act

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.down(self.act(self.up(x))), None


def make_feedforward(cfg: GPTConfig, layer_idx: int, std: float, out_std: float,
                     moe_runtime: MoERuntime | None = None) -> nn.Module:
    moe = cfg.moe
    if moe is None or not moe.is_moe_layer(layer_idx):
        return MLP(cfg)
    runtime = (moe_runtime or MoERuntime()).for_layer(layer_idx)
    return MoELayer(cfg.hidden_size, moe.ffn_hidden_size or cfg.ffn_size, cfg.act, std, out_std, moe, runtime)


def make_attention(cfg: GPTConfig, layer_idx: int = 0) -> nn.Module:
    """The attention the config chooses: multi-head latent attention (mla.py) when `cfg.mla` is set, else
    multi-head / grouped-query attention (attention.py)."""
    if cfg.mla is not None:
        return MultiHeadLatentAttention(cfg, layer_idx)
    return Attention(cfg, layer_idx)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int, std: float, out_std: float,
                 moe_runtime: MoERuntime | None = None):
        super().__init__()
        self.input_norm = make_norm(cfg)
        self.attention = make_attention(cfg, layer_idx)
        self.post_attention_norm = make_norm(cfg)
        self.mlp = make_feedforward(cfg, layer_idx, std, out_std, moe_runtime)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.parallel_residual = cfg.gpt_j_residual

    def forward(self, x_BSD: torch.Tensor, cache: KVCache | None = None,
                padding: Padding | None = None) -> tuple[torch.Tensor, MoEAux | None]:
        if self.parallel_residual:  # GPT-J: attention and MLP both read the block's input
            mlp_out, aux = self.mlp(self.post_attention_norm(x_BSD))
            attention = self.attention(self.input_norm(x_BSD), cache, padding)
            return x_BSD + self.dropout(attention) + self.dropout(mlp_out), aux
        x_BSD = x_BSD + self.dropout(self.attention(self.input_norm(x_BSD), cache, padding))
        mlp_out, aux = self.mlp(self.post_attention_norm(x_BSD))
        return x_BSD + self.dropout(mlp_out), aux


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, moe_runtime: MoERuntime | None = None):
        """`moe_runtime`: how this run computes the MoE layers (expert parallelism, kernels, LSH); kept apart
        from `cfg`, which is what the model computes and all that is written with it. None: MoERuntime()."""
        super().__init__()
        self.cfg = cfg
        self.moe_runtime = moe_runtime or MoERuntime()
        std = init_std(cfg.init_method, cfg.init_method_std, cfg.hidden_size, cfg.num_layers)
        out_std = init_std(cfg.output_layer_init_method, cfg.init_method_std, cfg.hidden_size, cfg.num_layers)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_embed = (
            nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size) if cfg.pos_emb == "learned" else None
        )
        self.embed_dropout = nn.Dropout(cfg.hidden_dropout)
        self.blocks = nn.ModuleList(Block(cfg, i, std, out_std, self.moe_runtime) for i in range(cfg.num_layers))
        self.final_norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._init_weights(self, std, out_std)
        # multi-token prediction (mtp.py), built and drawn after the rest: the main model's weights are those of
        # the same model without it; module d's block is layer num_layers + d - 1 (MoE by the MoE layer rule)
        self.mtp = nn.ModuleList(
            MTPModule(cfg.hidden_size, lambda: make_norm(cfg), Block(cfg, cfg.num_layers + k, std, out_std,
                                                                     self.moe_runtime))
            for k in range(cfg.mtp_num_modules))
        self._init_weights(self.mtp, std, out_std)

    @staticmethod
    @torch.no_grad()
    def _init_weights(root: nn.Module, std: float, out_std: float) -> None:
        """GPT-NeoX init: normal(std) for inputs, output projections use the output init method.

        MoE layers are left alone: they initialise their own weights with the stds they were given, drawn
        so that every expert-parallel layout gets the same weights (a draw here would depend on the layout).
        """
        moe_layers = tuple(f"{name}." for name, module in root.named_modules() if isinstance(module, MoELayer))
        for name, module in root.named_modules():
            if name.startswith(moe_layers):
                continue
            if isinstance(module, nn.Linear):
                is_output = name.endswith(("attention.dense", "mlp.down"))
                nn.init.normal_(module.weight, std=out_std if is_output else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)

    def forward(self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor | None = None, loss_chunk_tokens: int = 0,
                cache: KVCache | None = None, attention_mask_BT: torch.Tensor | None = None, mtp: bool = False
                ) -> tuple[torch.Tensor, list[MoEAux]] | tuple[torch.Tensor, list[MoEAux], torch.Tensor]:
        """Returns logits [B, S, V] and the aux outputs of every MoE layer, in layer order. With `targets_BS`, the
        mean cross-entropy instead of the logits, `loss_chunk_tokens` at a time so the full logits never exist
        (megatron/model/loss.py); inside the forward, so a sharded (FSDP2) head weight is gathered for it.
        With `cache`, the tokens follow the ones it holds (their positions start there) and are added to it.
        With `attention_mask_BT` (T = cached + new tokens, 0 for padding), positions count each row's tokens
        and padding is not attended to; the logits at padded positions mean nothing.
        With `mtp` (training with targets, no cache or padding): (the main head's loss, the aux of every MoE layer,
        the MTP modules' after the main model's, each MTP module's loss [mtp_num_modules]) (megatron/model/mtp.py);
        without it the MTP modules do not run, and the model is the main model alone."""
        if mtp and (targets_BS is None or cache is not None or attention_mask_BT is not None
                    or not self.cfg.mtp_num_modules):
            raise ValueError(f"mtp: multi-token prediction needs targets, no cache and no attention mask, and "
                             f"mtp_num_modules > 0 (got {self.cfg.mtp_num_modules})")
        start = 0 if cache is None else cache.length()
        padding = None
        if attention_mask_BT is not None and not bool(attention_mask_BT.all()):
            padding = Padding.from_mask(attention_mask_BT, tokens_BS.shape[1])
        if start + tokens_BS.shape[1] > self.cfg.max_position_embeddings:
            raise ValueError(f"{start + tokens_BS.shape[1]} positions exceed max_position_embeddings "
                             f"{self.cfg.max_position_embeddings}")
        x_BSD = self.embed(tokens_BS)
        if self.pos_embed is not None:
            positions = (torch.arange(start, start + tokens_BS.shape[1], device=tokens_BS.device) if padding is None
                         else padding.positions_BS)
            x_BSD = x_BSD + self.pos_embed(positions)
        x_BSD = self.embed_dropout(x_BSD)
        if torch.is_autocast_enabled(tokens_BS.device.type):
            # the residual stream in fp32 under autocast whatever the weights' dtype: FSDP2's bf16 compute
            # copies would otherwise make it bf16 from the embedding on, and numerics depend on the layout
            x_BSD = x_BSD.float()
        moe_aux: list[MoEAux] = []
        for block in self.blocks:
            if self.cfg.checkpoint_activations and self.training:
                x_BSD, aux = checkpoint(block, x_BSD, cache, padding, use_reentrant=False)
            else:
                x_BSD, aux = block(x_BSD, cache, padding)
            if aux is not None:
                moe_aux.append(aux)
        x_BSD = self.final_norm(x_BSD)  # what the head and the first MTP module read
        weight_VD = self.embed.weight if self.lm_head is None else self.lm_head.weight
        if targets_BS is None:
            return F.linear(x_BSD, weight_VD), moe_aux
        loss = lm_loss(x_BSD.flatten(0, 1), weight_VD, targets_BS.flatten(), loss_chunk_tokens)
        if not mtp:
            return loss, moe_aux
        mtp_loss_M, mtp_aux = mtp_losses(self.mtp, x_BSD, tokens_BS, targets_BS, self.embed, weight_VD,
                                         loss_chunk_tokens, self.cfg.checkpoint_activations and self.training)
        return loss, moe_aux + mtp_aux, mtp_loss_M
