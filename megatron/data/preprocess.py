"""Text -> GPT-NeoX indexed dataset, with worker processes (the logic behind tools/preprocess_data.py).

Output is identical for any worker count: documents are tokenized in order-preserving chunks.
Each worker tokenizes single-threaded (TOKENIZERS_PARALLELISM=false) so that `--workers` is the one
knob for parallelism.
"""

from __future__ import annotations

import gzip
import io
import json
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megatron.data.indexed_dataset import IndexedDatasetBuilder, best_dtype
from megatron.data.tokenizer import Tokenizer, build_tokenizer

CHUNK = 16
_worker_tokenizer: Tokenizer | None = None
_worker_options: tuple = (True, np.uint16)


def read_documents(path: str, keys: list[str]) -> Iterator[dict[str, str]]:
    """Yields {key: text} per document from .jsonl(.gz/.zst), .txt (one document per file) or .parquet."""
    if path.endswith(".txt"):
        yield {key: Path(path).read_text(encoding="utf-8") for key in keys}
        return
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=keys)
        columns = {key: table.column(key).to_pylist() for key in keys}
        for i in range(table.num_rows):
            yield {key: columns[key][i] or "" for key in keys}
        return
    if path.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json")):
        if path.endswith(".gz"):
            handle = gzip.open(path, "rb")
        elif path.endswith(".zst"):
            try:
                import zstandard
            except ImportError:
                raise ValueError(f"--input: {path}: reading .zst needs the zstandard package") from None

            handle = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
        else:
            handle = open(path, "rb")
        with handle:  # bytes, decoded line by line, so that a line that is not UTF-8 is named
            for line_no, raw in enumerate(handle, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not UTF-8 text (byte {err.start} of the line: "
                                     f"{err.reason})") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not a JSON record ({err.msg}, column {err.colno}); "
                                     "expected one JSON object per line") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{line_no}: a JSON {type(record).__name__}, expected an object with "
                                     f"keys {keys}")
                missing = [k for k in keys if k not in record]
                if missing:
                    raise ValueError(f"{path}:{line_no}: jsonl record has no key {missing[0]!r} (--jsonl-keys; the "
                                     f"record has {sorted(record)[:5]})")
                bad = [k for k in keys if not isinstance(record[k], str)]
                if bad:
                    raise ValueError(f"{path}:{line_no}: key {bad[0]!r} holds "
                                     f"{type(record[bad[0]]).__name__}, expected a string")
                yield {key: record[key] for key in keys}
        return
    raise ValueError(f"--input: {path}: unsupported file type "
                     "(expected .jsonl, .jsonl.gz, .jsonl.zst, .txt, .parquet)")


def _init_worker(tokenizer_type: str, vocab_file: str | None, merge_file: str | None, append_eod: bool,
                 dtype: type) -> None:
    """Each worker builds its own tokenizer once (tokenizers are not shared across processes)."""
    global _worker_tokenizer, _worker_options
    _worker_tokenizer = build_tokenizer(tokenizer_type, vocab_file, merge_file)
    _worker_options = (append_eod, dtype)


def _encode_chunk(chunk: list[dict[str, str]]) -> list[dict[str, np.ndarray]]:
    """Token arrays (EOD appended) in the final dtype: compact to send back from a worker."""
    tok, (append_eod, dtype) = _worker_tokenizer, _worker_options
    keys = list(chunk[0]) if chunk else []
    encoded = {}
    for key in keys:
        texts = [doc[key] for doc in chunk]
        ids = tok.encode_batch(texts) if hasattr(tok, "encode_batch") else [tok.encode(t) for t in texts]
        encoded[key] = [np.asarray(i + [tok.eod_id] if append_eod else i, dtype=dtype) for i in ids]
    return [{key: encoded[key][i] for key in keys} for i in range(len(chunk))]


def _chunks(inputs: list[str], keys: list[str]) -> Iterator[list[dict[str, str]]]:
    """CHUNK documents per task: enough work per message that pickling stays cheap."""
    chunk = []
    for path in inputs:
        for doc in read_documents(path, keys):
            chunk.append(doc)
            if len(chunk) == CHUNK:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def preprocess(
    inputs: list[str],
    keys: list[str],
    tokenizer_type: str,
    vocab_file: str | None,
    output_prefix: str,
    append_eod: bool = True,
    workers: int = 1,
    progress: bool = True,
    log_interval: int = 1000,
    merge_file: str | None = None,
) -> dict[str, str]:
    """Writes `{output_prefix}_{key}_document.bin/.idx` per key; returns the dataset prefix of each key."""
    if workers < 1:
        raise ValueError(f"--workers: expected at least 1, got {workers}")
    if not inputs or not keys:
        raise ValueError(f"preprocess: expected input files and jsonl keys, got inputs={inputs}, keys={keys}")
    for path in inputs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--input: {path} does not exist")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = build_tokenizer(tokenizer_type, vocab_file, merge_file)
    dtype = best_dtype(tokenizer.vocab_size)
    prefixes = {key: f"{output_prefix}_{key}_document" for key in keys}
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    builders = {key: IndexedDatasetBuilder(f"{prefixes[key]}.bin", dtype) for key in keys}
    bar = tqdm(desc="tokenizing", unit="doc", disable=not progress, mininterval=1.0, miniters=log_interval)
    if workers > 1:
        init_args = (tokenizer_type, vocab_file, merge_file, append_eod, dtype)
        pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, init_args)
        results = pool.imap(_encode_chunk, _chunks(inputs, keys), chunksize=1)
    else:
        pool = None
        _init_worker(tokenizer_type, vocab_file, merge_file, append_eod, dtype)
        results = map(_encode_chunk, _chunks(inputs, keys))
    documents = 0
    try:
        for chunk in results:
            for doc in chunk:
                for key, tokens in doc.items():
                    builders[key].add_document(tokens)
            documents += len(chunk)
            bar.update(len(chunk))
        if documents == 0:  # an empty dataset would only fail later, at training
            raise ValueError(f"--input: {', '.join(inputs)}: no documents (empty, or only blank lines); "
                             "nothing written")
        for key, builder in builders.items():
            builder.finalize(f"{prefixes[key]}.idx")
    except BaseException:  # bad input or an interrupt: no partial dataset is left behind
        for prefix, builder in zip(prefixes.values(), builders.values()):
            builder.bin_file.close()
            for suffix in (".bin", ".idx"):
                Path(prefix + suffix).unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        bar.close()
    return prefixes
