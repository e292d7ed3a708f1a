"""Language modelling as a `Task`: GPT-NeoX data in, next-token loss (+ MoE aux losses) out.

Shape legend: B sequences, S sequence, V vocabulary, E experts, M LoREs per expert.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megatron.config import ConfigError
from megatron.data.bundled import ensure_bundled_dataset
from megatron.data.gpt_dataset import build_train_valid_test_datasets
from megatron.data.tokenizer import padded_vocab_size, tokenizer_of
from megatron.model.build import build_gpt
from megatron.model.compile import compile_regions, compile_wanted
from megatron.model.moe import MoEAux
from megatron.model.moe.lsh_probes import CompressionErrorProbe, hashers_of
from megatron.model.moe.stats import PEAK_STATS, routing_stats
from megatron.parallel import DistInfo, all_reduce_mean, barrier
from megatron.parallel.expert_parallel import ExpertParallel
from megatron.sizing.flops import flops_per_token
from megatron.training.balancing import BalanceTracker, bias_metrics
from megatron.training.routing_health import RoutingHealth

log = logging.getLogger("megatron.lm")


def share_per_expert(load_EM: torch.Tensor) -> torch.Tensor:
    """Rows rescaled to sum to 1: the mean LoRE shares over the micro-batches and ranks that gave the
    expert rows (with expert parallelism, only the ranks holding it do)."""
    totals = load_EM.sum(dim=1, keepdim=True)
    return torch.where(totals > 0, load_EM / totals.clamp_min(1e-12), load_EM)


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not values:
        return values
    means = all_reduce_mean(torch.tensor(list(values.values()), dtype=torch.float64, device=device))
    return dict(zip(values, means.tolist()))


def max_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not values or not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    peaks = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    return dict(zip(values, peaks.tolist()))


class RoutingAccumulator:
    """Averages each MoE layer's expert (and LoRE) load over a log interval; the exchange's statistics too, except
    the peaks (moe/stats.py's PEAK_STATS), whose maximum over the interval and the ranks is kept."""

    def __init__(self) -> None:
        self.last: list[MoEAux] = []
        self.expert_load: list[torch.Tensor] = []
        self.lore_load: list[torch.Tensor | None] = []
        self.dispatch: list[dict[str, float]] = []  # per layer: sums of the exchange's statistics
        self.balance: list[dict[str, torch.Tensor]] = []  # per layer: sums of the balancing statistics
        self.count = 0

    def add(self, aux_list: list[MoEAux]) -> None:
        if not aux_list:
            return
        if self.count == 0:
            self.expert_load = [torch.zeros_like(aux.expert_load_E) for aux in aux_list]
            self.lore_load = [None if aux.lore_load_EM is None else torch.zeros_like(aux.lore_load_EM)
                              for aux in aux_list]
            self.dispatch = [dict.fromkeys(aux.dispatch_stats, 0.0) for aux in aux_list]
            self.balance = [{} for _ in aux_list]
        for i, aux in enumerate(aux_list):
            for key, value in aux.dispatch_stats.items():
                sums = self.dispatch[i]
                sums[key] = max(sums[key], value) if key in PEAK_STATS else sums[key] + value
            for key, value in (aux.balance.stats if aux.balance is not None else {}).items():
                self.balance[i][key] = self.balance[i].get(key, 0.0) + value  # tensors: no host sync per step
            self.expert_load[i] += aux.expert_load_E.detach()
            if aux.lore_load_EM is not None:
                self.lore_load[i] += aux.lore_load_EM.detach()
        self.last, self.count = aux_list, self.count + 1

    def pop(self) -> dict[str, Any]:
        if self.count == 0:
            return {}
        averaged = [
            dataclasses.replace(
                aux,
                expert_load_E=all_reduce_mean(load / self.count),
                lore_load_EM=None if lore is None else share_per_expert(all_reduce_mean(lore)),
                dispatch_stats=mean_over_ranks({k: float(v) / self.count for k, v in (sums | balance).items()
                                                if k not in PEAK_STATS}, load.device)
                | max_over_ranks({k: float(v) for k, v in sums.items() if k in PEAK_STATS}, load.device),
            )
            for aux, load, lore, sums, balance in zip(self.last, self.expert_load, self.lore_load, self.dispatch,
                                                      self.balance)
        ]
        self.count = 0
        return routing_stats(averaged)


class LMTask:
    def __init__(self, args, dist_info: DistInfo, expert_parallel: ExpertParallel | None = None):
        self.args, self.dist = args, dist_info
        self.tokenizer = tokenizer_of(args)
        if args.prepare_data:
            if dist_info.is_main:
                ensure_bundled_dataset(args.prepare_data, args.data_path, args.tokenizer_type, args.vocab_file)
            barrier()
        vocab = padded_vocab_size(self.tokenizer.vocab_size, args.make_vocab_size_divisible_by)
        if args.vocab_size is not None and args.vocab_size not in (self.tokenizer.vocab_size, vocab):
            raise ConfigError(f"vocab_size: {args.vocab_size} disagrees with the {args.tokenizer_type} tokenizer "
                              f"({self.tokenizer.vocab_size} tokens, {vocab} padded to make_vocab_size_divisible_by "
                              f"{args.make_vocab_size_divisible_by}); remove vocab_size or make it match")
        self.vocab_size = vocab
        self._flops_per_token: float | None = None  # of the whole model (every expert: EP ranks hold a share)
        self.model: nn.Module = build_gpt(args, vocab, expert_parallel)
        if compile_wanted(args.torch_compile, dist_info.device):
            regions = compile_regions(self.model)
            log.info("torch_compile: %d regions compiled (attention, norms, dense MLPs, routers)", len(regions))
        self.micro_batch = args.train_micro_batch_size_per_gpu
        self.global_batch = args.train_batch_size
        self.eval_samples_per_rank = args.eval_iters * self.micro_batch
        num_valid = self.eval_samples_per_rank * dist_info.world_size if args.eval_interval else 0
        self.train_data, self.valid_data, _ = build_train_valid_test_datasets(
            data_prefixes=[args.data_path] if args.data_path else None,
            weights=None,
            split=args.split,
            seq_length=args.seq_length,
            seed=args.seed,
            num_samples=(args.train_iters * self.global_batch, num_valid, 0),
            train_prefixes=args.train_data_paths,
            train_weights=args.train_data_weights,
            valid_prefixes=args.valid_data_paths,
            valid_weights=args.valid_data_weights,
            test_prefixes=args.test_data_paths,
            test_weights=args.test_data_weights,
        )
        if self.train_data is None:  # every corpus empty, or its training split holds no document
            corpora = args.train_data_paths or [args.data_path]
            raise ValueError(f"data: no training documents in {', '.join(corpora)} (split {args.split!r}): expected "
                             "a dataset with documents (tools/preprocess_data.py) and a positive training share")
        if num_valid and self.valid_data is None:
            corpora = args.valid_data_paths or [args.data_path]
            raise ValueError(f"data: no validation documents in {', '.join(corpora)} (split {args.split!r}) but "
                             f"eval_interval is {args.eval_interval}: give validation a share, or set eval_interval 0")
        self.routing = RoutingAccumulator()
        self.health = RoutingHealth(args.moe_health_min_share, args.moe_health_patience, args.moe_health_min_entropy,
                                    args.moe_receive_warning_factor)
        self.steps_seen = 0  # the step being trained, for the health warnings
        self.error_interval = args.lsh_error_interval if args.lsh_compression else 0
        self.error_probe = CompressionErrorProbe(self.model) if self.error_interval else None
        self.lsh_hashers = hashers_of(self.model) if args.lsh_rotation_refresh_interval else []
        self.balance = BalanceTracker(self.model)  # loss-free biases, global-batch loads (training/balancing.py)
        self.aux_coeffs = {
            "load_balancing_loss": args.moe_loss_coeff,
            "z_loss": args.moe_zloss_coeff,
            "lore_balancing_loss": args.lore_loss_coeff,
        }

    # -- batches ---------------------------------------------------------------------------------
    def _stack(self, dataset, start: int) -> torch.Tensor:
        rows = np.stack([np.asarray(dataset[start + j], dtype=np.int64) for j in range(self.micro_batch)])
        largest = int(rows.max())
        if largest >= self.vocab_size:  # would be an index error deep in the embedding otherwise
            raise ValueError(f"data: token id {largest} in samples {start}..{start + self.micro_batch - 1} is outside "
                             f"the model's vocabulary ({self.vocab_size}, from the {self.args.tokenizer_type} "
                             "tokenizer): was the dataset preprocessed with another tokenizer?")
        return torch.from_numpy(rows).to(self.dist.device)

    def train_batch(self, step: int, micro_batch: int) -> torch.Tensor:
        """Samples of a global step are laid out micro-batch-major, then rank: with the same global
        batch, one rank with accumulation sees exactly the samples that several ranks see together."""
        slot = micro_batch * self.dist.world_size + self.dist.rank
        self.steps_seen = step + 1
        for hasher in self.lsh_hashers:
            hasher.at_step(step)
        if self.error_probe is not None and micro_batch == 0 and (step + 1) % self.error_interval == 0:
            self.error_probe.arm()  # this batch's forward also measures the compression error
        return self._stack(self.train_data, step * self.global_batch + slot * self.micro_batch)

    def flops_per_step(self) -> float:
        """Model FLOPs of one optimizer step over all ranks (3x the forward; megatron/sizing/flops.py)."""
        if self._flops_per_token is None:
            self._flops_per_token = flops_per_token(self.model, self.args.seq_length).training
        return self._flops_per_token * self.tokens_per_step()

    def tokens_per_step(self) -> int:
        return self.global_batch * self.args.seq_length

    # -- loss ------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, tokens_BS1: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.balance.before_forward()
        if self.args.loss_chunk_tokens:  # the head and loss in chunks: the full logits never exist
            lm_loss, moe_aux = model(tokens_BS1[:, :-1], tokens_BS1[:, 1:], self.args.loss_chunk_tokens)
        else:
            logits_BSV, moe_aux = model(tokens_BS1[:, :-1])
            lm_loss = F.cross_entropy(logits_BSV.flatten(0, 1).float(), tokens_BS1[:, 1:].flatten())
        metrics = {"loss": lm_loss.detach()}
        total = lm_loss
        if moe_aux:
            for name, coeff in self.aux_coeffs.items():
                summed = sum(getattr(aux, name) for aux in moe_aux)  # summed over layers
                metrics[f"moe/{name}"] = summed.detach()
                if coeff:
                    total = total + coeff * summed
            metrics["total_loss"] = total.detach()
            self.routing.add(moe_aux)
            self.balance.record(moe_aux)
        return total, metrics

    def optimizer_stepped(self) -> None:
        self.balance.optimizer_stepped()

    def interval_metrics(self) -> dict[str, Any]:
        metrics = self.routing.pop()
        metrics.update(mean_over_ranks(bias_metrics(self.model), self.dist.device))
        metrics.update(self.health.update(self.steps_seen, metrics))
        if self.error_probe is not None:
            device = self.dist.device
            metrics.update(mean_over_ranks(self.error_probe.pop(), device))
        return metrics

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self.valid_data is None or len(self.valid_data) == 0:
            return {}
        start = self.dist.rank * self.eval_samples_per_rank
        losses = []
        for i in range(self.args.eval_iters):
            tokens_BS1 = self._stack(self.valid_data, start + i * self.micro_batch)
            logits_BSV, _ = model(tokens_BS1[:, :-1])
            losses.append(F.cross_entropy(logits_BSV.flatten(0, 1).float(), tokens_BS1[:, 1:].flatten()))
        val_loss = float(all_reduce_mean(torch.stack(losses).mean()))
        return {"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50.0))}

    def lr_scales(self) -> dict[str, float]:
        return {}

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}  # batches are a function of the step: nothing else to remember

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
