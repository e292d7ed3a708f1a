"""Group-limited routing under expert parallelism: to how many ranks a token is sent, and the bytes exchanged.

Shape legend: T tokens, D hidden, E experts, K experts per token, P expert-parallel ranks, G expert groups.

    python benchmarks/group_routing_ranks.py --json docs/results/group_routing_ranks.json
    python benchmarks/group_routing_ranks.py --markdown docs/results/group_routing_ranks.json   # the table, no run

DeepSeek-V3 limits each token to the experts of its `moe_router_group_top_k` best groups; with the groups laid out
one per expert-parallel rank (E / G experts a group, E / P a rank, G = P), a token's experts then lie on at most
that many ranks. Two parts, each with and without the limit, on routers at their initial weights and Gaussian
inputs (near-random choices: a trained router's choices are correlated, which this does not model):

1. measured: 4 gloo ranks, EP=4, our MoE layer (32 experts, top-4, sigmoid scores, 4 groups) under bf16 autocast;
   each rank routes its own tokens, and the bytes it sends are the layer's own `exchange_bytes_sent`. The same
   counts computed from the routing alone (as part 2 does) must equal them, which checks the simulation.
2. simulated on one process: DeepSeek-V3's routing shape (256 experts, top-8, 8 groups) over 8 ranks, counted
   exactly from each token's chosen experts and the layout `local_expert_range` gives (no exchange is run).

Per token it reports the ranks its experts lie on (its own included; mean and max), and the rows it sends to
other ranks two ways: one per (token, expert) slot, what our all-to-all dispatcher sends (a token with two experts
on one rank sends two rows), and one per (token, destination rank), what a dispatcher that sends a token once per
rank and fans it out there would send (DeepSeek-V3's node-limited dispatch); bytes are rows x D x 2 (bf16 rows).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from harness import spawn_gloo_ranks  # noqa: E402

from megatron.model.moe import MoELayer  # noqa: E402
from megatron.model.moe.router import build_router  # noqa: E402
from megatron.parallel.expert_parallel import ExpertParallel, local_expert_range  # noqa: E402

COMMAND = "python benchmarks/group_routing_ranks.py --json docs/results/group_routing_ranks.json"
BF16_BYTES = 2
MEASURED = dict(ranks=4, experts=32, top_k=4, groups=4, hidden=256, ffn=64, tokens_per_rank=2048,
                keep=(None, 2, 1))
SIMULATED = dict(ranks=8, experts=256, top_k=8, groups=8, hidden=7168, router_hidden=256, tokens_per_rank=4096,
                 keep=(None, 4, 2))  # DeepSeek-V3: n_group 8, topk_group 4, 8 of 256 experts, d = 7168


def rank_of_expert(num_experts: int, ranks: int) -> torch.Tensor:
    """The EP rank holding each expert, as the layer places them (contiguous blocks, local_expert_range)."""
    owner_E = torch.empty(num_experts, dtype=torch.long)
    for rank in range(ranks):
        block = local_expert_range(num_experts, ranks, rank)
        owner_E[block.start:block.stop] = rank
    return owner_E


def destination_counts(expert_ids_TK: torch.Tensor, source_T: torch.Tensor, owner_E: torch.Tensor,
                       ranks: int) -> dict[str, float]:
    """Sums over the tokens: ranks each token's experts lie on, remote ones among them, the max, and the slots sent
    to another rank (one row each, as our all-to-all sends them)."""
    rank_TK = owner_E[expert_ids_TK]
    on_TP = torch.zeros(rank_TK.shape[0], ranks, dtype=torch.bool).scatter_(1, rank_TK, True)
    ranks_T = on_TP.sum(dim=1)
    remote_T = ranks_T - on_TP.gather(1, source_T.unsqueeze(1)).squeeze(1).long()
    return {"tokens": rank_TK.shape[0], "ranks": int(ranks_T.sum()), "max_ranks": int(ranks_T.max()),
            "remote_ranks": int(remote_T.sum()), "remote_slots": int((rank_TK != source_T.unsqueeze(1)).sum())}


def summary(counts: dict[str, float], hidden: int) -> dict[str, float]:
    tokens = counts["tokens"]
    return {"ranks_per_token": counts["ranks"] / tokens, "max_ranks_per_token": counts["max_ranks"],
            "remote_ranks_per_token": counts["remote_ranks"] / tokens,
            "slot_rows_sent_per_token": counts["remote_slots"] / tokens,
            "rank_rows_sent_per_token": counts["remote_ranks"] / tokens,
            "slot_bytes_sent_per_token": counts["remote_slots"] * hidden * BF16_BYTES / tokens,
            "rank_bytes_sent_per_token": counts["remote_ranks"] * hidden * BF16_BYTES / tokens}


def add_counts(parts: list[dict]) -> dict:
    return {"tokens": sum(p["tokens"] for p in parts), "ranks": sum(p["ranks"] for p in parts),
            "max_ranks": max(p["max_ranks"] for p in parts), "remote_ranks": sum(p["remote_ranks"] for p in parts),
            "remote_slots": sum(p["remote_slots"] for p in parts)}


def layer_settings(shape: dict, keep: int | None) -> dict:
    groups = dict(num_groups=shape["groups"], group_top_k=keep) if keep else {}
    return dict(router_type="topk", score_function="sigmoid", **groups)


# -- part 1: 4 gloo ranks ------------------------------------------------------------------------------------------

def measure_rank(rank: int, world: int, shape: dict) -> dict:
    """This rank's exchange, per variant: the bytes the layer sent, and the counts from its own routing."""
    ep = ExpertParallel(world, rank, torch.distributed.group.WORLD)
    owner_E = rank_of_expert(shape["experts"], world)
    out = {}
    for keep in shape["keep"]:
        torch.manual_seed(0)  # the same router on every rank and in every variant
        layer = MoELayer.build(shape["hidden"], shape["ffn"], shape["experts"], shape["top_k"], "swiglu",
                               **layer_settings(shape, keep), expert_parallel=ep).eval()
        torch.manual_seed(100 + rank)  # each rank its own tokens
        x_TD = torch.randn(shape["tokens_per_rank"], shape["hidden"])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            _, aux = layer(x_TD)
            ids_TK = layer.router(x_TD).expert_ids_TK
        counts = destination_counts(ids_TK, torch.full((ids_TK.shape[0],), rank), owner_E, world)
        out[str(keep)] = {"measured_bytes_sent": aux.dispatch_stats["exchange_bytes_sent"], **counts}
    return out


def run_measured(shape: dict) -> list[dict]:
    per_rank = spawn_gloo_ranks(measure_rank, shape["ranks"], shape)
    variants = []
    for keep in shape["keep"]:
        parts = [r[str(keep)] for r in per_rank]
        counts = add_counts(parts)
        measured = sum(p["measured_bytes_sent"] for p in parts)
        simulated = counts["remote_slots"] * shape["hidden"] * BF16_BYTES
        if measured != simulated:
            raise AssertionError(f"group_top_k {keep}: the layer sent {measured} bytes, the routing says {simulated}")
        variants.append({"group_top_k": keep, **summary(counts, shape["hidden"]),
                         "measured_bytes_sent_per_token": measured / counts["tokens"]})
    return variants


# -- part 2: simulated -----------------------------------------------------------------------------------------------

def run_simulated(shape: dict) -> list[dict]:
    P, T = shape["ranks"], shape["tokens_per_rank"]
    owner_E = rank_of_expert(shape["experts"], P)
    torch.manual_seed(1)
    x_TD = torch.randn(P * T, shape["router_hidden"])
    source_T = torch.arange(P).repeat_interleave(T)  # rank r routes tokens r*T .. (r+1)*T - 1
    variants = []
    for keep in shape["keep"]:
        torch.manual_seed(0)
        groups = dict(num_groups=shape["groups"], group_top_k=keep) if keep else {}
        router = build_router("topk", shape["router_hidden"], shape["experts"], shape["top_k"],
                              score_function="sigmoid", **groups).eval()
        with torch.no_grad():
            ids_TK = router(x_TD).expert_ids_TK
        variants.append({"group_top_k": keep,
                         **summary(destination_counts(ids_TK, source_T, owner_E, P), shape["hidden"])})
    return variants


# -- report -------------------------------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    rows = ["| layout | routing | ranks per token: mean (max) | rows sent per token: per slot (ours) / per rank "
            "| bytes sent per token: per slot / per rank |", "|---|---|---|---|---|"]
    for part in ("measured", "simulated"):
        shape = result[part]["shape"]
        layout = (f"{shape['experts']} experts, top-{shape['top_k']}, {shape['ranks']} ranks, d={shape['hidden']} "
                  f"({'4 gloo ranks' if part == 'measured' else 'counted from the routing'})")
        for v in result[part]["variants"]:
            routing = ("no groups" if v["group_top_k"] is None else
                       f"{shape['groups']} groups, keep {v['group_top_k']}")
            rows.append(f"| {layout} | {routing} | {v['ranks_per_token']:.2f} ({v['max_ranks_per_token']}) | "
                        f"{v['slot_rows_sent_per_token']:.2f} / {v['rank_rows_sent_per_token']:.2f} | "
                        f"{v['slot_bytes_sent_per_token'] / 1024:.1f} KiB / "
                        f"{v['rank_bytes_sent_per_token'] / 1024:.1f} KiB |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    parser.add_argument("--markdown", type=Path, default=None, metavar="JSON", help="print a recorded result's table")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    result = {"command": COMMAND,
              "measured": {"shape": MEASURED, "variants": run_measured(MEASURED)},
              "simulated": {"shape": SIMULATED, "variants": run_simulated(SIMULATED)}}
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
