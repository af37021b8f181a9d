"""LatentDiffusionPipeline against the behaviours diffusers' own pipeline harness checks
(`PipelineTesterMixin`, tests/pipelines/test_pipelines_common.py), with exact references where possible.

save/load, batch vs single, dict/tuple, components, to(dtype), num_images_per_prompt, cfg, callback inputs,
a callback that changes guidance, `SDCFGCutoffCallback`, the call signature, `cross_attention_kwargs`
(per-call LoRA scale), `encode_prompt` in isolation, custom timesteps/sigmas, clip skip, interrupt, eta, VAE
slicing/tiling and FreeU. The reference for guidance schedules is `manual_sample`: the sampling loop written
out by hand from the components.
"""

import inspect

import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from diffusers.callbacks import MultiPipelineCallbacks, SDCFGCutoffCallback
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.models.text import build_clip_tokenizer
from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline

PROMPT = "a red circle on the left"
STEPS = 5
TEXT_TO_IMAGE_PARAMS = {"prompt", "height", "width", "guidance_scale", "negative_prompt", "prompt_embeds",
                        "negative_prompt_embeds", "cross_attention_kwargs"}  # diffusers' pipeline_params.py
REQUIRED_OPTIONAL_PARAMS = {"num_inference_steps", "num_images_per_prompt", "generator", "latents", "output_type",
                            "return_dict"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def components(seed=0):
    """Tiny harness-style components: f = 2 VAE, 2-level U-Net, 3-layer CLIP text encoder, 16-token context."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=8, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=16, scaling_factor=0.5)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                                                num_attention_heads=4, vocab_size=49408, max_position_embeddings=16,
                                                bos_token_id=49406, eos_token_id=49407, pad_token_id=0))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False)
    return {"vae": vae.eval(), "text_encoder": text_encoder.eval(), "tokenizer": build_clip_tokenizer(16),
            "unet": unet.eval(), "scheduler": scheduler}


def make_pipe(**overrides):
    pipe = LatentDiffusionPipeline(**{**components(), **overrides})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def inputs(seed=0, **kw):
    return {"prompt": PROMPT, "generator": torch.Generator().manual_seed(seed), "num_inference_steps": STEPS,
            "guidance_scale": 6.0, "output_type": "pt", **kw}


def run(pipe, **kw):
    return pipe(**inputs(**kw)).images


@torch.no_grad()
def manual_sample(pipe, guidance_per_step, seed=0, prompt=PROMPT):
    """The sampling loop by hand: guidance s_i > 1 at step i runs [u; c] and ε_u + s_i (ε_c − ε_u), else c only."""
    ids = pipe.tokenizer([prompt, ""], padding="max_length", max_length=16, truncation=True,
                         return_tensors="pt").input_ids
    cond, uncond = pipe.text_encoder(ids)[0].chunk(2)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    pipe.scheduler.set_timesteps(len(guidance_per_step))
    for t, s in zip(pipe.scheduler.timesteps, guidance_per_step):
        if s > 1:
            e_u, e_c = pipe.unet(torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([uncond, cond]),
                                 return_dict=False)[0].chunk(2)
            eps = e_u + s * (e_c - e_u)
        else:
            eps = pipe.unet(latents, t, encoder_hidden_states=cond, return_dict=False)[0]
        latents = pipe.scheduler.step(eps, t, latents, return_dict=False)[0]
    return (pipe.vae.decode(latents / 0.5).sample / 2 + 0.5).clamp(0, 1)


def max_diff(a, b):
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max())


# ------------------------------------------------------------------------------------------------
# Call signature, components, save/load
# ------------------------------------------------------------------------------------------------
def test_call_signature_is_stable_diffusions():
    ours = inspect.signature(LatentDiffusionPipeline.__call__).parameters
    stock = inspect.signature(StableDiffusionPipeline.__call__).parameters
    assert TEXT_TO_IMAGE_PARAMS <= set(ours)
    assert all(ours[name].default is not inspect.Parameter.empty for name in REQUIRED_OPTIONAL_PARAMS)
    shared = [name for name in stock if name in ours]
    assert set(stock) - set(shared) == {"ip_adapter_image", "ip_adapter_image_embeds", "kwargs"}
    assert [name for name in ours if name in stock] == shared  # same order: positional calls mean the same
    assert set(ours) == set(shared)  # nothing beyond stock SD's arguments
    ours_encode = list(inspect.signature(LatentDiffusionPipeline.encode_prompt).parameters)
    assert ours_encode == list(inspect.signature(StableDiffusionPipeline.encode_prompt).parameters)


def test_components_function(pipe):
    assert set(pipe.components) == {"vae", "text_encoder", "tokenizer", "unet", "scheduler"}


def test_save_load_local_and_variants(pipe, tmp_path):
    expected = run(pipe)
    pipe.save_pretrained(tmp_path / "plain")
    loaded = LatentDiffusionPipeline.from_pretrained(tmp_path / "plain")  # other loaders: test_pipeline.py
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(run(loaded), expected)
    pipe.save_pretrained(tmp_path / "variant", variant="fp16")
    names = [p.name for p in (tmp_path / "variant" / "unet").iterdir()]
    assert "diffusion_pytorch_model.fp16.safetensors" in names
    loaded = LatentDiffusionPipeline.from_pretrained(tmp_path / "variant", variant="fp16")
    assert all(torch.equal(a, b) for a, b in zip(loaded.unet.parameters(), pipe.unet.parameters()))
    with pytest.raises(ValueError, match="variant=fp16"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "plain", variant="fp16")
    with pytest.raises(ValueError, match="safe_serialization"):
        pipe.save_pretrained(tmp_path / "pickle", safe_serialization=False)


def test_to_dtype():
    pipe = make_pipe()
    pipe.to(dtype=torch.bfloat16)
    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    assert len(modules) == 3 and all(m.dtype == torch.bfloat16 for m in modules)
    images = run(pipe, num_inference_steps=2)
    assert images.dtype == torch.bfloat16 and torch.isfinite(images).all()


# ------------------------------------------------------------------------------------------------
# Batching and outputs
# ------------------------------------------------------------------------------------------------
def test_inference_batch_single_identical(pipe):
    """The harness's batch: unequal prompts, the last one far over the context length, one generator each."""
    prompts = [PROMPT, PROMPT[: len(PROMPT) // 2], 100 * "very long"]
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    batch = pipe(**inputs(prompt=prompts, generator=generators)).images
    assert batch.shape == (3, 3, 16, 16)
    for i, prompt in enumerate(prompts):
        assert max_diff(batch[i], run(pipe, prompt=prompt, seed=i)[0]) <= 1e-5


def test_dict_and_tuple_outputs_are_equal(pipe):
    assert torch.equal(pipe(**inputs(), return_dict=False)[0], run(pipe))


@pytest.mark.parametrize("batch, per_prompt", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_num_images_per_prompt(pipe, batch, per_prompt):
    images = pipe(**inputs(prompt=[PROMPT] * batch, num_images_per_prompt=per_prompt)).images
    assert images.shape[0] == batch * per_prompt


def test_cfg_on_and_off(pipe):
    rows = []
    hook = pipe.unet.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    try:
        off, on = run(pipe, guidance_scale=1.0), run(pipe, guidance_scale=7.5)
    finally:
        hook.remove()
    assert off.shape == on.shape and max_diff(off, on) > 1e-3
    assert rows == [1] * STEPS + [2] * STEPS  # the unconditional pass runs only with s > 1
    assert torch.allclose(off, manual_sample(pipe, [1.0] * STEPS), atol=1e-6)
    assert torch.allclose(on, manual_sample(pipe, [7.5] * STEPS), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Callbacks
# ------------------------------------------------------------------------------------------------
def test_callback_inputs(pipe):
    def only_allowed(p, i, t, kwargs):
        assert set(kwargs) <= set(p._callback_tensor_inputs)
        return kwargs

    def all_present(p, i, t, kwargs):
        assert set(kwargs) == set(p._callback_tensor_inputs)
        return kwargs

    def zero_last(p, i, t, kwargs):
        if i == p.num_timesteps - 1:
            kwargs["latents"] = torch.zeros_like(kwargs["latents"])
        return kwargs

    run(pipe, callback_on_step_end=only_allowed, callback_on_step_end_tensor_inputs=["latents"])
    run(pipe, callback_on_step_end=all_present, callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs)
    out = run(pipe, output_type="latent", callback_on_step_end=zero_last,
              callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs)
    assert out.abs().sum() == 0 and pipe.num_timesteps == STEPS


def test_callback_changing_guidance_is_used_at_the_next_step(pipe):
    def increase(p, i, t, kwargs):
        p._guidance_scale += 1.0
        return kwargs

    images = run(pipe, guidance_scale=2.0, callback_on_step_end=increase)
    assert pipe.guidance_scale == 2.0 + pipe.num_timesteps
    assert torch.allclose(images, manual_sample(pipe, [2.0 + i for i in range(STEPS)]), atol=1e-6)


def test_sd_cfg_cutoff_callback_equals_guidance_switched_off_by_hand(pipe):
    """cutoff_step_ratio 0.4 of 5 steps: guidance 6 for steps 0-2, then the conditional pass alone."""
    cutoff = int(STEPS * 0.4)

    def by_hand(p, i, t, kwargs):
        if i == cutoff:
            p._guidance_scale = 0.0
        return kwargs

    with_callback = run(pipe, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.4))
    assert pipe.guidance_scale == 0.0 and not pipe.do_classifier_free_guidance
    assert torch.equal(with_callback, run(pipe, callback_on_step_end=by_hand))
    reference = manual_sample(pipe, [6.0] * (cutoff + 1) + [0.0] * (STEPS - cutoff - 1))
    assert torch.allclose(with_callback, reference, atol=1e-6)
    assert max_diff(with_callback, run(pipe)) > 1e-4  # it did switch guidance off
    by_index = run(pipe, callback_on_step_end=MultiPipelineCallbacks([SDCFGCutoffCallback(None, cutoff_step_index=2)]))
    assert torch.equal(by_index, with_callback)


def test_sd_cfg_cutoff_callback_with_a_batch_is_refused_clearly(pipe):
    with pytest.raises(ValueError, match="one image per call"):
        run(pipe, prompt=[PROMPT, PROMPT], callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.4))


def test_callback_cannot_switch_guidance_on_without_unconditional_embeddings(pipe):
    def switch_on(p, i, t, kwargs):
        p._guidance_scale = 5.0
        return kwargs

    with pytest.raises(ValueError, match="guidance_scale > 1"):
        run(pipe, guidance_scale=1.0, callback_on_step_end=switch_on)


def test_interrupt_stops_at_the_step(pipe):
    seen = {}

    def stop_after_one(p, i, t, kwargs):
        seen[i] = kwargs["latents"].clone()
        p._interrupt = i == 1
        return kwargs

    out = run(pipe, output_type="latent", callback_on_step_end=stop_after_one)
    assert sorted(seen) == [0, 1] and torch.equal(out, seen[1]) and pipe.interrupt


# ------------------------------------------------------------------------------------------------
# encode_prompt in isolation
# ------------------------------------------------------------------------------------------------
def test_encode_prompt_works_in_isolation():
    parts = components()
    text_only = LatentDiffusionPipeline(**{k: (v if k in ("text_encoder", "tokenizer") else None)
                                           for k, v in parts.items()})
    with torch.no_grad():
        prompt_embeds, negative_prompt_embeds = text_only.encode_prompt(PROMPT)
        sd_style = text_only.encode_prompt(PROMPT, torch.device("cpu"), 2, True, "dark")  # positional, as in SD
    assert prompt_embeds.shape == negative_prompt_embeds.shape == (1, 16, 32)
    assert sd_style[0].shape == sd_style[1].shape == (2, 16, 32) and torch.equal(sd_style[0][1], prompt_embeds[0])
    no_text = make_pipe(**{k: (None if k in ("text_encoder", "tokenizer") else v) for k, v in parts.items()})
    from_embeds = no_text(**{**inputs(), "prompt": None}, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds).images
    assert torch.equal(from_embeds, run(make_pipe(**parts)))
    with torch.no_grad():
        alone, none = text_only.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    assert none is None and torch.equal(alone, prompt_embeds)


# ------------------------------------------------------------------------------------------------
# cross_attention_kwargs: the per-call LoRA scale
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """Random (non-zero) LoRA adapters on the U-Net attention and the text encoder, in diffusers' LoRA file."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = make_pipe()
    torch.manual_seed(1)
    unet_config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"])
    text_config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    inject_adapter_in_model(unet_config, pipe.unet)
    inject_adapter_in_model(text_config, pipe.text_encoder)
    folder = tmp_path_factory.mktemp("lora")
    pipe.save_lora_weights(folder, safe_serialization=True,
                           unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
                           text_encoder_lora_layers=convert_state_dict_to_diffusers(
                               get_peft_model_state_dict(pipe.text_encoder)))
    return folder


def test_lora_scale_zero_equals_the_base_model(lora_dir):
    base = run(make_pipe())
    pipe = make_pipe()
    pipe.load_lora_weights(lora_dir)
    full = run(pipe)
    assert max_diff(full, base) > 1e-3  # the LoRA changes the image
    assert torch.equal(run(pipe, cross_attention_kwargs={"scale": 0.0}), base)
    half = run(pipe, cross_attention_kwargs={"scale": 0.5})
    assert min(max_diff(half, base), max_diff(half, full)) > 1e-4
    assert torch.equal(run(pipe), full)  # the scale holds for one call only
    with torch.no_grad():
        text_base = make_pipe().encode_prompt(PROMPT)[0]
        assert torch.equal(pipe.encode_prompt(PROMPT, lora_scale=0.0)[0], text_base)  # the text encoder is scaled too
        assert max_diff(pipe.encode_prompt(PROMPT)[0], text_base) > 1e-4
    with pytest.raises(ValueError, match="cross_attention_kwargs"):
        run(pipe, cross_attention_kwargs={"scale": "half"})


# ------------------------------------------------------------------------------------------------
# Cheap extras: custom timesteps/sigmas, clip skip, eta, VAE slicing/tiling, FreeU
# ------------------------------------------------------------------------------------------------
def test_custom_timesteps_and_sigmas(pipe):
    euler = make_pipe(scheduler=EulerDiscreteScheduler.from_config(pipe.scheduler.config))
    seen = []
    run(euler, timesteps=[901, 601, 301, 1], callback_on_step_end=lambda p, i, t, kw: seen.append(int(t)))
    assert seen == [901, 601, 301, 1] and euler.num_timesteps == 4
    sigmas = [14.6, 5.0, 1.0, 0.3, 0.0]  # σ_0 … σ_N: N = 4 steps
    run(euler, sigmas=sigmas)
    assert euler.num_timesteps == 4 and torch.equal(euler.scheduler.sigmas, torch.tensor(sigmas))
    with pytest.raises(ValueError, match="`timesteps` and `sigmas`"):
        run(euler, timesteps=[901, 1], sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="custom timestep"):
        run(pipe, timesteps=[901, 1])  # DDIM's set_timesteps takes no custom schedule


def test_clip_skip_conditions_on_an_earlier_layer_for_both_texts(pipe):
    with torch.no_grad():
        ids = pipe.tokenizer([PROMPT, ""], padding="max_length", max_length=16, truncation=True,
                             return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        cond, uncond = pipe.text_encoder.final_layer_norm(hidden).chunk(2)
    skipped = run(pipe, clip_skip=1)
    assert torch.allclose(skipped, run(pipe, prompt=None, prompt_embeds=cond, negative_prompt_embeds=uncond),
                          atol=1e-6)
    assert max_diff(skipped, run(pipe)) > 1e-4
    assert torch.equal(run(pipe, clip_skip=0), run(pipe))
    with pytest.raises(ValueError, match="clip_skip"):
        run(pipe, clip_skip=3)  # the text encoder has 3 layers


def test_eta_reaches_ddim(pipe):
    assert torch.equal(run(pipe, eta=0.0), run(pipe))
    assert max_diff(run(pipe, eta=1.0), run(pipe)) > 1e-4
    with pytest.raises(ValueError, match="eta"):
        run(pipe, eta=-1.0)


def test_vae_slicing_and_tiling():
    pipe = make_pipe()

    def batch():
        return dict(prompt=[PROMPT, "a blue square"], generator=[torch.Generator().manual_seed(i) for i in (0, 1)])

    plain = run(pipe, **batch())
    pipe.vae.enable_slicing()
    assert max_diff(run(pipe, **batch()), plain) <= 1e-6
    pipe.vae.disable_slicing()
    pipe.vae.enable_tiling()
    pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 8, 4  # 16 px images in 8 px tiles
    calls = []
    tiled_decode = pipe.vae.tiled_decode
    pipe.vae.tiled_decode = lambda *a, **k: calls.append(1) or tiled_decode(*a, **k)
    tiled = run(pipe, **batch())
    assert calls and tiled.shape == plain.shape and max_diff(tiled, plain) < 0.5  # blended seams, as diffusers


def test_freeu_changes_and_restores(pipe):
    plain = run(pipe)
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    try:
        assert max_diff(run(pipe), plain) > 1e-4
    finally:
        pipe.disable_freeu()
    assert torch.equal(run(pipe), plain)
