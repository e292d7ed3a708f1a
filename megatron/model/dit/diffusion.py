"""Gaussian diffusion as DiT trains and samples it: DDPM (Ho et al., 2020) with improved DDPM's learned variance.

Shape legend: B batch, C channels, H/W pixels (any trailing dims work), T schedule timesteps.

The model predicts epsilon; it is any callable `model(x_BCHW, t_B, y_B) -> out_BCHW` or `(out_BCHW, aux)`, with
C output channels, or 2C with learn_sigma (eps, then v in [-1, 1]). Betas are linear from beta_start to beta_end
and taken as given (DiT scales both by 1000/T when T != 1000; pass scaled values to do the same). Every table is
computed in float64, as DiT and improved-diffusion do, and cast to float32 on the input's device when used.

Variance of p(x_{t-1} | x_t):
- learn_sigma=False: "fixed large", beta_t (the posterior variance at t=1 stands in for beta_0), which is what
  DiT's `create_diffusion` picks without learned sigma (sigma_small=False) and improved-diffusion's default.
  `fixed_variance="small"` takes the posterior variance instead (DDPM's other choice, better for few steps).
- learn_sigma=True: log variance = frac log(beta_t) + (1 - frac) log(posterior variance), frac = (v + 1) / 2
  (improved DDPM eq. 15), learned by the hybrid loss mse + vb with eps detached inside vb.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

Model = Callable[..., Any]


def _at(table_T: torch.Tensor, t_B: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] as float32 on like's device, shaped [B, 1, 1, ...] to broadcast against like."""
    values_B = table_T.float().to(like.device)[t_B]
    return values_B.view(-1, *([1] * (like.dim() - 1)))


def _split_output(result: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A model returns `out` or `(out, aux)`; DiT's forward_with_cfg returns a bare tensor."""
    if isinstance(result, tuple):
        return result[0], dict(result[1])
    return result, {}


def guide(out_2B: torch.Tensor, channels: int, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance of a [conditional half; unconditional half] output: both halves carry
    uncond + s (cond - uncond) on the first `channels` channels; the rest (learned variance) passes through."""
    cond, uncond = out_2B[:, :channels].chunk(2)
    guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided]), out_2B[:, channels:]], dim=1)


def forward_with_cfg(model: Model, x_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor,
                     cfg_scale: float) -> torch.Tensor:
    """DiT's `forward_with_cfg` for any model with `config.in_channels`: the batch is [conditional half; null-class
    half] (y = num_classes in the second half), only the first half of x is read, and the output is `guide`'s."""
    half = x_BCHW[: x_BCHW.shape[0] // 2]
    out = _split_output(model.forward(torch.cat([half, half]), t_B, y_B))[0]
    return guide(out, model.config.in_channels, cfg_scale)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x's 8-bit bin) under N(mean, e^(2 log_scale)): bins 2/255 wide on [-1, 1], the two edge bins open.

    The exact erf cdf; improved-diffusion uses a tanh approximation (they differ by < 1e-3).
    """
    def cdf(z: torch.Tensor) -> torch.Tensor:
        return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))

    inv_scale, centred = torch.exp(-log_scale), x - mean
    cdf_plus, cdf_minus = cdf(inv_scale * (centred + 1 / 255)), cdf(inv_scale * (centred - 1 / 255))
    log_below = cdf_plus.clamp_min(1e-12).log()
    log_above = (1.0 - cdf_minus).clamp_min(1e-12).log()
    log_bin = (cdf_plus - cdf_minus).clamp_min(1e-12).log()
    return torch.where(x < -0.999, log_below, torch.where(x > 0.999, log_above, log_bin))


class GaussianDiffusion:
    """The forward process q, the training loss and two samplers (ancestral DDPM and DDIM) for eps models."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 learn_sigma: bool = False, fixed_variance: str = "large"):
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps {num_timesteps}: expected >= 2")
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"beta_start {beta_start}, beta_end {beta_end}: expected 0 < beta_start <= beta_end < 1")
        if fixed_variance not in ("large", "small"):
            raise ValueError(f"fixed_variance {fixed_variance!r}: expected 'large' or 'small'")
        self.num_timesteps, self.learn_sigma, self.fixed_variance = num_timesteps, learn_sigma, fixed_variance
        betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
        cumprod = np.cumprod(1.0 - betas)
        cumprod_prev = np.append(1.0, cumprod[:-1])
        posterior_variance = betas * (1.0 - cumprod_prev) / (1.0 - cumprod)
        # the posterior variance is 0 at t=0: its log takes t=1's value there (it only enters the t=0 decoder term)
        posterior_log_variance = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        large_log_variance = np.log(np.append(posterior_variance[1], betas[1:]))
        tables = {
            "betas": betas,
            "alphas_cumprod": cumprod,
            "alphas_cumprod_prev": cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / cumprod - 1.0),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_log_variance,
            "posterior_mean_coef1": betas * np.sqrt(cumprod_prev) / (1.0 - cumprod),
            "posterior_mean_coef2": (1.0 - cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - cumprod),
            "log_betas": np.log(betas),
            "fixed_log_variance": large_log_variance if fixed_variance == "large" else posterior_log_variance,
        }
        for name, values_T in tables.items():
            setattr(self, name, torch.from_numpy(values_T))  # float64 on the CPU

    # -- the forward process ---------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t_B: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, a draw from q(x_t | x0)."""
        return _at(self.sqrt_alphas_cumprod, t_B, x0) * x0 + _at(self.sqrt_one_minus_alphas_cumprod, t_B, x0) * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t_B: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, variance, clipped log variance) of q(x_{t-1} | x_t, x0)."""
        mean = _at(self.posterior_mean_coef1, t_B, x_t) * x0 + _at(self.posterior_mean_coef2, t_B, x_t) * x_t
        return (mean, _at(self.posterior_variance, t_B, x_t).expand_as(x_t),
                _at(self.posterior_log_variance_clipped, t_B, x_t).expand_as(x_t))

    def predict_x0(self, x_t: torch.Tensor, t_B: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), q_sample solved for x0."""
        return (_at(self.sqrt_recip_alphas_cumprod, t_B, x_t) * x_t
                - _at(self.sqrt_recipm1_alphas_cumprod, t_B, x_t) * eps)

    def _check_output(self, out: torch.Tensor, x: torch.Tensor) -> None:
        expected = [x.shape[0], 2 * x.shape[1] if self.learn_sigma else x.shape[1], *x.shape[2:]]
        if list(out.shape) != expected:
            raise ValueError(f"model output shape {list(out.shape)}: expected {expected} "
                             f"(learn_sigma={self.learn_sigma})")

    # -- the reverse process ---------------------------------------------------------------------
    def p_mean_variance(self, out: torch.Tensor, x_t: torch.Tensor, t_B: torch.Tensor,
                        clip_denoised: bool = True) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from the model's output at (x_t, t): mean, variance, log_variance, pred_x0.

        Takes the output rather than the model so the loss can feed it a detached eps.
        """
        self._check_output(out, x_t)
        C = x_t.shape[1]
        eps = out[:, :C]
        if self.learn_sigma:
            frac = (out[:, C:] + 1) / 2
            log_variance = frac * _at(self.log_betas, t_B, x_t) + (1 - frac) * _at(
                self.posterior_log_variance_clipped, t_B, x_t)
        else:
            log_variance = _at(self.fixed_log_variance, t_B, x_t).expand_as(x_t)
        pred_x0 = self.predict_x0(x_t, t_B, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t_B)
        return {"mean": mean, "variance": log_variance.exp(), "log_variance": log_variance, "pred_x0": pred_x0}

    def vb_terms_bpd(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        """[B] bits per dim: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)), or at t=0 the decoder's -log p(x0)."""
        true_mean, _, true_log_variance = self.q_posterior(x0, x_t, t_B)
        p = self.p_mean_variance(out, x_t, t_B, clip_denoised=False)
        kl_B = normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"]).flatten(1).mean(1)
        nll_B = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"]).flatten(1).mean(1)
        return torch.where(t_B == 0, nll_B, kl_B) / math.log(2.0)

    def training_losses(self, model: Model, x0: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor,
                        noise: torch.Tensor | None = None
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """({"loss", "mse"[, "vb"]}, each [B]; the model's aux dict). With learn_sigma loss = mse + vb, improved
        DDPM's hybrid loss: vb sees eps detached, so only the variance channels learn from it."""
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t_B, noise)
        out, aux = _split_output(model(x_t, t_B, y_B))
        self._check_output(out, x0)
        C = x0.shape[1]
        losses = {"mse": ((noise - out[:, :C]) ** 2).flatten(1).mean(1)}
        if self.learn_sigma:
            frozen = torch.cat([out[:, :C].detach(), out[:, C:]], dim=1)
            losses["vb"] = self.vb_terms_bpd(frozen, x0, x_t, t_B)
            losses["loss"] = losses["mse"] + losses["vb"]
        else:
            losses["loss"] = losses["mse"]
        return losses, aux

    # -- sampling --------------------------------------------------------------------------------
    def guided_output(self, model: Model, x: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor,
                      cfg_scale: float | None, null_class: int | None = None) -> torch.Tensor:
        """The model's output, or with cfg_scale the classifier-free guided one: eps = uncond + s (cond - uncond),
        the variance channels from the conditional half. Uses `model.forward_with_cfg` if there is one (DiT's
        layout: [x; x], [t; t], [y; null]) and guides here otherwise; null is `null_class` or num_classes."""
        if cfg_scale is None:
            return _split_output(model(x, t_B, y_B))[0]
        B, C = x.shape[:2]
        null_B = torch.full_like(y_B, self._null_class(model, null_class))
        x2, t2, y2 = torch.cat([x, x]), torch.cat([t_B, t_B]), torch.cat([y_B, null_B])
        if callable(getattr(model, "forward_with_cfg", None)):
            return _split_output(model.forward_with_cfg(x2, t2, y2, cfg_scale))[0][:B]
        return guide(_split_output(model(x2, t2, y2))[0], C, cfg_scale)[:B]

    @staticmethod
    def _null_class(model: Model, null_class: int | None) -> int:
        if null_class is not None:
            return null_class
        for owner in (model, getattr(model, "module", None)):
            config = getattr(owner, "config", None)
            for found in (getattr(config, "num_classes", None), getattr(owner, "num_classes", None)):
                if isinstance(found, int):
                    return found
        raise ValueError("cfg_scale: the model has no config.num_classes or num_classes; pass null_class")

    @staticmethod
    def _noise(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device)

    @staticmethod
    def _progress(steps: Iterable[int], progress: bool) -> Iterable[int]:
        if not progress:
            return steps
        from tqdm.auto import tqdm

        return tqdm(list(steps), desc="sampling")

    @torch.no_grad()
    def ddpm_sample(self, model: Model, shape: Sequence[int], y_B: torch.Tensor,
                    generator: torch.Generator | None = None, cfg_scale: float | None = None, progress: bool = False,
                    clip_denoised: bool = True, callback: Callable[[int, torch.Tensor], None] | None = None,
                    null_class: int | None = None) -> torch.Tensor:
        """Ancestral sampling, t = T-1 .. 0, on y's device. All noise comes from `generator` (on the CPU): x_T
        first, then one draw per step t > 0. The model's train/eval mode is the caller's (DiT drops labels in
        training mode). callback(t, x_{t-1}) after each step."""
        device = y_B.device
        x = self._noise(shape, generator, device)
        for i in self._progress(range(self.num_timesteps - 1, -1, -1), progress):
            t_B = torch.full((shape[0],), i, dtype=torch.long, device=device)
            out = self.guided_output(model, x, t_B, y_B, cfg_scale, null_class)
            p = self.p_mean_variance(out, x, t_B, clip_denoised)
            x = p["mean"]
            if i > 0:
                x = x + torch.exp(0.5 * p["log_variance"]) * self._noise(shape, generator, device)
            if callback is not None:
                callback(i, x)
        return x

    def ddim_timesteps(self, steps: int) -> list[int]:
        """Evenly spaced, ascending: t_i = round(i (T-1) / (steps-1)), i < steps, so 0 and T-1 are both visited
        (DiT's respacing with one section); one step is [T-1]."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"DDIM steps {steps}: expected 1 <= steps <= num_timesteps {self.num_timesteps}")
        if steps == 1:
            return [self.num_timesteps - 1]
        return [round(i * (self.num_timesteps - 1) / (steps - 1)) for i in range(steps)]

    @torch.no_grad()
    def ddim_sample(self, model: Model, shape: Sequence[int], y_B: torch.Tensor, steps: int = 50, eta: float = 0.0,
                    generator: torch.Generator | None = None, cfg_scale: float | None = None, progress: bool = False,
                    clip_denoised: bool = True, callback: Callable[[int, torch.Tensor], None] | None = None,
                    null_class: int | None = None) -> torch.Tensor:
        """DDIM (Song et al., eq. 12) over `ddim_timesteps(steps)`, on y's device; eta = 0 is deterministic given
        x_T (no noise drawn after it), eta = 1 is DDPM-like. Learned variance channels are ignored. Noise and
        callback as in `ddpm_sample`."""
        device = y_B.device
        x = self._noise(shape, generator, device)
        schedule = self.ddim_timesteps(steps)[::-1]
        for k in self._progress(range(len(schedule)), progress):
            i, prev = schedule[k], schedule[k + 1] if k + 1 < len(schedule) else -1
            t_B = torch.full((shape[0],), i, dtype=torch.long, device=device)
            out = self.guided_output(model, x, t_B, y_B, cfg_scale, null_class)
            pred_x0 = self.p_mean_variance(out, x, t_B, clip_denoised)["pred_x0"]
            eps = (_at(self.sqrt_recip_alphas_cumprod, t_B, x) * x - pred_x0) / _at(
                self.sqrt_recipm1_alphas_cumprod, t_B, x)  # re-derived: differs from the model's when clipped
            abar, abar_prev = float(self.alphas_cumprod[i]), float(self.alphas_cumprod[prev]) if prev >= 0 else 1.0
            sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
            x = math.sqrt(abar_prev) * pred_x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
            if sigma > 0:
                x = x + sigma * self._noise(shape, generator, device)
            if callback is not None:
                callback(i, x)
        return x
