"""Tokenizers: HF JSON (trained here), sentencepiece (trained here), bytes; padding; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron.data.tokenizer import build_tokenizer, padded_vocab_size, train_bpe_tokenizer

TEXTS = [
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
] * 20


def test_char_level_tokenizer_is_utf8_bytes_plus_eod() -> None:
    tok = build_tokenizer("CharLevelTokenizer", None)
    assert (tok.vocab_size, tok.eod_id) == (257, 256)
    assert tok.encode("Aé") == [65, 0xC3, 0xA9]
    assert tok.decode([72, 105, 256]) == "Hi"


def test_trained_bpe_round_trips_and_has_endoftext(tmp_path: Path) -> None:
    path = train_bpe_tokenizer(TEXTS, 300, tmp_path / "bpe.json")
    tok = build_tokenizer("HFTokenizer", str(path))
    vocab = json.loads(Path(path).read_text())["model"]["vocab"]
    assert tok.eod_id == vocab["<|endoftext|>"]
    assert 256 < tok.vocab_size <= 300
    text = "Shall I compare thee? — ünïcode 123"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eod_id not in ids
    # Merges learnt from the corpus make frequent words shorter than their bytes.
    assert len(tok.encode(" summer")) < len(b" summer")
    assert tok.encode_batch(["a b", "summer"]) == [tok.encode("a b"), tok.encode("summer")]


def _hf_json_with_special(tmp_path: Path, special: str | None) -> Path:
    """A minimal word-level `tokenizers` JSON, so that the EOD lookup is tested on other names."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if special:
        tok.add_special_tokens([special])
    path = tmp_path / "wl.json"
    tok.save(str(path))
    return path


@pytest.mark.parametrize("special", ["</s>", "<|end_of_text|>"])
def test_hf_eod_alternatives(tmp_path: Path, special: str) -> None:
    tok = build_tokenizer("HFTokenizer", str(_hf_json_with_special(tmp_path, special)))
    assert tok.eod_id == 3
    assert tok.vocab_size == 4
    assert tok.encode("hello world") == [1, 2]


def test_hf_without_eod_is_a_clear_error(tmp_path: Path) -> None:
    path = _hf_json_with_special(tmp_path, None)
    with pytest.raises(ValueError, match=r"wl\.json has no end-of-document token") as err:
        build_tokenizer("HFTokenizer", str(path))
    assert "\n" not in str(err.value)


def test_sentencepiece_model_trained_in_tmp(tmp_path: Path) -> None:
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS), model_prefix=str(tmp_path / "spm"), vocab_size=80,
        model_type="bpe", eos_id=2, bos_id=1, unk_id=0, pad_id=-1, minloglevel=2,
    )
    tok = build_tokenizer("SPMTokenizer", str(tmp_path / "spm.model"))
    assert tok.vocab_size == 80
    assert tok.eod_id == 2
    ids = tok.encode("to be or not to be")
    assert all(0 <= i < 80 for i in ids) and 2 not in ids
    assert tok.decode(ids) == "to be or not to be"


def test_padded_vocab_size() -> None:
    assert padded_vocab_size(50257, 128) == 50304
    assert padded_vocab_size(257, 128) == 384
    assert padded_vocab_size(256, 128) == 256
    assert padded_vocab_size(8192, 1) == 8192


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer_type: unknown 'Nope'"):
        build_tokenizer("Nope", None)
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        build_tokenizer("HFTokenizer", str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="vocab_file: None"):
        build_tokenizer("SPMTokenizer", None)
    with pytest.raises(ValueError, match="divisible_by=0"):
        padded_vocab_size(100, 0)


def _gpt2_files(tmp_path: Path, merges: str) -> tuple[str, str]:
    """A tiny GPT-2 vocab.json (h, e, he, l) and a merges.txt holding `merges`."""
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"h": 0, "e": 1, "he": 2, "l": 3, "<|endoftext|>": 4}))
    (tmp_path / "merges.txt").write_text(merges)
    return str(vocab), str(tmp_path / "merges.txt")


def test_gpt2_merges_are_read_as_tokenizers_reads_them(tmp_path: Path) -> None:
    tok = build_tokenizer("GPT2BPETokenizer", *_gpt2_files(tmp_path, "#version: 0.2\r\nh e\r\n"))
    assert tok.encode("hel") == [2, 3]


@pytest.mark.parametrize("merges", ["", "#version: 0.2\n"], ids=["empty", "header_only"])
def test_gpt2_merges_without_merges_are_refused(tmp_path: Path, merges: str) -> None:
    """Without merges every byte is a token: about three times as many tokens, which nothing else would report."""
    with pytest.raises(ValueError, match=r"^merge_file: .*merges\.txt holds no merges") as err:
        build_tokenizer("GPT2BPETokenizer", *_gpt2_files(tmp_path, merges))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("merges, message", [
    ("#version: 0.2\nh e\nl l\n", r"merges\.txt line 3: the pair 'l l' needs 'll', which is not in vocab_file "),
    ("#version: 0.2\nx e\n", r"merges\.txt line 2: the pair 'x e' needs 'x'"),
    ("h e\nh e l\n", r"merges\.txt line 2: 'h e l' is not a pair 'a b'"),
], ids=["merged_token", "first_token", "three_tokens"])
def test_a_bad_gpt2_merge_names_the_merges_file_line_and_pair(tmp_path: Path, merges: str, message: str) -> None:
    """tokenizers itself blames the vocab file ("Token `ll` out of vocabulary") and numbers lines without the
    header."""
    with pytest.raises(ValueError, match=r"^merge_file: .*" + message) as err:
        build_tokenizer("GPT2BPETokenizer", *_gpt2_files(tmp_path, merges))
    assert "\n" not in str(err.value)
