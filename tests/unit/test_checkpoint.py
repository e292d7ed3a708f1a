"""Checkpoints: GPT-NeoX layout, exact round trip, pruning, and a crash that leaves `latest` intact."""

import pytest
import torch

from megatron.parallel import DistInfo
from megatron.training import checkpoint as ckpt

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(4, 6)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def save(tmp_path, step, model, optimizer, keep=None):
    return ckpt.save_checkpoint(tmp_path, step, model, optimizer, {"step": step}, "seed: 1\n", SINGLE, keep)


def test_layout_and_exact_round_trip(tmp_path):
    model, optimizer = model_and_optimizer(0)
    path = save(tmp_path, 7, model, optimizer)
    assert path == tmp_path / "global_step7"
    assert (tmp_path / "latest").read_text() == "global_step7"
    assert (path / "config.yml").read_text() == "seed: 1\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left

    other, other_optimizer = model_and_optimizer(1)
    state = ckpt.load_checkpoint(ckpt.resolve_checkpoint(tmp_path), other, other_optimizer, SINGLE)
    assert state == {"step": 7}
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(optimizer.state.values(), other_optimizer.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_keep_last_n_prunes_older_checkpoints(tmp_path):
    model, optimizer = model_and_optimizer(0)
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, optimizer, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["global_step3", "global_step4"]


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer = model_and_optimizer(0)
    save(tmp_path, 1, model, optimizer)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.dcp, "save", crash)
    with pytest.raises(ckpt.CheckpointSaveError, match=r"global_step2 failed \(OSError: disk full\); the previous "
                       r"checkpoint is intact \(latest: global_step1\)"):
        save(tmp_path, 2, model, optimizer)
    assert not (tmp_path / ".tmp_global_step2").exists()  # the partial folder is gone: its space is free again
    assert (tmp_path / "latest").read_text() == "global_step1"
    assert ckpt.resolve_checkpoint(tmp_path) == tmp_path / "global_step1"
    monkeypatch.undo()
    save(tmp_path, 2, model, optimizer)  # the half-written folder from the crash is replaced
    assert (tmp_path / "latest").read_text() == "global_step2"
    assert not (tmp_path / ".tmp_global_step2").exists()


def test_resolve_checkpoint(tmp_path):
    assert ckpt.resolve_checkpoint(tmp_path / "nothing_yet") is None
    model, optimizer = model_and_optimizer(0)
    save(tmp_path, 5, model, optimizer)
    assert ckpt.resolve_checkpoint(tmp_path / "global_step5") == tmp_path / "global_step5"
    (tmp_path / "latest").write_text("global_step9")
    with pytest.raises(FileNotFoundError, match="global_step9"):
        ckpt.resolve_checkpoint(tmp_path)


def test_moe_layers_placed_elsewhere_name_moe_first_layer(tmp_path):
    """A checkpoint whose MoE layers are 1, 3 (fairseq-style placement) into a model with GPT-NeoX's 0, 2."""
    from megatron.model.gpt import GPT, GPTConfig
    from megatron.model.moe import MoEArchitecture

    def gpt(first_layer: int) -> GPT:
        moe = MoEArchitecture(num_experts=4, expert_interval=2, first_layer=first_layer)
        return GPT(GPTConfig(vocab_size=64, num_layers=4, hidden_size=32, num_attention_heads=4,
                             max_position_embeddings=16, moe=moe))

    saved = gpt(first_layer=1)
    path = save(tmp_path, 1, saved, torch.optim.AdamW(saved.parameters()))
    with pytest.raises(ValueError, match=r"MoE layers: checkpoint \[1, 3\], model \[0, 2\]: set moe_first_layer to 1"):
        ckpt.load_model_weights(path, gpt(first_layer=0))
    same = gpt(first_layer=1)
    ckpt.load_model_weights(path, same)
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), same.state_dict().values()))
