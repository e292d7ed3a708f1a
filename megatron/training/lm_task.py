"""Language modelling as a `Task`: GPT-NeoX data in, next-token loss (+ MoE aux losses, + multi-token prediction's) out.

Shape legend: B sequences, S sequence, V vocabulary, E experts, M LoREs per expert, P multi-token prediction
modules.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
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
from megatron.training.balancing import BalanceTracker, bias_spreads
from megatron.training.routing_health import RoutingHealth

log = logging.getLogger("megatron.lm")


def summed_over_ranks(tables: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each table summed over every rank, all in one all-reduce, then brought to the host in one copy; float64, so
    counts stay exact (to 2^53)."""
    if not tables:
        return []
    flat = torch.cat([table.double().flatten() for table in tables])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat)
    return [part.view(table.shape) for part, table in zip(flat.cpu().split([t.numel() for t in tables]), tables)]


def max_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not values or not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    peaks = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    return dict(zip(values, peaks.tolist()))


@dataclass
class LayerSums:
    """One MoE layer's sums over a log interval on this rank."""

    expert_slots_E: torch.Tensor
    lore_slots_EM: torch.Tensor | None
    ratios: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [part, whole] (device tensors)
    means: dict[str, list[float]] = field(default_factory=dict)  # name -> [sum, micro-batches] (host floats)
    peaks: dict[str, float] = field(default_factory=dict)  # name -> maximum


class RoutingAccumulator:
    """Sums what each MoE layer counted over a log interval; `pop` sums it over the ranks and logs statistics of
    the global batch, so every layout of the same run logs the same values.

    Loads are counts (shares and entropies come from the global counts, moe/stats.py); the balancing statistics
    are [part, whole] pairs (e.g. rows whose choice the bias changed, of all rows), logged as part / whole; the
    exchange's statistics (bytes, compression: per rank and micro-batch by nature) are their mean over the
    micro-batches and ranks, and the peaks (moe/stats.py's PEAK_STATS) their maximum."""

    def __init__(self) -> None:
        self.layers: list[LayerSums] = []

    def add(self, aux_list: list[MoEAux]) -> None:
        if not self.layers:
            self.layers = [LayerSums(torch.zeros_like(aux.expert_slots_E),
                                     None if aux.lore_slots_EM is None else torch.zeros_like(aux.lore_slots_EM))
                           for aux in aux_list]
        for sums, aux in zip(self.layers, aux_list):
            sums.expert_slots_E += aux.expert_slots_E
            if aux.lore_slots_EM is not None:
                sums.lore_slots_EM += aux.lore_slots_EM
            for key, value in aux.dispatch_stats.items():
                if key in PEAK_STATS:
                    sums.peaks[key] = max(sums.peaks.get(key, value), value)
                else:
                    total = sums.means.setdefault(key, [0.0, 0.0])
                    total[0], total[1] = total[0] + value, total[1] + 1
            for key, pair in (aux.balance.stats if aux.balance is not None else {}).items():
                sums.ratios[key] = sums.ratios[key] + pair if key in sums.ratios else pair.clone()  # no host sync

    def pop(self, ratios: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """The interval's statistics (and `ratios`: more [part, whole] pairs by metric name, e.g. the bias spreads)
        over every rank, in one all-reduce; the peaks in a second one, where there are any (expert parallelism)."""
        layers, self.layers = self.layers, []
        if not layers:
            return {}
        device = layers[0].expert_slots_E.device
        ratios = dict(ratios or {})
        for i, sums in enumerate(layers):
            ratios |= {f"moe/layer{i}/{key}": pair for key, pair in sums.ratios.items()}
            ratios |= {f"moe/layer{i}/{key}": torch.tensor(total, dtype=torch.float64, device=device)
                       for key, total in sums.means.items()}
        names = sorted(ratios)  # the same order on every rank
        lore_tables = [sums.lore_slots_EM for sums in layers if sums.lore_slots_EM is not None]
        summed = iter(summed_over_ranks([sums.expert_slots_E for sums in layers] + lore_tables
                                        + [ratios[name] for name in names]))
        expert_slots = [next(summed) for _ in layers]
        lore_slots = [None if sums.lore_slots_EM is None else next(summed) for sums in layers]
        metrics = routing_stats(expert_slots, lore_slots)
        for name, (part, whole) in zip(names, summed):
            metrics[name] = float(part / whole) if whole else 0.0
        peaks = {f"moe/layer{i}/{key}": value for i, sums in enumerate(layers) for key, value in sums.peaks.items()}
        return metrics | max_over_ranks(peaks, device)


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
        # an evaluation iteration is a global batch, as in GPT-NeoX: the same held-out samples at every layout
        self.eval_micro_batches = args.eval_iters * args.gradient_accumulation_steps
        self.eval_samples_per_rank = self.eval_micro_batches * self.micro_batch
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
        mtp_loss_P = None
        if self.args.mtp_num_modules:  # multi-token prediction: the model's loss path, its modules' losses too
            lm_loss, moe_aux, mtp_loss_P = model(tokens_BS1[:, :-1], tokens_BS1[:, 1:], self.args.loss_chunk_tokens,
                                                 mtp=True)
        elif self.args.loss_chunk_tokens:  # the head and loss in chunks: the full logits never exist
            lm_loss, moe_aux = model(tokens_BS1[:, :-1], tokens_BS1[:, 1:], self.args.loss_chunk_tokens)
        else:
            logits_BSV, moe_aux = model(tokens_BS1[:, :-1])
            lm_loss = F.cross_entropy(logits_BSV.flatten(0, 1).float(), tokens_BS1[:, 1:].flatten())
        metrics = {"loss": lm_loss.detach()}  # the main head's, as val/loss
        total = lm_loss
        if mtp_loss_P is not None:  # the modules' mean, unweighted (and each module's where there are several)
            mtp_loss = mtp_loss_P.mean()
            metrics["mtp_loss"] = mtp_loss.detach()
            if len(mtp_loss_P) > 1:
                metrics |= {f"mtp/module{d}_loss": loss.detach() for d, loss in enumerate(mtp_loss_P, start=1)}
            total = total + self.args.mtp_loss_coeff * mtp_loss
        if moe_aux:
            for name, coeff in self.aux_coeffs.items():
                summed = sum(getattr(aux, name) for aux in moe_aux)  # summed over layers
                metrics[f"moe/{name}"] = summed.detach()
                if coeff:
                    total = total + coeff * summed
            self.routing.add(moe_aux)
            self.balance.record(moe_aux)
        if mtp_loss_P is not None or moe_aux:  # the loss trained on, when more than the main head's
            metrics["total_loss"] = total.detach()
        return total, metrics

    def optimizer_stepped(self) -> None:
        self.balance.optimizer_stepped()

    def interval_metrics(self) -> dict[str, Any]:
        """Routing statistics of the global batch (RoutingAccumulator: one all-reduce for all of them), the same on
        every rank, and the routing health that reads them."""
        ratios = bias_spreads(self.model)
        if self.error_probe is not None:  # each rank's mean error: their mean over ranks
            ratios |= {key: torch.tensor([error, 1.0], dtype=torch.float64, device=self.dist.device)
                       for key, error in self.error_probe.pop().items()}
        metrics = self.routing.pop(ratios)
        metrics.update(self.health.update(self.steps_seen, metrics))
        return metrics

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self.valid_data is None or len(self.valid_data) == 0:
            return {}
        start = self.dist.rank * self.eval_samples_per_rank
        losses = []
        for i in range(self.eval_micro_batches):
            tokens_BS1 = self._stack(self.valid_data, start + i * self.micro_batch)
            logits_BSV, _ = model(tokens_BS1[:, :-1])
            losses.append(F.cross_entropy(logits_BSV.flatten(0, 1).float(), tokens_BS1[:, 1:].flatten()))
        val_loss = float(all_reduce_mean(torch.stack(losses).mean()))
        return {"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50.0))}

    def lr_scales(self) -> dict[str, float]:
        return {}

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Batches are a function of the step; what has history is the routing health's streaks and verdicts (the
        same on every rank, so any rank's copy resumes any layout)."""
        return {"routing_health": self.health.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "routing_health" in state:  # checkpoints from before it was saved start with a clean slate
            self.health.load_state_dict(state["routing_health"])
