"""Where models and data live: a local path or a Hugging Face Hub id, checked one way for every argument.

``--model``, ``data.path``, ``pretrained``, ``vae``, ``text_encoder`` and ``--repo-id`` each name either
something on this machine or something on the Hub. An existing path is local. A missing path that can
only be a path (absolute, ``./``, ``~``, or more than one ``/``) is an error that says it does not exist;
anything else must be a valid Hub id (``huggingface_hub``'s own rules), or the error says it is neither.

    location = local_or_hub("runs/unet/final", "--model")   # Path("runs/unet/final") or the Hub id
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from ldm.errors import UserError

# git's rules for branch names (git check-ref-format), which the Hub applies to revisions
_BAD_REVISION = re.compile(r"^[-/.]|\.\.|//|@\{|[\x00-\x20\x7f~^:?*\[\\]|/\.|\.lock$|\.lock/|[/.]$|^@$")
LORA_FILE = "pytorch_lora_weights.safetensors"  # a LoRA folder: these adapter weights + training.json (base model)


class LocationError(UserError, ValueError):
    """A path or Hub id argument is wrong; the message names the argument and what to do."""


def check_repo_id(value: str, key: str) -> str:
    """``value`` if it is a valid Hub repo id (``name`` or ``owner/name``), else a ``LocationError``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as err:
        raise LocationError(f"{key} {value!r} is not a valid Hub repo id: {err}") from None
    return value


def check_revision(value: str, key: str) -> str:
    """``value`` if it is a valid branch name for the Hub (git ref rules), else a ``LocationError``."""
    if not value or len(value) > 255 or _BAD_REVISION.search(value):
        raise LocationError(f"{key} {value!r} is not a valid branch name: use letters, digits, '-', '_', '.' "
                            f"and '/' (no spaces, '..', '~', '^', ':', '?', '*', '[', '\\', no leading '-' or '.')")
    return value


def must_be_local(value: str) -> bool:
    """True when ``value`` cannot be a Hub id: absolute, ``.``/``~`` relative, or more than one ``/``."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or "\\" in value or ":" in value


def local_or_hub(value: str, key: str, what: str = "folder") -> Path | str:
    """An existing local ``Path``, or ``value`` as a valid Hub id; otherwise an error naming ``key``."""
    path = Path(value).expanduser()
    if path.exists():
        return path
    if must_be_local(value):
        where = "" if path.is_absolute() else f" (relative to the current folder {Path.cwd()})"
        raise FileNotFoundError(f"{key} {value}: this {what} does not exist{where}")
    try:
        return check_repo_id(value, key)
    except LocationError:
        raise LocationError(f"{key} {value!r} is neither an existing {what} (looked in {Path.cwd()}) nor a valid "
                            f"Hub id (owner/name)") from None


def not_found_here_or_on_hub(value: str, key: str, err: BaseException, what: str = "folder") -> LocationError:
    """The error for a Hub-id-shaped ``value`` that is no local path and could not be loaded from the Hub."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return LocationError(f"{key} {value!r} is not a {what} here (looked in {Path.cwd()}), and loading it as a "
                         f"Hub id failed: {reason[:300]}")


def check_empty_or_new(folder: str | Path, key: str) -> Path:
    """``folder`` for a command that writes a new dataset: absent or empty, never someone's files."""
    path = Path(folder).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{key} {folder} already exists and is not empty; choose a new folder (nothing in it "
                              f"was changed)")
    return path


def check_writable(folder: str | Path, key: str, fix: str = "choose another one") -> Path:
    """``folder``, created if needed, after proving a file can be written in it (before any slow work)."""
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".ldm-write-test-"):
            pass
    except OSError as err:
        raise LocationError(f"{key} {folder} is not a folder this process can write to ({err.strerror or err}); "
                            f"{fix}") from None
    return path


def check_can_create(path: str | Path, key: str) -> Path:
    """``path`` (a file or folder a command will write) is not under a file and its nearest existing folder is
    writable; nothing is created, so a later refusal leaves no trace."""
    path = Path(path).expanduser()
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{key} {path}: {parent} is a file, not a folder; choose another path")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".ldm-write-test-"):
            pass
    except OSError as err:
        raise LocationError(f"{key} {path}: {parent} is not a folder this process can write to "
                            f"({err.strerror or err}); choose another path") from None
    return path


def check_ours_or_new(folder: str | Path, key: str, ours, writes: tuple[str, ...] | None, what: str) -> Path:
    """``folder`` for a command that (re)writes ``writes`` in it (None: the whole folder): absent, empty, holding
    none of those names, or written by this command before (``ours(folder)``); never someone else's files."""
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{key} {folder} is a file; it must be a folder (choose another path)")
    if path.is_dir() and not ours(path):
        taken = sorted(p.name for p in path.iterdir() if writes is None or p.name in writes)
        if taken:
            shown = ", ".join(taken[:5]) + (" ..." if len(taken) > 5 else "")
            raise FileExistsError(f"{key} {folder} already holds files that {what} did not write ({shown}); choose a "
                                  f"new or empty folder, or move them away (nothing in it was changed)")
    return check_can_create(path, key)


def check_apart(path: str | Path, key: str, other: str | Path | None, other_key: str) -> None:
    """Neither of two local paths lies inside the other (an output inside an input, or the reverse)."""
    if other is None or not Path(other).expanduser().exists():
        return  # a Hub id, or a path whose absence is reported where it is read
    a, b = Path(path).expanduser().resolve(), Path(other).expanduser().resolve()
    if a.is_relative_to(b) or b.is_relative_to(a):
        where = "is" if a == b else "is inside" if a.is_relative_to(b) else "holds"
        raise LocationError(f"{key} {path} {where} {other_key} {other}: {other_key} is only read, so keep "
                            f"{key} outside it and it outside {key}")


def model_location(value: str, key: str, marker: str | None, what: str) -> Path | str:
    """``local_or_hub``, and a local folder must hold ``marker`` (e.g. model_index.json): when it does not,
    the error says what the folder lacks and, for a stage's output_dir, points at its ``final/``."""
    location = local_or_hub(value, key)
    if isinstance(location, Path) and marker and not (location / marker).is_file():
        hint = (f"; did you mean {location / 'final'}?" if (location / "final" / marker).is_file() else
                f"; pass the {what} folder a stage saved (<output_dir>/final)")
        raise FileNotFoundError(f"{key} {value} is not a {what} folder (no {marker}){hint}")
    return location
