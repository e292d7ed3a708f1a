"""The diffusion family: DiT, Remix-DiT (K basis DiTs mixed into N timestep experts) and Gaussian diffusion.

Modules, each importing only those before it: config (settings, timestep intervals, the builder from the run
config), diffusion (the process, losses, samplers, classifier-free guidance), remix (basis layers, coefficient
tables), model (the DiT), experts (experts exported as plain DiTs, `ExpertSwitch`).
"""

from megatron.model.dit.config import (
    DiTConfig,
    RemixConfig,
    dit_config_from_args,
    expert_of_timestep,
    timestep_interval,
)
from megatron.model.dit.diffusion import GaussianDiffusion
from megatron.model.dit.experts import ExpertSwitch, mixed_state_dict
from megatron.model.dit.model import DiT, load_official_dit_state_dict

__all__ = [
    "DiT",
    "DiTConfig",
    "ExpertSwitch",
    "GaussianDiffusion",
    "RemixConfig",
    "dit_config_from_args",
    "expert_of_timestep",
    "load_official_dit_state_dict",
    "mixed_state_dict",
    "timestep_interval",
]
