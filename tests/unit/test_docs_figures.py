"""Figures quoted in README.md and docs/ equal the data that backs them (JSON written by the measuring command, or
the code itself), so a rerun or a code change cannot leave the prose behind."""

import json
import re
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
for folder in ("tools", "benchmarks"):
    sys.path.insert(0, str(REPO / folder))

import lm_eval_speed  # noqa: E402
import lsh_calibrate  # noqa: E402


def read(path: str) -> str:
    return (REPO / path).read_text()


def generated_block(text: str, marker: str) -> str:
    """The text between `<!-- generated: MARKER -->` and `<!-- end generated -->`."""
    match = re.search(rf"<!-- generated: {re.escape(marker)} -->\n(.*?)\n<!-- end generated -->", text, re.S)
    assert match, f"no generated block '{marker}'"
    return match.group(1)


def test_lsh_calibration_table_is_the_json():
    report = json.loads(read("docs/lsh_calibration.json"))
    quoted = generated_block(read("docs/lsh.md"), "tools/lsh_calibrate.py docs/lsh_calibration.json --markdown")
    assert quoted == lsh_calibrate.markdown_summary(report)
    # independently of the generator: the default row and the count of cases where compensation lowered the error
    default = [r for r in report["results"] if (r["num_hashes"], r["hash_dim"]) == (2, 16) and r["tokens"] == 2048]
    rate = sum(r["compression_rate"] for r in default) / len(default)
    assert f"**{rate:.3f}**" in quoted
    lowered = sum(r["error_with_compensation"] < r["error_without_compensation"] for r in report["results"])
    assert f"lowered the layer-output error in {lowered} and raised it in {len(report['results']) - lowered}" in quoted
    assert f"The default 2x16 keeps {rate:.3f} of the rows" in " ".join(read("docs/lsh.md").split())



def test_lsh_calibrate_reprints_a_recorded_json_without_measuring(capsys):
    lsh_calibrate.main([str(DOCS / "lsh_calibration.json"), "--markdown"])
    printed = capsys.readouterr().out
    assert lsh_calibrate.markdown_summary(json.loads(read("docs/lsh_calibration.json"))) in printed
    assert "--lsh_num_hashes 2 --lsh_hash_dim 32" in printed  # nearest 0.2 at 2048 tokens: 2x32 (0.212)


def test_lsh_quality_table_is_the_json():
    quality = json.loads(read("docs/lsh_quality.json"))
    lines = [line for line in read("docs/lsh.md").splitlines()
             if line.startswith(("| plain MoE |", "| StructMoE |"))]
    arms = {("plain MoE", "off"): "moe/off", ("plain MoE", "on"): "moe/on",
            ("plain MoE", "on, no compensation"): "moe/no_compensation", ("StructMoE", "off"): "structmoe/off",
            ("StructMoE", "on"): "structmoe/on", ("StructMoE", "on, no compensation"): "structmoe/no_compensation"}
    assert len(lines) == len(arms)
    for line in lines:
        model, lsh, loss, paired, rate, errors = (c.strip() for c in line.strip("|").split("|"))
        arm = quality[arms[model, lsh]]
        assert loss == "{:.3f} ± {:.3f}".format(*arm["final_val_loss"]), line
        if lsh == "off":
            assert (paired, rate, errors) == ("", "", "")
            continue
        assert paired == "{:+.3f} ± {:.3f}".format(*arm["paired_difference_to_off"]), line
        assert rate == f"{arm['compression_rate_second_half']:.3f}", line
        assert errors == f"{arm['error_with_compensation']:.3f} / {arm['error_without_compensation']:.3f}", line

def test_neox_key_counts_are_the_code():
    from megatron.config import neox_keys

    counts = Counter(entry.kind for entry in neox_keys.NEOX_KEYS.values())
    doc = read("docs/neox_compat.md")
    quoted = {kind: int(n) for kind, n in re.findall(r"^\| (SUPPORTED|TRANSLATED|IGNORED|REJECTED_UNLESS_DEFAULT) \| "
                                                     r"(\d+) \|", doc, re.M)}
    names = {"SUPPORTED": neox_keys.SUPPORTED, "TRANSLATED": neox_keys.TRANSLATED, "IGNORED": neox_keys.IGNORED,
             "REJECTED_UNLESS_DEFAULT": neox_keys.REJECTED}
    assert quoted == {name: counts[kind] for name, kind in names.items()}
    legacy = len(neox_keys.LEGACY_MOE_KEYS)
    rows = [line for line in read("tests/data/neox_arguments.tsv").splitlines() if line and not line.startswith("#")]
    current = len(rows)
    assert current + legacy == len(neox_keys.NEOX_KEYS)
    assert f"{current} keys, plus {legacy} MoE keys" in " ".join(doc.split())
    assert f"all {current + legacy} keys" in " ".join(doc.split())
    assert f"({current} keys of commit `ea7aefd8` and {legacy} MoE keys" in " ".join(read("docs/training.md").split())


def test_routing_study_tables_and_readings_are_the_json():
    """docs/routing.md quotes the study tool's tables verbatim; the prose's and the README's figures come from
    its JSON."""
    tables = read("docs/results/routing_study.md").strip().split("\n\n")
    doc = read("docs/routing.md")
    for number, table in enumerate(tables, start=1):
        assert generated_block(doc, f"docs/results/routing_study.md table {number}") == table
    study = json.loads(read("docs/results/routing_study.json"))
    assert all(p["ci_low"] < 0 < p["ci_high"] for p in study["pairs"])  # "every paired interval contains 0"
    largest = max(study["pairs"], key=lambda p: abs(p["mean"]))
    prose, readme = " ".join(doc.split()), " ".join(read("README.md").split())
    assert f"the largest mean difference is {largest['mean']:+.3f}" in prose
    loads = study["final_loads"]
    in_use = [f"{loads[arm]['lores_in_use']:.1f}" for arm in
              ("tiny_structmoe", "tiny_structmoe_lorebal", "tiny_structmoe_lore_loss_free")]
    assert (f"without LoRE balancing {in_use[0]} of 32 LoREs stay in use, the LoRE loss keeps {in_use[1]}" in readme
            and f"at rate 0.001 reaches {in_use[2]}" in readme)
    assert f"the LoRE loss keeps {loads['tiny_structmoe_lorebal']['lore']:.2f} ({in_use[1]} LoREs)" in prose
    diagnosis = study["routing_diagnosis"]
    assert f"(ratio {diagnosis['tiny_structmoe_lorebal']['offset_over_content']:.2f} vs " \
           f"{diagnosis['tiny_structmoe']['offset_over_content']:.2f})" in prose


def test_routing_study_at_600_steps_is_its_json():
    tables = read("docs/results/routing_study_600.md").strip().split("\n\n")
    doc = read("docs/routing.md")
    for number, table in enumerate(tables, start=1):
        assert generated_block(doc, f"docs/results/routing_study_600.md table {number}") == table
    study = json.loads(read("docs/results/routing_study_600.json"))
    pairs = {(p["method"], p["baseline"]): p for p in study["pairs"]}
    prose = " ".join(doc.split())
    lorebal = pairs[("tiny_structmoe_lorebal", "tiny_structmoe")]
    assert lorebal["ci_high"] < 0 and f"({lorebal['mean']:+.3f}, interval excluding 0)" in prose
    bias = pairs[("tiny_structmoe_lore_loss_free", "tiny_structmoe")]
    against_loss = pairs[("tiny_structmoe_lore_loss_free", "tiny_structmoe_lorebal")]
    assert bias["ci_low"] > 0 and against_loss["ci_low"] > 0
    assert f"{bias['mean']:+.3f} against none, {against_loss['mean']:+.3f} against the loss" in prose
    loads = study["final_loads"]
    assert f"(LoRE load entropy {loads['tiny_structmoe_lore_loss_free']['lore']:.2f}, " \
           f"{loads['tiny_structmoe_lore_loss_free']['lores_in_use']:.1f} of 32" in prose


def test_structmoe_study_tables_are_the_generated_ones():
    tables = read("docs/results/structmoe_study.md").strip().split("\n\n")
    doc = read("docs/results.md")
    for number, table in enumerate(tables, start=1):
        assert generated_block(doc, f"docs/results/structmoe_study.md table {number}") == table
    # the prose's "lower on every seed" for the LoRE balancing loss, from the per-seed losses in the JSON
    groups = json.loads(read("docs/results/structmoe_study.json"))["groups"]
    with_loss, without = (groups[arm]["final_val_per_seed"] for arm in ("tiny_structmoe_lorebal", "tiny_structmoe"))
    assert all(with_loss[seed] < without[seed] for seed in without)
    pair = next(p for p in json.loads(read("docs/results/structmoe_study.json"))["pairs"]
                if p["method"] == "tiny_structmoe_lorebal")
    assert pair["ci_low"] < 0 < pair["ci_high"] and "lower on every seed, but its interval includes 0" in " ".join(
        doc.split())



def test_readme_structmoe_study_figures_are_the_json():
    study = json.loads(read("docs/results/structmoe_study.json"))
    readme = " ".join(read("README.md").split())
    pair = next(p for p in study["pairs"] if (p["method"], p["baseline"]) == ("tiny_structmoe", "tiny_moe_matched"))
    assert f"+{pair['mean']:.3f}, 95% interval {pair['ci_low']:.3f} to +{pair['ci_high']:.3f}" in readme
    loads = study["final_loads"]
    assert f"(normalised entropy {loads['tiny_structmoe']['lore']:.1f}," in readme
    assert f"keeps them at {loads['tiny_structmoe_lorebal']['lore']:.2f} at no measured cost" in readme


def test_loss_memory_figures_are_the_json():
    result = json.loads(read("docs/results/loss_memory.json"))
    full, chunked = result["full"]["peak_mib"], result["chunked"]["peak_mib"]
    doc = " ".join(read("docs/performance.md").split())
    assert (f"{full:,.0f} MiB with full logits and {chunked:,.0f} MiB in chunks of {result['chunk']}, "
            f"**{chunked / full:.2f}x**") in doc
    assert result["full"]["loss"] == result["chunked"]["loss"]  # "with the same loss"
    assert f"{chunked / full:.2f}x the loss's peak memory" in " ".join(read("docs/training.md").split())

def table_rows(text: str, header_start: str) -> dict[str, list[str]]:
    """First cell -> the other cells, for the Markdown table whose header line starts with header_start."""
    lines = text[text.index(header_start):].split("\n")
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def mean_sd(entry: dict, digits: int, sign: str = "") -> str:
    return f"{entry['mean']:{sign}.{digits}f} ± {entry['std']:.{digits}f}"


def test_remix_study_tables_and_figures_are_the_json():
    study = json.loads(read("docs/remix_study.json"))
    doc = read("docs/remix.md")
    prose = " ".join(doc.split())
    rows = table_rows(doc, "| config | val loss (mean ± sd)")
    labels = {"plain DiT": "dit_digits",
              "Remix 4 x 20 (prior 1 annealed to 0 at step 500)": "remix_digits_4x20@remix_study",
              "Remix 4 x 20, no prior": "remix_digits_4x20@remix_study_noprior",
              "Remix 4 x 8": "remix_digits_4x8",
              "oracle (4 independent DiTs, 5 intervals each)": "remix_digits_oracle",
              "Remix 4 x 20, an expert per micro-batch (4 x 16 images)": "remix_digits_4x20_draw_micro"}
    assert set(rows) == set(labels)
    for label, key in labels.items():
        entry = study[key]
        expected = [mean_sd(entry["val_loss"], 4), "", mean_sd(entry["fd"], 0), ""]
        if key != "dit_digits":
            expected[1] = mean_sd(entry["val_loss"]["minus_baseline"], 4, "+")
            expected[3] = mean_sd(entry["fd"]["minus_baseline"], 0, "+")
        assert rows[label] == expected, label

    finetune = table_rows(doc, "| learning rate (cosine to 1/10)")
    for label, name in (("1e-3 (the configs' rate)", "remix_finetune"), ("1e-4", "remix_finetune_lr1e-4")):
        run = json.loads(read(f"docs/{name}.json"))
        plain, remix = run["plain"], run["remix"]
        cells = finetune[label]
        assert cells[0] == f"{mean_sd(plain['val_loss'], 4)}, FD {mean_sd(plain['fd'], 0)}"
        assert cells[1] == f"{mean_sd(remix['val_loss'], 4)}, FD {mean_sd(remix['fd'], 0)}"
        assert cells[2].startswith(mean_sd(remix["val_loss"]["minus_baseline"], 4, "+"))

    def paired(method: str, baseline: str) -> tuple[float, float]:
        a, b = study[method]["val_loss"]["per_seed"], study[baseline]["val_loss"]["per_seed"]
        differences = [a[seed] - b[seed] for seed in b]
        mean = sum(differences) / len(differences)
        sd = (sum((d - mean) ** 2 for d in differences) / (len(differences) - 1)) ** 0.5
        return mean, sd

    mean, sd = paired("remix_digits_4x20@remix_study", "remix_digits_oracle")
    assert f"(paired difference {mean:+.4f} ± {sd:.3f})" in prose
    assert f"(+{paired('remix_digits_4x20@remix_study_noprior', 'remix_digits_4x20@remix_study')[0]:.3f} against" \
           in prose
    coefficients = {key: study[key]["coefficients"] for key in labels.values() if "coefficients" in study[key]}
    assert f"end at {coefficients['remix_digits_4x20@remix_study']['peak_near_t0']['mean']:.2f} on the prior" in prose
    assert f"({coefficients['remix_digits_4x20@remix_study_noprior']['peak_near_t0']['mean']:.2f} on the main" in prose
    assert (f"distance {coefficients['remix_digits_4x20@remix_study']['neighbour_ratio']['mean']:.2f} with the prior, "
            f"{coefficients['remix_digits_4x20@remix_study_noprior']['neighbour_ratio']['mean']:.2f} without") in prose

    experts = json.loads(read("docs/remix_study_experts.json"))
    prior, no_prior = [r for r in experts["runs"] if r["name"] == "remix_digits_4x20_s1234"]
    own_best = [sum(o == b for o, b in zip(r["own_expert"], r["best_expert"])) for r in (no_prior, prior)]
    assert f"on {own_best[0]} of 20 intervals without the prior, {own_best[1]} of 20 with it" in prose
    peaks = [max(row) for row in no_prior["coefficients"]]
    assert f"({peaks[0]:.2f} on its basis, against {min(peaks[1:]):.2f}-{max(peaks[1:]):.2f} for the others)" in prose


ESTIMATE_MARKER = re.compile(r"<!-- generated: (python tools/estimate_memory\.py [^>]*?) -->\n```\n(.*?)\n```\n"
                             r"<!-- end generated -->", re.S)


def estimate_output(command: str) -> str:
    """What `python tools/estimate_memory.py ARGS` prints, run in this process (the model is built on meta)."""
    import contextlib
    import io

    import estimate_memory

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        estimate_memory.main(command.split()[2:])
    return out.getvalue().rstrip("\n")


def refresh_estimate_blocks(path: Path) -> None:
    """Rewrite every generated estimate_memory block of a doc with the tool's current output."""
    text = path.read_text()
    path.write_text(ESTIMATE_MARKER.sub(lambda m: f"<!-- generated: {m.group(1)} -->\n```\n"
                                        f"{estimate_output(m.group(1))}\n```\n<!-- end generated -->", text))


def test_memory_tables_and_figures_are_the_estimators_output():
    doc = read("docs/parallelism.md")
    blocks = ESTIMATE_MARKER.findall(doc)
    assert len(blocks) == 2
    for command, quoted in blocks:
        assert quoted == estimate_output(command), command

    from megatron.config import load_config
    from megatron.data.tokenizer import vocab_size_of
    from megatron.sizing.memory import activation_bytes, estimate_memory

    gib = 1024**3
    config = load_config(["configs/410M_structmoe.yml"], data_parallel_size=8)
    ep8_stage1 = estimate_memory(config, 8, 8, 1).peak_bytes() / gib
    ddp_state = estimate_memory(config, 8, 1, 0).state_bytes() / gib
    readme = " ".join(read("README.md").split())
    assert f"(`--world 8`: {ep8_stage1:.1f} GiB," in readme
    assert f"(its fp32 state alone is {ddp_state:.0f} GiB)" in readme
    prose = " ".join(doc.split())
    assert f"fits with EP = 8 and stage 1 ({ep8_stage1:.1f} GiB)" in prose
    assert f"the fp32 state alone is {ddp_state:.1f} GiB" in prose
    chunked = activation_bytes(config) / gib
    full_logits = load_config(["configs/410M_structmoe.yml"], ["--loss_chunk_tokens", "0"], data_parallel_size=8)
    tokens = full_logits.train_micro_batch_size_per_gpu * full_logits.seq_length
    logits = tokens * 12 * vocab_size_of(full_logits) / gib  # fp32 log-softmax, its gradient, the logits' gradient
    assert (f"{logits:.1f} GiB of the {activation_bytes(full_logits) / gib:.1f} GiB for the 410M" in prose
            and f"activations to {chunked:.2f} GiB" in prose)


if __name__ == "__main__":  # python tests/unit/test_docs_figures.py: refresh the generated estimator tables
    refresh_estimate_blocks(DOCS / "parallelism.md")


def test_moe_layer_benchmark_block_and_ratios_are_the_json():
    import moe_layer

    result = json.loads(read("docs/results/moe_layer.json"))
    doc = read("docs/moe.md")
    block = generated_block(doc, "python benchmarks/moe_layer.py --repeats 7 --json docs/results/moe_layer.json")
    assert block == f"```\n{moe_layer.format_report(result)}\n```"
    # independently of format_report: the memory ratio docs/moe.md and docs/performance.md quote, and the recorded load
    saved = {v["name"]: v["saved_bytes"] for v in result["variants"]}
    ratio = saved["StructMoE (M=32, r=64, l=1)"] / saved["plain MoE, 8 experts"]
    assert f"StructMoE saves {ratio:.2f}x the plain layer's" in " ".join(doc.split())
    assert f"the StructMoE layer saves {ratio:.2f}x the plain 8-expert layer's" in " ".join(
        read("docs/performance.md").split())
    start, end = result["load_average"]
    assert f"load average of {start:.1f} at the start and {end:.1f} at the end" in " ".join(doc.split())


def test_lm_eval_speed_figures_are_the_json():
    recorded = json.loads(read("docs/results/lm_eval_speed.json"))
    page = read("docs/evaluation.md")
    assert generated_block(page, "benchmarks/lm_eval_speed.py --markdown docs/results/lm_eval_speed.json") == \
        lm_eval_speed.markdown(recorded)
    dense, structmoe = recorded["results"]
    prose = " ".join(page.split())
    assert (f"{dense['total']['ours_over_hflm']:.2f}x HFLM's tokens/s on the dense model and "
            f"{structmoe['total']['ours_over_hflm']:.2f}x on StructMoE") in prose
    assert (f"{dense['total']['ours_wall_seconds']:.2f} s of wall time on the dense model, against "
            f"{dense['training']['seconds_of_as_many_steps']:.2f} s for as many training steps as the evaluation ran "
            f"forward batches ({dense['total']['forward_batches']})") in prose
    assert (f"({dense['training']['evaluation_in_steps']:.1f} dense, {structmoe['training']['evaluation_in_steps']:.1f}"
            " StructMoE)") in prose
    assert recorded["command"] in page


def test_the_study_pair_task_table_is_the_json():
    """docs/evaluation.md's downstream table of the StructMoE study's main pair, row by row from its JSON."""
    groups = json.loads(read("docs/results/structmoe_study_tasks.json"))
    page = read("docs/evaluation.md")
    for metric, entry in groups["tiny_structmoe"]["tasks"].items():
        d, base = entry["minus_baseline"], groups["tiny_moe_matched"]["tasks"][metric]
        row = (f"| `{metric}` | {entry['mean']:.4f} | {base['mean']:.4f} | {d['mean']:+.4f} "
               f"({d['ci_low']:+.4f} to {d['ci_high']:+.4f}) |")
        assert row in page, row
    loss = groups["tiny_structmoe"]["minus_baseline"]
    assert f"{loss['mean']:+.4f} ({loss['ci_low']:+.4f} to {loss['ci_high']:+.4f})" in page


def test_group_routing_ranks_table_and_figures_are_the_json():
    """docs/architectures.md's destination-rank table and the figures its prose quotes, from the benchmark's JSON."""
    import group_routing_ranks

    result = json.loads(read("docs/results/group_routing_ranks.json"))
    doc = read("docs/architectures.md")
    assert generated_block(doc, "python benchmarks/group_routing_ranks.py --markdown "
                                "docs/results/group_routing_ranks.json") == group_routing_ranks.markdown(result)
    assert result["command"] in " ".join(doc.split())
    # the 4-rank part's bytes are the layer's own, equal to the ones counted from the routing
    for variant in result["measured"]["variants"]:
        assert variant["measured_bytes_sent_per_token"] == variant["slot_bytes_sent_per_token"]
    # independently of markdown(): the prose's figures, and the bound the limit guarantees
    sim = {v["group_top_k"]: v for v in result["simulated"]["variants"]}
    assert all(v["max_ranks_per_token"] <= (k or result["simulated"]["shape"]["ranks"]) for k, v in sim.items())
    kib = lambda key, keep: f"{sim[keep][key] / 1024:.1f} KiB"
    prose = " ".join(doc.split())
    assert (f"take a token to {sim[4]['ranks_per_token']:.2f} ranks instead of {sim[None]['ranks_per_token']:.2f}"
            in prose)
    assert f"{kib('slot_bytes_sent_per_token', None)} a token with or without groups" in prose
    assert kib("slot_bytes_sent_per_token", None) == kib("slot_bytes_sent_per_token", 4)
    assert (f"it would send {kib('rank_bytes_sent_per_token', 4)} a token with 8 groups keeping 4 against "
            f"{kib('rank_bytes_sent_per_token', None)} without") in prose


def test_mla_cache_table_and_ratio_are_the_json():
    """docs/architectures.md's MLA cache table is benchmarks/mla_cache.py's, and its figures are the closed forms of
    the recorded shapes (DeepSeek-V3's as configs/families/deepseek_v3.yml has it)."""
    import mla_cache

    from megatron.config import load_config

    recorded = json.loads(read("docs/results/mla_cache.json"))
    page = read("docs/architectures.md")
    block = generated_block(page, "benchmarks/mla_cache.py --markdown docs/results/mla_cache.json")
    assert block == mla_cache.markdown(recorded)
    assert recorded["command"] in page and recorded["dtype"] == "bfloat16"  # "in bf16"

    def numbers(shape: dict) -> tuple[int, int]:  # per token and layer: latent + rope key, every head's K and V
        heads = shape["num_attention_heads"] * (shape["qk_nope_head_dim"] + shape["qk_rope_head_dim"] +
                                                shape["v_head_dim"])
        return shape["kv_lora_rank"] + shape["qk_rope_head_dim"], heads

    tiny = recorded["tiny"]
    latent, heads = numbers(tiny["shape"])
    layers = tiny["shape"]["num_layers"]
    assert tiny["ours"]["mla_bytes_per_token"] == tiny["transformers"]["mla_bytes_per_token"] == latent * layers * 2
    assert tiny["ours"]["full_kv_bytes_per_token"] == heads * layers * 2
    family = load_config([str(REPO / "configs/families/deepseek_v3.yml")])
    shape = recorded["deepseek_v3"]["shape"]
    assert all(getattr(family, key) == value for key, value in shape.items())
    latent, heads = numbers(shape)
    mla, full = latent * shape["num_layers"] * 2, heads * shape["num_layers"] * 2
    assert (f"DeepSeek-V3's cache holds {mla:,} bytes per token in bf16, against {full:,} for full keys and "
            f"values: **{full / mla:.1f}x smaller**") in " ".join(page.split())


def test_family_sizes_table_is_the_json_and_the_json_is_the_tool():
    """docs/architectures.md's sizes of the published models: the generated table is count_params' markdown of the
    committed JSON, the JSON is what the tool counts now, and the prose's figures are the JSON's."""
    import count_params

    recorded = json.loads(read("docs/results/family_sizes.json"))
    page = read("docs/architectures.md")
    assert generated_block(page, "python tools/count_params.py --markdown docs/results/family_sizes.json") == \
        count_params.markdown(recorded)
    assert count_params.family_sizes() == recorded
    assert recorded["command"] in page
    models, prose = recorded["models"], " ".join(page.split())
    for name, label in [("deepseek_v3", "DeepSeek-V3"), ("kimi_k2", "Kimi-K2"), ("moonlight_16b_a3b", "Moonlight"),
                        ("gpt_oss_120b", "gpt-oss-120b"), ("gpt_oss_20b", "gpt-oss-20b")]:
        assert f"{label} {models[name]['total']:,}" in prose, label
    rounded = [models[n]["active_without_input_embeddings"] / 1e9
               for n in ("deepseek_v3", "gpt_oss_120b", "gpt_oss_20b")]
    assert "ours below round to {:.1f}B, {:.2f}B and {:.2f}B".format(*rounded) in prose
    mtp = models["deepseek_v3"]["mtp"]
    assert f"MTP module adds {mtp:,} ({count_params.format_count(mtp)}) in training" in prose
    readme = " ".join(read("README.md").split())
    assert f"# DeepSeek-V3: {models['deepseek_v3']['total']:,} (+ its MTP module)" in readme



def test_granular_upcycling_table_and_readings_are_the_json():
    """docs/architectures.md's granular upcycling figures: the generated table is the benchmark's markdown of the
    committed JSON; independently of it, a row is within 1e-5 exactly when it is exact by construction and no routing
    split a group, the inexact rows with top-k off the routed shards split every routing, and the prose's figures
    are the JSON's."""
    import upcycle_granular

    recorded = json.loads(read("docs/results/upcycle_granular.json"))
    page = read("docs/architectures.md")
    block = generated_block(page, "python benchmarks/upcycle_granular.py --markdown docs/results/upcycle_granular.json")
    assert block == upcycle_granular.markdown(recorded)
    assert recorded["command"] in page
    rows = {r["name"]: r for r in recorded["rows"]}
    for r in rows.values():
        routed = r["granularity"] - r["shared"]
        normalised = r["scores"] == "sigmoid" or "renormalize_weights false" not in r["options"]
        assert r["exact"] == (r["top_k"] % routed == 0 and normalised), r["name"]
        assert (r["max_abs_logit_diff"] <= 1e-5) == (r["exact"] and r["split_routings"] == 0), r["name"]
        if r["top_k"] % routed:
            assert r["split_routings"] == r["routings"], r["name"]
    clean = max(r["max_abs_logit_diff"] for r in rows.values() if r["exact"] and not r["split_routings"])
    [tied] = [r for r in rows.values() if r["exact"] and r["split_routings"]]
    prose = " ".join(page.split())
    assert f"the largest |logit difference| is {clean:.2e} over {recorded['eval']['tokens']:,} tokens" in prose
    assert f"the source's {recorded['source']['val_loss']:.4f}, except for {tied['split_routings']} routing in " \
           f"{tied['routings']:,} in the 8-shard sigmoid row" in prose and tied["name"].startswith("8 shards")
    assert f"off by {tied['max_abs_logit_diff']:.3f}, the mean loss by {abs(tied['loss_minus_dense']):.1e}" in prose
    for name, quoted in [("4 shards x 4, top-2 (half of each MLP)", "top-2 of 4 shards {:+.4f} nats"),
                         ("8 shards x 4, top-4 (half of each MLP)", "top-4 of 8 shards {:+.4f}"),
                         ("4 shards x 2, top-6 (one and a half groups)", "one and a half groups {:+.4f}"),
                         ("DeepSeek overlay, top-2 (2 of 3 routed shards)", "beside the shared one {:+.4f}"),
                         ("4 shards x 4, top-4, raw softmax (down x R E / k)", "comes close ({:+.4f},")]:
        assert quoted.format(rows[name]["loss_minus_dense"]) in prose, name
    raw = rows["4 shards x 4, top-4, raw softmax (down x R E / k)"]["max_abs_logit_diff"]
    assert f"logits within {raw:.3f}) without being exact" in prose
    assert f"trains `configs/tiny_llama.yml` for {recorded['source']['train_iters']} steps" in prose
    assert "[architectures.md, Granular upcycling](architectures.md#granular-upcycling)" in read("docs/huggingface.md")
