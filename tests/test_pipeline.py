"""LatentDiffusionPipeline: sampling, guidance, schedulers, learned variance, validation, save/load.

Tiny components (VAE f=2 or f=4, 2-layer CLIP text encoder, 2-level U-Net) with a genuine CLIP BPE
tokenizer built offline from open_clip's packaged vocabulary.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import functools  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

import pipelines.pipeline_latent_diffusion as pld  # noqa: E402
from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline  # noqa: E402

STEPS = 3
PROMPTS = ["a red circle", "a blue square on the left"]


# ------------------------------------------------------------------------------------------------
# Tiny components
# ------------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tokenizer():
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in lines]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {v: i for i, v in enumerate(vocab)}
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=77)


def sd_scheduler():
    """Stable Diffusion's DDIM settings (stock SD rewrites steps_offset/clip_sample otherwise)."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def make_pipe(tokenizer, vae_blocks=(8, 16), out_channels=4, scheduler=None, seed=0):
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=vae_blocks,
        down_block_types=("DownEncoderBlock2D",) * len(vae_blocks),
        up_block_types=("UpDecoderBlock2D",) * len(vae_blocks),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=32,
        scaling_factor=0.5,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=49408,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
        )
    )
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=out_channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    pipe = LatentDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler or sd_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tokenizer):
    return make_pipe(tokenizer)


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    pipe.save_pretrained(folder)
    return folder


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def sample(pipe, prompt=PROMPTS[0], seeds=(0,), **kw):
    kw = {"num_inference_steps": STEPS, "guidance_scale": 3.0, "output_type": "np", **kw}
    return pipe(prompt, generator=gens(*seeds), **kw).images


def max_diff(a, b):
    return float(abs(torch.as_tensor(a) - torch.as_tensor(b)).max())


# ------------------------------------------------------------------------------------------------
# Guidance math
# ------------------------------------------------------------------------------------------------
def test_guidance_functions():
    g = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    assert torch.allclose(pld.classifier_free_guidance(uncond, cond, 1.0), cond, atol=1e-6)
    cfg = pld.classifier_free_guidance(uncond, cond, 5.0)
    assert torch.allclose(cfg, 5 * cond - 4 * uncond, atol=1e-5)
    assert torch.equal(pld.rescale_guidance(cfg, cond, 0.0), cfg)
    full = pld.rescale_guidance(cfg, cond, 1.0)  # per-sample std becomes the conditional one
    assert torch.allclose(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), atol=1e-5)
    half = pld.rescale_guidance(cfg, cond, 0.5)
    assert torch.allclose(half, (full + cfg) / 2, atol=1e-5)


def test_scheduler_takes_variance():
    learned = DDPMScheduler(variance_type="learned_range")
    assert pld.scheduler_takes_variance(learned)
    assert pld.scheduler_takes_variance(DDPMScheduler(variance_type="learned"))
    assert not pld.scheduler_takes_variance(DDPMScheduler())
    for cls in (DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler):
        other = cls.from_config(learned.config)
        assert other.config.variance_type == "learned_range"  # from_config carries the key along
        assert not pld.scheduler_takes_variance(other), cls.__name__


# ------------------------------------------------------------------------------------------------
# Save / load
# ------------------------------------------------------------------------------------------------
def test_save_pretrained_folder(saved):
    files = {os.path.relpath(os.path.join(d, f), saved) for d, _, fs in os.walk(saved) for f in fs}
    assert "pipeline_latent_diffusion.py" in files
    with open(pld.__file__, "rb") as a, open(saved / "pipeline_latent_diffusion.py", "rb") as b:
        assert a.read() == b.read()
    weights = [f for f in files if f.endswith((".bin", ".safetensors", ".pt", ".ckpt", ".pth"))]
    assert weights and all(f.endswith(".safetensors") for f in weights), weights
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == "LatentDiffusionPipeline"
    assert set(index) >= {"vae", "text_encoder", "tokenizer", "unet", "scheduler"}


def test_save_pretrained_refuses_pickle(pipe, tmp_path):
    with pytest.raises(ValueError, match="safe_serialization"):
        pipe.save_pretrained(tmp_path, safe_serialization=False)


def test_round_trip_all_loaders(pipe, saved, tmp_path):
    expected = sample(pipe)
    ours = LatentDiffusionPipeline.from_pretrained(saved)
    remote = DiffusionPipeline.from_pretrained(
        saved, custom_pipeline=str(saved / "pipeline_latent_diffusion.py"), trust_remote_code=True
    )
    assert type(remote).__name__ == "LatentDiffusionPipeline"
    for loaded in (ours, remote):
        loaded.set_progress_bar_config(disable=True)
        assert max_diff(sample(loaded), expected) == 0.0
    remote.save_pretrained(tmp_path)  # the remote-code class copies its own file along too
    code = (saved / "pipeline_latent_diffusion.py").read_bytes()
    assert (tmp_path / "pipeline_latent_diffusion.py").read_bytes() == code
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "LatentDiffusionPipeline"


@pytest.fixture(scope="module")
def ours_and_stock(saved):
    ours = LatentDiffusionPipeline.from_pretrained(saved)
    # safety_checker/feature_extractor are optional components: absent from the folder, they load as None;
    # requires_safety_checker=False only silences the warning about it.
    stock = StableDiffusionPipeline.from_pretrained(saved, requires_safety_checker=False)
    assert stock.safety_checker is None and stock.feature_extractor is None
    for p in (ours, stock):
        p.set_progress_bar_config(disable=True)
    return ours, stock


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler])
@pytest.mark.parametrize(
    "kw", [{}, {"guidance_rescale": 0.7}, {"negative_prompt": ["blurry", "dark"], "guidance_scale": 7.5}]
)
def test_matches_stock_stable_diffusion(ours_and_stock, scheduler_cls, kw):
    ours, stock_sd = ours_and_stock
    for p in (ours, stock_sd):
        p.scheduler = scheduler_cls.from_config(sd_scheduler().config)
    kw = {"num_inference_steps": 4, "guidance_scale": 3.0, **kw}
    for output_type in ("np", "latent"):
        a = ours(PROMPTS, generator=gens(1, 2), output_type=output_type, **kw).images
        b = stock_sd(PROMPTS, generator=gens(1, 2), output_type=output_type, **kw).images
        assert max_diff(a, b) <= 1e-4


# ------------------------------------------------------------------------------------------------
# Batching, outputs, inputs
# ------------------------------------------------------------------------------------------------
def test_batch_equals_one_at_a_time(pipe):
    batch = sample(pipe, PROMPTS, seeds=(1, 2), negative_prompt=["dark", "noisy"])
    one = sample(pipe, PROMPTS[0], seeds=(1,), negative_prompt="dark")
    two = sample(pipe, PROMPTS[1], seeds=(2,), negative_prompt="noisy")
    assert max_diff(batch[0], one[0]) <= 1e-5 and max_diff(batch[1], two[0]) <= 1e-5
    assert max_diff(batch[0], batch[1]) > 1e-3


def test_num_images_per_prompt(pipe):
    per = sample(pipe, PROMPTS, seeds=(1, 2, 3, 4), num_images_per_prompt=2)
    assert per.shape == (4, 16, 16, 3)
    repeated = sample(pipe, [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]], seeds=(1, 2, 3, 4))
    assert max_diff(per, repeated) <= 1e-5
    one_gen = pipe(
        PROMPTS[0], num_images_per_prompt=3, num_inference_steps=2, generator=torch.Generator(), output_type="latent"
    ).images
    assert one_gen.shape == (3, 4, 8, 8) and max_diff(one_gen[0], one_gen[1]) > 1e-3


def test_output_types(pipe):
    kw = {"height": 16, "width": 24, "seeds": (5,)}
    pil = sample(pipe, output_type="pil", **kw)
    np_ = sample(pipe, output_type="np", **kw)
    pt = sample(pipe, output_type="pt", **kw)
    latent = sample(pipe, output_type="latent", **kw)
    assert isinstance(pil, list) and len(pil) == 1 and pil[0].size == (24, 16) and pil[0].mode == "RGB"
    assert np_.shape == (1, 16, 24, 3) and str(np_.dtype) == "float32" and 0 <= np_.min() and np_.max() <= 1
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 3, 16, 24) and 0 <= pt.min() and pt.max() <= 1
    assert np_.std() > 0.01  # not a constant image
    assert latent.shape == (1, 4, 8, 12)
    assert max_diff(pt.permute(0, 2, 3, 1), np_) <= 1e-6
    assert max_diff(torch.tensor(list(pil[0].getdata())).view(16, 24, 3), (np_[0] * 255).round()) == 0
    tup = pipe(PROMPTS[0], num_inference_steps=1, generator=gens(5), output_type="np", return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 1 and tup[0].shape == (1, 16, 16, 3)


def test_latents_argument_equals_generator_noise(pipe):
    noise = randn_tensor((1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    kw = {"num_inference_steps": STEPS, "output_type": "latent"}
    from_latents = pipe(PROMPTS[0], latents=noise, **kw).images
    assert max_diff(from_latents, pipe(PROMPTS[0], generator=gens(7), **kw).images) == 0.0


def test_prompt_embeds_path_equals_prompt_path(pipe, tokenizer):
    def embed(texts):
        ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0].detach()

    by_text = sample(pipe, PROMPTS, seeds=(1, 2), negative_prompt=["dark", "noisy"])
    by_embeds = pipe(
        prompt_embeds=embed(PROMPTS),
        negative_prompt_embeds=embed(["dark", "noisy"]),
        generator=gens(1, 2),
        num_inference_steps=STEPS,
        guidance_scale=3.0,
        output_type="np",
    ).images
    mixed = pipe(
        prompt_embeds=embed(PROMPTS),
        negative_prompt=["dark", "noisy"],
        generator=gens(1, 2),
        num_inference_steps=STEPS,
        guidance_scale=3.0,
        output_type="np",
    ).images
    assert max_diff(by_text, by_embeds) <= 1e-6 and max_diff(by_text, mixed) <= 1e-6


def test_guidance_switch_and_negative_prompt(pipe):
    calls = []
    hook = pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        off = sample(pipe, PROMPTS, seeds=(1, 2), guidance_scale=1.0)
        assert calls == [2] * STEPS  # no unconditional pass
        calls.clear()
        on = sample(pipe, PROMPTS, seeds=(1, 2), guidance_scale=3.0)
        assert calls == [4] * STEPS  # one U-Net call with [uncond; cond]
    finally:
        hook.remove()
    assert max_diff(off, on) > 1e-3
    assert max_diff(off, sample(pipe, PROMPTS, seeds=(1, 2), guidance_scale=0.0, negative_prompt="x")) == 0.0
    default = sample(pipe, seeds=(3,))
    assert max_diff(default, sample(pipe, seeds=(3,), negative_prompt="")) == 0.0
    assert max_diff(default, sample(pipe, seeds=(3,), negative_prompt="dark")) > 1e-4
    assert max_diff(default, sample(pipe, seeds=(3,), guidance_rescale=0.7)) > 1e-4


@pytest.mark.parametrize("vae_blocks, factor", [((8, 16), 2), ((8, 16, 16), 4)])
def test_height_width_use_real_vae_factor(tokenizer, vae_blocks, factor):
    pipe = make_pipe(tokenizer, vae_blocks=vae_blocks)
    assert pipe.vae_scale_factor == factor
    assert sample(pipe, num_inference_steps=1).shape == (1, 8 * factor, 8 * factor, 3)  # unet sample_size 8
    assert sample(pipe, num_inference_steps=1, height=6 * factor, width=10 * factor).shape == (
        1,
        6 * factor,
        10 * factor,
        3,
    )
    for bad in (factor + 1, 0, -factor):
        with pytest.raises(ValueError, match=f"`height`.*factor {factor}"):
            sample(pipe, num_inference_steps=1, height=bad)
        with pytest.raises(ValueError, match="`width`"):
            sample(pipe, num_inference_steps=1, width=bad)


# ------------------------------------------------------------------------------------------------
# Schedulers and learned variance
# ------------------------------------------------------------------------------------------------
def test_scheduler_swap(tokenizer):
    pipe = make_pipe(tokenizer)
    base = pipe.scheduler.config
    results = {}
    for cls in (
        DDIMScheduler,
        DDPMScheduler,
        EulerDiscreteScheduler,
        DPMSolverMultistepScheduler,
        UniPCMultistepScheduler,
    ):
        pipe.scheduler = cls.from_config(base)
        results[cls.__name__] = sample(pipe, num_inference_steps=4, output_type="latent")
        assert torch.isfinite(results[cls.__name__]).all(), cls.__name__
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert max_diff(results[a], results[b]) > 1e-3, (a, b)
    pipe.scheduler = DDPMScheduler.from_config(base)  # stochastic steps draw from `generator`, not the global RNG
    torch.manual_seed(123)
    again = sample(pipe, num_inference_steps=4, output_type="latent")
    assert max_diff(again, results["DDPMScheduler"]) == 0.0


def spy_on_step(scheduler):
    """Record what `scheduler.step` receives."""
    seen, step = [], scheduler.step

    @functools.wraps(step)  # keeps the signature the pipeline inspects for `generator`
    def spy(model_output, t, sample, *args, **kwargs):
        seen.append({"output": model_output.clone(), "variance_type": scheduler.config.variance_type})
        return step(model_output, t, sample, *args, **kwargs)

    scheduler.step = spy
    return seen


def learned_ddpm():
    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        variance_type="learned_range",
    )


def test_learned_variance_ddpm_gets_guided_mean_and_conditional_v(tokenizer):
    pipe = make_pipe(tokenizer, out_channels=8, scheduler=learned_ddpm())
    assert pipe.learned_variance
    seen, raw = spy_on_step(pipe.scheduler), []
    hook = pipe.unet.register_forward_hook(lambda m, args, out: raw.append(out[0].clone()))
    try:
        images = sample(pipe, PROMPTS, seeds=(1, 2), guidance_scale=4.0)
    finally:
        hook.remove()
    assert images.shape == (2, 16, 16, 3) and torch.isfinite(torch.as_tensor(images)).all()
    assert len(seen) == STEPS
    for step, out in zip(seen, raw, strict=True):  # out: [uncond(2); cond(2)] x [mean(4), v(4)]
        uncond, cond = out.chunk(2)
        assert step["output"].shape == (2, 8, 8, 8)
        assert torch.allclose(step["output"][:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]), atol=1e-6)
        assert torch.equal(step["output"][:, 4:], cond[:, 4:])


def mean_only_copy(unet):
    """The same U-Net with only the first C output channels: what a mean-only scheduler should see."""
    config = {**unet.config, "out_channels": unet.config.out_channels // 2}
    copy = UNet2DConditionModel.from_config(config)
    state = unet.state_dict()
    state["conv_out.weight"], state["conv_out.bias"] = state["conv_out.weight"][:4], state["conv_out.bias"][:4]
    copy.load_state_dict(state)
    return copy.eval()


def test_learned_variance_dpm_solver_gets_mean_only(tokenizer):
    pipe = make_pipe(tokenizer, out_channels=8, scheduler=learned_ddpm())
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # variance_type carried over
    assert pipe.scheduler.config.variance_type == "learned_range"
    seen = spy_on_step(pipe.scheduler)
    learned = sample(pipe, PROMPTS, seeds=(1, 2), num_inference_steps=4, guidance_rescale=0.5)
    assert [s["output"].shape[1] for s in seen] == [4] * 4  # C, not 2C
    assert {s["variance_type"] for s in seen} == {None}  # DPM-Solver does not slice [:, :3]
    assert pipe.scheduler.config.variance_type == "learned_range"  # restored after sampling
    reference = LatentDiffusionPipeline(**{**pipe.components, "unet": mean_only_copy(pipe.unet)})
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, variance_type=None)
    expected = sample(reference, PROMPTS, seeds=(1, 2), num_inference_steps=4, guidance_rescale=0.5)
    assert max_diff(learned, expected) <= 1e-5


# ------------------------------------------------------------------------------------------------
# Callback, warnings, decoding
# ------------------------------------------------------------------------------------------------
def test_callback_on_step_end(pipe):
    calls = []

    def record(p, i, t, kwargs):
        calls.append((p, i, t, {k: v.shape for k, v in kwargs.items()}))
        return {}

    inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    sample(pipe, PROMPTS, seeds=(1, 2), callback_on_step_end=record, callback_on_step_end_tensor_inputs=inputs)
    assert [c[1] for c in calls] == list(range(STEPS))
    assert all(c[0] is pipe for c in calls)
    assert [int(c[2]) for c in calls] == [int(t) for t in pipe.scheduler.timesteps]
    assert calls[0][3] == {"latents": (2, 4, 8, 8), "prompt_embeds": (2, 77, 32), "negative_prompt_embeds": (2, 77, 32)}

    def zero_last(p, i, t, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == STEPS - 1 else None

    out = sample(pipe, output_type="latent", callback_on_step_end=zero_last)
    assert torch.count_nonzero(out) == 0

    def swap_text(p, i, t, kwargs):  # conditioning on the negative embedding = sampling without guidance
        return {"prompt_embeds": kwargs["negative_prompt_embeds"]} if i == 0 else {}

    swapped = sample(
        pipe,
        seeds=(4,),
        callback_on_step_end=swap_text,
        callback_on_step_end_tensor_inputs=["prompt_embeds", "negative_prompt_embeds"],
    )
    assert max_diff(swapped, sample(pipe, seeds=(4,))) > 1e-4


def test_long_prompt_warns_once_with_count(pipe, caplog):
    long = "cat " * 100  # 100 tokens + BOS/EOS = 102 > 77: 25 cut
    name = pld.logger.name
    with caplog.at_level(logging.WARNING):
        sample(pipe, [long, long + "cat " * 3], seeds=(1, 2), num_inference_steps=1, negative_prompt="dog " * 90)
    warnings = [r.getMessage() for r in caplog.records if r.name == name and r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "prompt[0]: 25 token(s) cut" in warnings[0] and "prompt[1]: 28 token(s) cut" in warnings[0]
    assert "negative_prompt[0]: 15 token(s) cut" in warnings[0] and "77-token" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        sample(pipe, "cat " * 75, num_inference_steps=1)  # exactly 77 tokens: nothing cut
    assert not [r for r in caplog.records if r.name == name]


def test_decode_uses_scaling_and_shift_factor(tokenizer):
    pipe = make_pipe(tokenizer)
    pipe.vae.register_to_config(scaling_factor=0.7, shift_factor=0.3)
    latents = sample(pipe, seeds=(2,), output_type="latent")
    images = sample(pipe, seeds=(2,), output_type="pt")
    with torch.no_grad():
        manual = pipe.vae.decode(latents / 0.7 + 0.3).sample
        unshifted = pipe.vae.decode(latents / 0.7).sample
    assert max_diff(images, (manual / 2 + 0.5).clamp(0, 1)) <= 1e-6
    assert max_diff(images, (unshifted / 2 + 0.5).clamp(0, 1)) > 1e-3


def test_float16_vae_decodes_in_float32_when_force_upcast(tokenizer):
    pipe = make_pipe(tokenizer)
    pipe.vae.to(torch.float16)
    assert pipe.vae.config.force_upcast
    dtypes, decode = [], pipe.vae.decode

    def spy(z, **kwargs):
        dtypes.append((z.dtype, pipe.vae.dtype))
        return decode(z, **kwargs)

    pipe.vae.decode = spy
    with torch.no_grad():
        images = pipe.decode_latents(torch.randn(1, 4, 8, 8, dtype=torch.float16))
    assert dtypes == [(torch.float32, torch.float32)] and images.dtype == torch.float32
    assert pipe.vae.dtype == torch.float16  # restored


# ------------------------------------------------------------------------------------------------
# Input validation: a ValueError naming the argument
# ------------------------------------------------------------------------------------------------
EMB = torch.zeros(2, 77, 32)
INVALID = [
    ({"prompt": "a", "prompt_embeds": EMB}, "`prompt_embeds`"),
    ({"prompt": None}, "`prompt`"),
    ({"prompt": 3}, "`prompt`"),
    ({"prompt": []}, "`prompt`"),
    ({"prompt": ["a", 1]}, "`prompt`"),
    ({"negative_prompt": 5}, "`negative_prompt`"),
    ({"prompt": PROMPTS, "negative_prompt": ["x"]}, "`negative_prompt`"),
    ({"negative_prompt": "x", "negative_prompt_embeds": EMB[:1]}, "`negative_prompt_embeds`"),
    ({"prompt": None, "prompt_embeds": torch.zeros(77, 32)}, "`prompt_embeds`"),
    ({"prompt": None, "prompt_embeds": torch.zeros(1, 77, 16)}, "`prompt_embeds`"),
    ({"prompt": None, "prompt_embeds": EMB, "negative_prompt_embeds": EMB[:1]}, "`negative_prompt_embeds`"),
    ({"prompt": None, "prompt_embeds": EMB[:, :10], "negative_prompt": "x"}, "`negative_prompt`"),
    ({"prompt": PROMPTS, "negative_prompt_embeds": EMB[:1]}, "`negative_prompt_embeds`"),
    ({"negative_prompt_embeds": [[0.0]]}, "`negative_prompt_embeds`"),
    ({"height": 15}, "`height`"),
    ({"width": 0}, "`width`"),
    ({"height": 16.0}, "`height`"),
    ({"num_inference_steps": 0}, "`num_inference_steps`"),
    ({"num_inference_steps": 2.5}, "`num_inference_steps`"),
    ({"num_images_per_prompt": 0}, "`num_images_per_prompt`"),
    ({"guidance_scale": -1.0}, "`guidance_scale`"),
    ({"guidance_scale": float("nan")}, "`guidance_scale`"),
    ({"guidance_scale": "7"}, "`guidance_scale`"),
    ({"guidance_rescale": 1.5}, "`guidance_rescale`"),
    ({"guidance_rescale": -0.1}, "`guidance_rescale`"),
    ({"output_type": "jpg"}, "`output_type`"),
    ({"latents": torch.zeros(1, 4, 4, 4)}, "`latents`"),
    ({"latents": torch.zeros(2, 4, 8, 8)}, "`latents`"),
    ({"latents": [0.0]}, "`latents`"),
    ({"generator": [torch.Generator()] * 2}, "`generator`"),
    ({"prompt": PROMPTS, "num_images_per_prompt": 2, "generator": [torch.Generator()] * 2}, "`generator`"),
    ({"generator": 42}, "`generator`"),
    ({"callback_on_step_end": "print"}, "`callback_on_step_end`"),
    ({"callback_on_step_end_tensor_inputs": ["noise_pred"]}, "`callback_on_step_end_tensor_inputs`"),
]


@pytest.mark.parametrize("kwargs, argument", INVALID, ids=[f"{i}-{a.strip('`')}" for i, (_, a) in enumerate(INVALID)])
def test_invalid_inputs_raise_value_error_naming_argument(pipe, kwargs, argument):
    kwargs = {"prompt": PROMPTS[0], "num_inference_steps": 1, **kwargs}
    with pytest.raises(ValueError, match=re.escape(argument)):
        pipe(**kwargs)


def test_learned_scheduler_needs_learned_unet(tokenizer):
    pipe = make_pipe(tokenizer, scheduler=learned_ddpm())  # 4 output channels: no variance to hand over
    with pytest.raises(ValueError, match="variance_type"):
        sample(pipe, num_inference_steps=1)


# ------------------------------------------------------------------------------------------------
# Work per call (bench/sampling.py measures the speed; these pin the work that makes it)
# ------------------------------------------------------------------------------------------------
def test_each_distinct_text_encoded_once_in_one_call(pipe):
    rows = []
    hook = pipe.text_encoder.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    try:
        sample(pipe, [PROMPTS[0]] * 3 + [PROMPTS[1]], seeds=(1, 2, 3, 4))  # default negative ""
        assert rows == [3]  # PROMPTS[0], PROMPTS[1], "" in one encoder call
        rows.clear()
        sample(pipe, PROMPTS, seeds=(1, 2), negative_prompt=["dark", PROMPTS[0]])
        assert rows == [3]  # a negative prompt equal to a prompt shares its row
        rows.clear()
        sample(pipe, PROMPTS, seeds=(1, 2), guidance_scale=1.0)
        assert rows == [2]  # no guidance: no negative prompt encoded
    finally:
        hook.remove()


def test_execution_device_read_once_per_call(pipe, monkeypatch):
    reads = []
    cls = type(pipe)
    original = cls._execution_device
    monkeypatch.setattr(cls, "_execution_device", property(lambda self: reads.append(1) or original.fget(self)))
    sample(pipe, PROMPTS, seeds=(1, 2))
    assert len(reads) == 1  # it walks every module of every component


def test_no_text_embedding_reused_across_calls(tokenizer):
    """Writes through `.data` (as peft's LoRA fusing does) bump no version counter: a cache keyed on
    version counters and data pointers would return stale embeddings. The pipeline keeps none."""
    pipe = make_pipe(tokenizer, seed=1)
    before = sample(pipe, seeds=(3,))
    weight = next(p for n, p in pipe.text_encoder.named_parameters() if n.endswith("final_layer_norm.weight"))
    version, pointer = weight._version, weight.data_ptr()
    weight.data.mul_(0.5)  # in place, invisible to the version counter
    assert (weight._version, weight.data_ptr()) == (version, pointer)
    after = sample(pipe, seeds=(3,))
    assert max_diff(before, after) > 1e-4
