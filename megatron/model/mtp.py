"""Multi-token prediction (DeepSeek-V3, section 2.2): D sequential modules after the main model, module d predicting
the token d + 1 places after the next one, a training objective only (evaluation and generation use the main head).

Shape legend: B batch, S sequence (the model's input), R positions a module predicts (S - d for module d), D hidden,
V vocabulary, M modules (mtp_num_modules).

With input tokens x_0 .. x_{S-1} and targets y_i = x_{i+1} (y_{S-1} the token after the input), module d (1-based)
at position i combines the previous depth's state h^{d-1}_i with the embedding of token x_{i+d} and predicts
x_{i+d+1} = y_{i+d}:

    u_i = eh_proj([enorm(embed(x_{i+d})); hnorm(h^{d-1}_i)])   embedding first, as DeepSeek-V3's checkpoints are
    h^d_{0:R} = final_norm(block(u_{0:R}))                       causal, at positions 0 .. R-1, R = S - d
    loss_d = mean_i cross_entropy(head(h^d_i), y_{i+d})

h^0 is the main model's final-normed hidden state, the one its head reads, and each depth hands on its own
final-normed state. The paper's formulas leave the norms open (DeepSeek released no MTP code); this is what the
implementations that run DeepSeek-V3's released MTP weights compute (transformers' MtpModel, the drafter of
generate(use_mtp=True), reads the main model's last hidden state, which is the normed one, and chains each layer's
post_norm output; SGLang's and Megatron-LM's do the same). Positions i >= S - d would need a token past the
sequence: they are dropped, so module d runs on S - d positions (rotary attention depends only on distances, so
starting them at 0 is starting them at d). `embed` and `head` are the main model's own weights (shared, not
copied). The loss the task adds is mtp_loss_coeff x the mean of loss_1 .. loss_D.

Parameters of module d, index k = d - 1 in `GPT.mtp` (the block is built at layer index num_layers + k, so it is an
MoE layer where that index is one by the MoE layer rule; DeepSeek-V3's is):
    mtp.{k}.enorm.weight        [D]       (+ .bias [D] with layernorm and use_bias_in_norms)
    mtp.{k}.hnorm.weight        [D]       (+ .bias)
    mtp.{k}.eh_proj.weight      [D, 2D]   columns 0..D-1 read the embedding, D..2D-1 the hidden state; no bias
    mtp.{k}.block.*                        a decoder block's weights, the same names as blocks.{i}.*
    mtp.{k}.final_norm.weight   [D]       (+ .bias)
DeepSeek-V3's checkpoints store module d as model.layers.{num_hidden_layers + k}: enorm, hnorm, eh_proj, the decoder
layer's weights, shared_head.norm (= final_norm; transformers' MtpLayer.post_norm), shared_head.head and
embed_tokens (copies of the main model's head and embedding, which this model shares).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from megatron.model.loss import lm_loss
from megatron.model.moe import MoEAux


class MTPModule(nn.Module):
    """One depth: the two input norms, the 2D -> D projection, a decoder block and the module's own final norm.
    Its forward is one FSDP2 unit (megatron/parallel/data_parallel.py) and one activation-checkpointing region."""

    def __init__(self, hidden_size: int, make_norm: Callable[[], nn.Module], block: nn.Module):
        super().__init__()
        self.enorm = make_norm()
        self.hnorm = make_norm()
        self.eh_proj = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.block = block
        self.final_norm = make_norm()

    def forward(self, h_BRD: torch.Tensor, emb_BRD: torch.Tensor) -> tuple[torch.Tensor, MoEAux | None]:
        """(this depth's final-normed state h^d, which the head and the next module read, the block's MoE aux)."""
        u_BRD = self.eh_proj(torch.cat([self.enorm(emb_BRD), self.hnorm(h_BRD)], dim=-1))
        if torch.is_autocast_enabled(u_BRD.device.type):
            u_BRD = u_BRD.float()  # the residual stream in fp32 under autocast, as the main model's (gpt.py)
        out_BRD, aux = self.block(u_BRD)
        return self.final_norm(out_BRD), aux


def module_inputs(tokens_BS: torch.Tensor, targets_BS: torch.Tensor, depth: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Module `depth` (1-based)'s input tokens x_{i+d} and targets y_{i+d} at its positions i < S - d."""
    return tokens_BS[:, depth:], targets_BS[:, depth:]


def mtp_losses(modules: nn.ModuleList, h_BSD: torch.Tensor, tokens_BS: torch.Tensor, targets_BS: torch.Tensor,
               embed: nn.Embedding, weight_VD: torch.Tensor, loss_chunk_tokens: int = 0, checkpointing: bool = False
               ) -> tuple[torch.Tensor, list[MoEAux]]:
    """Each module's mean cross-entropy [M] and the MoE aux of their blocks, in module order.

    `h_BSD`: the main model's final-normed hidden state (what its head reads); `embed` and `weight_VD`: the shared
    embedding and output head; `loss_chunk_tokens` as for the main head (megatron/model/loss.py)."""
    S = tokens_BS.shape[1]
    if S <= len(modules):
        raise ValueError(f"mtp_num_modules {len(modules)}: module d predicts the token d + 1 places after the next, "
                         f"so a sequence needs more than {len(modules)} tokens; got {S}")
    losses, moe_aux = [], []
    h_BRD = h_BSD
    for depth, module in enumerate(modules, start=1):
        inputs_BR, targets_BR = module_inputs(tokens_BS, targets_BS, depth)
        emb_BRD = embed(inputs_BR).to(h_BSD.dtype)  # fp32 under autocast, as the residual stream it joins
        h_BRD = h_BRD[:, :S - depth]  # the previous depth's state at the positions this module predicts from
        if checkpointing:
            h_BRD, aux = checkpoint(module, h_BRD, emb_BRD, use_reentrant=False)
        else:
            h_BRD, aux = module(h_BRD, emb_BRD)
        losses.append(lm_loss(h_BRD.flatten(0, 1), weight_VD, targets_BR.flatten(), loss_chunk_tokens))
        if aux is not None:
            moe_aux.append(aux)
    return torch.stack(losses), moe_aux  # [M]
