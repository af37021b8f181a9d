"""The installed package is this repository, and its dependencies import together."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_ldm_resolves_to_this_repository():
    import ldm
    import pipelines
    import train

    for module in (ldm, pipelines, train):
        assert Path(module.__file__).resolve().parent.parent == REPO, module.__file__


def test_open_clip_and_torchvision_import_with_torch():
    import open_clip
    import torch
    import torchvision

    model = open_clip.create_model("RN50", pretrained=None)  # builds with torchvision ops present
    assert sum(p.numel() for p in model.parameters()) > 0
    assert torchvision.__version__ and torch.__version__


def test_console_script_help_lists_every_command(capsys):
    import pytest

    from ldm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("data", "train", "sample", "eval", "push", "demo"):
        assert command in out
