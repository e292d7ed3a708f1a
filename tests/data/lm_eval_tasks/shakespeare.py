"""The data of the local lm-eval tasks: a JSONL file beside this one, its rows split by their `split` field.

A YAML task names it as `custom_dataset: !function shakespeare.load` with `dataset_kwargs: {data_file: NAME}`:
lm-eval resolves `!function` beside the YAML, so the tasks work from any working directory, and nothing is
downloaded (`dataset_path: json` would read `data_files` relative to the working directory).
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load(data_file: str, **_metadata) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (HERE / data_file).read_text(encoding="utf-8").splitlines() if line]
    splits = sorted({row["split"] for row in rows})
    return datasets.DatasetDict({split: datasets.Dataset.from_list([row for row in rows if row["split"] == split])
                                 for split in splits})
