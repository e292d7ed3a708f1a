"""Non-finite steps: skipped with no parameter or optimizer-state change, counted, and a run that keeps
producing them stops without rotating its good checkpoints out."""

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.runs import read_metrics, write_config
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import train
from megatron.training.lm_task import LMTask
from megatron.training.trainer import NonFiniteTraining, Trainer

REPO = Path(__file__).resolve().parents[2]


def saved_state(checkpoint: Path, tmp_path: Path) -> dict:
    out = tmp_path / f"{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint, out)
    return torch.load(out, weights_only=False)


def flat(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    items = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            items.update(flat(value, f"{name}."))
        elif isinstance(value, torch.Tensor):
            items[name] = value
    return items


@pytest.fixture
def nan_at_step(monkeypatch):
    """Makes the loss NaN on the micro-batches of the given 0-based steps."""
    bad_steps: set[int] = set()
    current = {"step": -1}
    train_batch, loss = LMTask.train_batch, LMTask.loss

    def recording_batch(self, step, micro_batch):
        current["step"] = step
        return train_batch(self, step, micro_batch)

    def poisoned_loss(self, model, batch):
        value, metrics = loss(self, model, batch)
        return (value * math.nan, metrics) if current["step"] in bad_steps else (value, metrics)

    monkeypatch.setattr(LMTask, "train_batch", recording_batch)
    monkeypatch.setattr(LMTask, "loss", poisoned_loss)
    return bad_steps


def test_a_nonfinite_step_changes_nothing_and_is_counted(tmp_path, data_prefix, nan_at_step, monkeypatch):
    nan_at_step.add(2)  # the third step
    snapshots = {}
    train_step = Trainer.train_step

    def snapshotting_step(self):
        step = self.step
        if step in (2, 3):
            snapshots[f"before{step}"] = copy.deepcopy((self.model.state_dict(), self.optimizer.state_dict()))
        metrics = train_step(self)
        if step in (2, 3):
            snapshots[f"after{step}"] = copy.deepcopy((self.model.state_dict(), self.optimizer.state_dict()))
        return metrics

    monkeypatch.setattr(Trainer, "train_step", snapshotting_step)
    config = write_config(tmp_path, data_prefix, train_iters=4, checkpoint_factor=1, eval_interval=0,
                          pos_emb="rotary")
    result = train.run([str(config)])
    assert result.final_step == 4
    before, after = (flat({"model": m, "optim": o}) for m, o in (snapshots["before2"], snapshots["after2"]))
    assert before.keys() == after.keys() and any(k.startswith("optim.state") for k in before)
    for key in before:  # weights, AdamW moments and step counts: exactly as before the skipped step
        assert torch.equal(before[key], after[key]), key
    model_before, _ = snapshots["before3"]
    model_after, _ = snapshots["after3"]
    assert any(not torch.equal(model_before[k], model_after[k]) for k in model_before)  # the next step trains
    records = {r["step"]: r for r in read_metrics(tmp_path / "logs") if "loss" in r}
    assert [records[s]["nonfinite_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 0]
    assert math.isnan(records[3]["grad_norm"])
    saved = sorted(p.name for p in (tmp_path / "ckpt").glob("global_step*"))
    assert saved == ["global_step1", "global_step2", "global_step4"]  # step 3's state was never saved
    rank_state = torch.load(tmp_path / "ckpt" / "global_step4" / "rank0.pt", weights_only=False)
    assert rank_state["nonfinite_total"] == 1


def test_consecutive_nonfinite_steps_stop_without_saving(tmp_path, data_prefix, nan_at_step):
    nan_at_step.update(range(3, 100))  # from the fourth step on
    config = write_config(tmp_path, data_prefix, train_iters=12, checkpoint_factor=2, keep_last_n_checkpoints=1,
                          eval_interval=0, max_consecutive_nonfinite=4, pos_emb="rotary")
    with pytest.raises(NonFiniteTraining, match=r"4 consecutive steps \(to step 7\).*global_step2"):
        train.run([str(config)])
    assert (tmp_path / "ckpt" / "latest").read_text() == "global_step2"  # steps 4 and 6 were not saved
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("global_step*")) == ["global_step2"]


def test_diverging_learning_rate_exits_with_one_line(tmp_path, data_prefix):
    """The reported case: a huge learning rate and no clipping; the run used to write NaN checkpoints and exit 0."""
    config = write_config(tmp_path, data_prefix, train_iters=60, checkpoint_factor=5, keep_last_n_checkpoints=2,
                          eval_interval=0, gradient_clipping=0.0, max_consecutive_nonfinite=3, pos_emb="rotary",
                          optimizer={"type": "AdamW", "params": {"lr": 1e4}}, min_lr=0.0, warmup=0.0)
    result = subprocess.run([sys.executable, str(REPO / "train.py"), str(config)], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 4, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "3 consecutive steps" in errors[0], result.stderr[-3000:]
    latest = (tmp_path / "ckpt" / "latest").read_text() if (tmp_path / "ckpt" / "latest").exists() else None
    if latest is not None:  # whatever was saved holds finite weights
        state = flat(saved_state(tmp_path / "ckpt" / latest, tmp_path))
        assert all(torch.isfinite(v).all() for k, v in state.items() if k.startswith("model"))
