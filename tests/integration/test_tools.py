"""count_params against real models, match_baseline's totals, compare_runs on synthetic runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron.config import load_config
from megatron.data.tokenizer import vocab_size_of
from megatron.model.build import build_gpt
from megatron.sizing.params import count_parameters

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import compare_runs  # noqa: E402
import match_baseline  # noqa: E402

CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yml"))
GPT_CONFIGS = [name for name in CONFIGS if load_config([str(REPO / "configs" / name)]).model_type == "gpt"]


@pytest.mark.parametrize("name", GPT_CONFIGS)
def test_count_params_equals_the_instantiated_model(name):
    args = load_config([str(REPO / "configs" / name)])
    small = name.startswith("tiny")
    # Big configs are built on the meta device: real parameter shapes, no memory.
    with torch.device("cpu" if small else "meta"):
        model = build_gpt(args, vocab_size_of(args))
    # the model built for training holds its multi-token prediction modules (counted apart from `total`)
    assert count_parameters(args).total_with_mtp == sum(p.numel() for p in model.parameters())


def test_active_parameters_on_a_hand_computed_case():
    args = load_config([], ["--num_layers", "2", "--hidden_size", "8", "--num_attention_heads", "2", "--vocab_size",
                            "100", "--make_vocab_size_divisible_by", "4", "--moe_num_experts", "4", "--moe_top_k", "2",
                            "--moe_expert_interval", "2", "--lore_num_experts", "4", "--lore_rank", "2",
                            "--moe_router_type", "topk", "--pos_emb", "rotary"])
    counts = count_parameters(args)
    d, f = 8, 32
    embeddings = 100 * d
    attention = 2 * (4 * d * d + 4 * d)
    norms = 5 * 2 * d
    dense = 2 * d * f + f + d  # layer 1 only; layer 0 is MoE (GPT-NeoX placement)
    experts, lores, routers = 4 * 2 * d * f, 4 * 4 * 2 * (d + f), d * 4 + d * 4 * 4
    assert counts.total == embeddings + attention + norms + dense + experts + lores + routers
    # a token uses 2 of 4 experts and, in each, 1 of 4 LoREs
    assert counts.active == embeddings + attention + norms + dense + experts // 2 + lores // 2 // 4 + routers


@pytest.mark.parametrize("name", ["tiny_structmoe.yml", "125M_structmoe.yml", "410M_structmoe.yml"])
def test_match_baseline_is_the_nearest_expert_count(name):
    args = load_config([str(REPO / "configs" / name)])
    experts, total, target = match_baseline.matched_expert_count(args)
    plain = args.model_copy(update={"lore_num_experts": 0})
    one_expert = count_parameters(plain.model_copy(update={"moe_num_experts": experts + 1})).total - total
    assert abs(total - target) <= one_expert / 2  # nothing closer exists
    if one_expert / target <= 0.02:  # where one expert is a fine enough step, the match is within 1%
        assert abs(total - target) / target < 0.01
    shipped = load_config([str(REPO / "configs" / name.replace("structmoe", "moe_matched"))])
    assert count_parameters(shipped).total == total and shipped.lore_num_experts == 0


def test_match_baseline_refuses_a_config_without_lores():
    tool, config = REPO / "tools" / "match_baseline.py", REPO / "configs" / "tiny_moe.yml"
    result = subprocess.run([sys.executable, str(tool), str(config)], capture_output=True, text=True)
    assert result.returncode != 0 and "has no LoREs" in result.stderr


def write_run(folder: Path, val_losses: list[float]) -> None:
    (folder / "logs").mkdir(parents=True)
    lines = []
    for step in range(1, 11):
        lines.append({"step": step, "loss": 5.0 - 0.1 * step, "lr": 1e-3, "tokens": step * 100, "tokens_per_sec": 50.0})
        if step % 5 == 0:
            lines.append({"step": step, "val/loss": val_losses[step // 5 - 1], "val/ppl": 1.0})
    (folder / "logs" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines))


def test_compare_runs_plots_and_summarises(tmp_path, capsys):
    write_run(tmp_path / "a", [4.0, 3.5])
    write_run(tmp_path / "b", [3.0, 3.2])
    out = tmp_path / "cmp.png"
    summaries = compare_runs.main([str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [(s["final_val"], s["best_val"]) for s in summaries] == [(3.5, 3.5), (3.2, 3.0)]
    assert summaries[0]["val"][0] == [500, 1000] and summaries[0]["tokens_per_sec"] == 50.0
    assert "3.2000" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no non-empty metrics.jsonl"):
        compare_runs.main([str(tmp_path / "missing")])


def test_train_tokenizer_cli(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"to be or not to be, line {i}"}) for i in range(50)))
    out = tmp_path / "tok.json"
    subprocess.run([sys.executable, str(REPO / "tools" / "train_tokenizer.py"), "--input", str(corpus),
                    "--vocab-size", "300", "--output", str(out)], check=True, capture_output=True)
    from megatron.data.tokenizer import build_tokenizer

    tok = build_tokenizer("HFTokenizer", str(out))
    assert tok.vocab_size == 300 and tok.decode(tok.encode("to be or not")) == "to be or not"


def test_count_params_refuses_a_dit_config_in_one_line():
    with pytest.raises(ValueError, match="model_type dit: closed-form counts are for GPT models"):
        count_parameters(load_config([str(REPO / "configs" / "dit_digits.yml")]))
