"""The sample index with several ranks: one rank builds each index (a blend's parts and the blend once each), the
others wait and memory-map the same files; node-local cache folders get one build per node; a builder that fails
makes every other rank fail with one line instead of hanging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.distributed import REPO, run_on_ranks

from megatron.data import gpt_dataset
from megatron.data.gpt_dataset import GPTDataset, build_train_valid_test_datasets
from megatron.data.indexed_dataset import IndexedDatasetBuilder, MMapIndexedDataset

RANKS = 4


def make_corpus(prefix: Path, sizes: list[int]) -> str:
    builder = IndexedDatasetBuilder(f"{prefix}.bin", np.int32)
    for doc, size in enumerate(sizes):
        builder.add_document(np.arange(size) + 1000 * doc)
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def _count_builds(folder: Path, rank: int, scenario: list[str]) -> None:
    """Each build of a GPT index or a blend index appends a line to this rank's file."""
    log = folder / f"builds_rank{rank}.txt"
    build, blend = GPTDataset._build, gpt_dataset.blend_indices

    def counted_build(self, documents, seed, data_prefix, name):
        with open(log, "a") as f:
            f.write(f"{scenario[0]} {Path(data_prefix).name} {name}\n")
        return build(self, documents, seed, data_prefix, name)

    def counted_blend(weights, size):
        with open(log, "a") as f:
            f.write(f"{scenario[0]} blend {size}\n")
        return blend(weights, size)

    GPTDataset._build = counted_build
    gpt_dataset.blend_indices = counted_blend


def _failure(fn) -> str | None:
    try:
        fn()
    except (ValueError, FileNotFoundError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def _on_each_rank(rank: int, world_size: int, folder: str) -> None:
    folder_path = Path(folder)
    data = folder_path / "data"
    gpt_dataset.FALLBACK_CACHE = folder_path / "fallback"  # never the home folder
    scenario = ["blend"]
    _count_builds(folder_path, rank, scenario)
    result: dict = {}

    # 1. a blend of three corpora split three ways, the cache folder shared by every rank
    prefixes = [str(data / name) for name in ("a", "b", "c")]
    train, valid, _ = build_train_valid_test_datasets(prefixes, [3.0, 2.0, 1.0], "80,20,0", 8, 7, (60, 12, 0))
    arrays = [a for blend in (train, valid) for a in (blend.dataset_index, blend.sample_index)]
    arrays += [a for blend in (train, valid) for part in blend.datasets
               for a in (part.doc_idx, part.sample_idx, part.shuffle_idx)]
    result["memmapped"] = [isinstance(a, np.memmap) for a in arrays]
    result["blend_samples"] = [train[i].tolist() for i in range(len(train))] + [valid[i].tolist()
                                                                                for i in range(len(valid))]

    # 2. node-local cache folders: ranks 0-1 are node 0, ranks 2-3 node 1, each node with its own folder
    scenario[0] = "nodes"
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank % 2))
    corpus = MMapIndexedDataset(prefixes[0], check_items=False)
    local = GPTDataset("train", prefixes[0], corpus, range(0, 30), 50, 8, 3,
                       cache_dir=str(folder_path / f"node{rank // 2}"))
    result["node_samples"] = [local[i].tolist() for i in range(len(local))]
    result["node_cache"] = str(local.cache_paths[0].parent)

    # 3. the builder fails (an empty split) / the check on rank 0 fails (a damaged index): one line elsewhere
    scenario[0] = "failing"
    empty = str(data / "empty")
    result["build_failure"] = _failure(lambda: GPTDataset(
        "train", empty, MMapIndexedDataset(empty, check_items=False), range(3), 5, 4, 0))
    damaged = str(data / "damaged")
    result["check_failure"] = _failure(lambda: GPTDataset(
        "train", damaged, MMapIndexedDataset(damaged, check_items=False), range(4), 5, 4, 0))
    (folder_path / f"rank{rank}.json").write_text(json.dumps(result))


def test_one_rank_builds_every_rank_maps_the_same_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        make_corpus(data / name, [int(s) for s in rng.integers(1, 30, size=40)])
    make_corpus(data / "empty", [0, 0, 0])
    damaged = make_corpus(data / "damaged", [5, 5, 5, 5])
    idx = bytearray(Path(f"{damaged}.idx").read_bytes())
    pointer_of_item_1 = 9 + 8 + 1 + 8 + 8 + 4 * 4 + 8
    idx[pointer_of_item_1: pointer_of_item_1 + 8] = (1 << 20).to_bytes(8, "little")  # past the end of the .bin
    Path(f"{damaged}.idx").write_bytes(bytes(idx))

    run_on_ranks(_on_each_rank, RANKS, str(tmp_path))

    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(RANKS)]
    builds = {r: (tmp_path / f"builds_rank{r}.txt").read_text().splitlines()
              if (tmp_path / f"builds_rank{r}.txt").exists() else [] for r in range(RANKS)}
    # a shared cache folder: rank 0 built the six parts (three corpora x two splits) and the two blends, once each
    blend_builds = {r: [b for b in lines if b.startswith("blend")] for r, lines in builds.items()}
    assert sorted(blend_builds[0]) == sorted([f"blend {c} {s}" for c in "abc" for s in ("train", "valid")]
                                             + ["blend blend 60", "blend blend 12"]), builds
    assert not any(blend_builds[r] for r in range(1, RANKS)), builds
    for r in range(RANKS):
        assert all(results[r]["memmapped"]) and len(results[r]["memmapped"]) == 4 + 6 * 3
        assert results[r]["blend_samples"] == results[0]["blend_samples"]  # identical samples on every rank
    assert len(results[0]["blend_samples"]) == 72
    # node-local cache folders: rank 0 built node 0's, then node 1's local rank 0 (rank 2) built its own
    assert [[b for b in builds[r] if b.startswith("nodes")] for r in range(RANKS)] == [
        ["nodes a train"], [], ["nodes a train"], []], builds
    assert [Path(res["node_cache"]).name for res in results] == ["node0", "node0", "node1", "node1"]
    assert all(res["node_samples"] == results[0]["node_samples"] for res in results)
    # a failing builder: its own error on rank 0, one line naming rank 0's error on every other rank
    assert "empty: the train split's 3 documents hold no tokens" in results[0]["build_failure"]
    assert "lies outside" in results[0]["check_failure"]
    for r in range(1, RANKS):
        for key, expected in (("build_failure", "rank 0 failed to build it: "), ("check_failure", "rank 0 failed: ")):
            message = results[r][key]
            assert message.startswith(f"ValueError: rank {r}: ") and expected in message, message
            assert "\n" not in message and ("hold no tokens" in message or "lies outside" in message), message


@pytest.mark.slow
def test_the_benchmark_runs_at_toy_size(tmp_path):
    """benchmarks/sample_index.py end to end (its figures are measured by hand, not asserted here)."""
    out = tmp_path / "sample_index.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/sample_index.py"), "--documents", "20000", "--old-documents", "5000",
         "--ranks", "2", "--seq-length", "64", "--workdir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=600, check=True)
    assert "identical index arrays, samples    True, True" in result.stdout, result.stdout
    record = json.loads(out.read_text())
    assert record["results"]["big/new/cold"]["ranks_that_built"] == [0]
    assert record["results"]["big/new/warm"]["builds"] == 0 and record["results"]["big/new/warm"]["memory_mapped"]
