"""Writers never leave half an artifact: a failure while writing keeps the previous file or folder as it was."""

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
