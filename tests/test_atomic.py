"""Writers never leave half an artifact: a failure while writing keeps the previous file or folder as it was."""

import os

import pytest

from cad_lightning.utils import atomic_folder, atomic_path


def test_failed_folder_write_keeps_the_previous_folder(tmp_path):
    folder = tmp_path / "unet"
    with atomic_folder(folder) as tmp:
        (tmp / "weights").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(folder) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("crash while writing")
    assert (folder / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]  # no temporary folder left behind
    with atomic_folder(folder) as tmp:
        (tmp / "weights").write_text("new")
    assert (folder / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["unet"]


def test_failed_file_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "scores.safetensors"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["scores.safetensors"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_and_folders_follow_the_umask(tmp_path, umask):
    """Artifacts are readable as the umask allows (a group sharing a project folder), not 0600 like a temporary file."""
    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "report.json") as tmp:
            tmp.write_text("{}")
        with atomic_folder(tmp_path / "unet") as folder:
            (folder / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "unet").stat().st_mode & 0o777 == 0o777 & ~umask
