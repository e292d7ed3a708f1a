"""Gaussian diffusion: the schedule and posterior against closed forms, the loss and both samplers with oracle models.

Shape legend: B batch, C channels, H/W pixels.

An oracle knows the data is one fixed x0, so from x_t it computes the true eps = (x_t - sqrt(abar_t) x0) /
sqrt(1 - abar_t) in closed form; a sampler driven by it must land on x0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron.model.dit.diffusion import GaussianDiffusion, normal_kl


def linear_alphas_cumprod(T: int = 1000, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
    return np.cumprod(1.0 - np.linspace(start, end, T, dtype=np.float64))


def oracle(x0_BCHW: torch.Tensor, T: int = 1000, learn_sigma: bool = False, v: float = 0.0):
    """The model that predicts eps exactly for data = x0 (and a constant variance value v with learn_sigma)."""
    abar_T = torch.from_numpy(linear_alphas_cumprod(T))

    def model(x_BCHW, t_B, y_B):
        abar = abar_T[t_B].view(-1, 1, 1, 1)
        eps = ((x_BCHW.double() - abar.sqrt() * x0_BCHW.double()) / (1 - abar).sqrt()).float()
        return (torch.cat([eps, torch.full_like(eps, v)], dim=1) if learn_sigma else eps), {}

    return model


def x0_fixed(B: int = 2, C: int = 1, S: int = 4) -> torch.Tensor:
    return torch.linspace(-0.9, 0.9, B * C * S * S).view(B, C, S, S)


def test_schedule_matches_the_closed_form():
    diffusion = GaussianDiffusion()
    expected = linear_alphas_cumprod()
    assert diffusion.alphas_cumprod.dtype == torch.float64
    np.testing.assert_allclose(diffusion.alphas_cumprod.numpy(), expected, rtol=1e-12)
    assert float(diffusion.alphas_cumprod[0]) == pytest.approx(1 - 1e-4, abs=1e-15)
    assert float(diffusion.alphas_cumprod[999]) == pytest.approx(np.prod(1 - np.linspace(1e-4, 0.02, 1000)), rel=1e-12)
    assert 4.0e-5 < float(diffusion.alphas_cumprod[999]) < 4.1e-5  # the well-known value for DDPM's schedule


def test_q_sample_exact_without_noise_and_statistically_with_it():
    diffusion, abar = GaussianDiffusion(), linear_alphas_cumprod()
    x0 = torch.full((3, 1, 2, 2), 0.7)
    t_B = torch.tensor([0, 500, 999])
    zero = diffusion.q_sample(x0, t_B, torch.zeros_like(x0))
    assert zero.dtype == torch.float32
    torch.testing.assert_close(zero[:, 0, 0, 0], torch.tensor(0.7 * np.sqrt(abar[[0, 500, 999]]), dtype=torch.float32))
    noise = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    x_t = diffusion.q_sample(torch.full_like(noise, 0.7), torch.full((20000,), 300), noise)
    assert float(x_t.mean()) == pytest.approx(0.7 * math.sqrt(abar[300]), abs=0.02)
    assert float(x_t.std()) == pytest.approx(math.sqrt(1 - abar[300]), abs=0.02)


def test_posterior_mean_and_variance_for_hand_numbers():
    diffusion = GaussianDiffusion(num_timesteps=3, beta_start=0.1, beta_end=0.3)  # betas 0.1, 0.2, 0.3
    x0, x_t = torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), -0.2)
    mean, variance, log_variance = diffusion.q_posterior(x0, x_t, torch.tensor([1]))
    # abar = 0.9, 0.72; coef1 = beta_1 sqrt(abar_0) / (1 - abar_1), coef2 = (1 - abar_0) sqrt(alpha_1) / (1 - abar_1)
    expected_mean = 0.2 * math.sqrt(0.9) / 0.28 * 0.5 + 0.1 * math.sqrt(0.8) / 0.28 * -0.2
    assert float(mean) == pytest.approx(expected_mean, abs=1e-6)
    assert float(variance) == pytest.approx(0.2 * 0.1 / 0.28, abs=1e-7)
    assert float(log_variance) == pytest.approx(math.log(0.2 * 0.1 / 0.28), abs=1e-6)
    mean0, variance0, log_variance0 = diffusion.q_posterior(x0, x_t, torch.tensor([0]))
    assert float(mean0) == pytest.approx(0.5, abs=1e-6) and float(variance0) == 0.0  # t=0: x_{-1} is x0 itself
    assert float(log_variance0) == pytest.approx(math.log(0.2 * 0.1 / 0.28), abs=1e-6)  # clipped to t=1's value


def test_an_oracle_that_knows_the_noise_has_zero_loss():
    x0 = x0_fixed()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    t_B = torch.tensor([0, 700])
    losses, aux = GaussianDiffusion().training_losses(lambda x, t, y: (noise, {"a": 1}), x0, t_B, torch.zeros(2), noise)
    assert losses["loss"].shape == (2,) and torch.all(losses["loss"] == 0) and aux == {"a": 1}
    # a model returning a bare tensor (no aux) works too, and with learn_sigma the vb term is finite
    model = lambda x, t, y: torch.cat([noise, torch.zeros_like(noise)], dim=1)
    losses, aux = GaussianDiffusion(learn_sigma=True).training_losses(model, x0, t_B, torch.zeros(2), noise)
    assert aux == {} and torch.all(losses["mse"] == 0) and torch.isfinite(losses["vb"]).all()
    torch.testing.assert_close(losses["loss"], losses["vb"])


def test_vb_is_zero_for_the_true_posterior_and_trains_only_the_variance():
    diffusion = GaussianDiffusion(learn_sigma=True)
    x0 = x0_fixed()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    t_B = torch.tensor([10, 600])
    # v = -1 picks the posterior variance; with the true eps the model's p is q(x_{t-1} | x_t, x0): KL 0
    losses, _ = diffusion.training_losses(oracle(x0, learn_sigma=True, v=-1.0), x0, t_B, torch.zeros(2), noise)
    assert losses["vb"].abs().max() < 1e-4
    out = torch.cat([noise + 0.1, torch.full_like(noise, 0.3)], dim=1).requires_grad_()
    losses, _ = diffusion.training_losses(lambda x, t, y: out, x0, t_B, torch.zeros(2), noise)
    assert float(losses["vb"].detach().min()) > 0
    (grad,) = torch.autograd.grad(losses["vb"].sum(), out)
    assert torch.all(grad[:, :1] == 0) and grad[:, 1:].abs().sum() > 0


def test_normal_kl_of_equal_gaussians_is_zero_and_matches_the_formula():
    m, lv = torch.tensor([0.3]), torch.tensor([-1.0])
    assert float(normal_kl(m, lv, m, lv)) == 0.0
    expected = 0.5 * (0.5 - (-1.0) + math.exp(-1.5) + 0.2**2 * math.exp(-0.5) - 1)
    assert float(normal_kl(m, lv, m + 0.2, torch.tensor([0.5]))) == pytest.approx(expected, rel=1e-6)


def test_ddim_timesteps_are_evenly_spaced_from_0_to_T_minus_1():
    diffusion = GaussianDiffusion()
    steps = diffusion.ddim_timesteps(50)
    assert len(set(steps)) == 50 and steps[0] == 0 and steps[-1] == 999 and steps == sorted(steps)
    assert steps[:3] == [0, 20, 41]  # round(i x 999 / 49)
    assert diffusion.ddim_timesteps(1000) == list(range(1000)) and diffusion.ddim_timesteps(1) == [999]
    with pytest.raises(ValueError, match="DDIM steps 1001"):
        diffusion.ddim_timesteps(1001)


def test_ddim_with_an_oracle_recovers_x0_and_eta0_is_deterministic():
    diffusion, x0 = GaussianDiffusion(), x0_fixed()
    y_B = torch.zeros(2, dtype=torch.long)
    seen = []
    sample = diffusion.ddim_sample(oracle(x0), x0.shape, y_B, steps=5, generator=torch.Generator().manual_seed(0),
                                   callback=lambda t, x: seen.append(t))
    torch.testing.assert_close(sample, x0, atol=1e-4, rtol=0)
    assert seen == [999, 749, 500, 250, 0]
    model = lambda x, t, y: torch.tanh(x * 0.5 + t.view(-1, 1, 1, 1) / 1000)
    runs = [diffusion.ddim_sample(model, x0.shape, y_B, steps=8, generator=torch.Generator().manual_seed(3))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    noisy = [diffusion.ddim_sample(model, x0.shape, y_B, steps=8, eta=1.0, generator=torch.Generator().manual_seed(s))
             for s in (3, 3, 4)]
    assert torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[0], noisy[2])
    assert not torch.equal(noisy[0], runs[0])


def test_ddpm_with_an_oracle_ends_at_x0_and_seeds_reproduce():
    diffusion, x0 = GaussianDiffusion(), x0_fixed()
    y_B = torch.zeros(2, dtype=torch.long)
    sample = diffusion.ddpm_sample(oracle(x0), x0.shape, y_B, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample, x0, atol=1e-4, rtol=0)
    small = GaussianDiffusion(num_timesteps=50, beta_start=2e-3, beta_end=0.4)
    model = lambda x, t, y: 0.3 * x
    a, b, c = (small.ddpm_sample(model, x0.shape, y_B, generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_learned_variance_drives_the_ancestral_step_as_computed_by_hand():
    diffusion = GaussianDiffusion(num_timesteps=2, beta_start=0.1, beta_end=0.2, learn_sigma=True)
    shape, y_B = (1, 1, 2, 2), torch.zeros(1, dtype=torch.long)

    def model(x, t, y):
        return torch.cat([torch.full_like(x, 0.3), torch.full_like(x, 0.5)], dim=1)

    sample = diffusion.ddpm_sample(model, shape, y_B, generator=torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    x1 = torch.randn(shape, generator=generator).double().numpy()
    z = torch.randn(shape, generator=generator).double().numpy()
    abar0, abar1 = 0.9, 0.72
    pred = np.clip(np.sqrt(1 / abar1) * x1 - np.sqrt(1 / abar1 - 1) * 0.3, -1, 1)
    mean = 0.2 * np.sqrt(abar0) / (1 - abar1) * pred + (1 - abar0) * np.sqrt(0.8) / (1 - abar1) * x1
    log_variance = 0.75 * math.log(0.2) + 0.25 * math.log(0.2 * (1 - abar0) / (1 - abar1))  # frac = (0.5 + 1) / 2
    x0_step = mean + math.exp(0.5 * log_variance) * z
    expected = np.clip(np.sqrt(1 / abar0) * x0_step - np.sqrt(1 / abar0 - 1) * 0.3, -1, 1)  # t=0: the mean is x0
    np.testing.assert_allclose(sample.double().numpy(), expected, atol=1e-5)
    p = diffusion.p_mean_variance(model(sample, None, None), sample, torch.tensor([1]))
    assert float(p["variance"][0, 0, 0, 0]) == pytest.approx(math.exp(log_variance), rel=1e-5)


def test_fixed_variance_large_is_beta_and_small_is_the_posterior():
    x, t_B = torch.zeros(1, 1, 1, 1), torch.tensor([500])
    large = GaussianDiffusion().p_mean_variance(x, x, t_B)["variance"]
    small = GaussianDiffusion(fixed_variance="small").p_mean_variance(x, x, t_B)["variance"]
    abar = linear_alphas_cumprod()
    beta = np.linspace(1e-4, 0.02, 1000)[500]
    assert float(large) == pytest.approx(beta, rel=1e-5)
    assert float(small) == pytest.approx(beta * (1 - abar[499]) / (1 - abar[500]), rel=1e-5)


def test_guidance_with_a_plain_function_and_scale_one_is_no_guidance():
    diffusion, shape = GaussianDiffusion(), (3, 1, 2, 2)
    table = torch.tensor([0.5, -0.4, 0.1, 0.0])  # class 3 is the null class
    y_B = torch.tensor([0, 1, 2])
    model = lambda x, t, y: 0.1 * x + table[y].view(-1, 1, 1, 1)
    scale = 3.0
    guided = lambda x, t, y: 0.1 * x + (table[3] + scale * (table[y] - table[3])).view(-1, 1, 1, 1)

    def run(fn, cfg=None):
        return diffusion.ddim_sample(fn, shape, y_B, steps=6, generator=torch.Generator().manual_seed(0),
                                     cfg_scale=cfg, null_class=3, clip_denoised=False)

    torch.testing.assert_close(run(model, scale), run(guided), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run(model, 1.0), run(model), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pass null_class"):
        diffusion.ddim_sample(model, shape, y_B, steps=2, cfg_scale=2.0)


def test_guidance_through_a_dit_forward_with_cfg():
    from megatron.model.dit import DiT, DiTConfig

    torch.manual_seed(0)
    model = DiT(DiTConfig(image_size=8, in_channels=1, patch_size=4, depth=1, hidden_size=16, num_heads=2,
                          num_classes=10, learn_sigma=True)).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # adaLN-Zero starts at output 0: make the labels matter
            parameter.normal_(0, 0.2)
    diffusion, shape, y_B = GaussianDiffusion(learn_sigma=True), (2, 1, 8, 8), torch.tensor([3, 7])
    runs = {cfg: diffusion.ddim_sample(model, shape, y_B, steps=4, generator=torch.Generator().manual_seed(1),
                                       cfg_scale=cfg) for cfg in (None, 1.0, 4.0)}
    torch.testing.assert_close(runs[1.0], runs[None], atol=1e-5, rtol=0)
    assert (runs[4.0] - runs[None]).abs().max() > 1e-3
    losses, aux = diffusion.training_losses(model, torch.zeros(shape), torch.tensor([0, 999]), y_B)
    assert set(losses) == {"loss", "mse", "vb"} and torch.isfinite(losses["loss"]).all() and aux == {}


def test_a_model_output_of_the_wrong_shape_is_a_one_line_error():
    x0 = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"model output shape \[2, 1, 4, 4\]: expected \[2, 2, 4, 4\]") as err:
        GaussianDiffusion(learn_sigma=True).training_losses(lambda x, t, y: x, x0, torch.tensor([1, 2]), None)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="beta_start"):
        GaussianDiffusion(beta_start=0.5, beta_end=0.1)
