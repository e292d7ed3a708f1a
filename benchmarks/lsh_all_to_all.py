"""LSH-MoE compression of the expert-parallel exchange, on 2 ranks over a rate-limited veth link.

Shape legend: N or T rows (tokens), C centroids, D hidden, E experts.

    python benchmarks/lsh_all_to_all.py                       # 1 Gbit/s veth between two network namespaces
    python benchmarks/lsh_all_to_all.py --rate 10gbit --plot /tmp/lsh.png
    python benchmarks/lsh_all_to_all.py --no-netns            # loopback, no rate limit

Steps, all in one run:

1. Hidden states from a trained model, not noise. On first use a small MoE GPT (configs/tiny_moe.yml at
   d=768, 12 heads, 2 layers: block 1 is the MoE layer, 8 experts, top-1) is trained on the bundled corpus
   with this repo's train.py for --train-iters steps, and the checkpoint is cached under --cache
   (runs/lsh_benchmark, git-ignored). The inputs of its MoE layer (and the residual stream around it) are
   captured with forward hooks on sequences the training never saw: 4096 tokens per rank, other
   sequences for each rank. Later runs reuse the checkpoint and the captured states.
2. The network: two namespaces joined by a veth pair, each end rate-limited by a tbf qdisc (--rate),
   one rank in each namespace (gloo over TCP on the veth). Namespaces are removed on exit, Ctrl-C or
   error. Without root or `ip`/`tc`, or with --no-netns, both ranks run on loopback (not rate-limited).
3. The trained MoE layer's weights, expert-parallel over the 2 ranks (4 experts each), every rank routing its
   own 4096 captured tokens: the exact exchange (AllToAllDispatcher) against LSHDispatcher at the
   default LSHConfig and the other --settings, side by side, repeats interleaved, medians:
   (a) bytes each rank sends per exchange, and the compression rate (centroids / rows);
   (b) exchange time (the all_to_alls of dispatch and combine, forward + backward, and the counts
       all-gather) and the whole layer's forward + backward time;
   (c) relative error of the layer output and of the block output (residual + layer output) against the
       exact layer on the same tokens, with and without error compensation.

A timing shim, set by this file on the dispatcher instances in the rank processes, replaces the exact
dispatcher's all_to_all (benchmarks/harness.py's TimedAllToAll) and counts all-gather with ones that first
wait for the other rank at a barrier (timed apart as "wait", so the exchange time is wire time, not load
imbalance) and then time the collective itself, forward and backward; it also times each LSH dispatcher's
compress and decompress. The bytes on the wire are also read from the veth's own counter (tx_bytes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

WORLD = 2
TOKENS = 4096
CONFIG = REPO / "configs" / "tiny_moe.yml"
MOE_BLOCK = 1  # with 2 layers and moe_expert_interval 2, block 1 is the MoE block
TRAIN_OVERRIDES = ["--hidden_size", "768", "--num_attention_heads", "12", "--num_layers", "2",
                   "--train_micro_batch_size_per_gpu", "8", "--eval_interval", "0", "--log_interval", "10",
                   "--keep_last_n_checkpoints", "1"]
DEFAULT_SETTINGS = "2x16,4x16,1x64,1x16"  # num_hashes x hash_dim; 2x16 is LSHConfig's default
# The compressed exchange should send <= 0.25x the bytes, be >= 3x faster and make the MoE layer >= 1.5x faster.
TARGETS = {"bytes": 0.25, "exchange": 3.0, "layer": 1.5}
ADDRS = ("10.77.0.1", "10.77.0.2")
PORT = 29517
MIB = 2**20


def _log(message: str) -> None:
    print(message, flush=True)


# == parent: the trained model and the captured states ==============================================================

def _train_args(opts: argparse.Namespace, ckpt: Path) -> list[str]:
    return [*TRAIN_OVERRIDES, "--train_iters", str(opts.train_iters), "--checkpoint_factor", str(opts.train_iters),
            "--save", str(ckpt), "--load", str(ckpt), "--log_dir", str(ckpt / "logs"),
            "--tensorboard_dir", str(ckpt / "tensorboard")]


def _checkpoint_step(ckpt: Path) -> int:
    latest = ckpt / "latest"
    return int(latest.read_text().strip().removeprefix("global_step")) if latest.is_file() else 0


def _ensure_model(opts: argparse.Namespace, cache: Path) -> tuple[Path, float]:
    """The cached checkpoint, training it first if needed; returns it and the training seconds (0 if cached)."""
    ckpt = cache / "checkpoint"
    if _checkpoint_step(ckpt) >= opts.train_iters:
        return ckpt, 0.0
    cache.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "train.py", str(CONFIG.relative_to(REPO)), *_train_args(opts, ckpt)]
    _log(f"training the model (not cached yet): {' '.join(command)}\n  log: {cache / 'train.log'}")
    start = time.perf_counter()
    with open(cache / "train.log", "w") as log_file:
        done = subprocess.run(command, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, env=_child_env())
    if done.returncode != 0:
        raise RuntimeError(f"train.py failed (exit {done.returncode}); see {cache / 'train.log'}")
    return ckpt, time.perf_counter() - start


def _last_loss(cache: Path) -> str:
    log_path = cache / "train.log"
    found = re.findall(r"megatron: step (\d+) \| loss ([\d.]+)", log_path.read_text()) if log_path.is_file() else []
    if not found:
        return "loss not logged"
    (first_step, first), (last_step, last) = found[0], found[-1]
    return f"LM loss {first} at step {first_step} -> {last} at step {last_step}"


def _capture_states(opts: argparse.Namespace, ckpt: Path, states_path: Path) -> None:
    """Loads the checkpoint, runs unseen training-split sequences through it and keeps, per rank, the MoE
    layer's input x and the residual stream r it is added to (block output = r + layer(x)), and the layer."""
    import numpy as np

    from megatron.config import load_config
    from megatron.data.gpt_dataset import build_train_valid_test_datasets
    from megatron.data.tokenizer import vocab_size_of
    from megatron.model.build import build_gpt
    from megatron.parallel import DistInfo
    from megatron.training import checkpoint as ckpt_module
    from megatron.training.optim import build_optimizer

    cpu = torch.device("cpu")
    args = load_config([str(CONFIG)], _train_args(opts, ckpt), data_parallel_size=1)
    vocab = vocab_size_of(args)
    torch.manual_seed(args.seed)
    model = build_gpt(args, vocab)
    optimizer = build_optimizer(model, 1e-3, (0.9, 0.95), 1e-8, 0.1, cpu)
    path = ckpt_module.resolve_checkpoint(ckpt)
    ckpt_module.load_checkpoint(path, model, optimizer, DistInfo(0, 1, 0, cpu))
    model.eval()
    block = model.blocks[MOE_BLOCK]
    layer = block.mlp
    seqs_per_rank = math.ceil(TOKENS / args.seq_length)
    trained = args.train_iters * args.train_micro_batch_size_per_gpu  # samples the training consumed
    train_data, _, _ = build_train_valid_test_datasets([args.data_path], None, args.split, args.seq_length,
                                                       args.seed, (trained + WORLD * seqs_per_rank, 0, 0))
    captured: dict[str, list[torch.Tensor]] = {"x": [], "residual": []}
    hooks = [block.post_attention_norm.register_forward_pre_hook(lambda m, a: captured["residual"].append(a[0])),
             layer.register_forward_pre_hook(lambda m, a: captured["x"].append(a[0]))]
    ranks = []
    with torch.no_grad():
        for rank in range(WORLD):
            first = trained + rank * seqs_per_rank
            tokens = torch.from_numpy(np.stack([np.asarray(train_data[first + j], dtype=np.int64)
                                                for j in range(seqs_per_rank)]))
            for key in captured:
                captured[key].clear()
            model(tokens[:, :-1])
            x = captured["x"][0].reshape(-1, args.hidden_size)[:TOKENS].clone()
            residual = captured["residual"][0].reshape(-1, args.hidden_size)[:TOKENS].clone()
            ranks.append({"x": x, "residual": residual, "samples": (first, first + seqs_per_rank)})
    for hook in hooks:
        hook.remove()
    meta = {"hidden": args.hidden_size, "ffn": args.moe_ffn_hidden_size, "experts": args.moe_num_experts,
            "top_k": args.moe_top_k, "activation": args.activation, "jitter_eps": args.moe_jitter_eps,
            "renormalize": args.moe_renormalize_weights, "lsh_seed": args.seed + MOE_BLOCK,
            "layers": args.num_layers, "seq_length": args.seq_length, "step": _checkpoint_step(ckpt),
            "train_iters": opts.train_iters, "checkpoint": str(path), "lore": args.lore_num_experts}
    torch.save({"ranks": ranks, "layer": layer.state_dict(), "meta": meta}, states_path)


# == parent: the network ============================================================================================

class Network:
    """Two namespaces joined by a veth pair, rate-limited both ways; or loopback."""

    def __init__(self, opts: argparse.Namespace):
        tag = f"{os.getpid() % 100000}"
        self.namespaces = (f"lshb{tag}a", f"lshb{tag}b")
        self.ifnames = (f"lshv{tag}a", f"lshv{tag}b")
        self.rate, self.burst = opts.rate, opts.burst
        self.isolated = False
        self.why_not = ""
        self.made: list[str] = []
        if opts.no_netns:
            self.why_not = "--no-netns given"
        elif os.geteuid() != 0:
            self.why_not = "not root"
        elif not (shutil.which("ip") and shutil.which("tc")):
            self.why_not = "`ip` or `tc` not found"
        else:
            try:
                self._create()
                self.isolated = True
            except (subprocess.CalledProcessError, OSError) as err:
                detail = getattr(err, "stderr", b"") or b""
                self.why_not = f"namespace setup failed: {err} {detail.decode(errors='replace').strip()}"
                self.remove()

    def _run(self, *command: str) -> None:
        subprocess.run(command, check=True, capture_output=True)

    def _create(self) -> None:
        for ns in self.namespaces:
            self._run("ip", "netns", "add", ns)
            self.made.append(ns)
        a, b = self.ifnames
        self._run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        for ns, ifname, addr in zip(self.namespaces, self.ifnames, ADDRS):
            self._run("ip", "link", "set", ifname, "netns", ns)
            self._run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
            self._run("ip", "-n", ns, "link", "set", "lo", "up")
            self._run("ip", "-n", ns, "link", "set", ifname, "up")
            self._run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", ifname, "root", "tbf",
                      "rate", self.rate, "burst", self.burst, "latency", "50ms")

    def remove(self) -> None:
        for ifname in self.ifnames:  # only left in this namespace if the move failed
            subprocess.run(["ip", "link", "del", ifname], capture_output=True)
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made = []

    def describe(self) -> str:
        if not self.isolated:
            return f"LOOPBACK (127.0.0.1), NOT rate-limited: {self.why_not}"
        return (f"namespaces {self.namespaces[0]} / {self.namespaces[1]}, veth {self.ifnames[0]} {ADDRS[0]} <-> "
                f"{self.ifnames[1]} {ADDRS[1]}, tbf rate {self.rate} burst {self.burst} on both ends")

    def command(self, rank: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[rank], *argv] if self.isolated else argv

    def master(self) -> tuple[str, int, tuple[str, str]]:
        if self.isolated:
            return ADDRS[0], PORT, self.ifnames
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return "127.0.0.1", port, ("lo", "lo")


def _child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _run_ranks(network: Network, opts: argparse.Namespace, states: Path, out_dir: Path) -> list[dict]:
    addr, port, ifnames = network.master()
    procs = []
    try:
        for rank in range(WORLD):
            argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--rank", str(rank),
                    "--master", f"{addr}:{port}", "--ifname", ifnames[rank], "--states", str(states),
                    "--out", str(out_dir), "--settings", opts.settings, "--repeats", str(opts.repeats),
                    "--warmup", str(opts.warmup)]
            if network.isolated:
                argv.append("--count-tx")
            env = _child_env()
            env["GLOO_SOCKET_IFNAME"] = ifnames[rank]
            log = open(out_dir / f"rank{rank}.log", "w")
            procs.append(subprocess.Popen(network.command(rank, argv), cwd=REPO, env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
            log.close()
        deadline = time.monotonic() + opts.timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks still running after {opts.timeout} s")
            if any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
        failed = [rank for rank, p in enumerate(procs) if p.returncode != 0]
        if failed:
            tails = "\n".join(f"--- rank {r} ---\n" + "\n".join(
                (out_dir / f"rank{r}.log").read_text().splitlines()[-25:]) for r in range(WORLD))
            raise RuntimeError(f"rank(s) {failed} failed:\n{tails}")
    finally:
        for p in procs:  # only the processes started here, by their own handles
            if p.poll() is None:
                p.kill()
                p.wait()
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


# == rank side ======================================================================================================

class _Counters:
    def __init__(self):
        self.times = dict.fromkeys(("a2a_fwd", "a2a_bwd", "wait", "counts", "compress", "decompress"), 0.0)
        self.calls: list[tuple[str, int, int]] = []  # (phase, rows sent across, rows received across)
        self.input_error: list[float] = [0.0, 0.0]  # ||x - c||^2, ||x||^2 (only when measuring errors)
        self.measure_input = False


_COUNTERS = _Counters()


def _install_shim(rank: int, exact, compressed: list) -> None:
    """Times the exact dispatcher's all_to_all and all_gather_counts (after a barrier, timed as "wait") and each
    LSH dispatcher's compress and decompress, on those instances."""
    import torch.distributed as dist
    from harness import Exchange, TimedAllToAll

    def note(exchange: Exchange) -> None:
        _COUNTERS.times["wait"] += exchange.wait_seconds
        _COUNTERS.times[f"a2a_{exchange.phase}"] += exchange.seconds
        sent, received = exchange.input_splits, exchange.output_splits
        _COUNTERS.calls.append((exchange.phase, sum(sent) - sent[rank], sum(received) - received[rank]))

    def timed(name, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            _COUNTERS.times[name] += time.perf_counter() - start
            return out
        return call

    def compress_and_note(compress, x_ND, *args, **kwargs):
        out = timed("compress", compress)(x_ND, *args, **kwargs)
        if _COUNTERS.measure_input:
            centroids_CD, _, compression = out
            diff = x_ND - centroids_CD.index_select(0, compression.centroid_of_row_N)
            _COUNTERS.input_error[0] += float(diff.square().sum())
            _COUNTERS.input_error[1] += float(x_ND.square().sum())
        return out

    gather = exact.all_gather_counts

    def gather_after_barrier(counts_E, group):
        start = time.perf_counter()
        dist.barrier(group=group)
        _COUNTERS.times["wait"] += time.perf_counter() - start
        return timed("counts", gather)(counts_E, group)

    exact.all_to_all, exact.all_gather_counts = TimedAllToAll(note, barrier=True), gather_after_barrier
    for dispatcher in compressed:
        dispatcher.compress = partial(compress_and_note, dispatcher.compress)
        dispatcher.decompress = timed("decompress", dispatcher.decompress)


def _tx_bytes(ifname: str | None) -> int:
    return int(Path(f"/sys/class/net/{ifname}/statistics/tx_bytes").read_text()) if ifname else 0


def _link_check(ifname: str | None) -> dict:
    """Seconds of one all_to_all_single moving 16 MiB each way, up to a barrier after it (so the other rank
    has received it too), and the bytes the interface sent meanwhile; median of 3."""
    import torch.distributed as dist

    x = torch.zeros(8 * MIB)  # 32 MiB of fp32; half stays, half goes to the other rank
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x)  # warm the connections
    times, sent = [], []
    for _ in range(3):
        dist.barrier()
        tx, start = _tx_bytes(ifname), time.perf_counter()
        dist.all_to_all_single(out, x)
        dist.barrier()
        times.append(time.perf_counter() - start)
        sent.append(_tx_bytes(ifname) - tx)
    return {"seconds": statistics.median(times), "payload": x.numel() * 4 // 2, "tx": statistics.median(sent)}


def _build_layer(saved: dict, rank: int):
    import torch.distributed as dist

    from megatron.model.moe import MoELayer
    from megatron.parallel.expert_parallel import ExpertParallel

    meta = saved["meta"]
    shape = (meta["hidden"], meta["ffn"], meta["experts"], meta["top_k"])
    full = MoELayer.build(*shape, activation=meta["activation"], jitter_eps=meta["jitter_eps"],
                          renormalize=meta["renormalize"])
    full.load_state_dict(saved["layer"])
    layer = MoELayer.build(*shape, activation=meta["activation"], jitter_eps=meta["jitter_eps"],
                           renormalize=meta["renormalize"],
                           expert_parallel=ExpertParallel(WORLD, rank, dist.group.WORLD))
    whole, local = full.state_dict(), {}
    experts = layer.local_experts
    for name, value in layer.state_dict().items():
        source = whole[name]
        if source.shape != value.shape:  # stacked per expert: this rank's experts' blocks of rows
            rows = source.shape[0] // meta["experts"]
            source = source[experts.start * rows:experts.stop * rows]
        local[name] = source
    layer.load_state_dict(local)
    return layer


def _settings(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]


def _step(layer, x, grad, ifname) -> dict:
    import torch.distributed as dist

    global _COUNTERS
    _COUNTERS = _Counters()
    dist.barrier()
    tx = _tx_bytes(ifname)
    start = time.perf_counter()
    y, aux = layer(x)
    loss = (y * grad).sum() + 0.01 * (aux.load_balancing_loss + aux.z_loss)
    middle = time.perf_counter()
    loss.backward()
    end = time.perf_counter()
    layer.zero_grad(set_to_none=True)
    x.grad = None
    record = dict(_COUNTERS.times, fwd=middle - start, bwd=end - middle, tx=_tx_bytes(ifname) - tx,
                  calls=_COUNTERS.calls, stats=dict(aux.dispatch_stats))
    return record


def _worker(opts: argparse.Namespace) -> None:
    global _COUNTERS
    import torch.distributed as dist
    from harness import interleaved, medians

    from megatron.model.moe.dispatcher import LSHDispatcher
    from megatron.model.moe.lsh import LSHConfig
    from megatron.model.moe.lsh_probes import relative_error

    torch.set_num_threads(1)
    rank = opts.rank
    ifname = opts.ifname if opts.count_tx else None
    dist.init_process_group("gloo", init_method=f"tcp://{opts.master}", rank=rank, world_size=WORLD)
    try:
        result: dict = {"link": _link_check(ifname)}
        saved = torch.load(opts.states, weights_only=False)
        layer = _build_layer(saved, rank)
        exact = layer.dispatcher
        settings = _settings(opts.settings)
        lsh_seed = saved["meta"]["lsh_seed"]
        variants = {"exact": exact}
        for hashes, dims in settings:
            variants[f"{hashes}x{dims}"] = LSHDispatcher(exact, saved["meta"]["hidden"],
                                                         LSHConfig(hashes, dims, True, lsh_seed))
        _install_shim(rank, exact, [v for name, v in variants.items() if name != "exact"])
        x_TD = saved["ranks"][rank]["x"]
        residual_TD = saved["ranks"][rank]["residual"]
        generator = torch.Generator().manual_seed(100 + rank)
        grad = torch.randn(x_TD.shape, generator=generator) / math.sqrt(x_TD.numel())

        # (a) + (b): timing, variants interleaved repeat by repeat
        layer.train()
        x = x_TD.clone().requires_grad_()

        def step(name: str) -> dict:
            layer.dispatcher = variants[name]
            return _step(layer, x, grad, ifname)

        timing = {}
        for name, records in interleaved(step, variants, opts.repeats, opts.warmup).items():
            timing[name] = medians(records)
            timing[name]["calls"] = records[-1]["calls"]
            timing[name]["stats"] = records[-1]["stats"]
            timing[name]["totals"] = [r["fwd"] + r["bwd"] for r in records]
        result["timing"] = timing

        # (c): errors against the exact layer on the same tokens, eval mode, no gradients
        layer.eval()
        errors = {}
        with torch.no_grad():
            layer.dispatcher = exact
            y_exact = layer(x_TD)[0]
            block_exact = residual_TD + y_exact
            for name, dispatcher in variants.items():
                if name == "exact":
                    continue
                row = {}
                for compensate in (True, False):
                    _COUNTERS = _Counters()
                    _COUNTERS.measure_input = True
                    layer.dispatcher = dispatcher.with_compensation(compensate)
                    y = layer(x_TD)[0]
                    key = "comp" if compensate else "nocomp"
                    row[f"layer_{key}"] = [float((y - y_exact).square().sum()), float(y_exact.square().sum())]
                    row[f"block_{key}"] = [float((residual_TD + y - block_exact).square().sum()),
                                           float(block_exact.square().sum())]
                    row[f"rank_layer_{key}"] = relative_error(y, y_exact)
                    row["input"] = list(_COUNTERS.input_error)
                errors[name] = row
        result["errors"] = errors
        result["exact_norms"] = {"y": float(y_exact.norm()), "residual": float(residual_TD.norm()),
                                 "x": float(x_TD.norm())}
        Path(opts.out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


# == parent: the report =============================================================================================

def _mean(ranks: list[dict], name: str, key: str) -> float:
    return statistics.fmean(r["timing"][name][key] for r in ranks)


def _ok(met: bool) -> str:
    return "met" if met else "NOT met"


def _report(ranks: list[dict], saved_meta: dict, opts: argparse.Namespace) -> dict:
    names = list(ranks[0]["timing"])
    hidden = saved_meta["hidden"]
    row_bytes = hidden * 4
    out: dict = {"bytes": {}, "exchange": {}, "layer": {}}

    print("\n1. Bytes each rank sends per exchange (forward dispatch; the combine and the two backward exchanges "
          "mirror it)")
    print(f"   {'variant':<22}{'rows':>7}{'sent':>7}{'compr.':>8}{'MiB r0':>9}{'MiB r1':>9}{'vs exact':>10}"
          f"{'target':>9}{'':>9}{'veth tx/step MiB':>18}")
    exact_sent = [r["timing"]["exact"]["calls"][0][1] for r in ranks]
    for name in names:
        sent = [r["timing"][name]["calls"][0][1] for r in ranks]
        rows = TOKENS * saved_meta["top_k"]
        rates = [r["timing"][name]["stats"].get("lsh_compression_rate", 1.0) for r in ranks]
        ratio = sum(sent) / max(sum(exact_sent), 1)
        label = "exact (AllToAll)" if name == "exact" else f"LSH {name}" + (" (default)" if name == "2x16" else "")
        tx = statistics.fmean(r["timing"][name]["tx"] for r in ranks) / MIB if opts_count_tx(ranks) else float("nan")
        target = "" if name == "exact" else f"<= {TARGETS['bytes']}"
        met = "" if name == "exact" else _ok(ratio <= TARGETS["bytes"])
        print(f"   {label:<22}{rows:>7}{statistics.fmean(sent):>7.0f}{statistics.fmean(rates):>8.3f}"
              f"{sent[0] * row_bytes / MIB:>9.2f}{sent[1] * row_bytes / MIB:>9.2f}{ratio:>10.3f}{target:>9}"
              f"{met:>9}{tx:>18.2f}")
        out["bytes"][name] = ratio
    print("   rows: token rows each rank routes; sent: rows (or centroids) that cross to the other rank, mean of the "
          "ranks;\n   compr. = centroids / rows (the compression rate, LSHDispatcher's statistic; 1 for exact); "
          "MiB = sent x d x 4 B (fp32).\n   veth tx/step: what the interface counted for one whole forward+backward "
          "(4 all_to_alls, the counts all-gather,\n   the barriers, TCP/IP headers).")

    print("\n2. Time, ms: median of the repeats, mean of the 2 ranks; speed-up = exact / variant")
    print(f"   {'variant':<14}{'a2a fwd':>9}{'a2a bwd':>9}{'counts':>8}{'exchange':>10}{'speed-up':>10}"
          f"{'LSH fwd':>9}{'xchg+LSH':>10}{'speed-up':>10}{'wait':>8}{'layer fwd':>11}{'layer bwd':>11}"
          f"{'fwd+bwd':>10}{'speed-up':>10}")
    base = {}
    for name in names:
        a2a_f, a2a_b, counts = (_mean(ranks, name, k) for k in ("a2a_fwd", "a2a_bwd", "counts"))
        lsh = _mean(ranks, name, "compress") + _mean(ranks, name, "decompress")
        exchange = a2a_f + a2a_b + counts
        fwd, bwd = _mean(ranks, name, "fwd"), _mean(ranks, name, "bwd")
        values = {"exchange": exchange, "with_lsh": exchange + lsh, "layer": fwd + bwd}
        if name == "exact":
            base = values
        speed = {k: base[k] / v if v > 0 else float("nan") for k, v in values.items()}
        out["exchange"][name], out["layer"][name] = speed["exchange"], speed["layer"]
        out.setdefault("ms", {})[name] = {"exchange": exchange, "with_lsh": exchange + lsh, "layer": fwd + bwd}
        print(f"   {name:<14}{1e3 * a2a_f:>9.1f}{1e3 * a2a_b:>9.1f}{1e3 * counts:>8.1f}{1e3 * exchange:>10.1f}"
              f"{speed['exchange']:>10.2f}{1e3 * lsh:>9.1f}{1e3 * values['with_lsh']:>10.1f}{speed['with_lsh']:>10.2f}"
              f"{1e3 * _mean(ranks, name, 'wait'):>8.1f}{1e3 * fwd:>11.1f}{1e3 * bwd:>11.1f}{1e3 * (fwd + bwd):>10.1f}"
              f"{speed['layer']:>10.2f}")
    print("   exchange = the 4 all_to_all_single calls (dispatch + combine, forward + backward) + the counts "
          "all-gather;\n   LSH fwd = hashing + centroids (compress) + scatter back (decompress), forward only "
          "(their backward is in layer bwd);\n   wait = time at the barrier each all_to_all / all-gather passes first "
          "(load imbalance, not wire time);\n   layer = the whole MoE layer forward + backward, including waits "
          "and LSH work.")
    for rank, result in enumerate(ranks):
        spread = "; ".join(f"{name} " + "/".join(f"{1e3 * t:.0f}" for t in result["timing"][name]["totals"])
                           for name in names)
        print(f"   rank {rank} fwd+bwd per repeat, ms: {spread}")

    print("\n3. Relative error against the exact layer on the same tokens (all 2 x 4096 tokens, eval mode)")
    print("   layer: ||y - y_exact|| / ||y_exact||; block: ||(r + y) - (r + y_exact)|| / ||r + y_exact||, r the "
          "residual stream the\n   trained block adds the MoE output to; input: ||x - c|| / ||x|| (each row against "
          "its centroid)")
    print(f"   {'setting':<10}{'compr.':>8}{'input':>8}{'layer, comp':>14}{'layer, no comp':>16}{'block, comp':>14}"
          f"{'block, no comp':>16}   compensation")
    out["errors"] = {}
    def rel(name, key):
        num = sum(r["errors"][name][key][0] for r in ranks)
        den = sum(r["errors"][name][key][1] for r in ranks)
        return math.sqrt(num / den) if den > 0 else float("nan")

    for name in names[1:]:
        rate = statistics.fmean(r["timing"][name]["stats"].get("lsh_compression_rate", 1.0) for r in ranks)
        errs = {k: rel(name, k) for k in ("input", "layer_comp", "layer_nocomp", "block_comp", "block_nocomp")}
        out["errors"][name] = errs
        verdict = "helps" if errs["layer_comp"] < errs["layer_nocomp"] else "HURTS"
        print(f"   {name:<10}{rate:>8.3f}{errs['input']:>8.3f}{errs['layer_comp']:>14.3f}{errs['layer_nocomp']:>16.3f}"
              f"{errs['block_comp']:>14.3f}{errs['block_nocomp']:>16.3f}   {verdict}")
    norms = ranks[0]["exact_norms"]
    print(f"   (rank 0 norms: ||x|| {norms['x']:.1f}, ||y_exact|| {norms['y']:.1f}, ||r|| {norms['residual']:.1f})")
    return out


def opts_count_tx(ranks: list[dict]) -> bool:
    return ranks[0]["link"]["tx"] > 0


def _print_targets(out: dict) -> None:
    default = "2x16" if "2x16" in out["bytes"] else next(n for n in out["bytes"] if n != "exact")
    print("\n4. Targets (bytes <= 0.25x, exchange >= 3x, layer >= 1.5x), default LSHConfig (2 hashes x 16 dims) "
          "and the best other setting")
    print(f"   {'target':<40}{'default':>10}{'':>9}{'best':>12}{'':>9}")
    rows = (("bytes sent <= 0.25x uncompressed", "bytes", lambda v: v <= TARGETS["bytes"], min),
            ("exchange >= 3x faster", "exchange", lambda v: v >= TARGETS["exchange"], max),
            ("whole MoE layer >= 1.5x faster", "layer", lambda v: v >= TARGETS["layer"], max))
    for label, key, check, pick in rows:
        others = {n: v for n, v in out[key].items() if n != "exact"}
        best = pick(others, key=others.get)
        print(f"   {label:<40}{out[key][default]:>10.3f}{_ok(check(out[key][default])):>9}"
              f"{others[best]:>8.3f} {best:<4}{_ok(check(others[best])):>8}")


def _plot(out: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"plot: matplotlib is not installed; {path} not written")
        return
    names = list(out["bytes"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    axes[0].bar(names, [out["bytes"][n] for n in names])
    axes[0].axhline(TARGETS["bytes"], color="k", ls="--")
    axes[0].set_title("bytes sent / exact")
    for ax, key, title in ((axes[1], "exchange", "exchange ms (fwd+bwd)"), (axes[2], "layer", "MoE layer ms")):
        ax.bar(names, [1e3 * out["ms"][n][key] for n in names])
        ax.set_title(title)
    fig.suptitle("LSH-MoE exchange, 2 ranks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def _parent(opts: argparse.Namespace) -> None:
    start = time.perf_counter()
    cache = (REPO / opts.cache) if not Path(opts.cache).is_absolute() else Path(opts.cache)
    ckpt, train_seconds = _ensure_model(opts, cache)
    states = cache / f"states_step{opts.train_iters}.pt"
    capture_seconds = 0.0
    if not states.is_file() or train_seconds > 0:
        t0 = time.perf_counter()
        _capture_states(opts, ckpt, states)
        capture_seconds = time.perf_counter() - t0
    saved = torch.load(states, weights_only=False)
    meta, samples = saved["meta"], [r["samples"] for r in saved["ranks"]]
    x_all = torch.cat([r["x"] for r in saved["ranks"]])
    cosine = float(torch.nn.functional.cosine_similarity(x_all, x_all.mean(0, keepdim=True)).mean())
    del saved

    print(f"LSH-MoE all-to-all: {WORLD} ranks, expert parallel 2, {TOKENS} tokens x d={meta['hidden']} per rank, "
          f"top-{meta['top_k']}, fp32")
    print(f"hidden states: {CONFIG.relative_to(REPO)} + {' '.join(TRAIN_OVERRIDES[:6])} ({meta['layers']} layers), "
          f"trained {meta['step']} steps x 8 x {meta['seq_length']} tokens on the bundled corpus with train.py "
          f"({f'trained now in {train_seconds:.0f} s' if train_seconds else 'cached'}); {_last_loss(cache)}")
    print(f"   checkpoint {meta['checkpoint']}; inputs of the MoE layer of block {MOE_BLOCK} captured by a forward "
          f"hook on training-split\n   sequences after those trained on: rank 0 samples "
          f"{samples[0][0]}..{samples[0][1] - 1}, rank 1 samples {samples[1][0]}..{samples[1][1] - 1} "
          f"({'captured now' if capture_seconds else 'cached'}: "
          f"{states})")
    print(f"   diversity of the captured MoE inputs: mean cosine similarity of a row to the mean row {cosine:.3f}")
    print(f"layer: the trained MoE layer's weights (d={meta['hidden']}, ffn {meta['ffn']}, {meta['experts']} experts, "
          f"top-{meta['top_k']}, {meta['activation']}, no LoREs), EP=2: {meta['experts'] // WORLD} experts per rank")
    print(f"LSH: LSHDispatcher around the AllToAllDispatcher, settings (num_hashes x hash_dim) {opts.settings}, "
          f"seed {meta['lsh_seed']} (the model's for block {MOE_BLOCK})")

    network = None
    previous = {}

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, stop)
    try:
        network = Network(opts)
        if not network.isolated:
            print(f"\n*** network: falling back to LOOPBACK, NOT rate-limited ({network.why_not}) ***")
        print(f"network: {network.describe()}")
        with tempfile.TemporaryDirectory() as tmp:
            ranks = _run_ranks(network, opts, states, Path(tmp))
    finally:
        if network is not None:
            network.remove()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    link = ranks[0]["link"]
    gbit = link["payload"] * 8 / link["seconds"] / 1e9
    tx = f", the veth counted {link['tx'] / MIB:.2f} MiB sent" if link["tx"] else ""
    print(f"link check: one all_to_all_single moving {link['payload'] / MIB:.0f} MiB each way took "
          f"{1e3 * link['seconds']:.1f} ms = {gbit:.2f} Gbit/s payload per direction{tx}")
    print(f"timing: {opts.repeats} repeats after {opts.warmup} warm-up round(s), variants interleaved; "
          "1 thread per rank")
    out = _report(ranks, meta, opts)
    _print_targets(out)
    print("""
   Notes: the exchange speed-up can only approach 1 / compression rate: every all_to_all also pays a fixed
   latency (gloo rendezvous, TCP round trips) and the counts all-gather does not shrink. The layer speed-up
   comes mostly from the experts computing on centroids instead of rows; hashing and torch.unique add CPU work.
   How far rows compress depends on how diverse the hidden states are: the inputs of a briefly trained small
   model share a large common direction (see the cosine above), which puts many rows in one bucket.""")
    if opts.plot:
        _plot(out, opts.plot)
    print(f"\n(run took {time.perf_counter() - start:.0f} s, of which training {train_seconds:.0f} s and capture "
          f"{capture_seconds:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", default="1gbit", help="tbf rate on each veth end (tc syntax)")
    parser.add_argument("--burst", default="256kb", help="tbf burst (tc syntax)")
    parser.add_argument("--no-netns", action="store_true", help="run both ranks on loopback, not rate-limited")
    parser.add_argument("--cache", default="runs/lsh_benchmark", help="checkpoint and captured states (reused)")
    parser.add_argument("--train-iters", type=int, default=60, help="training steps of the small model")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="LSH settings, num_hashes x hash_dim, comma-sep.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before the ranks are killed")
    parser.add_argument("--plot", metavar="PATH", help="bar chart of bytes and times (PNG)")
    # rank processes (started by the parent)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--master", help=argparse.SUPPRESS)
    parser.add_argument("--ifname", help=argparse.SUPPRESS)
    parser.add_argument("--states", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--count-tx", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        _worker(opts)
        return
    try:
        _parent(opts)
    except KeyboardInterrupt as err:
        print(f"\ninterrupted ({err or 'Ctrl-C'}): rank processes killed, network namespaces removed", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
