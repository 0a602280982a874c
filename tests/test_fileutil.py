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


@pytest.mark.parametrize(("inside", "durable"), [(True, False), (False, True)])
def test_a_directory_in_the_way_is_refused_and_left_alone(
    tmp_path: Path, inside: bool, durable: bool
) -> None:
    target = tmp_path / "psk"
    target.mkdir()
    if inside:
        (target / "inside").write_bytes(b"kept")
    with pytest.raises(IsADirectoryError):
        write_secret_file(target, b"new", durable=durable)
    assert sorted(p.name for p in target.iterdir()) == (["inside"] if inside else [])
    if inside:
        assert (target / "inside").read_bytes() == b"kept"
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
    names = iter(["aaaaaaaa", "bbbbbbbb"])
    monkeypatch.setattr(fileutil.secrets, "token_urlsafe", lambda n: next(names))
    squatter = tmp_path / ".psk.aaaaaaaa.tmp"
    squatter.write_bytes(b"not ours")
    write_secret_file(tmp_path / "psk", b"new")
    assert next(names, None) is None  # the second name was drawn
    assert squatter.read_bytes() == b"not ours"
    assert (tmp_path / "psk").read_bytes() == b"new"
    assert _leftovers(tmp_path) == [squatter.name]


def test_the_temporary_file_is_private_from_its_creation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never readable by others even for an instant: created 0600 whatever the umask, before
    `mode` is set (here a public 0644, as for a public key)."""
    seen: list[int] = []
    real_fchmod = os.fchmod

    def fchmod(fd: int, mode: int) -> None:
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        real_fchmod(fd, mode)

    monkeypatch.setattr(fileutil.os, "fchmod", fchmod)
    previous = os.umask(0)
    try:
        write_secret_file(tmp_path / "pub", b"x", mode=0o644)
    finally:
        os.umask(previous)
    assert seen == [0o600]
    assert stat.S_IMODE((tmp_path / "pub").stat().st_mode) == 0o644


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_an_interrupted_write_leaves_no_temp_file_and_no_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "psk"
    write_secret_file(target, b"old")

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(fileutil.os, "fsync", interrupted)
    before = _open_fds()
    with pytest.raises(KeyboardInterrupt):
        write_secret_file(target, b"new")
    assert _open_fds() == before
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("durable", [True, False])
def test_durable_syncs_the_file_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    target = tmp_path / "psk"
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(fileutil.os, "fsync", fsync)
    monkeypatch.setattr(fileutil.os, "replace", replace)
    write_secret_file(target, b"new", durable=durable)
    assert events == (["file", "rename", "dir"] if durable else ["rename"])


def test_a_trailing_slash_names_the_file(tmp_path: Path) -> None:
    write_secret_file(f"{tmp_path}/psk/", b"new")
    assert (tmp_path / "psk").read_bytes() == b"new"


# -- writes through a spare made ahead (the file sink's install) -------------------------------


def test_a_write_through_a_spare_replaces_the_file_and_holds_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "psk"
    write_secret_file(target, b"old")
    old_inode = target.stat().st_ino
    previous = os.umask(0)
    try:
        spare = fileutil.create_spare(tmp_path)
    finally:
        os.umask(previous)
    named = tmp_path / spare.name
    assert stat.S_IMODE(named.stat().st_mode) == 0o600  # private from its creation
    spare_inode = named.stat().st_ino
    held = fileutil.write_via_spare(spare, target, b"new")
    assert held is not None
    try:
        assert target.read_bytes() == b"new" and target.stat().st_ino == spare_inode
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        assert os.fstat(held).st_ino == old_inode and os.fstat(held).st_nlink == 0  # no name
    finally:
        os.close(held)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["psk"]
    fresh = fileutil.create_spare(tmp_path)
    assert fileutil.write_via_spare(fresh, tmp_path / "new-file", b"first") is None
    assert (tmp_path / "new-file").read_bytes() == b"first"


def test_a_spare_whose_name_was_swapped_is_never_written_nor_renamed(tmp_path: Path) -> None:
    target = tmp_path / "psk"
    write_secret_file(target, b"old")
    spare = fileutil.create_spare(tmp_path)
    named = tmp_path / spare.name
    probe = os.dup(spare.fd)  # the spare's file, which no name reaches any more
    named.unlink()
    named.write_bytes(b"planted")  # another file under the spare's name
    before = _open_fds()
    try:
        with pytest.raises(FileExistsError):
            fileutil.write_via_spare(spare, target, b"new")
        assert os.fstat(probe).st_size == 0  # the key was never written into it
    finally:
        os.close(probe)
    assert target.read_bytes() == b"old"
    assert named.read_bytes() == b"planted"  # not ours: left where it is
    assert len(_open_fds()) == len(before) - 3  # the spare, its directory, the probe


def test_a_failed_write_through_a_spare_removes_it_and_leaves_the_target(tmp_path: Path) -> None:
    target = tmp_path / "psk"
    target.mkdir()
    spare = fileutil.create_spare(tmp_path)
    before = _open_fds()
    with pytest.raises(IsADirectoryError):
        fileutil.write_via_spare(spare, target, b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["psk"] and target.is_dir()
    assert len(_open_fds()) == len(before) - 2  # the spare and its directory closed


@pytest.mark.parametrize("renamable", [True, False])
def test_a_spare_in_a_directory_moved_aside_leaves_no_key_behind(
    tmp_path: Path, renamable: bool
) -> None:
    """Review finding: the spares made before the sink's directory was moved aside (and a
    new one made) took the key and stayed, named, in the old directory."""
    keys = tmp_path / "keys"
    keys.mkdir()
    spare = fileutil.create_spare(keys)
    keys.rename(tmp_path / "keys.old")
    keys.mkdir()
    target = keys / "psk"
    if renamable:
        assert fileutil.write_via_spare(spare, target, b"new key") is None
        assert target.read_bytes() == b"new key"
    else:
        target.mkdir()  # the rename fails after the write
        with pytest.raises(IsADirectoryError):
            fileutil.write_via_spare(spare, target, b"new key")
    assert list((tmp_path / "keys.old").iterdir()) == []


def test_only_files_named_as_spares_are_removed(tmp_path: Path) -> None:
    prefix = fileutil.SPARE_PREFIX
    (tmp_path / f"{prefix}abc.tmp").write_bytes(b"")
    (tmp_path / f"{prefix}dir.tmp").mkdir()
    (tmp_path / f"{prefix}link.tmp").symlink_to(tmp_path / "psk")
    (tmp_path / "psk").write_bytes(b"kept")
    (tmp_path / f"{prefix}abc.other").write_bytes(b"kept")
    fileutil.remove_stale_spares(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f"{prefix}dir.tmp", f"{prefix}link.tmp", "psk", f"{prefix}abc.other"])
    assert (tmp_path / "psk").read_bytes() == b"kept"


def test_a_spare_moved_away_before_its_rename_takes_no_key_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: between the last check of the spare's name and the rename, another
    writer in the directory moves the spare away and puts a file of its own there. That
    file is what gets renamed into place: the write fails (the caller writes anew), and the
    key is truncated out of the moved spare."""
    target = tmp_path / "psk"
    write_secret_file(target, b"old")
    spare = fileutil.create_spare(tmp_path)
    real_open = os.open

    def racing_open(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & os.O_PATH:  # just before the rename
            os.rename(tmp_path / spare.name, tmp_path / "moved")
            (tmp_path / spare.name).write_bytes(b"planted")
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fileutil.os, "open", racing_open)
    before = _open_fds()
    with pytest.raises(FileExistsError):
        fileutil.write_via_spare(spare, target, b"new key")
    monkeypatch.undo()
    assert (tmp_path / "moved").read_bytes() == b""  # no key left in it
    assert target.read_bytes() == b"planted"
    assert len(_open_fds()) == len(before) - 2  # the spare, its directory; nothing held
