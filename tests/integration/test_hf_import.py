"""tools/convert_from_hf.py: a GPT-NeoX folder built locally by transformers becomes our checkpoint with the
same logits; ours -> HF -> ours is exact; train.py continues from it at the converted model's loss."""

import sys

import pytest
import torch
from helpers.hf_models import REPO, save_random, saved_model, train_converted

sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))
import convert_from_hf  # noqa: E402
import convert_to_hf  # noqa: E402

from megatron.parallel import DistInfo  # noqa: E402
from megatron.training.lm_task import LMTask  # noqa: E402
from megatron.training.pretrained import load_pretrained  # noqa: E402

transformers = pytest.importorskip("transformers")
TOKENS = torch.randint(0, 8192, (2, 20), generator=torch.Generator().manual_seed(0))


def pythia_like(folder, **overrides):
    """A small GPTNeoXForCausalLM with every parameter random, saved with the bundled tokenizer."""
    config = transformers.GPTNeoXConfig(**{
        "vocab_size": 8256, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 64, "rotary_pct": 0.25, "rotary_emb_base": 10000,
        "use_parallel_residual": True, "tie_word_embeddings": False, **overrides})
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config)
    return save_random(model, folder, near_one=lambda name: "layernorm" in name and name.endswith("weight"))


@pytest.mark.parametrize("overrides", [{}, {"use_parallel_residual": False, "tie_word_embeddings": True,
                                            "rotary_pct": 1.0, "attention_bias": False}],
                         ids=["pythia", "sequential_tied_nobias"])
def test_gpt_neox_folder_converts_with_equal_logits(tmp_path, overrides):
    hf = pythia_like(tmp_path / "hf", **overrides)
    convert_from_hf.main([str(tmp_path / "hf"), str(tmp_path / "ours")])
    args, model, path = load_pretrained(tmp_path / "ours")
    assert path.name == "global_step0" and args.make_vocab_size_divisible_by == 8256  # 8192 tokens -> 8256 rows
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS)[0], hf(TOKENS).logits, atol=1e-5, rtol=0)


def test_ours_to_hf_to_ours_is_exact(tmp_path, data_prefix):
    save, model = saved_model(tmp_path / "run", data_prefix, gpt_j_residual=True, no_weight_tying=True,
                              rotary_pct=0.5)
    convert_to_hf.main([str(save), str(tmp_path / "hf")])
    convert_from_hf.main([str(tmp_path / "hf"), str(tmp_path / "back")])
    _, back, _ = load_pretrained(tmp_path / "back")
    before, after = model.state_dict(), back.state_dict()
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_training_continues_from_the_converted_model(tmp_path, data_prefix):
    pythia_like(tmp_path / "hf")
    convert_from_hf.main([str(tmp_path / "hf"), str(tmp_path / "ours")])
    result = train_converted(tmp_path, data_prefix)
    assert result.final_step == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    run_args, _, _ = load_pretrained(tmp_path / "continued")  # the run's data and batch settings
    _, model, _ = load_pretrained(tmp_path / "ours")  # the converted weights
    task = LMTask(run_args, DistInfo(0, 1, 0, torch.device("cpu")))
    with torch.no_grad():
        first, _ = task.loss(model, task.train_batch(0, 0))
    assert result.losses[0] == pytest.approx(float(first), abs=1e-5)  # the converted model's loss, not a fresh one


@pytest.mark.parametrize("overrides,message", [({"hidden_act": "gelu_new"}, "hidden_act"),
                                               ({"rotary_pct": 0.375}, "odd rotary width")],
                         ids=["inexact_activation", "odd_rotary"])
def test_what_we_cannot_compute_exactly_is_refused(tmp_path, overrides, message):
    pythia_like(tmp_path / "hf", **overrides)
    with pytest.raises(SystemExit, match=message):
        convert_from_hf.main([str(tmp_path / "hf"), str(tmp_path / "ours")])
