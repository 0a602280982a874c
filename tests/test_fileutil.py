"""`write_secret_file`: atomic, private, the old file unlinked, nothing left behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from qkdagent import fileutil
from qkdagent.fileutil import write_secret_file


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("durable", [True, False])
def test_replaces_the_content_privately_and_unlinks_the_old_file(
    tmp_path: Path, durable: bool
) -> None:
    target = tmp_path / "psk"
    write_secret_file(target, b"old", durable=durable)
    with open(target, "rb") as old:  # a reader holding the old file
        write_secret_file(target, b"new", durable=durable)
        assert old.read() == b"old"  # whole, never a mix
        assert os.fstat(old.fileno()).st_nlink == 0  # no name left for the old key
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert _leftovers(tmp_path) == []


def test_mode_is_set_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o777)
    try:
        write_secret_file(tmp_path / "pub", b"x", mode=0o644)
        write_secret_file(tmp_path / "pub", b"y", mode=0o644)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "pub").stat().st_mode) == 0o644


def test_a_directory_in_the_way_is_refused_and_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "psk"
    target.mkdir()
    (target / "inside").write_bytes(b"kept")
    with pytest.raises(IsADirectoryError):
        write_secret_file(target, b"new", durable=False)
    assert (target / "inside").read_bytes() == b"kept"
    assert _leftovers(tmp_path) == []


def test_an_empty_directory_in_the_way_is_refused_too(tmp_path: Path) -> None:
    target = tmp_path / "psk"
    target.mkdir()
    with pytest.raises(IsADirectoryError):
        write_secret_file(target, b"new")
    assert target.is_dir()
    assert _leftovers(tmp_path) == []


def test_a_symbolic_link_is_replaced_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"not ours")
    target = tmp_path / "psk"
    target.symlink_to(elsewhere)
    write_secret_file(target, b"new", durable=False)
    assert not target.is_symlink()
    assert target.read_bytes() == b"new"
    assert elsewhere.read_bytes() == b"not ours"


def test_a_failed_write_leaves_the_target_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "psk"
    write_secret_file(target, b"old")
    with pytest.raises(TypeError):
        write_secret_file(target, 12345)  # type: ignore[arg-type]  # fails once the temp exists
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_a_relative_path_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_secret_file("psk", b"one")
    write_secret_file("psk", b"two")
    assert (tmp_path / "psk").read_bytes() == b"two"
    assert _leftovers(tmp_path) == []


def test_a_taken_temporary_name_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file already at the random name (a leftover, or someone else's) is never opened or
    replaced: another name is drawn."""
    names = iter(["aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    monkeypatch.setattr(fileutil.secrets, "token_hex", lambda n: next(names))
    squatter = tmp_path / ".psk.aaaaaaaaaaaa.tmp"
    squatter.write_bytes(b"not ours")
    write_secret_file(tmp_path / "psk", b"new")
    assert squatter.read_bytes() == b"not ours"
    assert (tmp_path / "psk").read_bytes() == b"new"
    assert _leftovers(tmp_path) == [squatter.name]
