"""Publishing: an allow-listed release folder with a model card, pushed to the Hugging Face Hub.

The release folder holds only what a user of the model needs — safetensors weights, configs,
tokenizer files, the pipeline's .py, the model card and a sample grid — never optimizer
states, latent caches, logs or unfinished checkpoints. Its ``model_index.json`` names the
pipeline file, so ``DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)`` works.

The token is never handled here: ``huggingface_hub`` reads ``HF_TOKEN`` or the stored login.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData

from ldm.checkpoint import atomic_folder

logger = logging.getLogger(__name__)
PIPELINE_FILE = "pipeline_latent_diffusion.py"
LORA_FILE = "pytorch_lora_weights.safetensors"
ALLOW = ("model_index.json", PIPELINE_FILE, LORA_FILE, "training.json", "README.md", "samples.png",
         "*/config.json", "*/*.safetensors", "*/*.safetensors.index.json", "scheduler/scheduler_config.json",
         "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
         "tokenizer/merges.txt", "tokenizer/special_tokens_map.json")


def allowed(relative: str) -> bool:
    return any(fnmatch.fnmatchcase(relative, pattern) for pattern in ALLOW)


def assemble_release(model: str | Path, out: str | Path | None = None, repo_id: str = "your-name/your-model") -> Path:
    """Copy the allow-listed files of ``model`` into ``out`` (default ``<model>-release``) with a card."""
    model = Path(model)
    is_pipeline, is_lora = (model / "model_index.json").exists(), (model / LORA_FILE).exists()
    if not (is_pipeline or is_lora):
        raise FileNotFoundError(f"{model} is neither a pipeline folder (model_index.json) nor a LoRA folder "
                                f"({LORA_FILE}); push <output_dir>/final of a stage-2 run")
    out = Path(out) if out else model.parent / f"{model.name}-release"
    with atomic_folder(out) as tmp:
        for path in sorted(p for p in model.rglob("*") if p.is_file()):
            rel = path.relative_to(model).as_posix()
            if allowed(rel) and rel != "README.md":
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, tmp / rel)
        if is_pipeline:
            point_index_at_pipeline_file(tmp)
        grid = find_sample_grid(model)
        if grid is not None:
            shutil.copy2(grid, tmp / "samples.png")
        model_card(model, repo_id, has_grid=grid is not None).save(tmp / "README.md")
    skipped = sorted(p.relative_to(model).as_posix() for p in model.rglob("*")
                     if p.is_file() and not allowed(p.relative_to(model).as_posix()))
    if skipped:
        logger.info("left out of the release: %s", ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    return out


def point_index_at_pipeline_file(folder: Path) -> None:
    """Make ``model_index.json`` name the shipped .py, so DiffusionPipeline loads it (trust_remote_code)."""
    if not (folder / PIPELINE_FILE).exists():
        from pipelines import pipeline_latent_diffusion

        shutil.copyfile(pipeline_latent_diffusion.__file__, folder / PIPELINE_FILE)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = [PIPELINE_FILE[:-3], "LatentDiffusionPipeline"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def find_sample_grid(model: Path) -> Path | None:
    """The newest sample grid beside the model: samples.png in or next to it, or a training grid."""
    for candidate in (model / "samples.png", model.parent / "samples.png"):
        if candidate.exists():
            return candidate
    grids = sorted((model.parent / "samples").glob("step-*.png"), key=lambda p: int(p.stem.split("-")[1]))
    return grids[-1] if grids else None


def model_card(model: Path, repo_id: str, has_grid: bool) -> ModelCard:
    """Metadata (library, task, tags, base model, license, datasets) + training summary, metrics, usage."""
    summary = json.loads((model / "training.json").read_text()) if (model / "training.json").exists() else {}
    metrics = {p.stem: json.loads(p.read_text()) for p in sorted((model / "metrics").glob("*.json"))}
    is_lora = (model / LORA_FILE).exists()
    data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-image", license="apache-2.0",
                         tags=["text-to-image", "latent-diffusion", "diffusers-ldm"] + (["lora"] if is_lora else []),
                         base_model=summary.get("base_model"), datasets=summary.get("datasets") or None)
    return ModelCard.from_template(data, template_str=CARD_TEMPLATE, repo_id=repo_id, is_lora=is_lora,
                                   has_grid=has_grid, summary_rows=_summary_rows(summary),
                                   metric_rows=_metric_rows(metrics), base_model=summary.get("base_model"))


def _summary_rows(summary: dict) -> list[tuple[str, str]]:
    rows = []
    for stage in summary.get("stages", []):
        rows.append((stage.get("stage", "?"), ", ".join(f"{k}: {v}" for k, v in stage.items() if k != "stage")))
    return rows


def _metric_rows(metrics: dict) -> list[tuple[str, str]]:
    rows = []
    for kind, values in metrics.items():
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append((f"{kind} / {key}", f"{value:.4g}"))
    return rows


def push(model: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         dry_run: bool = False, commit_message: str | None = None) -> str:
    """``ldm push``: assemble the release folder and upload it (create_repo + upload_folder)."""
    release = assemble_release(model, repo_id=repo_id)
    files = sorted(p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file())
    if dry_run:
        return "\n".join([f"would upload to {repo_id}" + (f" (branch {revision})" if revision else "") + ":",
                          *[f"  {f}" for f in files], str(release)])
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
```python
import torch
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{{ base_model }}")
pipe.load_lora_weights("{{ repo_id }}", revision="<commit sha>")
image = pipe("a prompt", num_inference_steps=25, guidance_scale=5.0).images[0]
```
{% else %}
```python
import torch
from diffusers import DiffusionPipeline

# trust_remote_code runs pipeline_latent_diffusion.py from this repository: read it first, and pin
# `revision` to the commit you read so that later pushes cannot change the code you run.
pipe = DiffusionPipeline.from_pretrained("{{ repo_id }}", trust_remote_code=True, revision="<commit sha>")
image = pipe("a prompt", num_inference_steps=25, guidance_scale=5.0).images[0]
```

With `pip install diffusers-ldm` no remote code is needed:

```python
from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline

pipe = LatentDiffusionPipeline.from_pretrained("{{ repo_id }}", revision="<commit sha>")
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
