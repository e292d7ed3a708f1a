"""DiT (Peebles & Xie, 2023): a class-conditional diffusion transformer with adaLN-Zero blocks; or a Remix-DiT.

Shape legend: B batch, C channels, H/W pixels, T tokens (patches), D hidden, P patch values (p*p*C_out),
K basis models, L remixed linears, N experts.

Module and parameter names are those of facebookresearch/DiT's models.py, so its checkpoints load with
`load_state_dict`. A Remix model (megatron/model/dit/remix.py) keeps every name and gives the remixed weights
(attention qkv/proj, MLP fc1/fc2, each block's adaLN linear) a leading K dim; embedders and the final layer
stay shared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron.model.dit.config import DiTConfig, expert_of_timestep
from megatron.model.dit.diffusion import forward_with_cfg
from megatron.model.dit.remix import RemixLinear, coefficient_tables, forward_per_expert

REMIXED_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")  # per block, in this order


def timestep_embedding(t_B: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t f_i), sin(t f_i)] with f_i = max_period^(-i/half), i < half = dim // 2 (zero-padded if dim is odd)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
    args_BF = t_B[:, None].float() * freqs[None]
    emb_BD = torch.cat([args_BF.cos(), args_BF.sin()], dim=-1)
    return F.pad(emb_BD, (0, dim % 2))


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """[grid*grid, dim], row-major tokens (row i, column j): [sin(j w), cos(j w), sin(i w), cos(i w)],
    w_m = 10000^(-m / (dim/4)) for m < dim/4 (MAE's layout, which DiT checkpoints carry)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    col_TF, row_TF = cols.reshape(-1, 1) * omega, rows.reshape(-1, 1) * omega
    return torch.cat([col_TF.sin(), col_TF.cos(), row_TF.sin(), row_TF.cos()], dim=1).float()


def unpatchify(x_BTP: torch.Tensor, p: int, channels: int) -> torch.Tensor:
    """[B, C, H, W] from the final layer's tokens: row-major patches, each flattened as (row, column, channel)."""
    B, T, _ = x_BTP.shape
    h = math.isqrt(T)
    x = x_BTP.reshape(B, h, h, p, p, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, channels, h * p, h * p)


def modulate(x_BTD: torch.Tensor, shift_BD: torch.Tensor, scale_BD: torch.Tensor) -> torch.Tensor:
    return x_BTD * (1 + scale_BD[:, None]) + shift_BD[:, None]


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.proj(x_BCHW).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t_B: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t_B, self.frequency_size))


class LabelEmbedder(nn.Module):
    """Class embeddings; the extra last row (when dropout_prob > 0) is the null class for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, y_B: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop_B = torch.rand(y_B.shape, device=y_B.device) < self.dropout_prob
            y_B = torch.where(drop_B, self.num_classes, y_B)
        return self.embedding_table(y_B)


class PlainLinear(nn.Linear):
    """nn.Linear taking (and ignoring) mixing coefficients, so plain and Remix blocks share one forward."""

    def forward(self, x: torch.Tensor, coeffs_K: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


def make_linear(in_features: int, out_features: int, num_basis: int | None) -> nn.Module:
    if num_basis is None:
        return PlainLinear(in_features, out_features)
    return RemixLinear(in_features, out_features, num_basis)


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_basis: int | None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = make_linear(hidden_size, 3 * hidden_size, num_basis)
        self.proj = make_linear(hidden_size, hidden_size, num_basis)

    def forward(self, x_BTD: torch.Tensor, qkv_K: torch.Tensor | None, proj_K: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x_BTD.shape
        qkv = self.qkv(x_BTD, qkv_K).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out_BHTDh = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out_BHTDh.transpose(1, 2).reshape(B, T, D), proj_K)


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_size: int, num_basis: int | None):
        super().__init__()
        self.fc1 = make_linear(hidden_size, mlp_size, num_basis)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = make_linear(mlp_size, hidden_size, num_basis)

    def forward(self, x_BTD: torch.Tensor, fc1_K: torch.Tensor | None, fc2_K: torch.Tensor | None) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x_BTD, fc1_K)), fc2_K)


class DiTBlock(nn.Module):
    """adaLN-Zero block; `adaLN_modulation` is [SiLU, linear] in a ModuleList (official keys, coefficients pass)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, num_basis: int | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, num_basis)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), num_basis)
        self.adaLN_modulation = nn.ModuleList([nn.SiLU(), make_linear(hidden_size, 6 * hidden_size, num_basis)])

    def forward(self, x_BTD: torch.Tensor, c_BD: torch.Tensor, coeffs_5K: torch.Tensor | None = None) -> torch.Tensor:
        """coeffs_5K: the mixing coefficients of REMIXED_LINEARS, in order (None for a plain DiT)."""
        co = [None] * 5 if coeffs_5K is None else list(coeffs_5K)
        modulation_BD = self.adaLN_modulation[1](self.adaLN_modulation[0](c_BD), co[4])
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation_BD.chunk(6, dim=1)
        x_BTD = x_BTD + gate_msa[:, None] * self.attn(modulate(self.norm1(x_BTD), shift_msa, scale_msa), co[0], co[1])
        return x_BTD + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x_BTD), shift_mlp, scale_mlp), co[2], co[3])


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_size: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x_BTD: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
        shift_BD, scale_BD = self.adaLN_modulation(c_BD).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x_BTD), shift_BD, scale_BD))


class DiT(nn.Module):
    """Class-conditional DiT. With `config.remix`, a Remix-DiT whose coefficient tables live at `remix_coeffs`
    (global: one `MixingCoefficients`; local: a ModuleList, one per `remixed_layer_names()` entry). The forward
    routes each row to the expert of its timestep and hands every block its experts' coefficients."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config, cfg = config, config
        num_basis = None if cfg.remix is None else cfg.remix.num_basis
        grid = cfg.image_size // cfg.patch_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, cfg.hidden_size)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout_prob)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(cfg.hidden_size, grid)[None])  # fixed, [1, T, D]
        self.blocks = nn.ModuleList(DiTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, num_basis)
                                    for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg.hidden_size, cfg.patch_size**2 * cfg.out_channels)
        if cfg.remix is not None:
            self.remix_coeffs = coefficient_tables(cfg.remix, len(self.remixed_layer_names()))
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """DiT's init; adaLN linears and the output linear start at zero, so every block starts as the identity."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        weight = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for linear in [block.adaLN_modulation[1] for block in self.blocks] + [self.final_layer.adaLN_modulation[1],
                                                                              self.final_layer.linear]:
            linear.weight.zero_()
            linear.bias.zero_()

    # -- Remix ------------------------------------------------------------------------------------
    def remixed_layer_names(self) -> list[str]:
        """The remixed linears in the order of `expert_coefficients` rows (empty for a plain DiT)."""
        if self.config.remix is None:
            return []
        return [f"blocks.{i}.{name}" for i in range(self.config.depth) for name in REMIXED_LINEARS]

    def expert_coefficients(self, n: int) -> torch.Tensor:
        """coeffs_LK: expert n's coefficients for each remixed linear (global scope: one row, repeated)."""
        num_linears = len(self.remixed_layer_names())
        if isinstance(self.remix_coeffs, nn.ModuleList):
            return torch.stack([table.coefficients()[n] for table in self.remix_coeffs])
        return self.remix_coeffs.coefficients()[n].expand(num_linears, -1)

    def coefficient_table(self) -> torch.Tensor:
        """[N, K] coefficients (local scope: the mean over the remixed linears' tables), for logging."""
        if isinstance(self.remix_coeffs, nn.ModuleList):
            return torch.stack([table.coefficients() for table in self.remix_coeffs]).mean(0)
        return self.remix_coeffs.coefficients()

    def coefficient_parameter_names(self) -> list[str]:
        return [name for name, _ in self.named_parameters() if name.startswith("remix_coeffs.")]

    def prior_loss(self) -> torch.Tensor:
        """The tables' prior cross-entropy, averaged over experts (and over the remixed linears, local scope)."""
        if isinstance(self.remix_coeffs, nn.ModuleList):
            return torch.stack([table.prior_loss() for table in self.remix_coeffs]).mean()
        return self.remix_coeffs.prior_loss()

    # -- forward ----------------------------------------------------------------------------------
    def forward_expert(self, x_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor,
                       coeffs_LK: torch.Tensor | None = None) -> torch.Tensor:
        """The network with one set of weights: plain (coeffs_LK None) or one expert's mix."""
        x_BTD = self.x_embedder(x_BCHW) + self.pos_embed
        c_BD = self.t_embedder(t_B) + self.y_embedder(y_B, self.training)
        per_block = len(REMIXED_LINEARS)
        for i, block in enumerate(self.blocks):
            x_BTD = block(x_BTD, c_BD, None if coeffs_LK is None else coeffs_LK[i * per_block:(i + 1) * per_block])
        return unpatchify(self.final_layer(x_BTD, c_BD), self.config.patch_size, self.config.out_channels)

    def forward(self, x_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(out [B, C_out, H, W], aux); t_B integer timesteps. Remix: aux = {"prior_loss"}, and rows whose
        timesteps fall to different experts run as one forward per expert (one mix each), scattered back."""
        if self.config.remix is None:
            return self.forward_expert(x_BCHW, t_B, y_B), {}
        expert_B = expert_of_timestep(t_B, self.config.remix)
        experts = expert_B.unique().tolist()
        if len(experts) == 1:  # the usual training batch: no gather or scatter
            out = self.forward_expert(x_BCHW, t_B, y_B, self.expert_coefficients(experts[0]))
            return out, {"prior_loss": self.prior_loss()}
        out = forward_per_expert(expert_B, experts, lambda n, rows_R: self.forward_expert(
            x_BCHW[rows_R], t_B[rows_R], y_B[rows_R], self.expert_coefficients(n)))
        return out, {"prior_loss": self.prior_loss()}

    def forward_with_cfg(self, x_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor,
                         cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance as in DiT: the batch is [conditional half; null-class half] (y = num_classes
        in the second half) and only the first half of x is read. Both halves of the output carry the guided eps
        uncond + s (cond - uncond) on the first C channels; variance channels (learn_sigma) pass through."""
        return forward_with_cfg(self, x_BCHW, t_B, y_B, cfg_scale)


def load_official_dit_state_dict(model: DiT, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a plain DiT's weights (official layout, or ours: the same names), wrapped in {"ema"} / {"model"} or not
    (the EMA weights win when both are there). A Remix model gets each plain weight copied into all K bases (and
    keeps its coefficient tables), so every expert starts as the plain DiT. Checks every key and shape first."""
    if "ema" in state_dict and isinstance(state_dict["ema"], Mapping):
        state_dict = state_dict["ema"]
    elif "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    remixed = {f"{name}.{p}" for name in model.remixed_layer_names() for p in ("weight", "bias")}
    own = model.state_dict()
    expected = {k: v.shape[1:] if k in remixed else v.shape for k, v in own.items()
                if not k.startswith("remix_coeffs.")}
    for key in expected:
        if key not in state_dict:
            raise ValueError(f"{key}: missing from the checkpoint")
    for key in state_dict:
        if key not in expected:
            raise ValueError(f"{key}: unexpected key in the checkpoint (not a parameter of this DiT)")
    for key, shape in expected.items():
        if tuple(state_dict[key].shape) != tuple(shape):
            raise ValueError(f"{key}: checkpoint has {list(state_dict[key].shape)}, model expects {list(shape)}")
    if not torch.allclose(state_dict["pos_embed"].float().cpu(), own["pos_embed"].float().cpu(), atol=1e-5):
        raise ValueError("pos_embed: checkpoint differs from the fixed 2-D sin-cos embedding of this model")
    loaded = dict(own)
    for key in expected:
        value = state_dict[key].to(own[key].dtype)
        loaded[key] = value.expand_as(own[key]).clone() if key in remixed else value
    model.load_state_dict(loaded)
