"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

import numpy as np
import pytest

from megatron.data.indexed_dataset import IndexedDatasetBuilder


@pytest.fixture(scope="session")
def data_prefix(tmp_path_factory) -> str:
    """A small corpus of byte-level 'documents' with learnable structure (repeated phrases)."""
    rng = np.random.default_rng(0)
    phrases = [rng.integers(0, 256, size=rng.integers(5, 12)) for _ in range(20)]
    prefix = tmp_path_factory.mktemp("data") / "corpus_text_document"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", np.uint16)
    for _ in range(120):
        doc = np.concatenate([phrases[i] for i in rng.integers(0, 20, size=12)] + [np.array([256])])
        builder.add_document(doc.astype(np.uint16))
    builder.finalize(f"{prefix}.idx")
    return str(prefix)
