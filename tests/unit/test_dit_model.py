"""DiT and Remix-DiT: shapes, embeddings, adaLN-Zero, mixing, expert routing, checkpoint loading, guidance.

Shape legend: B batch, C channels, H/W pixels, T tokens, D hidden, K basis models, N experts.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron.model.dit import (
    DiT,
    DiTConfig,
    RemixConfig,
    expert_of_timestep,
    load_official_dit_state_dict,
    mixed_state_dict,
    timestep_interval,
)
from megatron.model.dit.model import PatchEmbed, sincos_pos_embed_2d, timestep_embedding, unpatchify
from megatron.model.dit.remix import MixingCoefficients, RemixLinear, prior_basis

NUM_CLASSES = 5


def tiny(remix: RemixConfig | None = None, **kw) -> DiTConfig:
    values = dict(image_size=8, in_channels=2, patch_size=2, depth=2, hidden_size=16, num_heads=2,
                  num_classes=NUM_CLASSES)
    values.update(kw)
    return DiTConfig(**values, remix=remix)


def remix_cfg(**kw) -> RemixConfig:
    return RemixConfig(**{"num_basis": 3, "num_experts": 5, **kw})


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Move every parameter (adaLN, output layer, coefficient logits too) away from its init."""
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(std * torch.randn(p.shape, generator=generator))
    return model.eval()


def inputs(cfg: DiTConfig, B: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x_BCHW = torch.randn(B, cfg.in_channels, cfg.image_size, cfg.image_size, generator=generator)
    y_B = torch.randint(0, NUM_CLASSES + 1, (B,), generator=generator)
    return x_BCHW, y_B


def np_pos_embed(dim: int, grid: int) -> np.ndarray:
    """MAE/DiT layout, written token by token: first half encodes the column, second half the row."""
    quarter = dim // 4
    out = np.zeros((grid * grid, dim))
    for i in range(grid):
        for j in range(grid):
            for m in range(quarter):
                w = 1.0 / 10000 ** (m / quarter)
                out[i * grid + j, m] = np.sin(j * w)
                out[i * grid + j, quarter + m] = np.cos(j * w)
                out[i * grid + j, 2 * quarter + m] = np.sin(i * w)
                out[i * grid + j, 3 * quarter + m] = np.cos(i * w)
    return out


# -- shapes and embeddings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size,patch_size,channels,learn_sigma",
                         [(8, 2, 1, False), (8, 2, 3, True), (16, 4, 3, False), (16, 4, 1, True)])
@pytest.mark.parametrize("remix", [None, "global"])
def test_output_shapes(image_size, patch_size, channels, learn_sigma, remix):
    cfg = tiny(remix_cfg(scope=remix) if remix else None, image_size=image_size, patch_size=patch_size,
               in_channels=channels, learn_sigma=learn_sigma)
    model = DiT(cfg)
    x_BCHW, y_B = inputs(cfg, B=2)
    out, aux = model(x_BCHW, torch.tensor([3, 998]), y_B)
    assert out.shape == (2, channels * (2 if learn_sigma else 1), image_size, image_size)
    assert model.pos_embed.shape == (1, (image_size // patch_size) ** 2, 16)
    if remix:
        assert set(aux) == {"prior_loss"} and aux["prior_loss"].shape == ()
    else:
        assert aux == {}


def test_unpatchify_by_hand_and_round_trip():
    x_CHW = torch.arange(2 * 4 * 4).reshape(1, 2, 4, 4)  # x[c, h, w] = 16 c + 4 h + w
    # token r*2+s = patch (row r, column s): its pixels row by row, channels innermost
    tokens = torch.tensor([[[16 * c + 4 * (2 * r + i) + 2 * s + j for i in range(2) for j in range(2) for c in range(2)]
                            for r in range(2) for s in range(2)]])
    assert tokens[0, 1].tolist() == [2, 18, 3, 19, 6, 22, 7, 23]
    assert tokens[0, 2].tolist() == [8, 24, 9, 25, 12, 28, 13, 29]
    assert torch.equal(unpatchify(tokens, 2, 2), x_CHW)
    # a patch embedding whose output o copies pixel (i, j, c) with o = (i p + j) C + c makes the same tokens
    p, C = 4, 3
    embed = PatchEmbed(p, C, p * p * C)
    with torch.no_grad():
        embed.proj.weight.zero_()
        embed.proj.bias.zero_()
        for i in range(p):
            for j in range(p):
                for c in range(C):
                    embed.proj.weight[(i * p + j) * C + c, c, i, j] = 1.0
        x = torch.randn(3, C, 12, 12)
        assert torch.equal(unpatchify(embed(x), p, C), x)


def test_pos_embed_2x2_grid_by_hand():
    w1 = 1 / 10000 ** 0.5  # dim 8: quarter 2, frequencies 1 and 10000^(-1/2)
    rows = []
    for i, j in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        rows.append([np.sin(j), np.sin(j * w1), np.cos(j), np.cos(j * w1),
                     np.sin(i), np.sin(i * w1), np.cos(i), np.cos(i * w1)])
    np.testing.assert_allclose(sincos_pos_embed_2d(8, 2).numpy(), np.array(rows), atol=1e-6)
    np.testing.assert_allclose(sincos_pos_embed_2d(16, 4).numpy(), np_pos_embed(16, 4), atol=1e-6)
    model = DiT(tiny())
    np.testing.assert_allclose(model.pos_embed[0].numpy(), np_pos_embed(16, 4), atol=1e-6)
    assert "pos_embed" in model.state_dict() and all(name != "pos_embed" for name, _ in model.named_parameters())


def test_timestep_embedding_closed_form():
    t = torch.tensor([0, 3, 999])
    freqs = [10000 ** (-i / 3) for i in range(3)]
    expected = [[math.cos(s * f) for f in freqs] + [math.sin(s * f) for f in freqs] for s in (0, 3, 999)]
    torch.testing.assert_close(timestep_embedding(t, 6), torch.tensor(expected), atol=1e-4, rtol=1e-5)
    odd = timestep_embedding(t, 7)
    assert odd.shape == (3, 7) and torch.equal(odd[:, 6], torch.zeros(3))


def test_label_dropout_uses_the_null_class():
    model = DiT(tiny(class_dropout_prob=0.5))
    table = model.y_embedder.embedding_table.weight
    assert table.shape == (NUM_CLASSES + 1, 16)
    y_B = torch.arange(200) % NUM_CLASSES
    torch.manual_seed(0)
    dropped = model.y_embedder(y_B, train=True)
    is_null = (dropped == table[NUM_CLASSES]).all(dim=1)
    assert torch.equal(dropped[~is_null], table[y_B[~is_null]])
    assert 40 < int(is_null.sum()) < 160
    assert torch.equal(model.y_embedder(y_B, train=False), table[y_B])
    assert DiT(tiny(class_dropout_prob=0.0)).y_embedder.embedding_table.weight.shape == (NUM_CLASSES, 16)


# -- initialisation and an independent forward ------------------------------------------------------------------


@pytest.mark.parametrize("remix", [None, remix_cfg(), remix_cfg(scope="local", mixer="raw")])
def test_adaln_zero_blocks_are_identity_and_output_is_zero_at_init(remix):
    cfg = tiny(remix)
    model = DiT(cfg)
    generator = torch.Generator().manual_seed(0)
    x_BTD, c_BD = torch.randn(3, 16, 16, generator=generator), torch.randn(3, 16, generator=generator)
    coeffs = model.expert_coefficients(2) if remix else None
    for i, block in enumerate(model.blocks):
        assert torch.equal(block(x_BTD, c_BD, None if coeffs is None else coeffs[5 * i:5 * i + 5]), x_BTD)
    x_BCHW, y_B = inputs(cfg)
    out, _ = model(x_BCHW, torch.tensor([1, 500, 999]), y_B)
    assert torch.equal(out, torch.zeros_like(out))


def test_init_follows_dit():
    model = DiT(tiny())
    qkv = model.blocks[0].attn.qkv
    assert qkv.weight.abs().max() <= math.sqrt(6 / (16 + 48)) and qkv.weight.std() > 0.1
    assert torch.equal(qkv.bias, torch.zeros(48)) and torch.equal(model.blocks[1].mlp.fc2.bias, torch.zeros(16))
    conv = model.x_embedder.proj.weight  # xavier on its [D, C p p] view
    assert conv.abs().max() <= math.sqrt(6 / (16 + 2 * 2 * 2))
    for weight in (model.y_embedder.embedding_table.weight, model.t_embedder.mlp[0].weight):
        assert 0.01 < float(weight.detach().std()) < 0.03
    zeroed = [model.final_layer.linear, model.final_layer.adaLN_modulation[1]] + [b.adaLN_modulation[1]
                                                                                   for b in model.blocks]
    assert all(not layer.weight.any() and not layer.bias.any() for layer in zeroed)


def reference_forward(sd: dict, x_BCHW, t_B, y_B, p: int, heads: int, c_out: int) -> torch.Tensor:
    """DiT written out op by op from a state dict (explicit attention, layer norm, tanh-GELU, pixel loops)."""
    def lin(h, name):
        return h @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def norm(h):
        mu = h.mean(-1, keepdim=True)
        return (h - mu) / torch.sqrt(((h - mu) ** 2).mean(-1, keepdim=True) + 1e-6)

    def gelu_tanh(h):
        return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))

    B, C, H, _ = x_BCHW.shape
    g, D = H // p, sd["pos_embed"].shape[-1]
    patches = x_BCHW.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)
    h = patches @ sd["x_embedder.proj.weight"].reshape(D, -1).T + sd["x_embedder.proj.bias"] + sd["pos_embed"]
    args = t_B[:, None].float() * torch.tensor([10000 ** (-i / 128) for i in range(128)])[None]
    temb = torch.cat([args.cos(), args.sin()], dim=1)
    c = lin(F.silu(lin(temb, "t_embedder.mlp.0")), "t_embedder.mlp.2") + sd["y_embedder.embedding_table.weight"][y_B]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        s1, sc1, g1, s2, sc2, g2 = lin(F.silu(c), f"blocks.{i}.adaLN_modulation.1").split(D, dim=1)
        qkv = lin(norm(h) * (1 + sc1[:, None]) + s1[:, None], f"blocks.{i}.attn.qkv").reshape(B, g * g, 3, heads, -1)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), dim=-1) @ v
        h = h + g1[:, None] * lin(att.transpose(1, 2).reshape(B, g * g, D), f"blocks.{i}.attn.proj")
        m = norm(h) * (1 + sc2[:, None]) + s2[:, None]
        h = h + g2[:, None] * lin(gelu_tanh(lin(m, f"blocks.{i}.mlp.fc1")), f"blocks.{i}.mlp.fc2")
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").split(D, dim=1)
    out = lin(norm(h) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")
    img = torch.zeros(B, c_out, H, H)
    for r in range(g):
        for s in range(g):
            patch = out[:, r * g + s].reshape(B, p, p, c_out).permute(0, 3, 1, 2)
            img[:, :, r * p:(r + 1) * p, s * p:(s + 1) * p] = patch
    return img


def test_forward_matches_a_hand_written_dit():
    cfg = tiny(learn_sigma=True)
    model = perturb(DiT(cfg))
    x_BCHW, y_B = inputs(cfg)
    t_B = torch.tensor([0, 417, 999])
    expected = reference_forward(model.state_dict(), x_BCHW, t_B, y_B, p=2, heads=2, c_out=4)
    torch.testing.assert_close(model(x_BCHW, t_B, y_B)[0], expected, atol=1e-4, rtol=1e-4)


# -- mixing -----------------------------------------------------------------------------------------------------


def test_remix_linear_mixes_in_weight_space():
    layer = RemixLinear(4, 2, num_basis=3)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(3, 2))
    c = torch.tensor([0.5, -1.0, 2.0])
    weight = 0.5 * layer.weight[0] - layer.weight[1] + 2.0 * layer.weight[2]
    bias = 0.5 * layer.bias[0] - layer.bias[1] + 2.0 * layer.bias[2]
    mixed_w, mixed_b = layer.mixed_weights(c)
    torch.testing.assert_close(mixed_w, weight)
    torch.testing.assert_close(mixed_b, bias)
    x = torch.randn(5, 4)
    torch.testing.assert_close(layer(x, c), x @ weight.T + bias)
    per_basis = sum(c[k] * (x @ layer.weight[k].T + layer.bias[k]) for k in range(3))
    torch.testing.assert_close(layer(x, c), per_basis, atol=1e-5, rtol=1e-5)


def test_softmax_raw_and_oracle_coefficients():
    expected_prior = [0, 0, 0, 1, 1, 2, 2]  # floor(3 n / 7)
    assert [prior_basis(n, 7, 3) for n in range(7)] == expected_prior
    softmax = MixingCoefficients(7, 3, "softmax", prior_strength=3.0)
    c = softmax.coefficients()
    torch.testing.assert_close(c.sum(dim=1), torch.ones(7))
    assert c.argmax(dim=1).tolist() == expected_prior
    torch.testing.assert_close(c.max(dim=1)[0], torch.full((7,), math.exp(3) / (math.exp(3) + 2)))

    oracle = MixingCoefficients(7, 3, "oracle")
    assert torch.equal(oracle.coefficients(), torch.eye(3)[expected_prior])
    assert list(oracle.parameters()) == [] and not oracle.coefficients().requires_grad

    raw = MixingCoefficients(7, 3, "raw")
    assert torch.equal(raw.coefficients(), torch.eye(3)[expected_prior])
    values = torch.randn(7, 3) * 3 - 1
    with torch.no_grad():
        raw.logits.copy_(values)
    assert torch.equal(raw.coefficients(), values)  # unconstrained: no normalisation, signs kept
    raw.coefficients()[2].sum().backward()
    assert torch.equal(raw.logits.grad, torch.eye(7)[2][:, None].expand(7, 3))


def test_oracle_trains_only_the_prior_basis():
    cfg = tiny(remix_cfg(mixer="oracle", num_experts=6))
    model = perturb(DiT(cfg))
    x_BCHW, y_B = inputs(cfg)
    out, aux = model(x_BCHW, torch.tensor([500, 600, 665]), y_B)  # expert 3: prior basis floor(3 * 3 / 6) = 1
    assert float(aux["prior_loss"]) == 0.0
    out.square().sum().backward()
    grad = model.blocks[0].mlp.fc1.weight.grad
    assert grad[1].abs().sum() > 0 and not grad[0].any() and not grad[2].any()


@pytest.mark.parametrize("scope", ["global", "local"])
@pytest.mark.parametrize("mixer", ["softmax", "raw"])
def test_expert_equals_a_plain_dit_with_its_mixed_state_dict(scope, mixer):
    cfg = tiny(remix_cfg(scope=scope, mixer=mixer), learn_sigma=True)
    model = perturb(DiT(cfg))
    x_BCHW, y_B = inputs(cfg)
    plain = DiT(tiny(learn_sigma=True)).eval()
    for n in (0, 2, 4):
        lo, hi = timestep_interval(n, cfg.remix)
        t_B = torch.tensor([lo, hi - 1, (lo + hi) // 2])
        state = mixed_state_dict(model, n)
        assert state["blocks.1.attn.qkv.weight"].shape == (48, 16)
        plain.load_state_dict(state)
        torch.testing.assert_close(model(x_BCHW, t_B, y_B)[0], plain(x_BCHW, t_B, y_B)[0], atol=1e-5, rtol=1e-5)
    coeffs = model.expert_coefficients(3).detach()
    layer = model.blocks[1].mlp.fc2
    by_hand = sum(coeffs[8][k] * layer.weight[k] for k in range(3))  # row 8 = blocks.1.mlp.fc2 (5 per block)
    torch.testing.assert_close(mixed_state_dict(model, 3)["blocks.1.mlp.fc2.weight"], by_hand.detach())


def test_timesteps_of_several_experts_are_routed_row_by_row():
    cfg = tiny(remix_cfg(scope="local"))
    model = perturb(DiT(cfg))
    x_BCHW, y_B = inputs(cfg, B=6)
    t_B = torch.tensor([0, 999, 450, 10, 620, 105])
    out, _ = model(x_BCHW, t_B, y_B)
    for i in range(6):
        row, _ = model(x_BCHW[i:i + 1], t_B[i:i + 1], y_B[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], row, atol=1e-5, rtol=1e-5)
    model.train()
    out, aux = model(x_BCHW, t_B, y_B)
    out.square().mean().backward()
    grad = model.remix_coeffs[0].logits.grad
    assert grad[[0, 2, 3, 4]].abs().sum(dim=1).min() > 0 and not grad[1].any()  # experts hit: 0, 2, 3, 4


@pytest.mark.parametrize("num_experts", [20, 7])
def test_expert_of_timestep_agrees_with_timestep_interval(num_experts):
    cfg = RemixConfig(num_experts=num_experts, num_timesteps=1000)
    t = torch.arange(1000)
    experts = expert_of_timestep(t, cfg)
    covered = []
    for n in range(num_experts):
        lo, hi = timestep_interval(n, cfg)
        assert lo == math.floor(n * 1000 / num_experts) and hi > lo
        assert torch.equal(experts[lo:hi], torch.full((hi - lo,), n))
        assert all(expert_of_timestep(s, cfg) == n for s in (lo, hi - 1))
        covered.extend(range(lo, hi))
    assert covered == list(range(1000))
    if num_experts == 7:
        assert timestep_interval(1, cfg) == (142, 285) and expert_of_timestep(142, cfg) == 1


def test_prior_loss_by_hand():
    table = MixingCoefficients(2, 2, "softmax")  # priors: expert 0 -> basis 0, expert 1 -> basis 1
    with torch.no_grad():
        table.logits.copy_(torch.tensor([[1.0, 2.0], [0.5, -1.0]]))
    expected = (-math.log(math.e / (math.e + math.e**2)) - math.log(math.exp(-1) / (math.exp(0.5) + math.exp(-1)))) / 2
    assert table.prior_loss().item() == pytest.approx(expected, rel=1e-6)

    raw = MixingCoefficients(2, 2, "raw")
    with torch.no_grad():
        raw.logits.copy_(torch.tensor([[0.25, 0.75], [0.6, -0.2]]))
    assert raw.prior_loss().item() == pytest.approx((-math.log(0.25) - math.log(1e-6)) / 2, rel=1e-6)
    assert float(MixingCoefficients(2, 2, "oracle").prior_loss()) == 0.0

    table = MixingCoefficients(5, 3, "softmax")
    with torch.no_grad():
        table.logits.copy_(torch.randn(5, 3))
    log_probs = torch.log_softmax(table.logits, dim=1)
    by_row = sum(-log_probs[n, prior_basis(n, 5, 3)] for n in range(5)) / 5
    torch.testing.assert_close(table.prior_loss(), by_row)

    model = perturb(DiT(tiny(remix_cfg(scope="local"))))
    per_table = torch.stack([t.prior_loss() for t in model.remix_coeffs])
    assert len(per_table) == 10  # 2 blocks x 5 remixed linears
    x_BCHW, y_B = inputs(model.config)
    _, aux = model(x_BCHW, torch.tensor([1, 2, 3]), y_B)
    torch.testing.assert_close(aux["prior_loss"], per_table.mean())


# -- loading ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["global", "local"])
@pytest.mark.parametrize("mixer", ["softmax", "raw", "oracle"])
def test_remix_initialised_from_a_plain_dit_matches_it_for_every_expert(scope, mixer):
    plain = perturb(DiT(tiny()))
    model = DiT(tiny(remix_cfg(scope=scope, mixer=mixer))).eval()
    load_official_dit_state_dict(model, plain.state_dict())
    assert torch.equal(model.blocks[1].attn.qkv.weight[2], plain.blocks[1].attn.qkv.weight)
    x_BCHW, y_B = inputs(model.config)
    for n in range(5):
        lo, hi = timestep_interval(n, model.config.remix)
        t_B = torch.tensor([lo, hi - 1, lo])
        torch.testing.assert_close(model(x_BCHW, t_B, y_B)[0], plain(x_BCHW, t_B, y_B)[0], atol=1e-5, rtol=1e-5)


def official_state_dict(D: int = 16, depth: int = 2, C: int = 2, p: int = 2, grid: int = 4, c_out: int = 2) -> dict:
    """The official DiT key names and shapes, written out (not taken from our model)."""
    shapes = {
        "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (NUM_CLASSES + 1, D),
        "final_layer.linear.weight": (p * p * c_out, D), "final_layer.linear.bias": (p * p * c_out,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for i in range(depth):
        for name, (out_f, in_f) in {"attn.qkv": (3 * D, D), "attn.proj": (D, D), "mlp.fc1": (4 * D, D),
                                    "mlp.fc2": (D, 4 * D), "adaLN_modulation.1": (6 * D, D)}.items():
            shapes[f"blocks.{i}.{name}.weight"], shapes[f"blocks.{i}.{name}.bias"] = (out_f, in_f), (out_f,)
    generator = torch.Generator().manual_seed(3)
    state = {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    state["pos_embed"] = torch.tensor(np_pos_embed(D, grid), dtype=torch.float32)[None]
    return state


def test_official_layout_loads_and_bad_checkpoints_name_the_key():
    state = official_state_dict()
    plain = DiT(tiny())
    load_official_dit_state_dict(plain, {"model": state})
    loaded = plain.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())

    remix = DiT(tiny(remix_cfg()))
    logits = remix.remix_coeffs.logits.detach().clone()
    load_official_dit_state_dict(remix, {"ema": state, "model": {}})
    assert torch.equal(remix.blocks[1].adaLN_modulation[1].weight, state["blocks.1.adaLN_modulation.1.weight"][None]
                       .expand(3, 96, 16))
    assert torch.equal(remix.x_embedder.proj.weight, state["x_embedder.proj.weight"])
    assert torch.equal(remix.remix_coeffs.logits, logits)

    def error(bad: dict) -> str:
        with pytest.raises(ValueError) as info:
            load_official_dit_state_dict(DiT(tiny()), bad)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert error({k: v for k, v in state.items() if k != "blocks.1.mlp.fc2.bias"}).startswith("blocks.1.mlp.fc2.bias")
    assert error({**state, "blocks.0.attn.q_norm.weight": torch.ones(8)}).startswith("blocks.0.attn.q_norm.weight")
    wrong = {**state, "blocks.0.attn.qkv.weight": torch.randn(16, 48)}
    assert error(wrong) == "blocks.0.attn.qkv.weight: checkpoint has [16, 48], model expects [48, 16]"
    assert error({**state, "pos_embed": state["pos_embed"][:, :9]}).startswith("pos_embed: checkpoint has [1, 9, 16]")
    assert error({**state, "pos_embed": state["pos_embed"] + 0.1}).startswith("pos_embed")
    with pytest.raises(ValueError, match="remix_coeffs.logits: unexpected key"):  # a Remix state dict is not a DiT's
        load_official_dit_state_dict(remix, remix.state_dict())
    bases = {k: v for k, v in remix.state_dict().items() if not k.startswith("remix_coeffs.")}
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.weight: checkpoint has \\[3, 48, 16\\], model expects"):
        load_official_dit_state_dict(remix, bases)


# -- guidance and validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_forward_with_cfg(learn_sigma):
    cfg = tiny(learn_sigma=learn_sigma)
    model = perturb(DiT(cfg))
    x_BCHW, _ = inputs(cfg, B=2)
    t_B, y_B = torch.tensor([10, 700]), torch.tensor([1, 3])
    null_B = torch.full((2,), NUM_CLASSES)
    cond, _ = model(x_BCHW, t_B, y_B)
    uncond, _ = model(x_BCHW, t_B, null_B)
    doubled = (torch.cat([x_BCHW, torch.randn_like(x_BCHW)]), torch.cat([t_B, t_B]), torch.cat([y_B, null_B]))
    for scale in (1.0, 3.0):
        out = model.forward_with_cfg(*doubled, scale)
        guided = uncond[:, :2] + scale * (cond[:, :2] - uncond[:, :2])
        torch.testing.assert_close(out[:2, :2], guided, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out[2:, :2], guided, atol=1e-4, rtol=1e-4)
        if learn_sigma:
            torch.testing.assert_close(out[:2, 2:], cond[:, 2:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.forward_with_cfg(*doubled, 1.0)[:2, :2], cond[:, :2], atol=1e-4, rtol=1e-4)


def test_bad_settings_give_one_line_errors():
    cases = [
        (lambda: RemixConfig(num_experts=0), "num_experts"),
        (lambda: RemixConfig(num_basis=0), "num_basis"),
        (lambda: RemixConfig(num_experts=30, num_timesteps=20), "num_timesteps"),
        (lambda: RemixConfig(mixer="mean"), "mixer"),
        (lambda: RemixConfig(scope="block"), "scope"),
        (lambda: tiny(image_size=10, patch_size=4), "image_size"),
        (lambda: tiny(hidden_size=18, num_heads=3), "hidden_size"),
        (lambda: expert_of_timestep(torch.tensor([3, 1000]), RemixConfig()), "timesteps"),
        (lambda: expert_of_timestep(torch.tensor([3.0]), RemixConfig()), "timesteps"),
        (lambda: timestep_interval(20, RemixConfig()), "expert 20"),
    ]
    for build, word in cases:
        with pytest.raises(ValueError, match=word) as info:
            build()
        assert "\n" not in str(info.value)
