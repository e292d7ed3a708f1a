"""Property-based fuzzing of the two readers of user files: the `.idx`/`.bin` reader and the config loader.

Whatever the bytes or values, each either works or fails with its documented, one-line error type; never an
IndexError, struct.error, OverflowError, a crash or a silently short read.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import numpy as np
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from megatron.config import ConfigError, load_config
from megatron.config.schema import NeoXArgs
from megatron.data.indexed_dataset import IndexedDatasetBuilder, MMapIndexedDataset

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def valid_dataset(folder: Path, sizes: list[int]) -> tuple[bytes, bytes]:
    builder = IndexedDatasetBuilder(str(folder / "d.bin"), np.uint16)
    for i, size in enumerate(sizes):
        builder.add_document(np.arange(size, dtype=np.uint16) + i)
    builder.finalize(str(folder / "d.idx"))
    return (folder / "d.idx").read_bytes(), (folder / "d.bin").read_bytes()


def opens_or_refuses(folder: Path, idx: bytes, bin_: bytes) -> None:
    (folder / "d.idx").write_bytes(idx)
    (folder / "d.bin").write_bytes(bin_)
    try:
        data = MMapIndexedDataset(str(folder / "d"))
    except ValueError as err:
        assert "\n" not in str(err) and "d." in str(err)  # one line naming the file
        return
    for i in range(len(data)):  # an accepted dataset reads every item in full
        item = data[i]
        assert len(item) == int(data.sizes[i])


@FUZZ
@given(sizes=st.lists(st.integers(1, 20), min_size=1, max_size=6), data=st.data())
def test_idx_mutations_open_fully_or_refuse(sizes, data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        idx, bin_ = valid_dataset(folder, sizes)
        mutation = data.draw(st.sampled_from(["flip", "truncate_idx", "truncate_bin", "extend_bin", "pointer"]))
        if mutation == "flip":
            position = data.draw(st.integers(0, len(idx) - 1))
            idx = idx[:position] + bytes([idx[position] ^ data.draw(st.integers(1, 255))]) + idx[position + 1:]
        elif mutation == "truncate_idx":
            idx = idx[: data.draw(st.integers(0, len(idx) - 1))]
        elif mutation == "truncate_bin":
            bin_ = bin_[: data.draw(st.integers(0, len(bin_) - 1))]
        elif mutation == "extend_bin":
            bin_ = bin_ + bytes(data.draw(st.integers(1, 64)))
        else:  # a pointer past the end of the .bin
            header = 9 + 8 + 1 + 8 + 8
            item = data.draw(st.integers(0, len(sizes) - 1))
            offset = header + 4 * len(sizes) + 8 * item
            idx = idx[:offset] + struct.pack("<q", data.draw(st.integers(len(bin_), 2**40))) + idx[offset + 8:]
        opens_or_refuses(folder, idx, bin_)


@FUZZ
@given(idx=st.binary(max_size=200), bin_=st.binary(max_size=64))
def test_random_bytes_never_crash_the_reader(idx, bin_):
    with tempfile.TemporaryDirectory() as tmp:
        opens_or_refuses(Path(tmp), idx, bin_)


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.lists(st.integers(-5, 5), max_size=3))
KEYS = sorted(NeoXArgs.model_fields) + ["hiden_size", "optimizer.params.lr", "fp16", "zero_optimization"]


@FUZZ
@given(values=st.dictionaries(st.sampled_from(KEYS), SCALARS, max_size=6))
# found by this test: batch sizes were multiplied out before their types were checked (a TypeError)
@example(values={"train_batch_size": "0", "train_micro_batch_size_per_gpu": True})
# and a precision that is not a string beside a DeepSpeed fp16 block (an AttributeError)
@example(values={"fp16": True, "precision": False})
def test_config_values_load_or_give_a_config_error(values):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yml"
        nested: dict = {}
        for key, value in values.items():
            node = nested
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
            node[leaf] = value
        path.write_text(yaml.safe_dump(nested))
        try:
            load_config([str(path)])
        except ConfigError as err:
            assert "\n" not in str(err)


@FUZZ
@given(text=st.text(max_size=120))
def test_any_yaml_text_loads_or_gives_a_config_error(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yml"
        path.write_text(text)
        try:
            load_config([str(path)])
        except ConfigError as err:
            assert "\n" not in str(err)
