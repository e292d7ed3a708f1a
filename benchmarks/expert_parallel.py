"""Expert parallelism on 2 gloo ranks, measured side by side in one run: time, bytes moved, memory per rank.

Shape legend: N or T rows (tokens), D hidden, E experts, K top-k.

    python benchmarks/expert_parallel.py                  # 125M shape: d=768, ffn 3072, 8 experts, top-1
    python benchmarks/expert_parallel.py --lore           # + StructMoE LoREs: 32 per expert, rank 64, top-1
    python benchmarks/expert_parallel.py --tokens 4096 --repeats 5 --plot /tmp/ep.png

It spawns its own 2 ranks (gloo over a file:// store, one thread each) and reports:

1. Time per MoE layer forward+backward, EP=1 (every rank holds all experts: LocalDispatcher) against EP=2
   (half the experts a rank: AllToAllDispatcher), each rank routing its own --tokens tokens, split into
   routing, exchange (counts all-gather + all_to_all both ways, with the regrouping around them),
   experts and the rest (permutation, combine, losses). A timing shim installed here, not in the
   package, wraps the router and experts (module hooks), and the dispatcher instance's exchange/exchange_back
   and its all_to_all/all_gather_counts. Backward times of a part come from identity autograd nodes on the
   part's inputs and outputs: autograd runs CPU nodes in decreasing creation order, so the time between
   the output's node and the input's node is exactly the backward of the nodes the part created. The
   all_to_all (benchmarks/harness.py's TimedAllToAll) times its own backward.
2. Bytes each rank sends per exchange with EP=2, and the share of rows that stay on their rank.
3. Per-rank bytes of parameters + gradients + AdamW state of the layer on 1 rank against 2 ranks (DDP,
   FSDP2 stage 3, EP=2), with ratios against the targets; then the estimator of
   megatron/sizing/memory.py for the paper configs, and against a small measured 2-rank GPT run.

Variants are interleaved repeat by repeat and medians taken; times are the mean of the two ranks'
medians. Like train.py on CPU it keeps freed memory in the process (--default-malloc does not).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from harness import Exchange, TimedAllToAll, interleaved, medians, spawn_gloo_ranks  # noqa: E402

from megatron.model.moe import LoREConfig, MoELayer  # noqa: E402
from megatron.parallel import DistInfo  # noqa: E402
from megatron.parallel.data_parallel import ParallelModel, expert_parameter_names  # noqa: E402
from megatron.parallel.expert_parallel import ExpertParallel  # noqa: E402
from megatron.parallel.mesh import build_parallel_dims  # noqa: E402
from megatron.runtime import keep_freed_memory_in_process  # noqa: E402
from megatron.training.optim import build_optimizer  # noqa: E402

WORLD = 2
WARMUP = 2
D, FFN, EXPERTS, TOP_K = 768, 3072, 8, 1
LORE = dict(num_lores=32, rank=64, top_l=1)
MEMORY_TOKENS = 256  # state bytes do not depend on the batch; a small step creates gradients and AdamW state
PARTS = ("routing", "exchange", "counts_all_gather", "all_to_all", "experts")
CPU = torch.device("cpu")

# layer memory layouts: (label, world, EP, zero stage)
LAYER_LAYOUTS = (
    ("1 rank", 1, 1, 0),
    ("2 ranks DDP", 2, 1, 0),
    ("2 ranks FSDP2 stage 3", 2, 1, 3),
    ("2 ranks EP=2 (DDP)", 2, 2, 0),
    ("2 ranks EP=2 + FSDP2 stage 3", 2, 2, 3),
)
SMALL_CONFIG = REPO / "configs" / "tiny_structmoe.yml"
SMALL_OVERRIDES = ["--train_micro_batch_size_per_gpu", "2"]
SMALL_LAYOUTS = ((0, 1), (3, 1), (0, 2), (3, 2))  # (zero stage, EP) on 2 ranks
PAPER_CONFIGS = ("125M_structmoe.yml", "410M_structmoe.yml")
PAPER_LAYOUTS = ((8, 1, 0), (8, 8, 1), (8, 8, 3), (64, 8, 1))  # (world, EP, zero stage)
GIB = 1024**3


# -- the timing shim ----------------------------------------------------------------------------------------------

class _Clock:
    """One step's forward seconds per part, and the backward stamps of each timed region's marks."""

    def __init__(self):
        self.forward: dict[str, float] = defaultdict(float)
        self.backward: dict[str, float] = defaultdict(float)  # backward seconds timed directly (the all_to_all)
        self.names: dict[int, str] = {}  # region id -> part
        self.starts: dict[int, list[float]] = defaultdict(list)  # backward stamps of the region's outputs
        self.ends: dict[int, float] = {}  # backward stamp of the region's inputs (the last one)
        self.splits: list[tuple[list[int], list[int]]] = []  # (input, output) splits of each forward all_to_all
        self.expert_rows = 0
        self.row_bytes = 0
        self._ids = itertools.count()
        self._open: dict[str, float] = {}

    def region(self, part: str) -> int:
        rid = next(self._ids)
        self.names[rid] = part
        return rid

    def backward_parts(self) -> dict[str, float]:
        parts: dict[str, float] = defaultdict(float, self.backward)
        for rid, part in self.names.items():
            if rid in self.ends and self.starts[rid]:
                parts[part] += self.ends[rid] - min(self.starts[rid])
        return parts


_CLOCK: _Clock | None = None  # the clock of the step being measured; shims pass through when None


class _Stamp(torch.autograd.Function):
    """Identity whose backward notes the time: on a region's outputs it fires before the region's backward,
    on its inputs after it."""

    @staticmethod
    def forward(ctx, x, clock: _Clock, rid: int, is_input: bool):
        ctx.clock, ctx.rid, ctx.is_input = clock, rid, is_input
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        now = time.perf_counter()
        if ctx.is_input:
            ctx.clock.ends[ctx.rid] = max(ctx.clock.ends.get(ctx.rid, now), now)
        else:
            ctx.clock.starts[ctx.rid].append(now)
        return grad, None, None, None


def _mark(tensor, clock: _Clock, rid: int, is_input: bool):
    if isinstance(tensor, torch.Tensor) and tensor.requires_grad and torch.is_grad_enabled():
        return _Stamp.apply(tensor, clock, rid, is_input)
    return tensor


def _timed_call(part: str, tensor: torch.Tensor, call, mark_output):
    """call(tensor) as one region: its forward time, and marks on its input and output for its backward time."""
    clock = _CLOCK
    if clock is None:
        return call(tensor)
    rid = clock.region(part)
    start = time.perf_counter()
    out = call(_mark(tensor, clock, rid, True))
    clock.forward[part] += time.perf_counter() - start
    return mark_output(out, lambda t: _mark(t, clock, rid, False))


def _instrument_layer(layer: MoELayer) -> None:
    """Timing shims on one layer: hooks on its router and experts, wrappers on its dispatcher's exchange."""

    def pre_hook(part):
        def hook(module, args):
            clock = _CLOCK
            if clock is None:
                return None
            rid = clock.region(part)
            module._bench_region = rid
            clock._open[part] = time.perf_counter()
            if part == "experts":
                clock.expert_rows = args[0].shape[0]
            return (_mark(args[0], clock, rid, True), *args[1:])
        return hook

    def post_hook(part):
        def hook(module, args, output):
            clock = _CLOCK
            if clock is None:
                return None
            clock.forward[part] += time.perf_counter() - clock._open.pop(part)
            mark = lambda t: _mark(t, clock, module._bench_region, False)
            if part == "routing":
                return dataclasses.replace(output, weights_TK=mark(output.weights_TK), probs_TE=mark(output.probs_TE),
                                           load_balancing_loss=mark(output.load_balancing_loss),
                                           z_loss=mark(output.z_loss))
            y, aux = output
            if aux is not None:
                aux = {key: mark(value) for key, value in aux.items()}
            return mark(y), aux
        return hook

    for part, module in (("routing", layer.router), ("experts", layer.experts)):
        module.register_forward_pre_hook(pre_hook(part))
        module.register_forward_hook(post_hook(part))

    dispatcher = layer.dispatcher
    exchange, exchange_back = dispatcher.exchange, dispatcher.exchange_back

    def timed_exchange(x_ND, tokens_per_expert_E):
        return _timed_call("exchange", x_ND, lambda x: exchange(x, tokens_per_expert_E),
                           lambda out, mark: dataclasses.replace(out, rows_ND=mark(out.rows_ND)))

    def timed_exchange_back(y_ND, state):
        return _timed_call("exchange", y_ND, lambda y: exchange_back(y, state), lambda out, mark: mark(out))

    dispatcher.exchange, dispatcher.exchange_back = timed_exchange, timed_exchange_back
    if hasattr(dispatcher, "all_to_all"):  # the EP layer's AllToAllDispatcher
        _instrument_collectives(dispatcher)


def _note_all_to_all(exchange: Exchange) -> None:
    clock = _CLOCK
    if clock is None:
        return
    if exchange.phase == "fwd":
        clock.forward["all_to_all"] += exchange.seconds
        clock.splits.append((exchange.input_splits, exchange.output_splits))
        clock.row_bytes = exchange.row_bytes
    else:
        clock.backward["all_to_all"] += exchange.seconds


def _instrument_collectives(dispatcher) -> None:
    """Times one dispatcher's all_to_all (forward and backward) and counts all-gather, on that instance."""
    all_gather_counts = dispatcher.all_gather_counts

    def timed_all_gather_counts(counts_E, group):
        return _timed_call("counts_all_gather", counts_E, lambda c: all_gather_counts(c, group),
                           lambda out, mark: out)

    dispatcher.all_to_all, dispatcher.all_gather_counts = TimedAllToAll(_note_all_to_all), timed_all_gather_counts


# -- rank side: timing ----------------------------------------------------------------------------------------------

def _lore_config(use_lore: bool) -> LoREConfig | None:
    return LoREConfig(LORE["num_lores"], LORE["rank"], LORE["top_l"], "entangled") if use_lore else None


def _aux_loss(aux) -> torch.Tensor:
    return 0.01 * (aux.load_balancing_loss + aux.z_loss + aux.lore_balancing_loss)


def _timed_step(layer: MoELayer, x: torch.Tensor, grad: torch.Tensor) -> tuple[dict, _Clock]:
    global _CLOCK
    clock = _Clock()
    dist.barrier()  # both ranks start together: waiting at a collective is the exchange's, not the warm-up's
    _CLOCK = clock
    try:
        start = time.perf_counter()
        y, aux = layer(x)
        loss = (y * grad).sum() + _aux_loss(aux)
        middle = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
    finally:
        _CLOCK = None
    layer.zero_grad(set_to_none=True)
    x.grad = None
    forward, backward = dict(clock.forward), dict(clock.backward_parts())
    forward["total"], backward["total"] = middle - start, end - middle
    for phase in (forward, backward):
        for part in PARTS:
            phase.setdefault(part, 0.0)
        phase["other"] = phase["total"] - phase["routing"] - phase["exchange"] - phase["experts"]
    return {"forward": forward, "backward": backward}, clock


def _time_layers(rank: int, world: int, opts: argparse.Namespace) -> dict:
    lore = _lore_config(opts.lore)
    layers = {}
    for name, expert_parallel in (("EP=1", None), ("EP=2", ExpertParallel(world, rank, dist.group.WORLD))):
        torch.manual_seed(0)  # the same weights on every rank and in both layouts
        layers[name] = MoELayer.build(D, FFN, EXPERTS, TOP_K, lore=lore, expert_parallel=expert_parallel)
        _instrument_layer(layers[name])
    generator = torch.Generator().manual_seed(100 + rank)  # every rank routes its own tokens
    x = torch.randn(opts.tokens, D, generator=generator).requires_grad_()
    grad = torch.randn(opts.tokens, D, generator=generator)
    last: dict[str, _Clock] = {}

    def step(name: str) -> dict:
        record, last[name] = _timed_step(layers[name], x, grad)
        return record

    result = {}
    for name, steps in interleaved(step, layers, opts.repeats, WARMUP).items():
        median = {phase: medians([step[phase] for step in steps]) for phase in ("forward", "backward")}
        median["fwd_bwd"] = {part: median["forward"][part] + median["backward"][part] for part in median["forward"]}
        totals = [step["forward"]["total"] + step["backward"]["total"] for step in steps]
        clock = last[name]
        result[name] = {"median": median, "totals": totals, "expert_rows": clock.expert_rows,
                        "splits": clock.splits, "row_bytes": clock.row_bytes or D * x.element_size()}
    return result


# -- rank side: memory ------------------------------------------------------------------------------------------------

def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def _state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer, only: set[str] | None = None) -> dict:
    """This rank's bytes of parameters, gradients, AdamW moments and step counters (of `only` names if given)."""
    out = dict(params=0, grads=0, moments=0, steps=0)
    for name, param in model.named_parameters():
        if only is not None and name not in only:
            continue
        out["params"] += _local_bytes(param)
        out["grads"] += _local_bytes(param.grad) if param.grad is not None else 0
        for key, value in optimizer.state[param].items():
            if isinstance(value, torch.Tensor):
                out["steps" if key == "step" else "moments"] += _local_bytes(value)
    out["state"] = sum(out.values())
    return out


def _measure_layer_memory(rank: int, world: int, opts: argparse.Namespace) -> dict:
    lore = _lore_config(opts.lore)
    results = {}
    for label, layout_world, ep, stage in LAYER_LAYOUTS:
        if layout_world == 1 and rank != 0:  # one rank: rank 0 alone, as a 1-rank run
            dist.barrier()
            continue
        info = DistInfo(rank, layout_world, rank, CPU) if layout_world > 1 else DistInfo(0, 1, 0, CPU)
        dims = build_parallel_dims(info, ep)
        torch.manual_seed(0)
        layer = MoELayer.build(D, FFN, EXPERTS, TOP_K, lore=lore, expert_parallel=dims.expert_parallel())
        expert_names = set(expert_parameter_names(layer))
        parallel = ParallelModel(layer, dims, stage)
        optimizer = build_optimizer(layer, 1e-3, (0.9, 0.95), 1e-8, 0.1, CPU)
        x = torch.randn(MEMORY_TOKENS, D, generator=torch.Generator().manual_seed(rank))
        y, aux = parallel.module(x)
        (y.square().mean() + _aux_loss(aux)).backward()
        parallel.reduce_gradients()
        optimizer.step()
        results[label] = {"all": _state_bytes(layer, optimizer), "experts": _state_bytes(layer, optimizer,
                                                                                          expert_names)}
        del parallel, optimizer, layer, y, aux
        if layout_world == 1:
            dist.barrier()
    return results


def _measure_small_run(rank: int, world: int) -> dict:
    """The state of a small GPT (configs/tiny_structmoe.yml) after one step at a few 2-rank layouts."""
    from megatron.config import load_config
    from megatron.data.tokenizer import vocab_size_of
    from megatron.model.build import build_gpt

    args = load_config([str(SMALL_CONFIG)], SMALL_OVERRIDES, data_parallel_size=world)
    vocab = vocab_size_of(args)
    results = {}
    for stage, ep in SMALL_LAYOUTS:
        dims = build_parallel_dims(DistInfo(rank, world, rank, CPU), ep)
        torch.manual_seed(0)
        model = build_gpt(args, vocab, dims.expert_parallel())
        parallel = ParallelModel(model, dims, stage)  # one step: DDP never has to look for unused parameters
        optimizer = build_optimizer(model, 1e-3, (0.9, 0.95), 1e-8, 0.1, CPU)
        tokens = torch.randint(0, vocab, (args.train_micro_batch_size_per_gpu, args.seq_length + 1),
                               generator=torch.Generator().manual_seed(rank))
        logits, aux = parallel.module(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + sum(_aux_loss(a) for a in aux)
        loss.backward()
        parallel.reduce_gradients()
        parallel.clip_grad_norm_(1.0)
        optimizer.step()
        results[f"{stage},{ep}"] = _state_bytes(model, optimizer)
        del parallel, optimizer, model, logits, aux, loss
    return results


def _rank_main(rank: int, world: int, opts: argparse.Namespace) -> dict:
    # the layer returns y.view_as(x); nothing here modifies it in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    if not opts.default_malloc:
        keep_freed_memory_in_process()  # as train.py does on CPU
    result = {"timing": _time_layers(rank, world, opts), "layer_memory": _measure_layer_memory(rank, world, opts)}
    try:
        result["small_run"] = _measure_small_run(rank, world)
    except Exception as err:  # the layer figures stand without it
        result["small_run_error"] = f"{type(err).__name__}: {err}"
    return result


# -- parent side: the report ------------------------------------------------------------------------------------------

def _ratio(new: float, base: float) -> str:
    return f"{new / base:7.2f}" if base > 1e-5 else "    n/a"


def _print_timing(ranks: list[dict], opts: argparse.Namespace) -> dict[str, dict[str, float]]:
    def mean(variant, phase, part):
        return statistics.fmean(r["timing"][variant]["median"][phase][part] for r in ranks)

    shape = f"d={D} ffn={FFN} {EXPERTS} experts top-{TOP_K}"
    if opts.lore:
        shape += f" + LoREs ({LORE['num_lores']} per expert, rank {LORE['rank']}, top-{LORE['top_l']})"
    print(f"1. MoE layer forward+backward, {shape}, {opts.tokens} tokens per rank, fp32")
    print(f"   {WORLD} gloo ranks x 1 thread; median of {opts.repeats} repeats after {WARMUP} warm-up rounds, "
          "mean of the ranks; milliseconds")
    phases = (("forward", "forward"), ("backward", "backward"), ("fwd_bwd", "fwd+bwd"))
    header = "".join(f"{title:^24}{'':>6}" for _, title in phases)
    print(f"   {'part':<34}{header}".rstrip())
    print(f"   {'':<34}" + "".join(f"{'EP=1':>8}{'EP=2':>8}{'EP2/EP1':>8}{'':>6}" for _ in phases).rstrip())
    rows = (("routing", "routing"), ("exchange", "exchange (all)"),
            ("counts_all_gather", "  of which counts all-gather"), ("all_to_all", "  of which all_to_all (2 calls)"),
            ("experts", "experts"), ("other", "other (permute, combine, losses)"), ("total", "total"))
    for part, label in rows:
        line = f"   {label:<34}"
        for phase, _ in phases:
            one, two = mean("EP=1", phase, part), mean("EP=2", phase, part)
            line += f"{1e3 * one:8.1f}{1e3 * two:8.1f}{_ratio(two, one):>8}{'':>6}"
        print(line.rstrip())
    rows_one = statistics.fmean(r["timing"]["EP=1"]["expert_rows"] for r in ranks)
    rows_two = [r["timing"]["EP=2"]["expert_rows"] for r in ranks]
    print(f"   expert rows per rank: EP=1 {rows_one:.0f} (8 experts), EP=2 {rows_two} (4 experts each, rows of "
          "both ranks)")
    for rank, result in enumerate(ranks):
        spread = "; ".join(f"{name} " + " / ".join(f"{1e3 * f(result['timing'][name]['totals']):.0f}"
                                                   for f in (min, statistics.median, max))
                           for name in ("EP=1", "EP=2"))
        print(f"   rank {rank} fwd+bwd total per repeat, min / median / max ms: {spread}")
    print("""   fwd+bwd = the sum of the forward and backward medians. Backward per part: identity autograd nodes on
   each part's inputs and outputs (CPU autograd runs nodes in reverse creation order, so a part's backward
   lies between them); routing's backward includes its aux losses. Exchange times include waiting for the
   other rank at the collectives (routing skew, load imbalance). Neither variant includes the
   data-parallel gradient reduction. On this machine gloo's all-to-all goes over loopback/shared memory
   between 2 processes on 2 cores: exchange times do not represent a GPU cluster's NVLink/InfiniBand.""")
    return {name: {part: mean(name, "fwd_bwd", part) for part in ("routing", "exchange", "experts", "other")}
            for name in ("EP=1", "EP=2")}


def _print_bytes(ranks: list[dict]) -> None:
    print("2. Bytes per exchange, EP=2 (the forward exchanges of the last measured step; backward mirrors them)")
    for rank, result in enumerate(ranks):
        timing = result["timing"]["EP=2"]
        splits, row_bytes = timing["splits"], timing["row_bytes"]
        if not splits:
            print(f"   rank {rank}: no all_to_all recorded")
            continue
        send, recv = splits[0]  # dispatch: input splits (rows sent to each rank), output splits (received)
        routed, stay = sum(send), send[rank]
        cross_out, cross_in = routed - stay, sum(recv) - recv[rank]
        counts_bytes = (WORLD - 1) * EXPERTS * 8  # int64 counts to every other rank
        step_sent = 2 * (cross_out + cross_in) * row_bytes + counts_bytes  # dispatch + combine, fwd + bwd
        print(f"   rank {rank}: {routed} routed rows; {stay} stay on the rank ({stay / routed:.1%}), "
              f"{cross_out} cross ({cross_out / routed:.1%}); receives {cross_in} rows from the other rank")
        print(f"           dispatch sends {cross_out} x {row_bytes} B = {cross_out * row_bytes / 2**20:.2f} MiB, "
              f"combine sends {cross_in} x {row_bytes} B = {cross_in * row_bytes / 2**20:.2f} MiB, "
              f"counts all-gather {counts_bytes} B")
        print(f"           per layer forward+backward (4 all_to_alls + 1 all-gather): "
              f"{step_sent / 2**20:.2f} MiB sent, as much received")
    print("   (rows x d x 4 B in fp32; 2 B per element under bf16 autocast. all_to_all_single also copies the "
          "rows that stay,\n   in memory; they are not counted as traffic.)")


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:10.2f}"


def _print_layer_memory(ranks: list[dict], opts: argparse.Namespace) -> None:
    print(f"3. Memory per rank of the layer{' with LoREs' if opts.lore else ''}: parameters + gradients + AdamW "
          "state after one step, MiB (the larger rank)")
    base = ranks[0]["layer_memory"]["1 rank"]
    print(f"   {'layout':<30}{'params':>10}{'grads':>10}{'AdamW':>10}{'state':>10}{'vs 1 rank':>10}"
          f"{'experts':>10}{'vs 1 rank':>10}")
    for label, world, _, _ in LAYER_LAYOUTS:
        per_rank = [r["layer_memory"][label] for r in ranks[:world]]
        worst = max(per_rank, key=lambda m: m["all"]["state"])
        whole, experts = worst["all"], worst["experts"]
        print(f"   {label:<30}{_fmt_bytes(whole['params'])}{_fmt_bytes(whole['grads'])}"
              f"{_fmt_bytes(whole['moments'] + whole['steps'])}{_fmt_bytes(whole['state'])}"
              f"{whole['state'] / base['all']['state']:10.4f}{_fmt_bytes(experts['state'])}"
              f"{experts['state'] / base['experts']['state']:10.4f}")
    fsdp = max(r["layer_memory"]["2 ranks FSDP2 stage 3"]["all"]["state"] for r in ranks)
    ratio = fsdp / base["all"]["state"]
    print(f"   FSDP2 stage 3, 2 ranks / 1 rank, params+grads+AdamW: {ratio:.4f}  (target <= 0.52, ideal 0.5): "
          f"{'met' if ratio <= 0.52 else 'NOT met'}")
    ep_parts = [r["layer_memory"]["2 ranks EP=2 (DDP)"]["experts"] for r in ranks]
    one = base["experts"]
    elementwise = lambda m: m["params"] + m["grads"] + m["moments"]
    exact = all(2 * elementwise(m) == elementwise(one) for m in ep_parts)
    shares = ", ".join(f"{elementwise(m) / elementwise(one):.6f}" for m in ep_parts)
    print(f"   EP=2 expert bytes per rank / 1 rank (params+grads+AdamW moments): {shares}  (target 0.5 exactly): "
          f"{'met, exactly half' if exact else 'NOT exactly half'}")
    steps = ep_parts[0]["steps"]
    print(f"   (AdamW's step counters, 4 B per tensor, are per tensor and not halved: {steps} B of expert state "
          "per rank)")


def _estimator():
    try:
        from megatron.sizing import memory
        return memory, None
    except Exception as err:  # missing or broken: the rest of the report stands
        return None, f"{type(err).__name__}: {err}"


def _print_estimator(ranks: list[dict]) -> None:
    memory, error = _estimator()
    if memory is None:
        print(f"4. Memory estimator: estimator not available (megatron.sizing.memory: {error})")
        return
    from megatron.config import load_config

    print("4. Memory estimator (megatron.sizing.memory.estimate_memory), GiB on the most loaded rank")
    print(f"   {'config':<20}{'W':>4}{'EP':>4}{'stage':>7}{'params':>9}{'grads':>9}{'AdamW':>9}{'state':>9}"
          f"{'gathered':>10}{'activ.':>9}{'peak':>9}")
    for config in PAPER_CONFIGS:
        for world, ep, stage in PAPER_LAYOUTS:
            args = load_config([str(REPO / "configs" / config)], [], data_parallel_size=world)
            est = memory.estimate_memory(args, world, ep, stage)
            name = "DDP" if stage == 0 else str(stage)
            print(f"   {config.removesuffix('.yml'):<20}{world:>4}{ep:>4}{name:>7}"
                  + "".join(f"{v / GIB:9.2f}" for v in (est.params_bytes, est.grads_bytes, est.optimizer_bytes,
                                                          est.state_bytes()))
                  + f"{est.gathered_params_bytes / GIB:10.2f}{est.activations_bytes / GIB:9.2f}"
                  f"{est.peak_bytes() / GIB:9.2f}")
    if "small_run" not in ranks[0]:
        print(f"   measured small run failed: {ranks[0].get('small_run_error')}")
        return
    args = load_config([str(SMALL_CONFIG)], SMALL_OVERRIDES, data_parallel_size=WORLD)
    print(f"   against a measured small run: {SMALL_CONFIG.relative_to(REPO)} on {WORLD} gloo ranks, one step; "
          "state = params + grads + AdamW, KiB")
    print(f"   {'stage':>7}{'EP':>4}{'estimate':>11}{'rank 0':>11}{'rank 1':>11}{'error':>9}  (target within 2%)")
    worst = 0.0
    for stage, ep in SMALL_LAYOUTS:
        est = memory.estimate_memory(args, WORLD, ep, stage).state_bytes()
        measured = [r["small_run"][f"{stage},{ep}"]["state"] for r in ranks]
        error = (est - measured[0]) / measured[0]  # rank 0 is the most loaded
        worst = max(worst, abs(error))
        name = "DDP" if stage == 0 else str(stage)
        print(f"   {name:>7}{ep:>4}{est / 1024:11.1f}" + "".join(f"{m / 1024:11.1f}" for m in measured)
              + f"{error:9.2%}")
    print(f"   largest error {worst:.2%}: {'met' if worst <= 0.02 else 'NOT met'}")


def _plot(parts: dict[str, dict[str, float]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"plot: matplotlib is not installed; {path} not written")
        return
    fig, ax = plt.subplots(figsize=(5, 4))
    names = list(parts)
    bottom = [0.0] * len(names)
    for part in ("routing", "exchange", "experts", "other"):
        heights = [1e3 * parts[name][part] for name in names]
        ax.bar(names, heights, bottom=bottom, label=part)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("ms per MoE layer forward+backward")
    ax.set_title("MoE layer on 2 gloo CPU ranks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens each rank routes per step")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lore", action="store_true", help="add StructMoE LoREs (32 per expert, rank 64, top-1)")
    parser.add_argument("--plot", metavar="PATH", help="write a stacked bar chart of the time split (PNG)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default (unmap large freed blocks), as train.py does not on CPU")
    opts = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # one thread per rank: 2 ranks on 2 cores
    start = time.perf_counter()
    ranks = spawn_gloo_ranks(_rank_main, WORLD, opts)
    parts = _print_timing(ranks, opts)
    print()
    _print_bytes(ranks)
    print()
    _print_layer_memory(ranks, opts)
    print()
    _print_estimator(ranks)
    if opts.plot:
        print()
        _plot(parts, opts.plot)
    print(f"\n(run took {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
