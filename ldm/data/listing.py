"""The files of a local imagefolder, listed in one walk instead of datasets' 66.

``datasets.load_dataset("imagefolder", data_dir=D)`` finds its splits by trying ~66 glob patterns
(``train/**``, ``**/*-test-*``, ...), each a full walk of D with a ``stat`` per file: ~8 s for the
demo's 10,000 images on one core, ~2 minutes for 50,000, paid by every process of every stage. When
no relative path under D could match any of those patterns, datasets' answer is always the one
split ``train = **`` (every file that is not hidden, not in a ``__special__`` folder and not one of
its ignored names), so that list is made here in one walk and handed over as ``data_files``. Any
path that might match a split pattern leaves the folder to datasets' own resolution.
"""

from __future__ import annotations

import os
from pathlib import Path

# Substrings of datasets' split keywords (train/training, validation/valid/dev/val, test/testing/
# eval/evaluation), of its sharded split pattern (``-of-``) and of its other default patterns
# (``**/*.eval``, ``task.toml``, ``instruction.md``): a relative path holding none of them, in any
# case, matches none of datasets' split patterns.
SPLIT_HINTS = ("train", "val", "dev", "test", "eval", "-of-", "task.toml", "instruction.md")
IGNORED_NAMES = {"README.md", "config.json", "dataset_info.json", "dataset_infos.json", "dummy_data.zip",
                 "dataset_dict.json"}  # datasets.data_files.FILES_TO_IGNORE


def single_split_files(folder: Path) -> list[str] | None:
    """Every file datasets would put in the ``train`` split of ``folder``, sorted as it sorts them; None
    when a path might name a split (or lies in a ``__special__`` folder): then datasets must decide."""
    folder, files = Path(os.path.abspath(folder)), []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(d.startswith("__") or os.path.islink(os.path.join(root, d)) for d in dirs):
            return None  # special folders and linked folders: datasets' own rules
        for name in names:
            path = Path(root, name)
            relative = path.relative_to(folder).as_posix().lower()
            if any(hint in relative for hint in SPLIT_HINTS):
                return None
            if not name.startswith(".") and name not in IGNORED_NAMES and path.is_file():
                files.append(path.as_posix())
    return sorted(files)
