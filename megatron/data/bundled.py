"""The demo corpus shipped in the package, tokenized into a GPT-NeoX dataset on first use."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from megatron.data.indexed_dataset import dataset_exists
from megatron.data.preprocess import preprocess

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
BUNDLED_CORPORA = {"shakespeare": BUNDLED_DIR / "shakespeare.jsonl.gz"}
BUNDLED_TOKENIZER = BUNDLED_DIR / "shakespeare_tokenizer.json"


def ensure_bundled_dataset(
    name: str, dataset_prefix: str, tokenizer_type: str, vocab_file: str | None
) -> str:
    """Makes `dataset_prefix.bin/.idx` from a bundled corpus unless they exist; returns the prefix.

    The files are built under temporary names and renamed, so an interrupted run leaves nothing half-made.
    """
    if name not in BUNDLED_CORPORA:
        raise ValueError(f"prepare_data: unknown bundled corpus {name!r} "
                         f"(expected one of {sorted(BUNDLED_CORPORA)})")
    if dataset_exists(dataset_prefix):
        return dataset_prefix
    target = Path(dataset_prefix)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".building_") as tmp:
        built = preprocess([str(BUNDLED_CORPORA[name])], ["text"], tokenizer_type, vocab_file,
                           os.path.join(tmp, "corpus"), append_eod=True, workers=1, progress=False)["text"]
        shutil.move(f"{built}.bin", f"{dataset_prefix}.bin")
        shutil.move(f"{built}.idx", f"{dataset_prefix}.idx")  # the index last: it marks the dataset complete
    return dataset_prefix
