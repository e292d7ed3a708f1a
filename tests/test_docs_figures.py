"""Figures quoted in README.md and docs/ equal the data that backs them (JSON written by the measuring command, or
the code itself), so a rerun or a code change cannot leave the prose behind."""

import json
import re
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
for folder in ("tools", "benchmarks"):
    sys.path.insert(0, str(REPO / folder))

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
    assert f"({current} keys of commit `ea7aefd8` and {legacy} MoE keys" in " ".join(read("README.md").split())


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
