"""Across any number of restarts, every training sample is read exactly once, in the order of an uninterrupted run
(checked with sample ids, not losses)."""

from helpers.runs import write_config

import train
from megatron.config import load_config
from megatron.data.gpt_dataset import build_train_valid_test_datasets
from megatron.training.lm_task import LMTask


def record_sample_ids(monkeypatch) -> list[int]:
    """Dataset indices of every training sample the task reads, in order."""
    seen: list[int] = []
    stack = LMTask._stack

    def recording_stack(self, dataset, start):
        if dataset is self.train_data:
            seen.extend(range(start, start + self.micro_batch))
        return stack(self, dataset, start)

    monkeypatch.setattr(LMTask, "_stack", recording_stack)
    return seen


def test_every_sample_once_across_restarts(tmp_path, data_prefix, monkeypatch):
    iters, micro, accum = 12, 2, 2
    settings = dict(train_iters=iters, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum,
                    checkpoint_factor=100, eval_interval=0, log_interval=1, pos_emb="rotary")
    seen = record_sample_ids(monkeypatch)
    train.run([str(write_config(tmp_path / "straight", data_prefix, **settings))])
    straight = list(seen)
    assert straight == list(range(iters * micro * accum))  # each sample index once, in order

    seen.clear()
    for exit_after in (5, 4, 100):  # stop after 5 steps, then after 4 more, then run to the end
        config = write_config(tmp_path / "restarted", data_prefix, exit_interval=exit_after, **settings)
        train.run([str(config)])
    assert seen == straight  # no sample replayed or skipped by the restarts

    # and the samples behind those indices are distinct windows of the corpus (none read twice)
    args = load_config([str(config)])
    train_data, _, _ = build_train_valid_test_datasets(
        data_prefixes=[args.data_path], weights=None, split=args.split, seq_length=args.seq_length, seed=args.seed,
        num_samples=(iters * micro * accum, 0, 0), train_prefixes=None, train_weights=None, valid_prefixes=None,
        valid_weights=None, test_prefixes=None, test_weights=None)
    windows = [tuple(int(v) for v in train_data.sample_idx[train_data.shuffle_idx[i]]) for i in straight]
    assert len(set(windows)) == len(windows)
