"""Tokenizers from local files only: HF `tokenizers` JSON, sentencepiece, GPT-2 BPE, bytes."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

# Looked up in this order: GPT-NeoX/GPT-2, then Llama-2-style, then Llama-3.
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>")


class Tokenizer:
    """What the data pipeline needs: ids in, ids out, and the id that ends a document."""

    name: str
    vocab_size: int
    eod_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError


class HFTokenizer(Tokenizer):
    """A `tokenizers` JSON file: covers the GPT-NeoX and Llama-3 tokenizers."""

    def __init__(self, vocab_file: str):
        from tokenizers import Tokenizer as RustTokenizer

        self.name = "HFTokenizer"
        self.tokenizer = RustTokenizer.from_file(vocab_file)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        eod = next((vocab[t] for t in EOD_CANDIDATES if t in vocab), None)
        if eod is None:
            raise ValueError(f"vocab_file: {vocab_file} has no end-of-document token "
                             f"(expected one of {', '.join(EOD_CANDIDATES)})")
        self.eod_id = eod

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts per call: far less Python overhead per document during preprocessing."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))


class TokenizerFileError(ValueError):
    """A tokenizer file that our own checks found wrong; the message names the file and what was expected."""


def check_gpt2_merges(vocab_file: str, merge_file: str) -> None:
    """GPT-2's merges.txt as `tokenizers` reads it (lines starting `#version` skipped, then one `a b` pair a line;
    a, b and ab must be in vocab.json), with its errors naming the merges file and its line: `tokenizers` blames
    the vocab file and numbers lines without the header. A file with no merges is refused too: the text would be
    split into single bytes, about three times as many tokens, without a word."""
    try:
        vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerFileError(f"vocab_file: {vocab_file} is not a GPT-2 vocab.json ({err})") from None
    if not isinstance(vocab, dict):
        raise TokenizerFileError(f"vocab_file: {vocab_file} is not a GPT-2 vocab.json (expected a JSON object "
                                 "of token -> id)")
    try:
        lines = Path(merge_file).read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise TokenizerFileError(f"merge_file: {merge_file} is not UTF-8 text (byte {err.start})") from None
    merges = 0
    for number, line in enumerate(lines, start=1):
        line = line.removesuffix("\r")
        if line.startswith("#version") or (number == len(lines) and not line):  # the header, the final newline
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise TokenizerFileError(f"merge_file: {merge_file} line {number}: {line!r} is not a pair 'a b' "
                                     "(one space between two tokens)")
        missing = next((token for token in (*pair, "".join(pair)) if token not in vocab), None)
        if missing is not None:
            raise TokenizerFileError(f"merge_file: {merge_file} line {number}: the pair {line!r} needs {missing!r}, "
                                     f"which is not in vocab_file {vocab_file}")
        merges += 1
    if merges == 0:
        raise TokenizerFileError(f"merge_file: {merge_file} holds no merges (expected GPT-2's merges.txt: a "
                                 "#version line, then one 'a b' pair a line)")


class GPT2BPETokenizer(HFTokenizer):
    """GPT-2's vocab.json + merges.txt, as GPT-NeoX's default tokenizer reads them."""

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import ByteLevelBPETokenizer

        check_gpt2_merges(vocab_file, merge_file)
        self.name = "GPT2BPETokenizer"
        self.tokenizer = ByteLevelBPETokenizer(vocab_file, merge_file)
        self.vocab_size = self.tokenizer.get_vocab_size()
        vocab = self.tokenizer.get_vocab()
        if "<|endoftext|>" not in vocab:
            raise ValueError(f"vocab_file: {vocab_file} has no <|endoftext|> token")
        self.eod_id = vocab["<|endoftext|>"]


class SPMTokenizer(Tokenizer):
    """A sentencepiece `.model` (Llama-2); the end of a document is the EOS id."""

    def __init__(self, vocab_file: str):
        import sentencepiece

        self.name = "SPMTokenizer"
        self.model = sentencepiece.SentencePieceProcessor(model_file=vocab_file)
        self.vocab_size = self.model.get_piece_size()
        self.eod_id = self.model.eos_id()
        if self.eod_id < 0:
            raise ValueError(f"vocab_file: {vocab_file} defines no EOS piece to end documents with")

    def encode(self, text: str) -> list[int]:
        return self.model.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.model.decode(list(ids))


class CharLevelTokenizer(Tokenizer):
    """UTF-8 bytes, with 256 as the end of a document; needs no file."""

    name = "CharLevelTokenizer"
    vocab_size = 257
    eod_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def build_tokenizer(tokenizer_type: str, vocab_file: str | None, merge_file: str | None = None) -> Tokenizer:
    """GPT-NeoX's `tokenizer_type` names; every file is local, nothing is downloaded."""
    if tokenizer_type == "CharLevelTokenizer":
        return CharLevelTokenizer()
    if tokenizer_type not in ("HFTokenizer", "SPMTokenizer", "GPT2BPETokenizer"):
        raise ValueError(f"tokenizer_type: unknown {tokenizer_type!r} "
                         "(expected HFTokenizer, SPMTokenizer, GPT2BPETokenizer or CharLevelTokenizer)")
    if vocab_file and Path(vocab_file).is_dir():
        raise IsADirectoryError(f"vocab_file: {vocab_file} is a folder; expected the {tokenizer_type} file")
    if not vocab_file or not Path(vocab_file).is_file():
        raise FileNotFoundError(f"vocab_file: {vocab_file} does not exist ({tokenizer_type} needs it)")
    if tokenizer_type == "GPT2BPETokenizer" and (not merge_file or not Path(merge_file).is_file()):
        raise FileNotFoundError(f"merge_file: {merge_file} does not exist (GPT2BPETokenizer needs it)")
    expected = {"HFTokenizer": "a tokenizers .json", "SPMTokenizer": "a SentencePiece .model",
                "GPT2BPETokenizer": "a GPT-2 vocab.json with its merges.txt"}[tokenizer_type]
    try:  # the libraries raise their own errors (tokenizers: a bare Exception) on a file of another kind
        if tokenizer_type == "HFTokenizer":
            return HFTokenizer(vocab_file)
        if tokenizer_type == "SPMTokenizer":
            return SPMTokenizer(vocab_file)
        return GPT2BPETokenizer(vocab_file, merge_file)
    except TokenizerFileError:  # already names the file, the line and the value
        raise
    except Exception as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"vocab_file: {vocab_file} is not {expected} ({tokenizer_type}): {reason}") from None


def tokenizer_of(args) -> Tokenizer:
    """The tokenizer a run's config names: its type, vocab_file and (GPT2BPETokenizer) merge_file. Every tool
    builds a run's tokenizer through here, so no setting is dropped on the way."""
    return build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file)


def vocab_size_of(args) -> int:
    """The model's vocabulary for a run's config: `vocab_size` if given, else the tokenizer's, padded to
    `make_vocab_size_divisible_by` as GPT-NeoX does."""
    vocab = args.vocab_size if args.vocab_size is not None else tokenizer_of(args).vocab_size
    return padded_vocab_size(vocab, args.make_vocab_size_divisible_by)


def padded_vocab_size(vocab_size: int, divisible_by: int) -> int:
    """GPT-NeoX pads the embedding to a multiple of `make_vocab_size_divisible_by` for fast matmuls."""
    if divisible_by < 1 or vocab_size < 1:
        raise ValueError(f"padded_vocab_size: expected positive sizes, got vocab_size={vocab_size}, "
                         f"divisible_by={divisible_by}")
    return -(-vocab_size // divisible_by) * divisible_by


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str | Path) -> Path:
    """A byte-level BPE with `<|endoftext|>`, saved as a `tokenizers` JSON usable as HFTokenizer."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = RustTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    out_path = Path(out_path)
    tokenizer.save(str(out_path))
    return out_path
