"""Folders a tool writes whole: a non-empty target is refused before any work, a failure leaves nothing behind."""

import pytest

from megatron.outputs import OutputExists, new_output_folder


def test_the_folder_appears_only_when_complete(tmp_path):
    out = tmp_path / "export"
    with new_output_folder(out) as staging:
        (staging / "config.json").write_text("{}")
        assert not out.exists()  # nothing at the final name while writing
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging folder left


def test_an_empty_folder_made_by_the_user_is_used(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    with new_output_folder(out) as staging:
        (staging / "a").write_text("1")
    assert (out / "a").read_text() == "1"


def test_a_failure_leaves_no_folder(tmp_path):
    out = tmp_path / "nested" / "export"
    with pytest.raises(RuntimeError, match="boom"), new_output_folder(out) as staging:
        (staging / "config.json").write_text("{}")
        raise RuntimeError("boom")
    assert not out.exists() and list(out.parent.iterdir()) == []
    with new_output_folder(out) as staging:  # the same command runs again
        (staging / "config.json").write_text("{}")
    assert (out / "config.json").exists()


def test_interrupt_leaves_no_folder(tmp_path):
    out = tmp_path / "export"
    with pytest.raises(KeyboardInterrupt), new_output_folder(out) as staging:
        (staging / "x").write_text("1")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_non_empty_folder_or_a_file_is_refused_and_kept(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "model.yml").write_text("user's own")
    with pytest.raises(OutputExists, match=r"mine: not empty"), new_output_folder(out):
        pytest.fail("must not run")
    assert (out / "model.yml").read_text() == "user's own"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExists, match=r"file: is a file"), new_output_folder(tmp_path / "file"):
        pytest.fail("must not run")
