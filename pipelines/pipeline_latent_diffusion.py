"""Text-to-image sampling with a latent diffusion model (Rombach et al. 2022).

    prompt ──CLIPTokenizer/CLIPTextModel──► c [B, L, D]
    z_T ~ N(0, σ_T² I) ──UNet2DConditionModel + scheduler, classifier-free guidance──► z_0 [B, C, H/f, W/f]
    z_0 ──AutoencoderKL.decode(z_0 / s + shift)──► image [B, 3, H, W]

The components are the standard diffusers/transformers classes, so a folder written by
`LatentDiffusionPipeline.save_pretrained` also loads in stock `StableDiffusionPipeline`, and this file
is copied into that folder so that `DiffusionPipeline.from_pretrained(folder, custom_pipeline=...)`
finds it. It therefore imports nothing but torch, diffusers, transformers and the standard library.

It follows `StableDiffusionPipeline`'s conventions, so diffusers' callbacks and APIs work unchanged:
the call signature (custom `timesteps`/`sigmas`, `cross_attention_kwargs={"scale": s}` for the LoRA scale,
`clip_skip`, `eta`), `encode_prompt`, and the per-call state a `callback_on_step_end` may read or change
(`guidance_scale`, `do_classifier_free_guidance`, `num_timesteps`, `interrupt`). VAE slicing and tiling
are the VAE's own `pipe.vae.enable_slicing()` / `enable_tiling()`.

Beyond stock Stable Diffusion it handles U-Nets with a learned variance (Nichol & Dhariwal 2021),
VAEs whose downsampling factor is not 8, and VAEs with a `shift_factor`.
"""

import contextlib
import inspect
import math
import os
import shutil

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput, StableDiffusionMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import USE_PEFT_BACKEND, logging, scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
LEARNED_VARIANCE = ("learned", "learned_range")


def classifier_free_guidance(pred_uncond, pred_cond, scale):
    """ε̃ = ε(z, ∅) + s · (ε(z, c) − ε(z, ∅))   (Ho & Salimans 2022, Eq. 6 with s = 1 + w).

    Shapes: all [B, C, h, w]. s = 1 gives the conditional prediction.
    """
    return pred_uncond + scale * (pred_cond - pred_uncond)


def rescale_guidance(pred_cfg, pred_cond, phi):
    """ε = φ · ε̃ · std(ε_c) / std(ε̃) + (1 − φ) · ε̃   (Lin et al. 2023, Sec. 3.4).

    Rescales the guided prediction ε̃ to the per-sample standard deviation of the conditional one ε_c
    (fixes over-exposure at high guidance), then mixes back by φ ∈ [0, 1]. Shapes: [B, C, h, w].
    """
    dims = list(range(1, pred_cfg.ndim))
    ratio = pred_cond.std(dim=dims, keepdim=True) / pred_cfg.std(dim=dims, keepdim=True)
    return phi * (pred_cfg * ratio) + (1 - phi) * pred_cfg


def scheduler_takes_variance(scheduler):
    """True when `scheduler.step` itself splits a [mean, v] model output (DDPMScheduler and kin).

    That needs a learned `variance_type` in the config and a variance formula that accepts the model's
    prediction (`_get_variance(..., predicted_variance=...)`). Every `from_config` copy carries the key
    `variance_type` along, so the config alone does not decide: DDIM, Euler, UniPC or DPM-Solver built
    from a learned-variance DDPM config still take the mean only.
    """
    if getattr(scheduler.config, "variance_type", None) not in LEARNED_VARIANCE:
        return False
    get_variance = getattr(scheduler, "_get_variance", None)
    return get_variance is not None and "predicted_variance" in inspect.signature(get_variance).parameters


@contextlib.contextmanager
def hide_learned_variance(scheduler):
    """Show a mean-only scheduler `variance_type=None` while sampling, and restore its config after.

    DPM-Solver (and SA-Solver) read a learned `variance_type` as "keep `model_output[:, :3]`", written for
    3-channel pixel models and wrong for C-channel latents. The pipeline already hands it the C-channel mean.
    """
    variance_type = getattr(scheduler.config, "variance_type", None)
    if variance_type not in LEARNED_VARIANCE:
        yield
        return
    scheduler.register_to_config(variance_type=None)
    try:
        yield
    finally:
        scheduler.register_to_config(variance_type=variance_type)


def schedule_problem(scheduler, steps=None):
    """Why the scheduler's current timesteps cannot sample (None when they can).

    Each timestep must index the training schedule, t ∈ {0, …, T − 1}; a first-order scheduler (one model
    call per timestep) must visit each once and, when asked for `steps`, take that many. diffusers' timestep
    spacings break this for some step counts — e.g. DPM-Solver++ with "leading" spacing at 999 of T = 1000
    steps gives t = 1000 and a blank image, "trailing" at 61 steps gives 62 timesteps — and sample
    anyway. Second-order schedulers (Heun, KDPM2) repeat timesteps by design.
    """
    t = [float(x) for x in scheduler.timesteps]
    last = scheduler.config.num_train_timesteps - 1
    if not t:
        return "it made no timesteps"
    if min(t) < 0 or max(t) > last:
        return f"it made timestep {max(t) if max(t) > last else min(t):g}, outside the schedule's 0 to {last}"
    if getattr(scheduler, "order", 1) == 1 and len(set(t)) != len(t):
        return "it made a timestep twice"
    if getattr(scheduler, "order", 1) == 1 and steps is not None and len(t) != steps:
        return f"it made {len(t)} timesteps for {steps} steps"
    return None


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_text(value):
    return isinstance(value, str) or (
        isinstance(value, list) and len(value) > 0 and all(isinstance(v, str) for v in value)
    )


def _per_image(embeds, n, device, dtype):
    """[B, L, D] -> [B · n, L, D], prompt-major (None stays None)."""
    return None if embeds is None else embeds.to(device=device, dtype=dtype).repeat_interleave(n, dim=0)


class LatentDiffusionPipeline(DiffusionPipeline, StableDiffusionMixin, StableDiffusionLoraLoaderMixin):
    """Text-to-image latent diffusion: CLIP text encoder → conditional latent U-Net → KL-VAE decoder.

    Args:
        vae: `AutoencoderKL`; its `scaling_factor` (and `shift_factor`, when set) map latents to unit scale.
        text_encoder: `CLIPTextModel`; its last hidden state conditions the U-Net.
        tokenizer: `CLIPTokenizer`.
        unet: `UNet2DConditionModel` predicting the mean part (ε, v or x₀, as the scheduler's
            `prediction_type` says), or [mean, variance interpolation v] when it has 2C output channels.
        scheduler: any diffusers scheduler, e.g. `DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _lora_loadable_modules = ["unet", "text_encoder"]  # pipe.load_lora_weights(dir), as in stock SD
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    # state of the current call (StableDiffusionPipeline's names); a step-end callback may change it
    _guidance_scale, _guidance_rescale, _clip_skip, _cross_attention_kwargs = 1.0, 0.0, None, None
    _num_timesteps, _interrupt = 0, False

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
    ):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)

    @property
    def vae_scale_factor(self):
        """f, the VAE's real spatial downsampling: one ×2 per level after the first."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self):
        return self.vae.config.latent_channels

    @property
    def learned_variance(self):
        """True when the U-Net predicts [mean, v] (Improved DDPM): 2C output channels."""
        return self.unet.config.out_channels == 2 * self.latent_channels

    @property
    def text_context_length(self):
        """Tokens per prompt: the tokenizer's model_max_length, bounded by the encoder's positions."""
        return min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)

    # --- per-call state, as StableDiffusionPipeline exposes it ---------------------------------------
    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def guidance_rescale(self):
        return self._guidance_rescale

    @property
    def do_classifier_free_guidance(self):
        """s > 1: the unconditional pass runs. Read at every step (SDCFGCutoffCallback sets s = 0)."""
        return self._guidance_scale > 1

    @property
    def clip_skip(self):
        return self._clip_skip

    @property
    def cross_attention_kwargs(self):
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        """Set `pipe._interrupt = True` in a callback to skip the remaining steps (the latents so far decode)."""
        return self._interrupt

    def save_pretrained(self, save_directory, **kwargs):
        """`DiffusionPipeline.save_pretrained` (safetensors only) plus a copy of this file.

        The copy is written first, so `push_to_hub=True` uploads it as well. `model_index.json` keeps the
        plain class name, which stock `StableDiffusionPipeline.from_pretrained(folder)` accepts.
        """
        if not kwargs.get("safe_serialization", True):
            raise ValueError("`safe_serialization=False`: this pipeline saves safetensors only.")
        os.makedirs(save_directory, exist_ok=True)
        target = os.path.join(save_directory, "pipeline_latent_diffusion.py")
        with contextlib.suppress(shutil.SameFileError):
            shutil.copyfile(os.path.abspath(__file__), target)
        super().save_pretrained(save_directory, **kwargs)

    # --- input checks: a ValueError naming the argument for every impossible input -------------------
    def _check_text_inputs(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds):
        """Checks the text arguments and returns the prompt batch size B."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("Pass exactly one of `prompt` and `prompt_embeds`.")
        if prompt is not None and not _is_text(prompt):
            raise ValueError(f"`prompt` must be a str or a non-empty list of str, got {type(prompt).__name__}.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass at most one of `negative_prompt` and `negative_prompt_embeds`.")
        if negative_prompt is not None and not _is_text(negative_prompt):
            raise ValueError("`negative_prompt` must be a str or a non-empty list of str.")
        width = self.unet.config.cross_attention_dim
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is None:
                continue
            if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
                raise ValueError(f"`{name}` must be a tensor [batch, tokens, dim].")
            if isinstance(width, int) and embeds.shape[-1] != width:
                raise ValueError(f"`{name}` has dim {embeds.shape[-1]}, the U-Net cross-attends to {width}.")
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    f"`negative_prompt_embeds` has shape {tuple(negative_prompt_embeds.shape)}, "
                    f"`prompt_embeds` {tuple(prompt_embeds.shape)}; they must match."
                )
        batch = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        if isinstance(negative_prompt, list) and len(negative_prompt) != batch:
            raise ValueError(f"`negative_prompt` has {len(negative_prompt)} entries for a batch of {batch} prompts.")
        return batch

    def _check_sampling_inputs(self, height, width, steps, per_prompt, guidance_scale, guidance_rescale):
        f = self.vae_scale_factor
        for name, size in (("height", height), ("width", width)):
            if not _is_int(size) or size <= 0 or size % f:
                raise ValueError(f"`{name}`={size!r} must be a positive multiple of the VAE factor {f}.")
        if not _is_int(steps) or steps < 1:
            raise ValueError(f"`num_inference_steps`={steps!r} must be an integer >= 1.")
        if not _is_int(per_prompt) or per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt`={per_prompt!r} must be an integer >= 1.")
        if not _is_number(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"`guidance_scale`={guidance_scale!r} must be a finite number >= 0 (<= 1: no guidance).")
        if not _is_number(guidance_rescale) or not 0 <= guidance_rescale <= 1:
            raise ValueError(f"`guidance_rescale`={guidance_rescale!r} must be in [0, 1].")

    def _check_options(self, timesteps, sigmas, eta, cross_attention_kwargs, clip_skip):
        if timesteps is not None and sigmas is not None:
            raise ValueError("Pass at most one of `timesteps` and `sigmas`.")
        if not _is_number(eta) or eta < 0:
            raise ValueError(f"`eta`={eta!r} must be a finite number >= 0 (DDIM's η; 0 = deterministic).")
        if cross_attention_kwargs is not None and not isinstance(cross_attention_kwargs, dict):
            raise ValueError("`cross_attention_kwargs` must be a dict, e.g. {'scale': 0.5} for the LoRA scale.")
        scale = (cross_attention_kwargs or {}).get("scale")
        if scale is not None and not _is_number(scale):
            raise ValueError(f"`cross_attention_kwargs['scale']`={scale!r} must be a finite number (the LoRA scale).")
        layers = self.text_encoder.config.num_hidden_layers if self.text_encoder is not None else math.inf
        if clip_skip is not None and (not _is_int(clip_skip) or not 0 <= clip_skip < layers):
            raise ValueError(f"`clip_skip`={clip_skip!r} must be an integer in [0, {layers}): layers skipped from the end.")

    def _check_run_inputs(self, shape, generator, latents, output_type, callback, callback_inputs):
        if isinstance(generator, list):
            if len(generator) != shape[0] or not all(isinstance(g, torch.Generator) for g in generator):
                raise ValueError(f"`generator` list must hold {shape[0]} torch.Generator (batch x images per prompt).")
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError("`generator` must be a torch.Generator or a list of them.")
        if latents is not None and (not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape):
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"`latents` must be a tensor of shape {shape}, got {got}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type`={output_type!r} must be one of {OUTPUT_TYPES}.")
        if callback is not None and not callable(callback):
            raise ValueError("`callback_on_step_end` must be callable(pipe, step_index, timestep, callback_kwargs).")
        unknown = [k for k in callback_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has {unknown}; allowed: {self._callback_tensor_inputs}."
            )
        if self.unet.config.out_channels not in (self.latent_channels, 2 * self.latent_channels):
            raise ValueError(f"unet.config.out_channels must be {self.latent_channels} or twice that.")
        if scheduler_takes_variance(self.scheduler) and not self.learned_variance:
            raise ValueError("scheduler.config.variance_type is learned but the U-Net predicts no variance.")

    # --- text ----------------------------------------------------------------------------------------
    def _encode_text(self, texts, device, clip_skip=None):
        """Text-encoder states [len(texts), L, D] and how many tokens each text lost to the context length.

        The last hidden state, or with `clip_skip` = k the one k layers earlier through the final LayerNorm
        (stock SD's clip skip; a tower truncated by k layers gives the same numbers).
        """
        length = self.text_context_length
        tokens = self.tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        full_lengths = [len(ids) for ids in self.tokenizer(texts, verbose=False).input_ids]
        use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
        mask = tokens.attention_mask.to(device) if use_mask else None
        ids = tokens.input_ids.to(device)
        if clip_skip is None:
            embeds = self.text_encoder(ids, attention_mask=mask)[0]
        else:  # transformers >= 5 dropped CLIPTextModel's `text_model` wrapper (stock SD still reads it)
            hidden = self.text_encoder(ids, attention_mask=mask, output_hidden_states=True).hidden_states
            final_norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
            embeds = final_norm(hidden[-(clip_skip + 1)])
        return embeds, [max(0, n - length) for n in full_lengths]

    def _encode_distinct(self, texts, device, clip_skip=None):
        """{name: [str]} → ({name: [len, L, D]}, {name: tokens each text lost}) from ONE text-encoder call
        over the distinct texts. The encoder treats every row on its own, so this changes no result."""
        unique = list(dict.fromkeys(t for batch in texts.values() for t in batch))
        if not unique:
            return {}, {}
        embeds, lost = self._encode_text(unique, device, clip_skip)
        row = {t: i for i, t in enumerate(unique)}
        rows = {name: [row[t] for t in batch] for name, batch in texts.items()}
        return ({name: embeds[torch.tensor(r, device=embeds.device)] for name, r in rows.items()},
                {name: [lost[i] for i in r] for name, r in rows.items()})

    @contextlib.contextmanager
    def _text_encoder_lora_scale(self, scale):
        """Scale the text encoder's LoRA layers by `scale` for one encode, then restore them (as stock SD)."""
        active = scale is not None and USE_PEFT_BACKEND and self.text_encoder is not None
        if active:
            scale_lora_layers(self.text_encoder, scale)
        try:
            yield
        finally:
            if active:
                unscale_lora_layers(self.text_encoder, scale)

    def encode_prompt(
        self,
        prompt,
        device=None,
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        lora_scale=None,
        clip_skip=None,
    ):
        """Conditional and unconditional embeddings c, u, each [B · n, L, D]; u is None without guidance.

        `StableDiffusionPipeline.encode_prompt`'s signature and return value; it needs only the tokenizer and
        the text encoder (the embeddings keep the text encoder's dtype, or the given embeddings'). The
        negative prompt defaults to "" — the empty-prompt embedding that caption dropout trains for. Prompts
        and negative prompts are encoded together, each distinct text once (the default "" is one row), so
        `clip_skip` applies to the negative prompt too (stock SD encodes that one from the last layer).
        `lora_scale` scales the text encoder's LoRA layers for this call. Nothing is cached across calls: the
        text encoder may change in place (LoRA fusing writes through `.data`, which bumps no version counter).
        """
        device = device or self._execution_device
        guided, texts = do_classifier_free_guidance, {}
        if prompt_embeds is None:
            texts["prompt"] = [prompt] if isinstance(prompt, str) else list(prompt)
        if guided and negative_prompt_embeds is None:
            negative = negative_prompt or ""
            batch = len(texts["prompt"]) if prompt_embeds is None else len(prompt_embeds)
            texts["negative_prompt"] = [negative] * batch if isinstance(negative, str) else list(negative)
        if texts and (self.text_encoder is None or self.tokenizer is None):
            raise ValueError("This pipeline has no text encoder: pass `prompt_embeds` (and `negative_prompt_embeds`).")
        with self._text_encoder_lora_scale(lora_scale):
            encoded, cut = self._encode_distinct(texts, device, clip_skip)
        prompt_embeds = encoded.get("prompt", prompt_embeds)
        negative_prompt_embeds = encoded.get("negative_prompt", negative_prompt_embeds) if guided else None
        if guided and negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(
                f"`negative_prompt_embeds` (given or encoded from `negative_prompt`) has shape "
                f"{tuple(negative_prompt_embeds.shape)}, the prompt embeddings {tuple(prompt_embeds.shape)}."
            )
        self._warn_truncated(cut)
        dtype = self.text_encoder.dtype if self.text_encoder is not None else prompt_embeds.dtype
        prompt_embeds = _per_image(prompt_embeds, num_images_per_prompt, device, dtype)
        negative_prompt_embeds = _per_image(negative_prompt_embeds, num_images_per_prompt, device, dtype)
        return prompt_embeds, negative_prompt_embeds  # one return of names: diffusers' harness parses it

    def _warn_truncated(self, cut):
        """One warning per call listing every text that lost tokens to the context length."""
        lost = [f"{name}[{i}]: {n} token(s) cut" for name, counts in cut.items() for i, n in enumerate(counts) if n]
        if lost:
            context = self.text_context_length
            logger.warning(f"Truncated to the text encoder's {context}-token context: {'; '.join(lost)}.")

    # --- sampling ------------------------------------------------------------------------------------
    def prepare_latents(self, shape, generator, latents, device=None, dtype=None):
        """z_T = σ_T · ε with ε ~ N(0, I) drawn from `generator` (or the given `latents` as ε)."""
        device, dtype = device or self._execution_device, dtype or self.unet.dtype
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

    def predict(self, latents, t, cond, uncond, guidance_scale, guidance_rescale, keep_variance):
        """One guided U-Net evaluation: the mean part [B, C, h, w], or [mean, v] [B, 2C, h, w] if keep_variance.

        `uncond` None: no guidance (the conditional prediction alone).
        """
        # 1. batch the unconditional and conditional passes into one U-Net call: [z; z] with [u; c]
        guided = uncond is not None
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = self.scheduler.scale_model_input(model_input, t)
        context = torch.cat([uncond, cond]) if guided else cond
        output = self.unet(model_input, t, encoder_hidden_states=context,
                           cross_attention_kwargs=self.cross_attention_kwargs, return_dict=False)[0]
        # 2. split the mean part from the variance interpolation v (Nichol & Dhariwal 2021, Eq. 15);
        #    v is empty for a U-Net without learned variance
        channels = latents.shape[1]
        mean, v = output[:, :channels], output[:, channels:]
        # 3. guidance acts on the mean only; v stays the conditional one (as in GLIDE)
        if guided:
            mean_uncond, mean_cond = mean.chunk(2)
            v = v.chunk(2)[1]
            mean = classifier_free_guidance(mean_uncond, mean_cond, guidance_scale)
            if guidance_rescale > 0:
                mean = rescale_guidance(mean, mean_cond, guidance_rescale)
        # 4. a variance-aware scheduler (DDPM learned/learned_range) gets [mean, v]; any other the mean
        return torch.cat([mean, v], dim=1) if keep_variance else mean

    def _step_kwargs(self, generator, eta):
        """`generator` for schedulers whose step draws noise (DDPM, ancestral samplers); `eta` for DDIM."""
        accepts = inspect.signature(self.scheduler.step).parameters
        return {k: v for k, v in (("generator", generator), ("eta", eta)) if k in accepts}

    def _unconditional(self, state):
        """u for this step, or None while guidance is off (a callback may switch it off, or back on)."""
        if not self.do_classifier_free_guidance:
            return None
        if state["negative_prompt_embeds"] is None:
            raise ValueError(
                "A callback raised `_guidance_scale` above 1 in a call that started without guidance, so there are "
                "no unconditional embeddings: start with guidance_scale > 1 (or pass `negative_prompt_embeds`)."
            )
        return state["negative_prompt_embeds"]

    def _run_callback(self, callback, i, t, state, names):
        """callback(pipe, i, t, {name: tensor}); the tensors it returns replace the state's."""
        changes = callback(self, i, t, {k: state[k] for k in names}) or {}
        state.update({k: changes[k] for k in self._callback_tensor_inputs if k in changes})
        rows = state["latents"].shape[0]
        for name in ("prompt_embeds", "negative_prompt_embeds"):
            if state[name] is not None and state[name].shape[0] != rows:
                raise ValueError(
                    f"The step-end callback left `{name}` with {state[name].shape[0]} rows for {rows} latents. "
                    f"(diffusers' SDCFGCutoffCallback keeps one row: it supports one image per call.)"
                )

    def denoise(self, state, generator, eta, callback, callback_inputs):
        """Run the scheduler from z_T to z_0. `state` holds latents, prompt_embeds, negative_prompt_embeds.

        Guidance, its rescale and the cross-attention kwargs are read from the pipeline at every step, so a
        step-end callback may change them: diffusers' `SDCFGCutoffCallback` sets `_guidance_scale = 0` (the
        following steps run the conditional pass only); `_interrupt = True` skips the remaining steps.
        """
        keep_variance = self.learned_variance and scheduler_takes_variance(self.scheduler)
        step_kwargs = self._step_kwargs(generator, eta)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        hide = contextlib.nullcontext() if keep_variance else hide_learned_variance(self.scheduler)
        with hide, self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                latents, cond, uncond = state["latents"], state["prompt_embeds"], self._unconditional(state)
                output = self.predict(latents, t, cond, uncond, self.guidance_scale, self.guidance_rescale,
                                      keep_variance)
                state["latents"] = self.scheduler.step(output, t, latents, **step_kwargs, return_dict=False)[0]
                if callback is not None:
                    self._run_callback(callback, i, t, state, callback_inputs)
                progress.update()
        return state["latents"]

    # --- decoding ------------------------------------------------------------------------------------
    def decode_latents(self, latents):
        """x = D(z / s + shift): undo the latent normalisation z = (E(x) − shift) · s, then decode to [-1, 1].

        A float16 VAE with `force_upcast` decodes in float32 (its decoder overflows in half precision).
        """
        config = self.vae.config
        z = latents / config.scaling_factor
        if getattr(config, "shift_factor", None) is not None:
            z = z + config.shift_factor
        dtype = self.vae.dtype
        upcast = dtype == torch.float16 and getattr(config, "force_upcast", False)
        if upcast:
            self.vae.to(dtype=torch.float32)
        try:
            return self.vae.decode(z.to(torch.float32 if upcast else dtype), return_dict=False)[0]
        finally:
            if upcast:
                self.vae.to(dtype=torch.float16)

    def _format(self, images, output_type):
        """[-1, 1] tensors → [0, 1] "pt" [B, 3, H, W], float32 "np" [B, H, W, 3], or a list of "pil" images."""
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        images = images.cpu().permute(0, 2, 3, 1).float().numpy()
        return images if output_type == "np" else self.numpy_to_pil(images)

    def _default_size(self, height, width):
        """Pixels: the U-Net's sample_size · f where not given."""
        f, size = self.vae_scale_factor, self.unet.config.sample_size
        default_h, default_w = (size, size) if _is_int(size) else size
        return (default_h * f if height is None else height), (default_w * f if width is None else width)

    @torch.no_grad()
    def __call__(
        self,
        prompt=None,
        height=None,
        width=None,
        num_inference_steps=50,
        timesteps=None,
        sigmas=None,
        guidance_scale=5.0,
        negative_prompt=None,
        num_images_per_prompt=1,
        eta=0.0,
        generator=None,
        latents=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        output_type="pil",
        return_dict=True,
        cross_attention_kwargs=None,
        guidance_rescale=0.0,
        clip_skip=None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
    ):
        """Generate images from text. The arguments, their order and their meaning are StableDiffusionPipeline's.

        Args:
            prompt: a str or list of str; or pass `prompt_embeds` [B, L, D] instead.
            height, width: pixels, positive multiples of `vae_scale_factor`; default unet sample_size · f.
            num_inference_steps: scheduler steps (ignored when `timesteps` or `sigmas` are given).
            timesteps, sigmas: a custom schedule, for schedulers whose `set_timesteps` accepts one.
            guidance_scale: s in ε̃ = ε_∅ + s (ε_c − ε_∅); s <= 1 skips the unconditional pass.
            negative_prompt: str (used for every prompt) or list of B str; default "" (the unconditional
                embedding). Or `negative_prompt_embeds` with the shape of the prompt embeddings.
            num_images_per_prompt: images per prompt; the batch is ordered prompt-major.
            eta: DDIM's η (schedulers without it ignore it).
            generator: a torch.Generator, or one per image (B · num_images_per_prompt) for per-image seeds.
            latents: noise [B · n, C, H/f, W/f] to start from (scaled by the scheduler's init_noise_sigma).
            output_type: "pil", "np" (float [0, 1], NHWC), "pt" (float [0, 1], NCHW) or "latent" (z_0).
            return_dict: `ImagePipelineOutput` if True, else the tuple `(images,)`.
            cross_attention_kwargs: passed to the U-Net's attention processors; its "scale" is the LoRA scale
                of this call, for the U-Net and the text encoder (0 = the base model).
            guidance_rescale: φ ∈ [0, 1] of Lin et al. 2023 (0 = off).
            clip_skip: condition on the hidden state this many layers before the last (through the final LN).
            callback_on_step_end: f(pipe, step_index, timestep, {name: tensor}) after every step, or a diffusers
                `PipelineCallback`; it may return a dict replacing any of `latents`, `prompt_embeds` (c) and
                `negative_prompt_embeds` (u), each [B · n, ...], and may set `pipe._guidance_scale` or
                `pipe._interrupt`.
            callback_on_step_end_tensor_inputs: names passed to the callback, from `_callback_tensor_inputs`
                (a `PipelineCallback` brings its own `tensor_inputs`).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        # 0. defaults and checks
        height, width = self._default_size(height, width)
        batch = self._check_text_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        self._check_sampling_inputs(
            height, width, num_inference_steps, num_images_per_prompt, guidance_scale, guidance_rescale
        )
        self._check_options(timesteps, sigmas, eta, cross_attention_kwargs, clip_skip)
        f = self.vae_scale_factor
        shape = (batch * num_images_per_prompt, self.latent_channels, height // f, width // f)
        callback_inputs = list(callback_on_step_end_tensor_inputs)
        self._check_run_inputs(shape, generator, latents, output_type, callback_on_step_end, callback_inputs)
        self._guidance_scale, self._guidance_rescale, self._clip_skip = guidance_scale, guidance_rescale, clip_skip
        self._cross_attention_kwargs, self._interrupt = cross_attention_kwargs, False
        # 1. text embeddings c and u, each [B · n, L, D]; the device is looked up once (it walks every module)
        device, dtype = self._execution_device, self.unet.dtype
        cond, uncond = self.encode_prompt(
            prompt, device, num_images_per_prompt, self.do_classifier_free_guidance, negative_prompt,
            prompt_embeds, negative_prompt_embeds, (cross_attention_kwargs or {}).get("scale"), clip_skip,
        )
        # 2. timesteps, then z_T (a scheduler's σ_T may depend on its timesteps)
        retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)
        asked = num_inference_steps if timesteps is None and sigmas is None else None
        problem = schedule_problem(self.scheduler, asked)
        if problem:
            raise ValueError(f"{type(self.scheduler).__name__} cannot sample with these timesteps "
                             f"(`num_inference_steps`={asked}): {problem}. Choose another step count.")
        latents = self.prepare_latents(shape, generator, latents, device, dtype)
        state = {"latents": latents, "prompt_embeds": cond.to(dtype),
                 "negative_prompt_embeds": None if uncond is None else uncond.to(dtype)}
        # 3. denoise z_T -> z_0
        latents = self.denoise(state, generator, eta, callback_on_step_end, callback_inputs)
        # 4. decode and format
        images = latents if output_type == "latent" else self._format(self.decode_latents(latents), output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
