"""The rule that decides whether a native Hugging Face family may hold our model: by every field of its config.

A family declares the config fields it represents (`represents`: a field's dotted path in GPTConfig, such as
`norm` or `moe.score_function`, mapped to the values it holds, or ANY). Every other field must hold its
default, the value that means "off", or the family would compute another function: each such field is a
reason naming it and its value. Nested configs (`moe`, `moe.balancing`, `moe.lore`, `rope_scaling`) are walked
field by field, so a field added to any of them later blocks every family until one declares it, instead of
being silently dropped from an export. Fields that shape training but never the function (TRAINING_ONLY) are
free for every family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

ANY = "any value"  # a `represents` entry: the family holds whatever value the field has

# Fields that change how a model trains, never what its forward computes in evaluation (tested: the same weights
# give the same logits whatever their value), so no family needs to hold them.
TRAINING_ONLY = frozenset({
    "init_method", "output_layer_init_method", "init_method_std",  # the initial draw only
    "hidden_dropout", "attention_dropout",  # off outside training
    "checkpoint_activations",  # recomputation in the backward pass
    "attention_impl",  # sdpa or flash: two kernels of one attention
    "moe.jitter_eps",  # input noise in training only
    "moe.lbl_in_fp32",  # the balancing loss's precision
    "moe.balancing.lbl_scope", "moe.balancing.bias_update_rate",  # the loss's scope, the bias's update (not the bias)
    "moe.lore.balancing.lbl_scope", "moe.lore.balancing.bias_update_rate",
})


def field_default(field: dataclasses.Field) -> Any:
    """The value a field holds when not set, or MISSING for a required one."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def shown(value: Any) -> str:
    """A value for a reason: a nested config by its class name, anything else as repr."""
    return f"{type(value).__name__}(...)" if dataclasses.is_dataclass(value) else repr(value)


def unrepresented(cfg: Any, represents: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Each field of `cfg` (a config dataclass, walked into its nested ones) that the family's `represents`
    does not hold: `path: value (expected ...)`; [] when the family holds every one."""
    reasons = []
    for field in dataclasses.fields(cfg):
        path, value = prefix + field.name, getattr(cfg, field.name)
        if path in TRAINING_ONLY:
            continue
        default = field_default(field)
        if path in represents:
            allowed = represents[path]
            if allowed != ANY and value not in allowed:
                reasons.append(f"{path}: {shown(value)} (expected {' or '.join(map(repr, allowed))})")
                continue
        elif not (dataclasses.is_dataclass(value) and dataclasses.is_dataclass(default)) and value != default:
            expected = "a field this format has no place for" if default is dataclasses.MISSING else repr(default)
            reasons.append(f"{path}: {shown(value)} (expected {expected})")
            continue
        if dataclasses.is_dataclass(value):  # a nested config the family holds: each of its fields counts
            reasons += unrepresented(value, represents, f"{path}.")
    return reasons
