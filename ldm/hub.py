"""Publishing: an allow-listed release folder with a model card, pushed to the Hugging Face Hub.

The release folder holds only what a user of the model needs — safetensors weights, configs,
tokenizer files, the pipeline's .py, the model card and a sample grid — never optimizer
states, latent caches, logs or unfinished checkpoints. Patterns match one path component each:
``{component}`` is a folder that ``model_index.json`` names, ``*`` never crosses a ``/``.

``model_index.json`` names the class as a plain string, as a training folder does, so the release
loads the same three ways: ``LatentDiffusionPipeline.from_pretrained(repo)`` (this package installed,
no remote code), stock ``StableDiffusionPipeline``, and ``DiffusionPipeline.from_pretrained(repo,
custom_pipeline="pipeline_latent_diffusion", trust_remote_code=True)`` (the shipped .py).

Repo ids and branches are validated (``ldm.locations``) before anything is written. The token is never
handled here: ``huggingface_hub`` reads ``HF_TOKEN`` or the stored login.

No local path of the machine that trained the model is published: in every JSON file of the release
(``training.json``, component configs' ``_name_or_path``, ...) and in the card, a path inside the model
folder becomes relative to it, and any other local path becomes its last component (the folder's name);
Hub ids are kept as they are (``public_paths``).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path, PureWindowsPath

from huggingface_hub import HfApi, ModelCard, ModelCardData

from ldm.checkpoint import atomic_folder
from ldm.errors import UserError
from ldm.locations import LORA_FILE, LocationError, check_repo_id, check_revision, check_writable

logger = logging.getLogger(__name__)
PIPELINE_FILE = "pipeline_latent_diffusion.py"
PIPELINE_CLASS = "LatentDiffusionPipeline"
CARD_TAG = "diffusers-ldm"
ALLOW = ("model_index.json", PIPELINE_FILE, LORA_FILE, "training.json", "samples.png",
         "{component}/config.json", "{component}/*.safetensors", "{component}/*.safetensors.index.json",
         "scheduler/scheduler_config.json", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
         "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
         "open_clip/open_clip_config.json", "open_clip/open_clip_model.safetensors")  # stage-0 CLIP: FD/KID features


def allowed(relative: str, components: frozenset[str] = frozenset()) -> bool:
    """Whether ``relative`` (a/b/c) matches an ALLOW pattern component by component, at the same depth."""
    parts = relative.split("/")
    for pattern in ALLOW:
        wanted = pattern.split("/")
        if len(wanted) == len(parts) and all(
                (part in components) if want == "{component}" else fnmatch.fnmatchcase(part, want)
                for part, want in zip(parts, wanted)):
            return True
    return False


def pipeline_components(model: Path) -> frozenset[str]:
    """The component folders ``model_index.json`` names (plain names only; none for a LoRA folder)."""
    index = model / "model_index.json"
    if not index.exists():
        return frozenset()
    entries = read_json(index)
    return frozenset(k for k, v in entries.items()
                     if isinstance(v, list) and k.isidentifier() and not k.startswith("_"))


class ReleaseError(UserError, ValueError):
    """A file of the model folder cannot go into a release as it is; the message names it."""


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ReleaseError(f"{path} is not readable JSON ({err}); restore it from the training output") from None


def assemble_release(model: str | Path, out: str | Path | None = None, repo_id: str = "your-name/your-model") -> Path:
    """Copy the allow-listed files of ``model`` into ``out`` (default ``<model>-release``) with a card.

    An existing ``out`` is replaced only when it is a release folder this function wrote before.
    """
    model = Path(model).expanduser()
    check_repo_id(repo_id, "--repo-id")
    if not model.is_dir():
        raise FileNotFoundError(f"--model {model}: this folder does not exist (ldm push uploads a local folder)")
    is_pipeline, is_lora = (model / "model_index.json").exists(), (model / LORA_FILE).exists()
    if not (is_pipeline or is_lora):
        hint = f"did you mean {model / 'final'}?" if (model / "final").is_dir() else \
            "push <output_dir>/final of a stage-2 run"
        raise FileNotFoundError(f"{model} is neither a pipeline folder (model_index.json) nor a LoRA folder "
                                f"({LORA_FILE}); {hint}")
    out = Path(out) if out else model.parent / f"{model.name}-release"
    refuse_foreign_folder(out)
    check_writable(out.parent, "the release folder's parent", "copy the model somewhere writable, or push without "
                   "--dry-run (a real push assembles the release in a temporary folder)")
    components = pipeline_components(model)
    files = sorted(p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file())
    with atomic_folder(out) as tmp:
        for rel in (f for f in files if allowed(f, components)):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(model / rel, tmp / rel)
        if is_pipeline:
            ship_pipeline_file(tmp)
        strip_local_paths(tmp, model)
        grid = find_sample_grid(model)
        if grid is not None:
            shutil.copy2(grid, tmp / "samples.png")
        model_card(model, repo_id, has_grid=grid is not None).save(tmp / "README.md")
    skipped = [f for f in files if not allowed(f, components)]
    if skipped:
        logger.info("left out of the release: %s", ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    return out


def refuse_foreign_folder(out: Path) -> None:
    """``out`` may be replaced only if it is absent or an earlier release: allowed files and our card."""
    if not out.exists():
        return
    card = out / "README.md"
    ours = out.is_dir() and card.is_file() and CARD_TAG in card.read_text(errors="replace")
    components = pipeline_components(out) if ours else frozenset()
    foreign = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
               and not allowed(p.relative_to(out).as_posix(), components) and p != card] if ours else []
    if not ours or foreign:
        raise FileExistsError(f"{out} exists and is not a release folder written by `ldm push` "
                              f"({'it holds ' + ', '.join(foreign[:3]) if foreign else 'no diffusers-ldm card'}); "
                              f"move it away (nothing in it is replaced)")


def strip_local_paths(release: Path, model: Path) -> None:
    """Rewrite every JSON file of ``release`` whose strings hold local paths (``public_paths``); the tokenizer's
    vocabulary files are left as they are (their strings are tokens, such as "/", not paths)."""
    for path in sorted(release.rglob("*.json")):
        if path.relative_to(release).as_posix() in TOKEN_FILES:
            continue
        data = read_json(path)
        public = public_paths(data, model)
        if public != data:
            path.write_text(json.dumps(public, indent=2) + "\n")


TOKEN_FILES = ("tokenizer/tokenizer.json", "tokenizer/vocab.json")
WINDOWS_PATH = re.compile(r"^[A-Za-z]:[/\\]|^\\\\[^\s\\]")  # C:\x  \\host\x
WHOLE_PATH = re.compile(r"^(?:~|\.{1,2})?/[^\s/]|" + WINDOWS_PATH.pattern)  # /x ~/x ./x ../x and Windows ones
EMBEDDED_PATH = re.compile(r"(?:^|(?<=[\s(\[=,]))(?:(?:~|\.{1,2})?(?:/[^\s\"'()\[\],;/]+){2,}"  # from /home/me/x
                           r"|[A-Za-z]:[/\\][^\s\"'()\[\],;]+)")  # from C:\Users\me\x


def public_paths(value, model: Path):
    """``value`` (parsed JSON) with every local path in its strings made public (``public_path``): whole strings
    that are paths (even with spaces), and paths inside longer text. Other values are kept as they are."""
    if isinstance(value, dict):
        return {key: public_paths(item, model) for key, item in value.items()}
    if isinstance(value, list):
        return [public_paths(item, model) for item in value]
    if not isinstance(value, str):
        return value
    if WHOLE_PATH.match(value) and "\n" not in value:
        return public_path(value, model)
    return EMBEDDED_PATH.sub(lambda m: public_path(m.group(), model), value)


def public_path(path: str, model: Path) -> str:
    """A local path as a release shows it: relative to the model folder when inside it ("." for the folder
    itself), else its last component (the name of the folder or file, never its location)."""
    if WINDOWS_PATH.match(path):
        return PureWindowsPath(path).name
    local = Path(path).expanduser().resolve()
    try:
        return local.relative_to(model.expanduser().resolve()).as_posix()
    except ValueError:
        return local.name


def ship_pipeline_file(folder: Path) -> None:
    """Ship the pipeline .py and name its class as a plain string in ``model_index.json``.

    A ``[file, class]`` list would make diffusers load the shipped file as remote code for every caller,
    even ``LatentDiffusionPipeline.from_pretrained`` with this package installed.
    """
    index = read_json(folder / "model_index.json")
    name = index.get("_class_name")
    if isinstance(name, list) and name and name[0] == PIPELINE_FILE[:-3]:
        index["_class_name"] = name = name[-1]
    if name == PIPELINE_CLASS and not (folder / PIPELINE_FILE).exists():
        from pipelines import pipeline_latent_diffusion

        shutil.copyfile(pipeline_latent_diffusion.__file__, folder / PIPELINE_FILE)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def find_sample_grid(model: Path) -> Path | None:
    """The newest sample grid beside the model: samples.png in or next to it, or a training grid."""
    for candidate in (model / "samples.png", model.parent / "samples.png"):
        if candidate.is_file():
            return candidate
    steps = {int(m.group(1)): p for p in (model.parent / "samples").glob("step-*.png")
             if (m := re.fullmatch(r"step-(\d+)", p.stem))}
    return steps[max(steps)] if steps else None


def hub_ids(values) -> list[str]:
    """The entries of ``values`` that are Hub ids (valid, and not a folder on this machine)."""
    ids = []
    for value in values:
        try:
            if isinstance(value, str) and not Path(value).expanduser().exists():
                ids.append(check_repo_id(value, "id"))
        except LocationError:
            pass
    return ids


def model_card(model: Path, repo_id: str, has_grid: bool) -> ModelCard:
    """Metadata (library, task, tags, base model, license, datasets) + training summary, metrics, usage.

    Only validated Hub ids reach the card: ``repo_id`` is checked here, and a base model or dataset
    that was a local folder is left out (the snippets then say to load the base model yourself).
    """
    check_repo_id(repo_id, "--repo-id")
    summary = read_json(model / "training.json") if (model / "training.json").exists() else {}
    metrics = {p.stem: read_json(p) for p in sorted((model / "metrics").glob("*.json"))}
    is_lora = (model / LORA_FILE).exists()
    base_model = next(iter(hub_ids([summary.get("base_model")])), None)  # before paths are cut to their names
    data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-image", license="apache-2.0",
                         tags=["text-to-image", "latent-diffusion", CARD_TAG] + (["lora"] if is_lora else []),
                         base_model=base_model, datasets=hub_ids(summary.get("datasets") or []) or None)
    return ModelCard.from_template(data, template_str=CARD_TEMPLATE, repo_id=repo_id, is_lora=is_lora,
                                   has_grid=has_grid, summary_rows=_summary_rows(public_paths(summary, model)),
                                   metric_rows=_metric_rows(public_paths(metrics, model)), base_model=base_model)


def _summary_rows(summary: dict) -> list[tuple[str, str]]:
    rows = []
    for stage in summary.get("stages", []):
        scalars = {k: v for k, v in stage.items() if k != "stage" and not isinstance(v, (list, dict))}
        if stage.get("val_loss"):  # the history of the held-out validation loss: its last value
            scalars["final val_loss"] = stage["val_loss"][-1].get("val_loss")
        rows.append((stage.get("stage", "?"), ", ".join(f"{k}: {v}" for k, v in scalars.items())))
    return rows


def _metric_rows(metrics: dict) -> list[tuple[str, str]]:
    rows = []
    for kind, values in metrics.items():
        for key, value in (values.items() if isinstance(values, dict) else ()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append((f"{kind} / {key}", f"{value:.4g}"))
            elif key == "features" and isinstance(value, str):  # the feature space of FD, KID and CLIP score
                rows.append((f"{kind} / feature space", value))
    return rows


def push(model: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         dry_run: bool = False, commit_message: str | None = None) -> str:
    """``ldm push``: assemble the release folder and upload it (create_repo + upload_folder).

    ``--dry-run`` leaves the release folder at ``<model>-release`` and lists it; a real push builds it in
    a temporary folder that is removed afterwards, so it writes nothing beside the model.
    """
    check_repo_id(repo_id, "--repo-id")
    if revision is not None:
        check_revision(revision, "--revision")
    if dry_run:
        release = assemble_release(model, repo_id=repo_id)
        files = sorted(p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file())
        return "\n".join([f"would upload to {repo_id}" + (f" (branch {revision})" if revision else "") + ":",
                          *[f"  {f}" for f in files], str(release)])
    with tempfile.TemporaryDirectory(prefix="ldm-release-") as tmp:
        release = assemble_release(model, Path(tmp) / "release", repo_id=repo_id)
        files = sorted(p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file())
        api = HfApi()
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(release), revision=revision, repo_type="model",
                          commit_message=commit_message or f"Upload {Path(model).name} with diffusers-ldm")
    logger.info("pushed %d files to %s", len(files), repo_id)
    return str(url)


CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ repo_id }}

A text-to-image latent diffusion {{ "LoRA" if is_lora else "pipeline" }} trained with
[diffusers-ldm](https://github.com/) (KL-VAE, CLIP text encoder, text-conditioned latent U-Net).
{% if has_grid %}
## Samples

![samples](samples.png)
{% endif %}
## Use with diffusers
{% if is_lora %}
{% if not base_model %}
It was trained on a base pipeline that is not on the Hub: load that pipeline in place of `BASE` below.
{% endif %}
```python
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained({{ '"%s"' % base_model if base_model else 'BASE' }})
pipe.load_lora_weights("{{ repo_id }}", revision="<commit sha>")
image = pipe("a prompt", num_inference_steps=25, guidance_scale=5.0).images[0]
```
{% else %}
With `pip install diffusers-ldm` no remote code runs:

```python
from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline

pipe = LatentDiffusionPipeline.from_pretrained("{{ repo_id }}", revision="<commit sha>")
image = pipe("a prompt", num_inference_steps=25, guidance_scale=5.0).images[0]
```

The components are standard, so stock `StableDiffusionPipeline.from_pretrained("{{ repo_id }}")` loads it
too. Without this package, run the pipeline file shipped here:

```python
from diffusers import DiffusionPipeline

# trust_remote_code runs pipeline_latent_diffusion.py from this repository: read it first, and pin
# `revision` to the commit you read so that later pushes cannot change the code you run.
pipe = DiffusionPipeline.from_pretrained("{{ repo_id }}", custom_pipeline="pipeline_latent_diffusion",
                                         trust_remote_code=True, revision="<commit sha>")
```
{% endif %}
## Training
{% if summary_rows %}
| stage | summary |
|---|---|
{% for stage, text in summary_rows %}| {{ stage }} | {{ text }} |
{% endfor %}{% else %}
No training summary was recorded.
{% endif %}
## Evaluation
{% if metric_rows %}
| metric | value |
|---|---|
{% for name, value in metric_rows %}| {{ name }} | {{ value }} |
{% endfor %}{% else %}
No metrics were recorded (run `ldm eval pipeline --model <folder> --data <held-out data>`).
{% endif %}
"""
