"""Multi-token prediction through train.py: the MTP loss logged beside the main one and in the loss trained, an exact
resume (the modules are in the checkpoint), and the same run at 2 ranks with FSDP2 (ZeRO-3) and expert parallelism."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers.distributed import run_on_ranks, torchrun
from helpers.layouts import STEPS, assert_same_parameters, final_parameters
from helpers.runs import read_metrics, train_losses, write_config
from torch.distributed.fsdp import FSDPModule

from megatron.model.gpt import GPT, GPTConfig
from megatron.model.moe import MoEArchitecture
from megatron.parallel import DistInfo
from megatron.parallel.data_parallel import shard_with_fsdp
from megatron.parallel.mesh import build_parallel_dims

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
import train  # noqa: E402

MTP = {"mtp_num_modules": 1, "mtp_loss_coeff": 0.3}
# layer 0 dense, layer 1 and the MTP block MoE (DeepSeek-V3's MTP layer is an MoE layer); 5 experts: 3 + 2 on EP=2
MOE_MTP = {**MTP, "moe_num_experts": 5, "moe_top_k": 2, "moe_first_layer": 1, "moe_zloss_coeff": 0.001}


@pytest.mark.parametrize("extra", [MTP, pytest.param({**MOE_MTP, "mtp_num_modules": 2, "loss_chunk_tokens": 24,
                                                      "checkpoint_activations": True}, marks=pytest.mark.slow)],
                         ids=["dense", "moe_two_chunked_recompute"])
def test_mtp_loss_is_logged_and_trained_and_the_run_resumes_exactly(tmp_path, data_prefix, extra):
    straight = train.run([str(write_config(tmp_path / "a", data_prefix, **extra))])
    records = [r for r in read_metrics(tmp_path / "a" / "logs") if "loss" in r]
    assert len(records) == 8
    for r in records:  # the main head's loss, the modules' mean, and the loss trained
        aux = r.get("moe/load_balancing_loss", 0.0) * 0.01 + r.get("moe/z_loss", 0.0) * 0.001
        assert r["total_loss"] == pytest.approx(r["loss"] + extra["mtp_loss_coeff"] * r["mtp_loss"] + aux, abs=1e-5)
        if extra["mtp_num_modules"] == 2:
            assert r["mtp_loss"] == pytest.approx((r["mtp/module1_loss"] + r["mtp/module2_loss"]) / 2, abs=1e-6)
    assert records[-1]["mtp_loss"] < records[0]["mtp_loss"]
    evals = [r for r in read_metrics(tmp_path / "a" / "logs") if "val/loss" in r]
    assert len(evals) == 2 and not any("mtp_loss" in r for r in evals)  # evaluation is the main head's

    config = write_config(tmp_path / "b", data_prefix, **extra)
    first_half = train.run([str(config), "--exit_interval", "4"])
    second_half = train.run([str(config)])
    assert first_half.losses + second_half.losses == pytest.approx(straight.losses, abs=1e-6)
    assert second_half.last_eval["val/loss"] == pytest.approx(straight.last_eval["val/loss"], abs=1e-6)
    resumed = {r["step"]: r["mtp_loss"] for r in read_metrics(tmp_path / "b" / "logs") if "mtp_loss" in r}
    assert [resumed[s] for s in range(1, 9)] == pytest.approx([r["mtp_loss"] for r in records], abs=1e-6)
    assert any(name.startswith("mtp.0.") for name in final_parameters(config))


@pytest.mark.slow
def test_fsdp_zero3_with_expert_parallelism_equals_one_rank(tmp_path, data_prefix):
    """2 ranks, ZeRO-3 and EP=2 (each MTP module an FSDP unit, its experts split over the ranks) == 1 rank with the
    same global batch: losses, MTP losses and the parameters after 4 steps."""
    one = write_config(tmp_path / "one", data_prefix, gradient_accumulation_steps=4, **STEPS, **MOE_MTP)
    two = write_config(tmp_path / "two", data_prefix, gradient_accumulation_steps=2, zero_stage=3,
                       moe_expert_parallel_size=2, **STEPS, **MOE_MTP)
    train.run([str(one)])
    torchrun(two, 2)
    single, parallel = (read_metrics(tmp_path / name / "logs") for name in ("one", "two"))
    assert train_losses(parallel) == pytest.approx(train_losses(single), abs=1e-5)
    assert [r["mtp_loss"] for r in parallel] == pytest.approx([r["mtp_loss"] for r in single], abs=1e-5)
    assert len(train_losses(single)) == 4
    assert_same_parameters(final_parameters(two), final_parameters(one))


def _shard_and_train(rank: int, world_size: int) -> None:
    dims = build_parallel_dims(DistInfo(rank, world_size, rank, torch.device("cpu")))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, num_layers=2, hidden_size=32, num_attention_heads=4,
                          max_position_embeddings=16, mtp_num_modules=2, checkpoint_activations=True,
                          moe=MoEArchitecture(num_experts=4, top_k=2, first_layer=1)))
    shard_with_fsdp(model, dims, reshard_after_forward=True)
    assert all(isinstance(module, FSDPModule) for module in [*model.blocks, *model.mtp])
    rows = torch.randint(0, 64, (2, 13))
    loss, _, mtp_loss_M = model(rows[:, :-1], rows[:, 1:], 5, mtp=True)
    (loss + mtp_loss_M.mean()).backward()
    assert all(param.grad is not None for name, param in model.named_parameters() if name.startswith("mtp."))


def test_fsdp2_wraps_each_mtp_module_like_a_block():
    """Each MTP module is an FSDP2 unit of its own (gathered for its forward, and again for its recompute)."""
    run_on_ranks(_shard_and_train, 2)
