"""What the toy world's training scripts share: logging, thread count, the diffusion loss, file names."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_OUT = Path("toy_weights")  # a local folder; copy the results into fusion_engine/worlds/toy/weights


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def adapt_threads(cap: int = 2) -> None:
    """``cap`` threads on an idle machine, fewer while something else is busy (oversubscribed threads spin).

    ``TOY_TRAIN_FIXED_THREADS=1`` keeps the count the script set (``--threads``): for a machine whose other
    work runs at ``nice 19``, which the load average counts but which yields the cores to training.
    """
    if os.environ.get("TOY_TRAIN_FIXED_THREADS") == "1":
        return
    busy = os.getloadavg()[0] - torch.get_num_threads()
    torch.set_num_threads(max(1, min(cap, round(os.cpu_count() - busy))))


def alphas_cumprod() -> torch.Tensor:
    from diffusers import DDPMScheduler

    from fusion_engine.worlds.toy.configs import SCHEDULER

    return DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k != "timestep_spacing"}).alphas_cumprod


def diffusion_loss(unet, x0, context, generator, alphas, min_snr: float | None = 5.0,
                   noise_offset: float = 0.0) -> torch.Tensor:
    """Epsilon-prediction MSE at uniform random timesteps, optionally Min-SNR-gamma weighted (Hang et al. 2023).

    ``noise_offset`` > 0 adds ``noise_offset * N(0, 1)`` per image and channel to the noise (offset noise, as
    diffusers' ``--noise_offset`` and SDXL's training): the noise then carries a random per-channel mean, so the
    model stops reading an image's mean colour from the starting noise's mean and takes it from the prompt. With
    0 nothing extra is drawn, so earlier runs' random streams are unchanged."""
    batch = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((batch, x0.shape[1], 1, 1), generator=generator)
    t = torch.randint(0, len(alphas), (batch,), generator=generator)
    a = alphas[t].view(-1, 1, 1, 1)
    prediction = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=context).sample
    per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
    if min_snr is None:
        return per_sample.mean()
    snr = alphas[t] / (1 - alphas[t])
    return (per_sample * torch.clamp(snr, max=min_snr) / snr).mean()


def token_ids(tokenizer, captions) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids
