"""utils.atomic_files: a write that fails leaves the destination exactly as it was, and no temporary name behind."""

from __future__ import annotations

import pytest

from diffusers_hyperlora.utils.atomic_files import atomic_folder, atomic_path, atomic_write_files


def _tree(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_atomic_folder_replaces_an_old_folder_whole(tmp_path):
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "old.txt").write_text("old")
    with atomic_folder(destination) as temporary:
        assert temporary.is_dir() and not any(temporary.iterdir())  # a new, empty folder beside the destination
        assert temporary.parent == tmp_path and temporary != destination
        (temporary / "new.txt").write_text("new")
        assert _tree(destination) == {"old.txt": "old"}  # nothing visible until the block succeeds
    assert _tree(destination) == {"new.txt": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_folder_creates_the_parents_of_a_new_folder(tmp_path):
    with atomic_folder(tmp_path / "a" / "b") as temporary:
        (temporary / "x.txt").write_text("x")
    assert _tree(tmp_path / "a") == {"b/x.txt": "x"}


@pytest.mark.parametrize("existed", [True, False])
def test_a_failed_atomic_folder_leaves_the_destination_as_it_was(tmp_path, existed):
    destination = tmp_path / "out"
    if existed:
        destination.mkdir()
        (destination / "old.txt").write_text("old")
    with pytest.raises(KeyError, match="writer failed"):  # the caller's error, unchanged
        with atomic_folder(destination) as temporary:
            (temporary / "half.txt").write_text("half")
            raise KeyError("writer failed")
    assert _tree(tmp_path) == ({"out/old.txt": "old"} if existed else {})
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existed else [])


def test_atomic_folder_puts_the_old_folder_back_when_the_swap_fails(tmp_path, monkeypatch):
    """The old folder is moved aside before the new one is renamed in; if that rename fails, the old one returns."""
    import os

    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "old.txt").write_text("old")
    real_replace = os.replace

    def replace(source, target):
        if str(source).endswith(".tmp"):
            raise PermissionError(13, "denied")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(PermissionError):
        with atomic_folder(destination) as temporary:
            (temporary / "new.txt").write_text("new")
    assert _tree(tmp_path) == {"out/old.txt": "old"}


def test_atomic_path_and_files_keep_the_old_contents_on_failure(tmp_path):
    target = tmp_path / "note.txt"
    target.write_text("old")
    with pytest.raises(KeyError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise KeyError("stop")

    def fail(path):
        raise KeyError("second writer")

    with pytest.raises(KeyError):
        atomic_write_files(tmp_path, {"note.txt": lambda path: path.write_text("new"), "other.txt": fail})
    assert _tree(tmp_path) == {"note.txt": "old"}
