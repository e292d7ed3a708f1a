"""Why StructMoE's secondary (LoRE) routing collapses: measured on a trained run's held-out sequences.

Shape legend: B sequences, S sequence, N rows, D hidden, E experts, M LoREs per expert, R rows of one expert.

    python tools/lore_routing.py runs/tiny_structmoe [--sequences 64] [--output lore_routing.json]

The rows an expert receives were chosen by the first router, so they may share a large common direction
(their mean). The LoRE router's logits are W_e x = W_e mu_e + W_e (x - mu_e): the first term is the same for
every row of the expert, so if it varies across the M LoREs more than the second term does, every row picks
the same few LoREs, whatever its content. Per MoE layer (mean over experts with at least 2 rows) this prints:

- mean share: ||mu_e||^2 / mean ||x||^2, the rows' energy along their common mean;
- offset / content: the spread over LoREs of W_e mu_e against the typical spread over LoREs of W_e (x - mu_e)
  (standard deviations over the M logits; above 1 the shared offset dominates the choice);
- LoRE load entropy (normalised, 1 = balanced) of the top-1 choice as trained (with its loss-free bias, if it
  has one), and with the router's input centred per expert (x - mu_e, no bias), i.e. what removing the common
  direction would do to this trained router.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from lsh_calibrate import validation_tokens  # noqa: E402

from megatron.model.moe.stats import normalized_entropy  # noqa: E402


def lore_inputs(model, tokens_BS1: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per transformer layer with LoREs: (rows grouped by expert, rows per expert) as the LoRE bank sees them."""
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for i, block in enumerate(model.blocks):
        lore = getattr(block.mlp, "lore", None)
        if lore is not None and getattr(lore, "routed", False):
            hooks.append(lore.register_forward_pre_hook(
                lambda m, a, i=i: captured.__setitem__(i, (a[0].detach(), a[1].detach()))))
    try:
        with torch.no_grad():
            model.eval()
            model(tokens_BS1[:, :-1])
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def analyse_layer(lore, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> dict[str, float]:
    E, M = lore.num_experts, lore.lores_per_expert
    w_EMD = lore.router.weight.detach().view(E, M, -1).float()
    mean_shares, ratios, trained_loads, centred_loads = [], [], [], []
    for e, rows in enumerate(x_ND.float().split(tokens_per_expert_E.tolist())):
        if rows.shape[0] < 2:
            continue
        mu = rows.mean(dim=0)
        mean_shares.append(float(mu.square().sum() / rows.square().sum(dim=1).mean()))
        offset_M = w_EMD[e] @ mu
        content_RM = (rows - mu) @ w_EMD[e].T
        ratios.append(float(offset_M.std() / content_RM.std(dim=1).mean().clamp_min(1e-12)))
        scores_RM = rows @ w_EMD[e].T
        if hasattr(lore, "lore_bias_EM"):  # loss-free balancing: the bias joins the scores for choosing
            scores_RM = scores_RM.softmax(dim=1) + lore.lore_bias_EM[e].float()
        trained_loads.append(torch.bincount(scores_RM.argmax(dim=1), minlength=M).float())
        centred_loads.append(torch.bincount(content_RM.argmax(dim=1), minlength=M).float())
    if not ratios:
        return {}
    return {"experts": len(ratios), "mean_share": sum(mean_shares) / len(ratios),
            "offset_over_content": sum(ratios) / len(ratios),
            "entropy_trained": float(normalized_entropy(torch.stack(trained_loads)).mean()),
            "entropy_centred": float(normalized_entropy(torch.stack(centred_loads)).mean())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a StructMoE save folder (its `latest`) or one global_stepN folder")
    parser.add_argument("--sequences", type=int, default=64, help="held-out sequences to route")
    parser.add_argument("--output", default=None, help="also write the figures as JSON here")
    opts = parser.parse_args(argv)
    from megatron.config import ConfigError
    from megatron.training.pretrained import load_pretrained

    try:
        args, model, path = load_pretrained(opts.run)
    except (ConfigError, OSError, ValueError) as err:  # bad input: one line naming it, no traceback
        sys.exit(f"lore_routing: {err}")
    inputs = lore_inputs(model, validation_tokens(args, opts.sequences))
    if not inputs:
        sys.exit(f"lore_routing: {path}: no routed LoREs (lore_num_experts {args.lore_num_experts}, "
                 f"lore_mode {args.lore_mode})")
    results = {layer: analyse_layer(model.blocks[layer].mlp.lore, *inputs[layer]) for layer in sorted(inputs)}
    print(f"{path}: {opts.sequences} held-out sequences")
    print(f"{'layer':>6}{'experts':>9}{'mean share':>12}{'offset/content':>16}{'entropy trained':>17}"
          f"{'entropy centred':>17}")
    for layer, r in results.items():
        print(f"{layer:>6}{r['experts']:>9}{r['mean_share']:>12.3f}{r['offset_over_content']:>16.2f}"
              f"{r['entropy_trained']:>17.3f}{r['entropy_centred']:>17.3f}")
    if opts.output:
        Path(opts.output).write_text(json.dumps({"checkpoint": str(path), "layers": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
