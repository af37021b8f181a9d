"""Every argument of every ``ldm`` command, and ``python -m train.<stage>``, through bad values (issue 22).

Each case must exit with status 2 and one ``error:`` line (the last line of stderr) that names the argument
and what it allows, print no traceback, create nothing and change no file of the user's (hashed before and
after). Every case fails before any work: the whole file trains nothing and generates no image.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ldm.cli import main as cli

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# The table: (command, argument, kind of value); each kind lists bad values and what the message allows
# --------------------------------------------------------------------------------------------
KINDS = {
    "count": (["0", "-1", "nan", "1.5", "inf", "two"], "whole number >= 1"),
    "seed": (["-1", "nan", str(2**63), "1e3"], "whole number in [0, 9223372036854775807]"),
    "guidance": (["nan", "inf", "-inf", "-0.5", "five"], "finite number >= 0"),
    "sigma_rel": (["0", "-0.1", "nan", "0.3", "inf"], "finite number in (0, 0.288675)"),
    "heldout": (["0", "-0.1", "nan", "1.5", "inf"], "fraction in (0, 1) or a whole count >= 1"),
    "eval_images": (["0", "3", "-4", "nan"], "whole number >= 4"),
    "num_images": (["0", "1025", "nan"], "whole number in [1, 1024]"),
    "text": ([""], "must not be empty"),
    "override": (["max_steps", "=1", "train..max_steps=1"], "must look like key.sub=value"),
}
SAMPLE = "sample --model {pipe} --prompt p --out {new}/s.png"
EVAL = "eval {kind} --model {pipe} --data {data} --out {new}/m.json"
EMA = "ema --model {run}"
TRAIN_ALL = "train all --data {data} --out {new}"
ARGUMENTS = [
    ("data shapes --out {new}", "--num", "count"), ("data shapes --out {new}", "--size", "count"),
    ("data shapes --out {new}", "--seed", "seed"), ("data digits --out {new}", "--num", "count"),
    ("data textures --out {new}", "--num", "count"), ("data textures --out {new}", "--seed", "seed"),
    ("train vae --config {config}", "--set", "override"), ("cache build --config {config}", "--set", "override"),
    ("cache verify", "--dir", "text"),
    (SAMPLE, "--num-images", "num_images"), (SAMPLE, "--steps", "count"), (SAMPLE, "--guidance", "guidance"),
    (SAMPLE, "--seed", "seed"),
    *[(EVAL.format(kind=kind, pipe="{pipe}", data="{data}", new="{new}"), arg, value_kind)
      for kind in ("vae", "text-encoder", "pipeline")
      for arg, value_kind in (("--num", "count"), ("--resolution", "count"), ("--batch-size", "count"),
                              ("--seed", "seed"), ("--steps", "count"), ("--guidance", "guidance"),
                              ("--split", "text"), ("--image-column", "text"), ("--caption-column", "text"))],
    ("push --repo-id a/b --dry-run", "--model", "text"), ("push --model {pipe} --dry-run", "--repo-id", "text"),
    ("demo --out {new}", "--seed", "seed"),
    (EMA, "--sigma-rel", "sigma_rel"), (EMA, "--sweep", "sigma_rel"), (EMA + " --sweep 0.05", "--num", "count"),
    (TRAIN_ALL, "--heldout", "heldout"), (TRAIN_ALL, "--seed", "seed"), (TRAIN_ALL, "--eval-images", "eval_images"),
    (TRAIN_ALL, "--set", "override"), (TRAIN_ALL, "--caption-column", "text"), (TRAIN_ALL, "--image-column", "text"),
    ("train all --out {new}", "--data", "text"), ("train all --data {data}", "--out", "text"),
]
NUMBER_CASES = [(f"{command} {argument}='{bad}'", argument, allowed)  # --x=-inf: a value, not an option
                for command, argument, kind in ARGUMENTS for bad in KINDS[kind][0] for allowed in [KINDS[kind][1]]]
CHOICES = [("data pictures --out {new}", "dataset", "choose from 'shapes', 'digits'"),
           (SAMPLE + " --scheduler lms", "--scheduler", "choose from 'ddim', 'ddpm', 'euler', 'dpm++', 'unipc'"),
           (EVAL.format(kind="pipeline", pipe="{pipe}", data="{data}", new="{new}") + " --scheduler lms", "--scheduler",
            "choose from"),
           ("eval unet --model {pipe} --data {data}", "kind", "choose from 'vae', 'text-encoder', 'pipeline'"),
           (TRAIN_ALL + " --preset tpu", "--preset", "choose from 'cpu', 'gpu-256', 'gpu-512'"),
           (TRAIN_ALL + " --clip ViT-B-32:{new}/weights.safetensors", "--clip", "does not exist"),
           (TRAIN_ALL + " --clip :weights", "--clip", "MODEL_NAME:PRETRAINED_PATH"),
           (TRAIN_ALL + " --clip {new}/clip", "--clip", "not an open_clip folder"),
           (EVAL.format(kind="pipeline", pipe="{pipe}", data="{data}", new="{new}") + " --clip local-dir:{user}",
            "--clip", "no open_clip_config.json"),
           *[(f"train {stage} --config {{config}} --resume {{new}}/checkpoint-4", "--resume",
              "latest, never or an existing") for stage in ("vae", "text-encoder", "unet")]]

# Values that pass their type but not the command, the data, a path rule or the model: `error: <message>`
CHECKS = [
    ("data shapes --out {new} --size 8", "--size 8", "16 to 2048"),
    ("data digits --out {new} --size 4", "--size 4", "8 to 2048"),
    ("data digits --out {new} --num 1798", "--num 1798", "1 to 1797"),
    ("data shapes --out {user} --num 2", "--out", "not empty"),
    ("data shapes --out {file}/data", "--out", "is a file, not a folder"),
    (SAMPLE + " --steps 1000", "--steps 1000", "choose 1 to 999"),  # the saved DDPM sampler, 'leading' spacing
    (SAMPLE + " --steps 999 --scheduler dpm++", "--steps 999", "choose 1 to 998"),  # was a blank image
    ("sample --model {pipe} --prompt p --out {pipe}/grid.png", "--out", "inside --model"),
    ("sample --model {pipe} --prompt p --out {user}", "--out", "must be an image file name"),
    ("sample --model {new}/model --prompt p --out {new}/s.png", "--model", "does not exist"),
    ("eval vae --model {user} --data {data} --out {new}/m.json", "--model", "is not a vae folder"),
    ("eval text-encoder --model {pipe} --data {data} --num 1", "--num 1", "at least 2"),
    ("eval pipeline --model {pipe} --data {data} --num 3", "--num 3", "at least 4"),
    ("eval vae --model {pipe} --data {data} --out {data}/m.json", "--out", "inside --data"),
    ("eval vae --model {pipe} --data {data} --out {new}/m.json --resolution 18", "--resolution 18",
     "multiple of the VAE's downsampling factor 4"),
    ("eval text-encoder --model {stage0} --data {data} --out {new}/m.json --resolution 48", "--resolution 48",
     "takes 32-pixel images"),
    ("eval pipeline --model {pipe} --data {data} --out {new}/m.json --resolution 32", "--resolution 32",
     "the pipeline's own size"),
    ("eval vae --model {pipe} --data {data} --out {new}/m.txt", "--out", "ending in .json"),
    ("eval vae --model {pipe} --data {new}/data --out {new}/m.json", "--data", "does not exist"),
    ("eval vae --model someone/vae --data {data}", "--model", "pass --out"),
    (EVAL.format(kind="pipeline", pipe="{pipe}", data="{data}", new="{new}") + " --steps 5000", "--steps 5000",
     "choose 1 to 998"),  # eval's default sampler is dpm++
    (EMA, "ldm ema", "needs --sigma-rel"),
    (EMA + " --sigma-rel 0.07 --out {user}", "--out", "did not write"),  # issue item 1: the folder was replaced
    (EMA + " --sigma-rel 0.07 --out {run}/final", "--out", "is the run's final/"),
    (EMA + " --sigma-rel 0.07 --out {run}/ema-snapshots/ema", "--out", "is inside the run's ema-snapshots/"),
    (EMA + " --sigma-rel 0.07 --out {run}", "--out", "holds the run's final/"),
    (EMA + " --sweep 0.05 --out {new}", "--out", "used with --sigma-rel only"),
    (EMA + " --sigma-rel 0.07 --num 5", "--num 5", "used with --sweep only"),
    (EMA + " --sigma-rel 0.07 --data {data}", "--data", "used with --sweep only"),
    ("ema --model {user} --sigma-rel 0.07", "--model", "final/unet not found"),
    ("ema --model {new}/run --sigma-rel 0.07", "--model", "does not exist"),
    ("ema --model {unsnapped} --sigma-rel 0.07", "--model", "no EMA snapshots"),
    (TRAIN_ALL.replace("{new}", "{user}"), "--out", "did not write (data, metrics.json, pipeline)"),
    ("train all --data {data} --out {data}/run", "--out", "inside --data"),
    ("train all --data {user}/data --out {user}", "--out", "holds --data"),
    (TRAIN_ALL + " --data {new}/data", "--data", "does not exist"),
    (TRAIN_ALL + " --text-encoder {new}/clip", "--text-encoder", "does not exist"),
    (TRAIN_ALL + " --text-encoder {pipe}/vae", "--text-encoder", "not a text encoder folder"),
    (TRAIN_ALL + " --set vae.train.max_steps=0", "train.max_steps", ">= 1"),
    (TRAIN_ALL + " --set vea.train.max_steps=1", "--set", "<stage>.key=value"),
    ("demo --out {user}", "--out", "did not write (data, metrics.json, pipeline)"),
    ("demo --out {file}", "--out", "is a file"),
    ("cache verify --dir {new}/cache", "--dir", "does not exist"),
    ("cache build --config {new}/unet.yaml", "config file", "does not exist"),
    *[(f"train {stage} --config {{new}}/stage.yaml", "config file", "does not exist")
      for stage in ("vae", "text-encoder", "unet")],
    ("train vae --config {user}", "config file", "is a folder"),
    ("train vae --config {config} --set train.max_steps=-1", "train.max_steps", ">= 1"),
    ("train vae --config {config} --set data.path={new}/data", "data.path", "does not exist"),
    ("train vae --config {config} --set output_dir={user}", "output_dir", "holds final/, which no stage wrote there"),
    ("train text-encoder --config {config} --set data.path={new}/data", "data.path", "does not exist"),
    ("train unet --config {config}", "vae", "is not set"),
    ("train unet --config {config} --set vae={new}/vae --set text_encoder={pipe}", "vae", "does not exist"),
    ("train unet --config {config} --set pretrained={user}", "pretrained", "not a pipeline folder"),
    ("train unet --config {config} --set pretrained={pipe} --set data.resolution=18", "data.resolution 18",
     "multiple of the downsampling factor 4"),
    ("cache build --config {config} --set vae={pipe}/vae --set text_encoder={pipe} --set data.resolution=18",
     "data.resolution 18", "multiple of the downsampling factor 4"),
    ("train unet --config {config} --set vae={pipe}/vae --set text_encoder={pipe} --set validation.data={new}/held",
     "validation.data", "does not exist"),
    ("train unet --config {config} --set lora.rank=4 --set vae={pipe}/vae --set text_encoder={pipe}", "lora.rank",
     "set `pretrained`"),
    ("push --model {new}/model --repo-id a/b --dry-run", "--model", "does not exist"),
    ("push --model {pipe} --repo-id 'a b' --dry-run", "--repo-id", "not a valid Hub repo id"),
]


# --------------------------------------------------------------------------------------------
# Fixtures: the user's files, a model, data, a stage-2 run with snapshots, a config
# --------------------------------------------------------------------------------------------
def digest(folder: Path, contents: bool = True) -> str:
    """sha256 over every path, mode and file content under ``folder`` (``contents=False``: size and mtime instead,
    for the shared model and data folders, which are large enough to make hashing them per case slow)."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        stat = path.stat()
        h.update(f"{path.relative_to(folder).as_posix()} {stat.st_mode}".encode())
        if path.is_file():
            h.update(path.read_bytes() if contents else f"{stat.st_size} {stat.st_mtime_ns}".encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def stage0(tmp_path_factory):
    """A stage-0 folder with only its tiny open_clip model (32 px images, patch 8): what the checks read first."""
    from ldm.config import CLIPModelConfig
    from ldm.models.text import build_open_clip, open_clip_config, save_open_clip

    cfg = open_clip_config(CLIPModelConfig(embed_dim=16, vision_layers=1, vision_width=32, vision_heads=2,
                                           vision_patch_size=8, text_context_length=16, text_width=32, text_heads=2,
                                           text_layers=1), 32)
    folder = tmp_path_factory.mktemp("stage0")
    save_open_clip(folder / "open_clip", build_open_clip(cfg), cfg)
    return folder


@pytest.fixture
def places(tmp_path, tiny_pipeline_dir, shapes16, stage0):
    user = tmp_path / "user"  # someone's folder: their own data/, final/, pipeline/, metrics.json among other files
    for name, content in (("notes.txt", "mine"), ("metrics.json", "{}"), ("pipeline/weights.bin", "w"),
                          ("final/w", "w"), ("data/metadata.jsonl", ""), ("data/photo.png", "p")):
        (user / name).parent.mkdir(parents=True, exist_ok=True)
        (user / name).write_text(content)
    run = tmp_path / "run"  # a stage-2 output_dir as `ldm ema` reads it (only the layout is looked at)
    (run / "final" / "unet").mkdir(parents=True)
    (run / "final" / "model_index.json").write_text("{}")
    (run / "ema-snapshots").mkdir()
    (run / "ema-snapshots" / "step-4-sigma-0.050.safetensors").write_bytes(b"x")
    unsnapped = tmp_path / "unsnapped"
    (unsnapped / "final" / "unet").mkdir(parents=True)
    config = tmp_path / "stage.yaml"
    config.write_text(f"output_dir: {tmp_path / 'new' / 'out'}\ndata:\n  path: {shapes16}\n  resolution: 16\n")
    (tmp_path / "file").write_text("a file")
    return {"user": user, "run": run, "unsnapped": unsnapped, "config": config, "file": tmp_path / "file",
            "pipe": tiny_pipeline_dir, "data": shapes16, "stage0": stage0, "new": tmp_path / "new"}


def argv_of(command: str, places: dict) -> list[str]:
    import shlex

    return shlex.split(command.format(**{k: str(v) for k, v in places.items()}))


def assert_refused(run, places, argument: str, allowed: str) -> str:
    """Run ``run()``; it must exit 2 with one error line naming ``argument`` and ``allowed``, touching nothing."""
    watched = [(p, k not in ("pipe", "data", "stage0")) for k, p in places.items() if k not in ("new", "config", "file")]
    before = [digest(*w) for w in watched] + [places["config"].read_bytes(), places["file"].read_bytes()]
    code, err = run()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert "Traceback" not in err and lines, err
    assert [line for line in lines if "error:" in line] == [lines[-1]], err
    assert argument in lines[-1] and allowed in lines[-1], lines[-1]
    assert [digest(*w) for w in watched] + [places["config"].read_bytes(), places["file"].read_bytes()] == before
    assert not places["new"].exists(), sorted(places["new"].rglob("*"))  # nothing was created
    return lines[-1]


def in_process(argv, capsys, entry=cli):
    def run():
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            entry(argv)
        return exit_info.value.code, capsys.readouterr().err
    return run


# --------------------------------------------------------------------------------------------
# The walk
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command, argument, allowed", NUMBER_CASES + CHOICES,
                         ids=[c[0].split(" {")[0] + f" {c[1]}={c[0].split()[-1]}" for c in NUMBER_CASES + CHOICES])
def test_bad_values_stop_the_parse(places, capsys, command, argument, allowed):
    line = assert_refused(in_process(argv_of(command, places), capsys), places, argument, allowed)
    assert line.startswith(f"ldm {command.split()[0]}") and ": error: " in line


@pytest.mark.parametrize("command, argument, allowed", CHECKS, ids=[" ".join(c[:2]) for c in CHECKS])
def test_bad_input_is_one_line_before_any_work(places, capsys, command, argument, allowed):
    line = assert_refused(in_process(argv_of(command, places), capsys), places, argument, allowed)
    assert line.startswith("error: ")


def command_of(case: str) -> str:
    words = case.split()
    return " ".join(words[:2]) if words[0] in ("train", "cache") else words[0]


def subcommands(parser, prefix=""):
    """(name, parser) of every leaf command: "data", "train vae", "cache build", ..."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    yield from subcommands(sub, f"{name} ")
                else:
                    yield prefix + name, sub


def test_every_argument_of_every_command_is_in_the_table():
    """A new option must join the tables above: each one that takes a value is walked through bad values."""
    from ldm.cli import build_parser

    walked = {(command_of(c), a) for c, a, _ in ARGUMENTS + CHOICES + CHECKS}
    walked |= {(command_of(c), "--config") for c, a, _ in CHECKS if a == "config file"}
    walked |= {(command_of(c), "--set") for c, a, _ in CHECKS if "." in a or a in ("vae", "pretrained")}
    free_text = {"--prompt", "--negative-prompt", "--revision"}  # any text; --revision: tests/test_bad_input.py
    options = [(name, action.option_strings[0]) for name, sub in subcommands(build_parser()) for action in sub._actions
               if action.option_strings and action.nargs != 0 and action.option_strings[0] != "-h"]
    assert len(options) > 50 and len({name for name, _ in options}) == 12
    assert [o for o in options if o[1] not in free_text and o not in walked] == []


# --------------------------------------------------------------------------------------------
# python -m train.<stage>: input errors that are not config errors are one line too, before any work
# --------------------------------------------------------------------------------------------
STAGE_CASES = [
    ("train.vae", "vae", "--config {config} --set data.path={new}/data", "data.path", "does not exist"),
    ("train.vae", "vae", "--config {config} --set train.batch_size=0", "train.batch_size", ">= 1"),
    ("train.text_encoder", "text_encoder", "--config {config} --set data.path=./missing", "data.path",
     "does not exist"),
    ("train.unet", "unet", "--config {config} --set vae={new}/vae --set text_encoder={pipe}", "vae",
     "does not exist"),
    ("train.cache", "unet", "--config {config} --set vae={pipe} --set text_encoder={pipe}", "vae",
     "is not a VAE folder"),
    ("train.unet", "unet", "--config {config} --resume {new}/checkpoint-2", "--resume", "latest, never"),
]


@pytest.mark.parametrize("module, stage, command, argument, allowed", STAGE_CASES,
                         ids=[f"{c[0]} {c[3]}" for c in STAGE_CASES])
def test_stage_entry_input_errors(places, capsys, module, stage, command, argument, allowed):
    import importlib

    from ldm.entry import stage_entry

    main = importlib.import_module(module).main
    entry = (lambda argv: stage_entry(stage, main, argv))
    assert_refused(in_process(argv_of(command, places), capsys, entry), places, argument, allowed)


# --------------------------------------------------------------------------------------------
# From a terminal: no traceback reaches it (the entry points as a user runs them)
# --------------------------------------------------------------------------------------------
TERMINAL = [
    (["-m", "ldm.cli"], SAMPLE + " --steps 0", "--steps", "whole number >= 1"),
    (["-m", "ldm.cli"], "train all --data {nometa} --out {new}", "caption column 'text' not in", "metadata.jsonl"),
    (["-m", "train.vae"], "--config {config} --set data.path={new}/data", "data.path", "does not exist"),
]


@pytest.mark.parametrize("entry, command, argument, allowed", TERMINAL, ids=[" ".join(t[0]) for t in TERMINAL])
def test_no_traceback_reaches_the_terminal(places, entry, command, argument, allowed):
    from PIL import Image

    nometa = places["new"].parent / "nometa"  # issue item 5: images without metadata.jsonl
    nometa.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(nometa / f"{i}.png")
    places = places | {"nometa": nometa}

    def run():
        env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        done = subprocess.run([sys.executable, *entry, *argv_of(command, places)], capture_output=True, text=True,
                              cwd=REPO, env=env, timeout=300)
        return done.returncode, done.stderr
    assert_refused(run, places, argument, allowed)


# --------------------------------------------------------------------------------------------
# The model's limits, found by asking the sampler; the pipeline refuses them too
# --------------------------------------------------------------------------------------------
def test_step_ranges_come_from_the_sampler():
    from ldm.arguments import ArgumentValueError
    from ldm.config import DiffusionConfig
    from ldm.models.unet import build_noise_scheduler
    from ldm.sampling import check_steps, make_scheduler, steps_problem

    leading = build_noise_scheduler(DiffusionConfig(), learned_variance=False)  # T = 1000, steps_offset 1
    assert steps_problem(leading, 999) is None and "outside the schedule's 0 to 999" in steps_problem(leading, 1000)
    dpm = make_scheduler("dpm++", leading.config)
    assert steps_problem(dpm, 998) is None and "timestep 1000" in steps_problem(dpm, 999)
    for n in (1, 2, 25, 500):
        check_steps(dpm, n)
    trailing = build_noise_scheduler(DiffusionConfig(zero_terminal_snr=True, prediction_type="v_prediction"), False)
    assert steps_problem(trailing, 1000) is None and steps_problem(trailing, 60) is None
    with pytest.raises(ArgumentValueError, match=r"--steps 61: .*'trailing' spacing.* exactly 61 steps \(it made "
                                                 r"timestep -1, outside the schedule's 0 to 999\); choose 60 or 62"):
        check_steps(trailing, 61)
    with pytest.raises(ArgumentValueError, match=r"--steps 1001: .*choose 1 to 1000"):
        check_steps(trailing, 1001)


def test_the_pipeline_refuses_a_schedule_it_cannot_sample(tiny_pipeline_dir):
    import torch

    from ldm.sampling import load_pipeline

    pipe = load_pipeline(tiny_pipeline_dir, scheduler="dpm++", device="cpu")
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match=r"DPMSolverMultistepScheduler cannot sample .*=999.*timestep 1000"):
        pipe("a red circle", num_inference_steps=999, generator=torch.Generator().manual_seed(0))
    assert calls == []  # refused before the first denoising step (it used to return a blank image)


def test_ema_replaces_only_its_own_folder(places, capsys):
    """`ldm ema` rewrites a folder an earlier `ldm ema` wrote; the check runs again inside the library call."""
    from ldm.ema import check_posthoc_args, write_posthoc_pipeline

    own = places["run"] / "posthoc-ema-0.070"
    assert check_posthoc_args(places["run"], 0.07) == own  # the default, new
    own.mkdir()
    (own / "model_index.json").write_text("{}")
    (own / "training.json").write_text(json.dumps({"posthoc_ema": {"sigma_rel": 0.07}}))
    assert check_posthoc_args(places["run"], 0.07) == own  # an earlier output: replaced when written
    (own / "training.json").write_text(json.dumps({"stages": []}))  # a pipeline someone copied there
    with pytest.raises(FileExistsError, match="did not write"):
        write_posthoc_pipeline(places["run"], 0.07)
    assert json.loads((own / "training.json").read_text()) == {"stages": []}
