"""The reference: one training step the way diffusers' ``examples/text_to_image/train_text_to_image.py`` does it.

What that script does every step, reproduced here without its argparse and Accelerate wrapping:
  - a ``datasets`` imagefolder with ``with_transform``: decode each PNG, RGB, torchvision
    Resize/CenterCrop/(flip)/ToTensor/Normalize, tokenize the captions; a shuffling DataLoader
    (``--dataloader_num_workers`` defaults to 0);
  - ``vae.encode(pixels).latent_dist.sample() * scaling_factor`` and ``text_encoder(input_ids)[0]``
    inside the step (frozen, no grad);
  - noise, uniform timesteps, ``noise_scheduler.add_noise``, the U-Net, MSE with the Min-SNR-γ
    weights of ``compute_snr`` (``--snr_gamma``), backward, clip, AdamW, LR scheduler;
  - ``EMAModel.step`` (``--use_ema``; ``--foreach_ema`` off by default) and ``loss.item()`` for logging.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader


def example_dataloader(data_dir: str | Path, tokenizer, resolution: int, batch_size: int, random_flip: bool,
                       seed: int, num_workers: int = 0) -> DataLoader:
    """The example's dataset and loader: decode + transform + tokenize on every visit."""
    import datasets
    from torchvision import transforms

    dataset = datasets.load_dataset("imagefolder", data_dir=str(data_dir), split="train")
    train_transforms = transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution),
        transforms.RandomHorizontalFlip() if random_flip else transforms.Lambda(lambda x: x),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])

    def preprocess_train(examples):
        images = [image.convert("RGB") for image in examples["image"]]
        examples["pixel_values"] = [train_transforms(image) for image in images]
        examples["input_ids"] = tokenizer(examples["text"], max_length=tokenizer.model_max_length,
                                          padding="max_length", truncation=True, return_tensors="pt").input_ids
        return examples

    def collate_fn(examples):
        pixel_values = torch.stack([e["pixel_values"] for e in examples])
        pixel_values = pixel_values.to(memory_format=torch.contiguous_format).float()
        return {"pixel_values": pixel_values, "input_ids": torch.stack([e["input_ids"] for e in examples])}

    return DataLoader(dataset.with_transform(preprocess_train), shuffle=True, collate_fn=collate_fn,
                      batch_size=batch_size, num_workers=num_workers, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


def endless(loader: DataLoader):
    while True:
        yield from loader


class ReferenceStep:
    """Callable: one optimizer step of the example on the next batch; ``images`` per call."""

    def __init__(self, parts, unet, data_dir, resolution: int, batch_size: int, learning_rate: float,
                 snr_gamma: float | None, max_grad_norm: float, ema_decay: float | None, random_flip: bool,
                 seed: int, autocast: bool = False, lr_schedule: str = "constant", lr_warmup_steps: int = 0,
                 max_steps: int = 1):
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        self.vae, self.text_encoder, self.unet, self.scheduler = parts.vae, parts.text_encoder, unet, parts.scheduler
        self.snr_gamma, self.max_grad_norm, self.images = snr_gamma, max_grad_norm, batch_size
        self.batches = endless(example_dataloader(data_dir, parts.tokenizer, resolution, batch_size, random_flip,
                                                  seed))
        self.optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate)
        self.lr_scheduler = get_scheduler({"constant": "constant_with_warmup"}.get(lr_schedule, lr_schedule),
                                          self.optimizer, num_warmup_steps=lr_warmup_steps,
                                          num_training_steps=max_steps)  # --lr_scheduler, --lr_warmup_steps
        self.ema = (EMAModel(unet.parameters(), decay=ema_decay, model_cls=type(unet), model_config=unet.config)
                    if ema_decay else None)
        self.weight_dtype = torch.bfloat16 if autocast else torch.float32
        if autocast:  # the example casts the frozen models to the mixed-precision dtype
            self.vae.to(self.weight_dtype)
            self.text_encoder.to(self.weight_dtype)
        self.autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
        self.losses: list[float] = []

    def __call__(self) -> None:
        batch = next(self.batches)
        with self.autocast():
            loss = self.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        if self.ema is not None:
            self.ema.step(self.unet.parameters())
        self.losses.append(loss.detach().item())

    def loss(self, batch: dict) -> torch.Tensor:
        from diffusers.training_utils import compute_snr

        with torch.no_grad():
            latents = self.vae.encode(batch["pixel_values"].to(self.weight_dtype)).latent_dist.sample()
            latents = latents * self.vae.config.scaling_factor
            encoder_hidden_states = self.text_encoder(batch["input_ids"], return_dict=False)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
        noisy_latents = self.scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.scheduler.config.prediction_type
        target = noise if prediction_type == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)
        model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        if self.snr_gamma is None:
            return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        snr = compute_snr(self.scheduler, timesteps)
        mse_loss_weights = torch.stack([snr, self.snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
        mse_loss_weights = mse_loss_weights / (snr if prediction_type == "epsilon" else snr + 1)
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
        return (loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights).mean()
