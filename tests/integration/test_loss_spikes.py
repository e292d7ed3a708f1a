"""The loss spike detector: logged-interval losses above factor x the recent median are flagged, once each."""

import pytest
from helpers.runs import read_metrics, write_config

import train
from megatron.training.lm_task import LMTask
from megatron.training.metrics import LossSpikeDetector


def test_spikes_against_the_running_median_by_hand():
    detector = LossSpikeDetector(factor=3.0, window=4, min_history=3)
    flags = [detector.is_spike(v) for v in [2.0, 2.2, 1.8, 7.0, 5.0, 2.0, 1.0, 3.1, float("nan")]]
    # history after 3 values: [2.0, 2.2, 1.8], median 2.0: 7.0 > 6 spikes; 5.0 does not (and joins the window);
    # window [2.2, 1.8, 5.0, 2.0] then [1.8, 5.0, 2.0, 1.0], median 1.9: 3.1 < 5.7; NaN is the non-finite guard's
    assert flags == [False, False, False, True, False, False, False, False, False]
    assert detector.history == [5.0, 2.0, 1.0, 3.1]
    assert not LossSpikeDetector(factor=0).is_spike(1e9)
    # the window goes into the checkpoint: a detector resumed from it flags what this one flags
    resumed = LossSpikeDetector(factor=3.0, window=4, min_history=3)
    resumed.load_state_dict(detector.state_dict())
    assert resumed.is_spike(9.0) and detector.is_spike(9.0)


@pytest.mark.parametrize("factor", [0.0, 3.0])
def test_a_run_flags_an_injected_spike(tmp_path, data_prefix, monkeypatch, factor):
    """The loss of the 9th step is multiplied by 20 (the gradient too): flagged at step 9 and only there."""
    current = {"step": -1}
    train_batch, loss = LMTask.train_batch, LMTask.loss

    def recording_batch(self, step, micro_batch):
        current["step"] = step
        return train_batch(self, step, micro_batch)

    def spiking_loss(self, model, batch):
        value, metrics = loss(self, model, batch)
        if current["step"] == 8:
            value, metrics = value * 20, {**metrics, "loss": metrics["loss"] * 20}
        return value, metrics

    monkeypatch.setattr(LMTask, "train_batch", recording_batch)
    monkeypatch.setattr(LMTask, "loss", spiking_loss)
    config = write_config(tmp_path, data_prefix, train_iters=12, log_interval=1, eval_interval=0,
                          checkpoint_factor=100, loss_spike_factor=factor, pos_emb="rotary")
    train.run([str(config)])
    flagged = [r["step"] for r in read_metrics(tmp_path / "logs") if r.get("loss_spike")]
    assert flagged == ([] if factor == 0 else [9])
