"""A trained model back from its checkpoint folder (load_pretrained), and the LSH calibration built on it."""

import sys
from pathlib import Path

import pytest
import torch
from helpers.runs import write_config

from megatron.model.moe.lsh import LSHConfig
from megatron.parallel import DistInfo
from megatron.training.lm_task import LMTask
from megatron.training.pretrained import load_pretrained

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
import lsh_calibrate  # noqa: E402

import train  # noqa: E402

MOE = {"moe_num_experts": 4, "moe_top_k": 2, "lore_num_experts": 4, "lore_rank": 2}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_prefix):
    folder = tmp_path_factory.mktemp("trained")
    result = train.run([str(write_config(folder, data_prefix, train_iters=4, **MOE))])
    return folder / "ckpt", result


def test_loaded_model_reproduces_the_runs_last_validation_loss(trained_run):
    save_dir, result = trained_run
    args, model, path = load_pretrained(save_dir)
    assert path.name == "global_step4" and not model.training
    task = LMTask(args, DistInfo(0, 1, 0, torch.device("cpu")))  # its own validation batches, a fresh model
    with torch.no_grad():
        assert task.evaluate(model)["val/loss"] == pytest.approx(result.last_eval["val/loss"], abs=1e-6)
        assert task.evaluate(task.model.eval())["val/loss"] != pytest.approx(result.last_eval["val/loss"], abs=1e-3)


def test_missing_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(Exception, match="no checkpoint"):
        load_pretrained(tmp_path)


def test_calibration_counts_centroids_per_expert_and_bucket(trained_run):
    save_dir, _ = trained_run
    args, model, _ = load_pretrained(save_dir)
    tokens = lsh_calibrate.validation_tokens(args, 4)
    x = lsh_calibrate.moe_inputs(model, tokens)[1].reshape(-1, args.hidden_size)
    layer = model.blocks[1].mlp
    config = LSHConfig(2, 2, seed=args.seed + 1)
    measured = lsh_calibrate.measure(layer, x, config)
    # by hand: distinct (expert, bucket) pairs over the routed rows
    from megatron.model.moe.lsh import CrossPolytopeHash
    experts_TK = layer.router(x).expert_ids_TK
    keys = CrossPolytopeHash(args.hidden_size, config)(x)
    pairs = {(int(e), int(keys[t])) for t in range(x.shape[0]) for e in experts_TK[t]}
    assert measured["compression_rate"] == pytest.approx(len(pairs) / experts_TK.numel())
    assert 0 < measured["error_with_compensation"] and 0 < measured["error_without_compensation"]
    distinct = torch.randn(64, args.hidden_size, generator=torch.Generator().manual_seed(0))
    fine = lsh_calibrate.measure(layer, distinct, LSHConfig(2, 1024, seed=0))  # 4M buckets: no collisions
    assert fine == {"compression_rate": 1.0, "error_with_compensation": 0.0, "error_without_compensation": 0.0}
