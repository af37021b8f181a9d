"""An imagefolder listed in one walk loads exactly what datasets' own 66-pattern resolution loads."""

import json

import datasets
import pytest
from PIL import Image

from ldm.config import DataConfig
from ldm.data.images import DataError, load_records
from ldm.data.listing import single_split_files


def write_folder(folder, names, hidden=(), extra=()):
    """Images ``names`` (relative paths) listed in metadata.jsonl, plus unlisted ``hidden`` and ``extra`` files."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (i * 20 % 256, 0, 0)).save(folder / name)
    for name in (*hidden, *extra):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("not data")
    rows = [json.dumps({"file_name": name, "text": f"caption {i}"}) for i, name in enumerate(names)]
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def rows(records):
    return [(r["image"]["path"], r.get("text")) for r in records]


def datasets_own(folder):
    table = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    return rows(table.cast_column("image", datasets.Image(decode=False)))


def test_flat_and_nested_folders_load_the_same_rows_as_datasets(tmp_path):
    folder = write_folder(tmp_path / "data", ["00002.png", "00001.png", "a/00003.png", "a/b/0004.png", "z.png"],
                          hidden=[".DS_Store", ".cache/x.png"], extra=["README.md", "notes.txt"])
    files = single_split_files(folder)
    assert files is not None and not any("/." in f or f.endswith("README.md") for f in files)
    assert files == sorted(files) and len(files) == 7  # 5 images, metadata.jsonl, notes.txt
    ours = rows(load_records(DataConfig(path=str(folder))))
    assert ours == datasets_own(folder)
    assert sorted(text for _, text in ours) == [f"caption {i}" for i in range(5)]


@pytest.mark.parametrize("name", ["test/00001.png", "train-00001.png", "x_val.png", "Dev/1.png",
                                  "data/train-00000-of-00001.png", "__special__/1.png"])
def test_paths_that_may_name_a_split_are_left_to_datasets(tmp_path, name):
    folder = write_folder(tmp_path / "data", ["00001.png", name])
    assert single_split_files(folder) is None
    try:  # datasets' own resolution, whatever it decides (here a "test" folder is the test split)
        expected = datasets_own(folder)
    except ValueError as err:
        with pytest.raises(DataError, match=str(err).split(".")[0]):
            load_records(DataConfig(path=str(folder)))
    else:
        assert rows(load_records(DataConfig(path=str(folder)))) == expected


def test_linked_folders_are_left_to_datasets(tmp_path):
    folder = write_folder(tmp_path / "data", ["00001.png"])
    write_folder(tmp_path / "elsewhere", ["00002.png"])
    (folder / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert single_split_files(folder) is None


def test_one_walk_instead_of_one_per_pattern(tmp_path, monkeypatch):
    """Counts directory scans, not seconds: the listing reads each folder once, datasets once per pattern."""
    import os

    folder = write_folder(tmp_path / "data", [f"{i:05d}.png" for i in range(20)] + ["a/1.png", "a/b/2.png"])
    scans, real_scandir = [], os.scandir
    monkeypatch.setattr(os, "scandir", lambda *a: scans.append(a) or real_scandir(*a))
    single_split_files(folder)
    assert len(scans) == 3  # data, data/a, data/a/b
    scans.clear()
    datasets.data_files.get_data_patterns(str(folder))
    assert len(scans) > 20 * 3
