"""CLIP text encoders: tokenizer, exact OpenCLIP conversion, loading, stage 0, retrieval. Offline, tiny."""

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import open_clip  # noqa: E402  (a broken torch/torchvision pair fails here, loudly)
import pytest  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from open_clip.tokenizer import SimpleTokenizer, basic_clean  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

from ldm.config import CLIPModelConfig, DataConfig, TextEncoderStageConfig, TrainConfig, load_config  # noqa: E402
from ldm.data.shapes import write_shapes_dataset  # noqa: E402
from ldm.evaluation.retrieval import retrieval_metrics, swap_attribute  # noqa: E402
from ldm.models.text import (build_clip_tokenizer, build_open_clip, encode_prompts, load_open_clip,  # noqa: E402
                             load_text_encoder, openclip_to_clip_text, save_text_encoder, tokenize,
                             warn_if_truncated)

TOL = 1e-5
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "text_encoder" / "shapes.yaml"
TRICKY = [
    "a small red circle in the top left on a gray background",
    "Hello, World!!  What's up?!",
    "CAPS lOwEr MiXeD Case",
    "  leading\tand\ttrailing\nwhitespace   ",
    "Ünïcödé café naïve — ÀÉÎÕÜ straße",
    "日本語 😀 🎨 Ελληνικά кириллица",
    "don't can't we'll I'm they've",
    "numbers 12345 3.14 1,000 and !!! ??? ...",
    "<|endoftext|> typed by a user <|startoftext|>",
    "",
    " ".join(["word"] * 100),  # over-long: truncated to the context
    "a" * 300,
]
FTFY_CHANGED = ["“curly quotes” ’s", "ﬁ ligature", "&amp; &lt;b&gt;", "mojibake cafÃ©", "fullwidth ＡＢＣ"]


def test_open_clip_and_torchvision_work():
    assert "ViT-H-14" in open_clip.list_models()
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.9]])
    assert torchvision.ops.nms(boxes, torch.tensor([1.0, 0.5]), 0.5).tolist() == [0]


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    build_clip_tokenizer(77).save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("length", [77, 32])
def test_saved_tokenizer_gives_open_clip_ids(saved_tokenizer, length):
    reference = SimpleTokenizer(context_length=length)(TRICKY)
    ids = tokenize(saved_tokenizer, TRICKY, length)
    assert ids.shape == (len(TRICKY), length)
    assert torch.equal(ids, reference)
    assert ids[-2, -1] == 49407 and ids[9, 2] == 0  # truncated prompts still end in EOT; "" is padded with zeros


def test_only_gap_is_open_clips_ftfy_cleaning(saved_tokenizer):
    """open_clip runs ftfy + html.unescape first; a saved CLIPTokenizer cannot. Nothing else differs."""
    reference = SimpleTokenizer()(FTFY_CHANGED)
    assert not torch.equal(tokenize(saved_tokenizer, FTFY_CHANGED), reference)
    assert torch.equal(tokenize(saved_tokenizer, [basic_clean(t) for t in FTFY_CHANGED]), reference)


def test_truncation_warns_once_with_the_count(saved_tokenizer, caplog):
    texts = ["a b c d e f g h i j", "short", "a b c d e f g"]  # 12, 3, 9 tokens with BOS/EOS
    with caplog.at_level(logging.WARNING, logger="ldm.models.text"):
        cut = warn_if_truncated(saved_tokenizer, texts, 8)
    assert cut == [4, 0, 1]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "5 token(s)" in warnings[0].getMessage() and "8-token" in warnings[0].getMessage()


# --------------------------------------------------------------------------------------------
# OpenCLIP -> CLIPTextModel, exact
# --------------------------------------------------------------------------------------------
TINY_VISION = {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8}


def registry_config(name: str) -> dict:
    config = open_clip.get_model_config(name)
    config["text_cfg"].update(width=64, heads=4, layers=3)
    return config | {"embed_dim": 24, "vision_cfg": TINY_VISION}


def custom_config(quick_gelu: bool) -> dict:
    text = {"context_length": 16, "vocab_size": 49408, "width": 48, "heads": 3, "layers": 3, "mlp_ratio": 2.0,
            "ls_init_value": 0.5, "norm_kwargs": {"eps": 1e-6}}
    return {"embed_dim": 20, "quick_gelu": quick_gelu, "vision_cfg": TINY_VISION, "text_cfg": text}


def randomised(config: dict, seed: int = 0):
    """A random open_clip model whose biases, gains and layer scales are all non-trivial."""
    torch.manual_seed(seed)
    model = build_open_clip(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def open_clip_reference(model, ids):
    """open_clip's own last and penultimate hidden states (final LN applied) and projected features."""
    with torch.no_grad():
        hidden = model.forward_intermediates(text=ids, text_indices=2, normalize_intermediates=True,
                                             intermediates_only=True)["text_intermediates"]
        return hidden[-1], hidden[-2], model.encode_text(ids)


CASES = {
    "ViT-H-14 (SD-2 tower, gelu)": registry_config("ViT-H-14"),
    "ViT-B-32-quickgelu": registry_config("ViT-B-32-quickgelu"),
    "custom gelu": custom_config(False),
    "custom quick_gelu": custom_config(True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_conversion_is_exact(name):
    model = randomised(CASES[name])
    full, tokenizer = openclip_to_clip_text(model, projection=True)
    penultimate, _ = openclip_to_clip_text(model, layer="penultimate")
    length = model.context_length
    ids = tokenize(tokenizer, TRICKY)
    assert torch.equal(ids, SimpleTokenizer(context_length=length)(TRICKY)) and ids.shape[1] == length
    last_ref, penultimate_ref, projected_ref = open_clip_reference(model, ids)
    with torch.no_grad():
        out = full(ids)
        pen = penultimate(ids)
        pooled_ref = last_ref[torch.arange(len(ids)), ids.argmax(dim=-1)]  # open_clip pools at the argmax id (EOT)
        assert (out.last_hidden_state - last_ref).abs().max() <= TOL
        assert (pen.last_hidden_state - penultimate_ref).abs().max() <= TOL
        assert (out.text_embeds - projected_ref).abs().max() <= TOL
        assert (full.text_model(ids).pooler_output - pooled_ref).abs().max() <= TOL
        # clip skip by truncation == stock diffusers' clip skip on the full model
        hidden = full.text_model(ids, output_hidden_states=True).hidden_states[-2]
        assert (pen.last_hidden_state - full.text_model.final_layer_norm(hidden)).abs().max() <= TOL
    assert penultimate.config.num_hidden_layers == CASES[name]["text_cfg"]["layers"] - 1
    assert full.config.hidden_act == ("quick_gelu" if CASES[name].get("quick_gelu") else "gelu")


def test_projected_embeds_equal_encode_text_only_for_the_last_layer():
    """The docstring's promise: text_embeds == encode_text with layer="last"; with "penultimate" they are
    the projection of the final-LN'd penultimate state at the end-of-text token, not encode_text."""
    model = randomised(custom_config(False), seed=2)
    last, tokenizer = openclip_to_clip_text(model, projection=True)
    penultimate, _ = openclip_to_clip_text(model, layer="penultimate", projection=True)
    ids = tokenize(tokenizer, TRICKY[:4])
    _, penultimate_ref, projected_ref = open_clip_reference(model, ids)
    with torch.no_grad():
        assert (last(ids).text_embeds - projected_ref).abs().max() <= TOL
        pen = penultimate(ids).text_embeds
        pooled = penultimate_ref[torch.arange(len(ids)), ids.argmax(dim=-1)]
        assert (pen - pooled @ model.text_projection).abs().max() <= TOL
        assert (pen - projected_ref).abs().max() > 100 * TOL


def test_conversion_from_config_and_local_checkpoint(tmp_path):
    config = custom_config(False)
    model = randomised(config, seed=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "ckpt.safetensors"))
    converted, tokenizer = openclip_to_clip_text(config, pretrained=str(tmp_path / "ckpt.safetensors"))
    ids = tokenize(tokenizer, TRICKY[:4])
    with torch.no_grad():
        assert (converted(ids).last_hidden_state - open_clip_reference(model, ids)[0]).abs().max() <= TOL
    assert not any(p.requires_grad for p in converted.parameters())


@pytest.mark.parametrize("change", [{"no_causal_mask": True}, {"pool_type": "last"}, {"embed_cls": True}])
def test_conversion_refuses_towers_it_cannot_express(change):
    config = custom_config(False) | {"custom_text": True}  # CustomTextCLIP keeps the whole TextTransformer
    config["text_cfg"] |= change
    with pytest.raises(ValueError):
        openclip_to_clip_text(build_open_clip(config))


# --------------------------------------------------------------------------------------------
# Loading folders
# --------------------------------------------------------------------------------------------
def test_load_text_encoder_layouts_and_clip_skip(tmp_path):
    full, tokenizer = openclip_to_clip_text(randomised(custom_config(True), seed=1))
    save_text_encoder(tmp_path / "pipeline", full, tokenizer)
    full.save_pretrained(tmp_path / "flat")
    tokenizer.save_pretrained(tmp_path / "flat")
    ids = tokenize(tokenizer, TRICKY[:3])
    with torch.no_grad():
        reference = full(ids, output_hidden_states=True)
        skip = full.final_layer_norm(reference.hidden_states[-2])
        for source in ("pipeline", "flat"):
            model, tok = load_text_encoder(tmp_path / source)
            assert torch.equal(model(ids).last_hidden_state, reference.last_hidden_state)
            assert tok.model_max_length == 16 and not model.training
            assert not any(p.requires_grad for p in model.parameters())
            model, _ = load_text_encoder(tmp_path / source, layer="penultimate")
            assert (model(ids).last_hidden_state - skip).abs().max() <= TOL
    with pytest.raises(FileNotFoundError):
        load_text_encoder(tmp_path)


def test_training_and_pipeline_embeddings_are_bit_identical(tiny_pipeline_dir):
    from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    prompts = [TRICKY[0], TRICKY[-2], ""]  # an over-long prompt and the empty (unconditional) one
    with torch.no_grad():
        inference, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert torch.equal(encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts, warn=False), inference)


# --------------------------------------------------------------------------------------------
# Retrieval metrics
# --------------------------------------------------------------------------------------------
def test_retrieval_metrics():
    features = torch.eye(4)
    perfect = retrieval_metrics(features, features, ["a", "b", "c", "d"], ks=(1, 2))
    assert perfect["text_to_image_top1"] == 1.0 and perfect["image_to_text_top1"] == 1.0
    rolled = retrieval_metrics(features, features.roll(1, dims=0), ["a", "b", "c", "d"], ks=(1, 2))
    assert rolled["text_to_image_top1"] == 0.0
    same_caption = retrieval_metrics(features, features.roll(1, dims=0), ["a", "a", "a", "a"], ks=(1,))
    assert same_caption["text_to_image_top1"] == 1.0  # identical captions are interchangeable
    assert swap_attribute("a small red circle", ("red", "blue", "green")) == ["a small blue circle",
                                                                             "a small green circle"]


# --------------------------------------------------------------------------------------------
# Stage 0
# --------------------------------------------------------------------------------------------
def tiny_stage_config(data, out, max_steps=4) -> TextEncoderStageConfig:
    return TextEncoderStageConfig(
        output_dir=str(out), eval_samples=8, eval_every=2,
        data=DataConfig(path=str(data), resolution=16),
        model=CLIPModelConfig(embed_dim=16, vision_layers=1, vision_width=16, vision_heads=2, vision_patch_size=8,
                              text_context_length=24, text_width=16, text_heads=2, text_layers=2,
                              layer="penultimate"),
        train=TrainConfig(seed=0, max_steps=max_steps, batch_size=8, learning_rate=1e-3, lr_warmup_steps=1,
                          lr_schedule="cosine", ema_decay=0.9, checkpoint_every=2, checkpoints_total_limit=3,
                          log_every=1))


@pytest.fixture(scope="module")
def stage0_run(tmp_path_factory):
    from train.text_encoder import main

    root = tmp_path_factory.mktemp("stage0")
    write_shapes_dataset(root / "data", num=40, size=16, seed=0)
    cfg = tiny_stage_config(root / "data", root / "out")
    final = main(cfg)
    return cfg, root, final


def test_stage0_writes_a_loadable_text_encoder(stage0_run):
    cfg, root, final = stage0_run
    text_encoder, tokenizer = load_text_encoder(final)
    assert text_encoder.config.num_hidden_layers == 1  # penultimate of 2 layers, realised by truncation
    assert tokenizer.model_max_length == 24
    clip, _ = load_open_clip(final / "open_clip")
    prompts = ["a small red circle in the top left on a gray background", "a large blue cross in the center"]
    ids = tokenize(tokenizer, prompts)
    with torch.no_grad():
        reference = clip.forward_intermediates(text=ids, text_indices=2, normalize_intermediates=True,
                                               intermediates_only=True)["text_intermediates"][-2]
    assert (encode_prompts(text_encoder, tokenizer, prompts) - reference).abs().max() <= TOL
    converted, _ = openclip_to_clip_text(final / "open_clip", layer="penultimate")  # a folder, via local-dir:
    assert all(torch.equal(v, converted.state_dict()[k]) for k, v in text_encoder.state_dict().items())


class Interrupted(Exception):
    pass


def test_stage0_resume_matches_uninterrupted_run(stage0_run, monkeypatch):
    import train.text_encoder as stage
    from ldm.training import Checkpointer

    cfg, root, final = stage0_run
    cfg = replace(cfg, output_dir=str(root / "interrupted"))
    save = Checkpointer.save

    def save_then_die(self, state):
        path = save(self, state)
        raise Interrupted(path)

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    with pytest.raises(Interrupted):
        stage.main(cfg)  # killed right after checkpoint-2
    monkeypatch.setattr(Checkpointer, "save", save)
    losses = []
    loss = stage.contrastive_loss
    monkeypatch.setattr(stage, "contrastive_loss", lambda *args: losses.append(1) or loss(*args))
    resumed = load_file(str(stage.main(cfg) / "open_clip" / "open_clip_model.safetensors"))
    assert len(losses) == 2  # only steps 3 and 4 were computed again
    uninterrupted = load_file(str(final / "open_clip" / "open_clip_model.safetensors"))
    assert max((resumed[k] - v).abs().max().item() for k, v in uninterrupted.items()) <= 1e-6
    digests = [json.loads((Path(d) / "checkpoint-4" / "trainer.json").read_text())["data_digest"]
               for d in (root / "out", root / "interrupted")]
    assert digests[0] == digests[1]


def test_eval_text_encoder_cli(stage0_run):
    from ldm.cli import main as cli

    cfg, root, final = stage0_run
    cli(["eval", "text-encoder", "--model", str(final), "--data", str(root / "data"), "--num", "20",
         "--out", str(root / "metrics.json")])
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["candidates"] == 20 and metrics["resolution"] == 16  # the model's own resolution
    for key in ("text_to_image_top1", "text_to_image_top5", "image_to_text_top1", "image_to_text_top5"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["text_to_image_top5"] >= metrics["text_to_image_top1"]
    for kind in ("attribute_sensitivity_projected", "attribute_sensitivity_pooled"):
        assert metrics[kind]["colour"]["pairs"] > 0 and -1 <= metrics[kind]["shape"]["max_cosine"] <= 1


def test_shapes_config_context_fits_every_shapes_caption(saved_tokenizer):
    from ldm.data.shapes import make_scene

    cfg = load_config(TextEncoderStageConfig, CONFIG, ["data.path=x"])
    captions = [make_scene(i, seed, 32).caption for seed in (0, 1) for i in range(1500)]
    longest = max(len(ids) for ids in saved_tokenizer(captions).input_ids)
    assert 20 <= longest <= cfg.model.text_context_length


# --------------------------------------------------------------------------------------------
# Hard negatives (NegCLIP)
# --------------------------------------------------------------------------------------------
GROUPS = (("red", "blue", "green"), ("circle", "square"))


def test_hard_negative_captions_swap_one_word_deterministically():
    from train.text_encoder import hard_negative_captions

    captions = ["a small red circle in the top left", "a large blue square and a small green circle", "a cat"]
    seeds = torch.tensor([11, 12, 13])
    negatives, has = hard_negative_captions(captions, seeds, GROUPS)
    assert has.tolist() == [True, True, False] and negatives[2] == "a cat"
    for caption, negative in zip(captions[:2], negatives[:2]):
        changed = [(a, b) for a, b in zip(caption.split(), negative.split()) if a != b]
        assert len(changed) == 1 and any(set(changed[0]) <= set(group) for group in GROUPS), (caption, negative)
    again, has_again = hard_negative_captions(captions, seeds, GROUPS)
    assert again == negatives and torch.equal(has_again, has)  # the example's own stream
    picks = {hard_negative_captions(captions[:1], torch.tensor([s]), GROUPS)[0][0] for s in range(40)}
    assert picks == {"a small blue circle in the top left", "a small green circle in the top left",
                     "a small red square in the top left"}  # every swap is reachable


def test_hard_negative_loss_against_hand_computation():
    from ldm.losses.contrastive import hard_negative_loss

    g = torch.Generator().manual_seed(0)
    image, text, negative = (torch.nn.functional.normalize(torch.randn(3, 5, generator=g), dim=-1) for _ in range(3))
    tau, has = torch.tensor(7.0), torch.tensor([True, False, True])
    expected = 0.0
    for i in (0, 2):
        pos, neg = tau * image[i] @ text[i], tau * image[i] @ negative[i]
        expected += -(pos - torch.logsumexp(torch.stack([pos, neg]), 0)).item()
    assert hard_negative_loss(image, text, negative, tau, has).item() == pytest.approx(expected / 3, rel=1e-6)


def test_hard_negative_groups_need_two_words():
    with pytest.raises(Exception, match="hard_negatives"):
        load_config(TextEncoderStageConfig, CONFIG, ["hard_negatives=[[red, blue], [circle]]"])


def test_stage0_with_hard_negatives_adds_the_term(tmp_path, monkeypatch):
    import train.text_encoder as stage
    import ldm.losses.contrastive as contrastive

    write_shapes_dataset(tmp_path / "data", num=24, size=16, seed=0)
    cfg = replace(tiny_stage_config(tmp_path / "data", tmp_path / "out", max_steps=2), hard_negatives=GROUPS)
    terms = []
    term = contrastive.hard_negative_loss
    monkeypatch.setattr(contrastive, "hard_negative_loss", lambda *args: terms.append(term(*args)) or terms[-1])
    stage.main(cfg)
    assert len(terms) == 2 and all(t.item() > 0 for t in terms)
