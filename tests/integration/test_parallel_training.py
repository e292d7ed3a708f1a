"""Training at other layouts (expert parallelism, FSDP2 stages) against one rank with the same global batch,
and checkpoints that resume at any layout. Every multi-rank run is a real `torchrun` with 2 gloo ranks."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from helpers.distributed import torchrun
from helpers.layouts import LORE, LR, STEPS, STRUCT_L1, assert_same_parameters, final_parameters
from helpers.runs import read_metrics, train_losses, write_config

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
import train  # noqa: E402

PLAIN_TOP2 = {"moe_num_experts": 5, "moe_top_k": 2, "moe_zloss_coeff": 0.001}  # 5 experts: 3 + 2 on EP=2
STRUCT_L2 = {"moe_num_experts": 4, "moe_top_k": 2, "lore_top_k": 2, **LORE}


LSH = {"lsh_compression": True, "lsh_num_hashes": 1, "lsh_hash_dim": 4, "lsh_error_interval": 2}  # 8 buckets


SLOW = pytest.mark.slow  # kept out of CI's time budget; the layer-level 2-rank tests cover these paths too


@pytest.mark.parametrize("moe", [PLAIN_TOP2, pytest.param({**STRUCT_L1, "checkpoint_activations": True}, marks=SLOW),
                                 pytest.param(STRUCT_L2, marks=SLOW), pytest.param({**STRUCT_L1, **LSH}, marks=SLOW)],
                         ids=["plain_top2", "structmoe_l1_recompute", "structmoe_l2", "structmoe_lsh"])
def test_expert_parallel_two_ranks_equal_one_rank(tmp_path, data_prefix, moe):
    """EP=2 on 2 ranks with accumulation 2 == 1 rank with accumulation 4: losses and updated parameters
    (with activation checkpointing too, whose recompute runs the exchange again during backward)."""
    one = write_config(tmp_path / "one", data_prefix, gradient_accumulation_steps=4, **STEPS, **moe)
    two = write_config(tmp_path / "two", data_prefix, gradient_accumulation_steps=2, moe_expert_parallel_size=2,
                       **STEPS, **moe)
    train.run([str(one)])
    torchrun(two, 2)
    single, parallel = (read_metrics(tmp_path / name / "logs") for name in ("one", "two"))
    expected = train_losses(single)
    assert train_losses(parallel) == pytest.approx(expected, abs=1e-5)
    assert len(expected) == 4
    # expert gradients are the mean over all ranks: AdamW's updates hardly see a factor, the norm does
    norms = [[r["grad_norm"] for r in records if "loss" in r] for records in (parallel, single)]
    assert len(norms[0]) == 4 and norms[0] == pytest.approx(norms[1], rel=1e-4)
    for aux in ("moe/load_balancing_loss", "moe/z_loss", "moe/lore_balancing_loss"):  # averaged over ranks
        assert [r[aux] for r in parallel] == pytest.approx([r[aux] for r in single], abs=1e-5), aux
    if moe.get("lsh_compression"):  # each rank compresses its own batch, as one rank does per micro-batch
        rates = [r["moe/layer0/lsh_compression_rate"] for r in parallel]
        assert rates == pytest.approx([r["moe/layer0/lsh_compression_rate"] for r in single], abs=1e-9)
        assert all(0 < rate < 0.5 for rate in rates)
        assert all(r["moe/layer0/exchange_bytes_sent"] > 0 for r in parallel)
        measured = [r for r in parallel if "moe/layer0/lsh_error_with_compensation" in r]
        assert [r["step"] for r in measured] == [2, 4]  # every lsh_error_interval steps
        assert all(r["moe/layer0/lsh_error_without_compensation"] > 0 for r in measured)
    assert_same_parameters(final_parameters(two), final_parameters(one))


@pytest.mark.parametrize("layout", [pytest.param({"zero_stage": 1}, marks=SLOW),
                                    {"zero_stage": 3, "moe_expert_parallel_size": 2}],
                         ids=["stage1", "stage3_ep2"])
def test_fsdp_stages_equal_one_rank(tmp_path, data_prefix, layout):
    """FSDP2 on 2 ranks == 1 rank with the same global batch (== DDP on 2 ranks, tested in test_trainer)."""
    moe = {**STRUCT_L1, "gradient_clipping": 0.05}  # a bound that clips: the norm must be global
    one = write_config(tmp_path / "one", data_prefix, gradient_accumulation_steps=4, **STEPS, **moe)
    two = write_config(tmp_path / "two", data_prefix, gradient_accumulation_steps=2, **layout, **STEPS, **moe)
    train.run([str(one)])
    torchrun(two, 2)
    single, sharded = (read_metrics(tmp_path / name / "logs") for name in ("one", "two"))
    assert train_losses(sharded) == pytest.approx(train_losses(single), abs=1e-5)
    assert [r["grad_norm"] for r in sharded] == pytest.approx([r["grad_norm"] for r in single], rel=1e-4)
    assert min(r["grad_norm"] for r in single) > 0.05  # so every step was clipped
    assert_same_parameters(final_parameters(two), final_parameters(one))


def test_resume_across_layouts(tmp_path, data_prefix):
    """2 ranks EP=2 for 4 steps -> 1 rank for 4 more, and 1 rank -> 2 ranks EP=2 with ZeRO-3, both equal
    8 steps without a restart."""
    moe = {**STRUCT_L2, "train_iters": 8, "checkpoint_factor": 4, "eval_interval": 0, **LR}
    straight = write_config(tmp_path / "straight", data_prefix, gradient_accumulation_steps=2, **moe)
    expected = train.run([str(straight)]).losses

    down = write_config(tmp_path / "down", data_prefix, gradient_accumulation_steps=2, **moe)
    torchrun(down, 2, "--moe_expert_parallel_size", "2", "--gradient_accumulation_steps", "1",
             "--exit_interval", "4")
    assert (tmp_path / "down" / "ckpt" / "latest").read_text() == "global_step4"
    resumed = train.run([str(down)])
    assert resumed.losses == pytest.approx(expected[4:], abs=1e-5)
    assert train_losses(read_metrics(tmp_path / "down" / "logs"))[4] == pytest.approx(expected[3], abs=1e-5)

    up = write_config(tmp_path / "up", data_prefix, gradient_accumulation_steps=2, **moe)
    assert train.run([str(up), "--exit_interval", "4"]).losses == pytest.approx(expected[:4], abs=1e-6)
    torchrun(up, 2, "--moe_expert_parallel_size", "2", "--gradient_accumulation_steps", "1", "--zero_stage", "3")
    assert train_losses(read_metrics(tmp_path / "up" / "logs"))[8] == pytest.approx(expected[7], abs=1e-5)
    assert [train_losses(read_metrics(tmp_path / "up" / "logs"))[s] for s in range(5, 9)] == pytest.approx(
        expected[4:], abs=1e-5)
    assert_same_parameters(final_parameters(up), final_parameters(straight))
    assert_same_parameters(final_parameters(down), final_parameters(straight))


def test_fp16_with_sharded_and_expert_parallel_gradients(tmp_path, data_prefix):
    """GPT-NeoX's own configs pair fp16 with ZeRO: the loss scaler must agree across ranks whose gradients
    differ (ShardedGradScaler), and half-precision expert outputs must combine into the fp32 stream."""
    config = write_config(tmp_path, data_prefix, precision="fp16", zero_stage=1, moe_expert_parallel_size=2,
                          gradient_accumulation_steps=1, **STRUCT_L1, **STEPS)
    torchrun(config, 2)
    losses = train_losses(read_metrics(tmp_path / "logs"))
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses.values())
    assert losses[4] < losses[1]


def test_bfloat16_autocast_through_moe_layers(tmp_path, data_prefix):
    result = train.run([str(write_config(tmp_path, data_prefix, precision="bfloat16", **STRUCT_L2, **STEPS))])
    assert all(math.isfinite(v) for v in result.losses) and result.losses[-1] < result.losses[0]
