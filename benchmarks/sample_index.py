"""The sample index at scale: built once and memory-mapped, against every rank building and loading its own copy.

    python benchmarks/sample_index.py                                  # 200M documents, 4 ranks (~5 GB peak)
    python benchmarks/sample_index.py --json docs/results/sample_index.json   # the figures docs/parallelism.md quotes
    python benchmarks/sample_index.py --documents 2000000 --old-documents 500000   # a quick look

A synthetic corpus (`.idx` written in GPT-NeoX's format a chunk at a time, `.bin` a sparse file: the reader checks
only its size, samples read zeros) is opened by RANKS gloo processes on this machine, each calling
`build_train_valid_test_datasets` (train and valid splits, as the trainer does) and reading its first sample:
first with no cached index (cold), then again with it (warm). Per rank: the seconds from that call to the first
sample, and the private resident memory it added (smaps_rollup Private_Clean + Private_Dirty, after minus
before: page cache that the ranks share is not counted), and its peak resident memory.

The old behaviour (every rank checks the whole corpus index, holds the split's ids and a copy of their sizes for
the cache key, builds the index when it is not cached, all ranks at once, and loads all three arrays with
`np.load`) is re-enacted step by step at --old-documents, where it fits in memory, next to the new path at that
same size: those ratios are measured side by side. Its private memory grows linearly with the documents (the
arrays and the split's ids); the printout scales it to --documents and to a 1T-token corpus.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron.data import gpt_dataset  # noqa: E402
from megatron.data.gpt_dataset import GPTDataset, build_train_valid_test_datasets  # noqa: E402
from megatron.data.indexed_dataset import MMapIndexedDataset, index_header  # noqa: E402

SPLIT, SEED = "969,30,1", 1234
CHUNK = 1 << 20


def write_corpus(prefix: Path, documents: int, mean_tokens: int) -> int:
    """PREFIX.idx with `documents` one-item documents of 1..2*mean_tokens-1 tokens, a chunk at a time (the
    sizes are drawn twice from the same seed: once for the sizes, once for the pointers); PREFIX.bin sparse.
    Returns the token count."""
    dtype = np.dtype(np.uint16)
    with open(f"{prefix}.idx", "wb") as f:
        f.write(index_header(dtype, documents, documents + 1))
        rng = np.random.default_rng(0)
        for lo in range(0, documents, CHUNK):
            f.write(rng.integers(1, 2 * mean_tokens, size=min(CHUNK, documents - lo), dtype=np.int32).tobytes())
        rng, tokens = np.random.default_rng(0), 0
        for lo in range(0, documents, CHUNK):
            sizes = rng.integers(1, 2 * mean_tokens, size=min(CHUNK, documents - lo), dtype=np.int32)
            ends = tokens + np.cumsum(sizes, dtype=np.int64)
            f.write(((ends - sizes) * dtype.itemsize).tobytes())  # byte pointers: where each document starts
            tokens = int(ends[-1])
        for lo in range(0, documents + 1, CHUNK):
            f.write(np.arange(lo, min(lo + CHUNK, documents + 1), dtype=np.int64).tobytes())
    with open(f"{prefix}.bin", "wb") as f:
        f.truncate(tokens * dtype.itemsize)
    return tokens


def private_mib() -> float:
    """This process's private resident memory (clean + dirty) in MiB: what it holds that no other process does."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0])
    return (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# -- the old per-rank path, step by step ---------------------------------------------------------------------------

def old_dataset(data: MMapIndexedDataset, prefix: str, name: str, documents: np.ndarray, num_samples: int,
                seq_length: int, seed: int, built: list[str]) -> GPTDataset:
    """What each rank did before: the key from a full copy of the split's sizes, the index built here when it
    was not cached (by every rank at once), then all three arrays loaded into this process."""
    digest = zlib.crc32(data.sizes[documents].astype(np.int64).tobytes(), zlib.crc32(documents.tobytes()))
    stem = f"{Path(prefix).name}_{name}_{num_samples}ns_{seq_length}sl_{seed}s_{digest:08x}"
    paths = [Path(prefix).parent / f"{stem}_{kind}_idx.npy" for kind in GPTDataset.KINDS]
    if all(p.is_file() for p in paths):
        arrays = [np.load(p) for p in paths]
    else:
        sizes = data.sizes
        epochs = max(1, math.ceil((num_samples * seq_length + 1) / int(sizes[documents].sum())))
        rng = np.random.RandomState(seed)
        doc_idx = np.concatenate([rng.permutation(documents) for _ in range(epochs)]).astype(np.int64)
        doc_ends = np.cumsum(sizes[doc_idx], dtype=np.int64)
        starts = np.arange(num_samples, dtype=np.int64) * seq_length
        position = np.searchsorted(doc_ends, starts, side="right")
        offset = starts - np.concatenate([[0], doc_ends])[position]
        arrays = [doc_idx, np.stack([position, offset], axis=1), rng.permutation(num_samples).astype(np.int64)]
        for path, array in zip(paths, arrays):
            gpt_dataset._save_atomically(path, array)
        built.append(name)
    dataset = GPTDataset.__new__(GPTDataset)  # the same __getitem__ over arrays held in memory
    dataset.data, dataset.seq_length, dataset.num_samples = data, seq_length, num_samples
    dataset.doc_idx, dataset.sample_idx, dataset.shuffle_idx = arrays
    return dataset


def old_datasets(prefix: str, seq_length: int, num_samples: tuple[int, int], built: list[str]) -> GPTDataset:
    data = MMapIndexedDataset(prefix, check_items=False)
    for lo in range(0, len(data), 1 << 22):  # the old open: items checked through the memory map ...
        sizes, pointers = data.sizes[lo:lo + (1 << 22)], data.pointers[lo:lo + (1 << 22)]
        assert not ((sizes < 0) | (pointers < 0)).any()
    assert not (np.diff(data.doc_idx) < 0).any()  # ... and the document index diffed whole
    weights = np.array([float(w) for w in SPLIT.split(",")])
    bounds = np.round(np.concatenate([[0.0], np.cumsum(weights / weights.sum())]) * len(data)).astype(int)
    datasets = [old_dataset(data, prefix, name, np.arange(bounds[i], bounds[i + 1]), num_samples[i], seq_length,
                            SEED, built) for i, name in enumerate(("train", "valid"))]
    return datasets[0]


# -- one rank ------------------------------------------------------------------------------------------------------

def rank_main(rank: int, world_size: int, store: str, path: str, prefix: str, seq_length: int,
              num_samples: tuple[int, int], out: str) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))  # one node
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    built: list[str] = []
    real_build = GPTDataset._build

    def counted_build(self, documents, seed, data_prefix, name):
        built.append(name)
        return real_build(self, documents, seed, data_prefix, name)

    GPTDataset._build = counted_build
    dist.barrier()
    private_before, rss_before = private_mib(), rss_mib()
    start = time.perf_counter()
    if path == "new":
        train, _, _ = build_train_valid_test_datasets([prefix], None, SPLIT, seq_length, SEED, (*num_samples, 0))
    else:
        train = old_datasets(prefix, seq_length, num_samples, built)
    first = train[rank]
    seconds = time.perf_counter() - start
    private_after = private_mib()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dist.barrier()  # every rank measured before any exits
    mapped = all(isinstance(a, np.memmap) for a in (train.doc_idx, train.sample_idx, train.shuffle_idx))
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "seconds_to_first_sample": seconds, "private_mib": private_after - private_before,
        "peak_mib": peak - rss_before, "builds": built, "memory_mapped": mapped,
        "first_sample_crc": zlib.crc32(first.tobytes())}))
    dist.destroy_process_group()


def run_ranks(ranks: int, path: str, prefix: str, seq_length: int, num_samples: tuple[int, int]) -> dict:
    """RANKS processes through one path; per-rank figures and the summary the printout uses."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        mp.spawn(rank_main, args=(ranks, os.path.join(out, "store"), path, prefix, seq_length, num_samples, out),
                 nprocs=ranks, join=True)
        wall = time.perf_counter() - start
        per_rank = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(ranks)]
    builders = [r for r, res in enumerate(per_rank) if res["builds"]]
    waiting = [res for r, res in enumerate(per_rank) if r not in builders] or per_rank
    return {
        "ranks": per_rank,
        "ranks_that_built": builders,
        "builds": sum(len(res["builds"]) for res in per_rank),
        "seconds_to_first_sample": max(res["seconds_to_first_sample"] for res in per_rank),
        "private_mib_max": max(res["private_mib"] for res in per_rank),
        "private_mib_max_not_building": max(res["private_mib"] for res in waiting),
        "peak_mib_max": max(res["peak_mib"] for res in per_rank),
        "peak_mib_max_not_building": max(res["peak_mib"] for res in waiting),
        "memory_mapped": all(res["memory_mapped"] for res in per_rank),
        "spawn_wall_seconds": wall,
    }


def arrays_mib(prefix: str) -> float:
    """Size of the cached index arrays of a corpus (train + valid), the memory the old path held per rank."""
    return sum(p.stat().st_size for p in Path(prefix).parent.glob("*_idx.npy")) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=200_000_000)
    parser.add_argument("--old-documents", type=int, default=20_000_000,
                        help="the size both paths run at side by side (the old one holds it on every rank)")
    parser.add_argument("--mean-tokens", type=int, default=1000, help="mean document length")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--epoch-fraction", type=float, default=0.9,
                        help="training samples asked for, as a fraction of one epoch of the training split")
    parser.add_argument("--workdir", default=None, help="where the corpora go (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the settings and every measurement to this path")
    opts = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=opts.workdir) as work:
        corpora, results = {}, {}
        for label, documents in (("big", opts.documents), ("side_by_side", opts.old_documents)):
            start = time.perf_counter()
            folder = Path(work, label)
            folder.mkdir()
            tokens = write_corpus(folder / "corpus", documents, opts.mean_tokens)
            corpora[label] = {"documents": documents, "tokens": tokens,
                              "idx_mib": Path(folder / "corpus.idx").stat().st_size / 2**20,
                              "write_seconds": time.perf_counter() - start}
            print(f"corpus {label}: {documents:,} documents, {tokens:,} tokens, .idx "
                  f"{corpora[label]['idx_mib']:.0f} MiB (written in {corpora[label]['write_seconds']:.0f} s)",
                  flush=True)
        old_folder = Path(work, "side_by_side_old")  # the same corpus (hard links), its own index cache
        old_folder.mkdir()
        for suffix in (".idx", ".bin"):
            os.link(Path(work, "side_by_side", f"corpus{suffix}"), old_folder / f"corpus{suffix}")

        def samples(label: str) -> tuple[int, int]:  # (train, valid): a run over most of one epoch
            train_share = float(SPLIT.split(",")[0]) / sum(float(w) for w in SPLIT.split(","))
            train = int(opts.epoch_fraction * corpora[label]["tokens"] * train_share / opts.seq_length)
            return train, max(1, train // 100)

        plan = [("big", "new", Path(work, "big", "corpus")),
                ("side_by_side", "new", Path(work, "side_by_side", "corpus")),
                ("side_by_side", "old", old_folder / "corpus")]
        for label, path, prefix in plan:
            for state in ("cold", "warm"):
                key = f"{label}/{path}/{state}"
                results[key] = run_ranks(opts.ranks, path, str(prefix), opts.seq_length, samples(label))
                results[key]["arrays_mib"] = arrays_mib(str(prefix))
                results[key]["num_samples_train_valid"] = samples(label)
                r = results[key]
                print(f"{key:24s} builds {r['builds']} (ranks {r['ranks_that_built']}), first sample after "
                      f"{r['seconds_to_first_sample']:6.2f} s, private {r['private_mib_max']:8.1f} MiB per rank "
                      f"(not building: {r['private_mib_max_not_building']:8.1f}), peak "
                      f"{r['peak_mib_max']:7.0f} MiB (not building: {r['peak_mib_max_not_building']:7.0f}), "
                      f"arrays {r['arrays_mib']:.0f} MiB", flush=True)
        same_arrays = all(
            np.array_equal(np.load(new, mmap_mode="r"), np.load(old_folder / new.name, mmap_mode="r"))
            for new in Path(work, "side_by_side").glob("*_idx.npy"))

    same_samples = [r["first_sample_crc"] for r in results["side_by_side/new/warm"]["ranks"]] == [
        r["first_sample_crc"] for r in results["side_by_side/old/warm"]["ranks"]]
    big, new, old = (results[k] for k in ("big/new/warm", "side_by_side/new/warm", "side_by_side/old/warm"))
    new_cold, old_cold = results["side_by_side/new/cold"], results["side_by_side/old/cold"]
    old_per_document = old["private_mib_max"] * 2**20 / opts.old_documents
    tokens_per_document = corpora["side_by_side"]["tokens"] / opts.old_documents
    ratios = {
        "big_private_over_arrays_max": big["private_mib_max"] / big["arrays_mib"],
        "big_cold_private_over_arrays_max": results["big/new/cold"]["private_mib_max"] / big["arrays_mib"],
        "side_by_side_private_new_over_old_warm": new["private_mib_max"] / old["private_mib_max"],
        "side_by_side_private_new_over_old_cold": new_cold["private_mib_max"] / old_cold["private_mib_max"],
        "side_by_side_seconds_new_over_old_warm": new["seconds_to_first_sample"] / old["seconds_to_first_sample"],
        "side_by_side_seconds_new_over_old_cold": (new_cold["seconds_to_first_sample"]
                                                   / old_cold["seconds_to_first_sample"]),
        "side_by_side_builds_new_over_old_cold": new_cold["builds"] / old_cold["builds"],
    }
    old_peak_per_document = old_cold["peak_mib_max"] * 2**20 / opts.old_documents
    projection = {  # the old path's memory is linear in the documents: scaled from --old-documents
        "old_private_bytes_per_document": old_per_document,
        "old_private_gib_per_rank_at_big": old_per_document * opts.documents / 2**30,
        "old_private_gib_per_rank_at_1t_tokens": old_per_document * 1e12 / tokens_per_document / 2**30,
        "old_cold_peak_bytes_per_document": old_peak_per_document,
        "old_cold_peak_gib_per_rank_at_1t_tokens": old_peak_per_document * 1e12 / tokens_per_document / 2**30,
        "old_warm_seconds_at_big": old["seconds_to_first_sample"] * opts.documents / opts.old_documents,
        "new_builder_peak_bytes_per_document": results["big/new/cold"]["peak_mib_max"] * 2**20 / opts.documents,
    }
    print(f"\nside by side at {opts.old_documents:,} documents, {opts.ranks} ranks (new / old):")
    print(f"  builds (cold)                      {new_cold['builds']} / {old_cold['builds']}")
    print(f"  private memory per rank, warm      {ratios['side_by_side_private_new_over_old_warm']:.4f} "
          f"({new['private_mib_max']:.1f} / {old['private_mib_max']:.1f} MiB)")
    print(f"  private memory per rank, cold      {ratios['side_by_side_private_new_over_old_cold']:.4f} "
          f"({new_cold['private_mib_max']:.1f} / {old_cold['private_mib_max']:.1f} MiB)")
    print(f"  seconds to the first sample, warm  {ratios['side_by_side_seconds_new_over_old_warm']:.3f} "
          f"({new['seconds_to_first_sample']:.2f} / {old['seconds_to_first_sample']:.2f} s)")
    print(f"  seconds to the first sample, cold  {ratios['side_by_side_seconds_new_over_old_cold']:.3f} "
          f"({new_cold['seconds_to_first_sample']:.2f} / {old_cold['seconds_to_first_sample']:.2f} s)")
    print(f"  identical index arrays, samples    {same_arrays}, {same_samples}")
    print(f"at {opts.documents:,} documents: private memory per rank / index arrays = "
          f"{ratios['big_private_over_arrays_max']:.4f} warm, {ratios['big_cold_private_over_arrays_max']:.4f} "
          f"cold (builder included; target <= 0.05); memory-mapped on every rank: {big['memory_mapped']}; "
          f"first sample after {big['seconds_to_first_sample']:.1f} s warm (old, scaled: "
          f"{projection['old_warm_seconds_at_big']:.0f} s), {results['big/new/cold']['seconds_to_first_sample']:.0f} s "
          f"cold; the building rank's peak {projection['new_builder_peak_bytes_per_document']:.1f} bytes per document")
    print(f"old path, linear in documents: {old_per_document:.1f} private bytes per document per rank -> "
          f"{projection['old_private_gib_per_rank_at_big']:.1f} GiB per rank at {opts.documents:,} documents, "
          f"{projection['old_private_gib_per_rank_at_1t_tokens']:.0f} GiB per rank at 1T tokens "
          f"({tokens_per_document:.0f} tokens per document); its peak while every rank builds: "
          f"{old_peak_per_document:.1f} bytes per document -> "
          f"{projection['old_cold_peak_gib_per_rank_at_1t_tokens']:.0f} GiB per rank at 1T tokens")
    if opts.json:
        settings = {k: v for k, v in vars(opts).items() if k not in ("json", "workdir")}
        record = {"settings": {**settings, "split": SPLIT, "seed": SEED}, "corpora": corpora, "results": results,
                  "ratios": ratios, "projection": projection, "identical_index_arrays": same_arrays,
                  "identical_first_samples": same_samples}
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {opts.json}")


if __name__ == "__main__":
    main()
