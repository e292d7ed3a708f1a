"""The rule that picks a native Hugging Face format (megatron/hf/fields.py): every field of the model's config
is either held by the family or blocks it, so a field added later can never be dropped from an export."""

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from megatron.hf.deepseek_v3 import DEEPSEEK_FIELDS, deepseek_blockers
from megatron.hf.export import choose_format
from megatron.hf.fields import ANY, TRAINING_ONLY, unrepresented
from megatron.hf.gpt_oss import GPT_OSS_FIELDS, gpt_oss_blockers
from megatron.hf.llama import LLAMA_FIELDS, llama_blockers
from megatron.hf.neox import NEOX_FIELDS, neox_blockers
from megatron.model.gpt import GPT, GPTConfig
from megatron.model.mla import MLAConfig
from megatron.model.moe import MoEArchitecture, MoERuntime
from megatron.model.moe.lore import LoREConfig
from megatron.model.moe.router import Balancing
from megatron.model.rope import Llama3RopeScaling, YarnRopeScaling

FAMILIES = {"gpt_neox": NEOX_FIELDS, "llama": LLAMA_FIELDS, "deepseek_v3": DEEPSEEK_FIELDS, "gpt_oss": GPT_OSS_FIELDS}
NEOX_SHAPED = GPTConfig(vocab_size=64, num_layers=2, hidden_size=32, num_attention_heads=4)
LLAMA_SHAPED = dataclasses.replace(NEOX_SHAPED, norm="rmsnorm", activation="swiglu", use_bias_in_mlp=False,
                                   use_bias_in_attn_linear=False, num_kv_heads=2, intermediate_size=96)
MIXTRAL_SHAPED = dataclasses.replace(LLAMA_SHAPED, moe=MoEArchitecture(4, top_k=2, renormalize=True))
# every nested part present, so that every field of every config class has a path
EVERYTHING = dataclasses.replace(MIXTRAL_SHAPED, rope_scaling=Llama3RopeScaling(), moe=dataclasses.replace(
    MIXTRAL_SHAPED.moe, lore=LoREConfig(4, 2)))
# ... and the nested parts that exclude those: YaRN's scaling, multi-head latent attention
EVERYTHING_ELSE = dataclasses.replace(EVERYTHING, rope_scaling=YarnRopeScaling(4.0, 16), mla=MLAConfig(16, 8, 4, 6, 12))
DEEPSEEK_SHAPED = dataclasses.replace(LLAMA_SHAPED, num_kv_heads=None, norm_eps=1e-6, mla=MLAConfig(16, 8, 4, 6, 12),
                                      moe=MoEArchitecture(8, top_k=2, first_layer=1, score_function="sigmoid",
                                                          balancing=Balancing(bias=True), num_shared_experts=1,
                                                          num_groups=4, group_top_k=2, scaling_factor=2.5))
GPT_OSS_SHAPED = dataclasses.replace(LLAMA_SHAPED, head_dim=16, use_bias_in_attn_linear=True, attention_sinks=True,
                                     sliding_window_width=5, sliding_window_pattern=("sliding", "full"),
                                     activation="clamped_swiglu", rope_scaling=YarnRopeScaling(32.0, 4096),
                                     moe=MoEArchitecture(4, top_k=2, renormalize=True, router_bias=True,
                                                         expert_biases=True))
FOREIGN = object()  # a value no family holds


def paths(cfg, prefix: str = "") -> list[str]:
    """The dotted path of every field, nested configs' fields included."""
    found = []
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        found.append(prefix + field.name)
        if dataclasses.is_dataclass(value):
            found += paths(value, f"{prefix}{field.name}.")
    return found


def with_value(cfg, path: str, value):
    """A copy of `cfg` with the field at `path` set to `value`, unchecked (frozen classes and validation bypassed)."""
    cfg = copy.deepcopy(cfg)
    *parents, name = path.split(".")
    owner = cfg
    for parent in parents:
        owner = getattr(owner, parent)
    object.__setattr__(owner, name, value)
    return cfg


def named(reasons: list[str], path: str) -> bool:
    return any(reason.startswith(f"{path}: ") for reason in reasons)


def ancestors(path: str) -> list[str]:
    """The path and those of the configs around it: `moe.lore.rank` -> moe.lore.rank, moe.lore, moe."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_field_is_held_by_the_family_or_blocks_it(family):
    represents = FAMILIES[family]
    all_paths = set(paths(EVERYTHING)) | set(paths(EVERYTHING_ELSE))
    assert set(represents) <= all_paths, "a declared field that no config has"
    assert TRAINING_ONLY <= all_paths, "a training-only field that no config has"
    for everything in (EVERYTHING, EVERYTHING_ELSE):
        for path in paths(everything):
            reasons = unrepresented(with_value(everything, path, FOREIGN), represents)
            if represents.get(path) == ANY or path in TRAINING_ONLY:
                assert not named(reasons, path), (path, reasons)
            else:  # named, or inside a config the family does not hold at all (GPT-NeoX and `moe`)
                assert any(named(reasons, p) for p in ancestors(path)), (path, reasons)


@pytest.mark.parametrize("family, base, blockers", [
    ("gpt_neox", NEOX_SHAPED, neox_blockers),
    ("mixtral", MIXTRAL_SHAPED, llama_blockers),
    ("llama", LLAMA_SHAPED, llama_blockers),
    ("deepseek_v3", DEEPSEEK_SHAPED, deepseek_blockers),
    ("gpt_oss", GPT_OSS_SHAPED, gpt_oss_blockers),
])
def test_a_field_added_later_blocks_the_family(family, base, blockers):
    """A new field of GPTConfig or of MoEArchitecture, set away from its default, blocks the family by name;
    at its default (off) it does not."""
    assert blockers(base) == []
    newer_gpt = dataclasses.make_dataclass("NewerGPTConfig", [("new_feature", bool, False)], bases=(GPTConfig,))
    newer = newer_gpt(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    assert blockers(newer) == []
    assert blockers(dataclasses.replace(newer, new_feature=True)) == ["new_feature: True (expected False)"]
    if base.moe is not None:
        newer_moe = dataclasses.make_dataclass("NewerMoE", [("new_trick", int, 0)], bases=(MoEArchitecture,),
                                               frozen=True)
        moe = newer_moe(**{f.name: getattr(base.moe, f.name) for f in dataclasses.fields(base.moe)}, new_trick=3)
        assert blockers(dataclasses.replace(base, moe=moe)) == ["moe.new_trick: 3 (expected 0)"]
    model = SimpleNamespace(cfg=dataclasses.replace(newer, new_feature=True), moe_runtime=MoERuntime())
    native, because = choose_format(model)
    assert native is None and any(reason.endswith("new_feature: True (expected False)") for reason in because)


@pytest.mark.parametrize("moe_change, blocked", [
    ({"score_function": "sigmoid", "renormalize": False}, "moe.score_function: 'sigmoid' (expected 'softmax')"),
    ({"balancing": Balancing(bias=True)}, "moe.balancing.bias: True (expected False)"),
    ({"lore": LoREConfig(4, 2, balancing=Balancing(bias=True))}, "moe.lore: LoREConfig(...) (expected None)"),
    ({"num_shared_experts": 1}, "moe.num_shared_experts: 1 (expected 0)"),
    ({"balancing": Balancing(lbl_scope="global_batch", bias_update_rate=0.1)}, None),  # the loss only
    ({"jitter_eps": 0.1, "lbl_in_fp32": True}, None),  # training only
])
def test_what_changes_the_forward_blocks_mixtral_and_what_trains_does_not(moe_change, blocked):
    cfg = dataclasses.replace(MIXTRAL_SHAPED, moe=dataclasses.replace(MIXTRAL_SHAPED.moe, **moe_change))
    reasons = llama_blockers(cfg)
    assert (blocked in reasons) if blocked else reasons == []


# a value of every training-only field other than its default (attention_impl: flash is CUDA only, the same
# attention as sdpa through another kernel)
TRAINING_VALUES = {
    "init_method": "small_init", "output_layer_init_method": "wang_init", "init_method_std": 0.5,
    "hidden_dropout": 0.5, "attention_dropout": 0.5, "checkpoint_activations": True, "moe.jitter_eps": 0.5,
    "moe.lbl_in_fp32": True, "moe.balancing.lbl_scope": "sequence", "moe.balancing.bias_update_rate": 0.5,
    "moe.lore.balancing.lbl_scope": "global_batch", "moe.lore.balancing.bias_update_rate": 0.5,
}


def test_training_only_fields_leave_the_forward_unchanged():
    """The same weights give the same logits in evaluation whatever a training-only field holds: no family
    needs to hold them. A field that changed the forward must not be on the list."""
    assert set(TRAINING_VALUES) | {"attention_impl"} == TRAINING_ONLY
    base = dataclasses.replace(EVERYTHING, rope_scaling=None, moe=dataclasses.replace(
        EVERYTHING.moe, balancing=Balancing(bias=True), lore=LoREConfig(4, 2, balancing=Balancing(bias=True))))
    torch.manual_seed(0)
    reference = GPT(base).eval()
    with torch.no_grad():  # biases that change the choices: a field that touched them would show
        for name, buffer in reference.named_buffers():
            if name.endswith(("expert_bias_E", "lore_bias_EM")):
                buffer.copy_(torch.randn_like(buffer))
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(tokens)[0]
        for path, value in TRAINING_VALUES.items():
            model = GPT(with_value(base, path, value)).eval()
            model.load_state_dict(reference.state_dict())
            torch.testing.assert_close(model(tokens)[0], expected, atol=0, rtol=0, msg=path)
