"""A model with DeepSeek-V3's and gpt-oss's routing pieces (groups, scaling, sigmoid + correction bias, router
bias, experts with biases, the clamped SwiGLU in the dense and the MoE layers) exports as remote code whose logits
are ours: the config carries every new field and the shipped files compute them."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers.hf_models import REPO, saved_model

sys.path.insert(0, str(REPO / "tools"))
import convert_to_hf  # noqa: E402

transformers = pytest.importorskip("transformers")
TOKENS = torch.tensor([[5, 9, 30, 7, 2, 11, 4, 8, 100, 3, 17, 6], [40, 41, 42, 1, 5, 5, 9, 12, 13, 14, 250, 3]])

ROUTING = {"moe_num_experts": 8, "moe_top_k": 3, "moe_router_type": "topk", "moe_expert_interval": 2,
           "moe_router_num_groups": 4, "moe_router_group_top_k": 2, "moe_router_scaling_factor": 2.5,
           "moe_router_bias": True, "moe_use_bias_in_experts": True, "moe_num_shared_experts": 1,
           "activation": "clamped_swiglu", "swiglu_alpha": 1.5, "swiglu_limit": 0.5, "intermediate_size": 96}


@pytest.mark.parametrize("score", [{"moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True},
                                   {"moe_renormalize_weights": True}], ids=["sigmoid_bias", "softmax_renormalised"])
def test_routing_pieces_travel_with_remote_code(tmp_path, data_prefix, score):
    save, model = saved_model(tmp_path / "run", data_prefix, **ROUTING, **score)
    report = convert_to_hf.main([str(save), str(tmp_path / "hf")])
    assert report["format"] == "remote_code"
    gpt = json.loads((tmp_path / "hf/config.json").read_text())["gpt"]
    assert (gpt["activation"], gpt["swiglu_alpha"], gpt["swiglu_limit"]) == ("clamped_swiglu", 1.5, 0.5)
    assert {k: gpt["moe"][k] for k in ("num_groups", "group_top_k", "scaling_factor", "router_bias",
                                       "expert_biases")} == dict(num_groups=4, group_top_k=2, scaling_factor=2.5,
                                                                 router_bias=True, expert_biases=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    model.eval()
    with torch.no_grad():
        ours = model(TOKENS)[0]
        torch.testing.assert_close(hf(TOKENS).logits, ours, atol=1e-5, rtol=0)
