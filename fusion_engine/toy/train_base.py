"""Train the toy world's base model: a tiny AutoencoderKL on every shape x style (the world's generic image
codec), then a UNet2DConditionModel and CLIPTextModel on every shape x style except the held-out subject
shape and style. Seeded; CPU.

    python -m fusion_engine.toy.train_base [--steps 900] [--out fusion_engine/toy/weights]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import configs
from .data import autoencoder_dataset, base_dataset

WEIGHTS = Path(__file__).parent / "weights"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def adapt_threads(cap: int = 2) -> None:
    """Two threads on an idle 2-core machine, one while something else is busy (oversubscribed threads spin)."""
    import os

    busy = os.getloadavg()[0] - torch.get_num_threads()
    torch.set_num_threads(max(1, min(cap, round(os.cpu_count() - busy))))


def train_vae(images: torch.Tensor, steps: int, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**configs.VAE)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        batch = images[torch.randint(len(images), (32,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss.item():.5f} ({time.perf_counter() - start:.0f} s)")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    return vae, latents * scaling, time.perf_counter() - start


def train_unet(latents, captions, steps: int, seed: int, batch: int = 32, lr: float = 1e-3):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..worlds.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**configs.UNET)
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs.TEXT_ENCODER))
    tokenizer = clip_tokenizer()
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    scheduler = DDPMScheduler(**{k: v for k, v in configs.SCHEDULER.items() if k != "timestep_spacing"})
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    def lr_at(s):  # 50 warm-up steps, then cosine down to 0.1
        return min(1.0, (s + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(s / steps * 3.14159)).item()))

    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(seed + 1)
    alphas = scheduler.alphas_cumprod
    start, running = time.perf_counter(), None
    for step in range(steps):
        index = torch.randint(len(latents), (batch,), generator=generator)
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        context = text_encoder(ids[index])[0]
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            adapt_threads()
            log(f"unet step {step} loss {running:.4f} ({time.perf_counter() - start:.0f} s, "
                f"{torch.get_num_threads()} threads)")
    return unet.eval(), text_encoder.eval(), time.perf_counter() - start


def save_base(out: Path, vae, unet, text_encoder) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for name, model in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out / f"{name}.safetensors"))
    config = {"vae": dict(configs.VAE, scaling_factor=vae.config.scaling_factor), "unet": configs.UNET,
              "text_encoder": configs.TEXT_ENCODER, "scheduler": configs.SCHEDULER}
    (out / "base_config.json").write_text(json.dumps(config, indent=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(WEIGHTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    adapt_threads(args.threads)
    images, captions = base_dataset(seed=args.seed)
    log(f"base data: {len(images)} images, e.g. {captions[-1]!r}")
    vae, _, vae_s = train_vae(autoencoder_dataset(seed=args.seed + 3), args.vae_steps, args.seed)
    with torch.no_grad():  # the base model's latents: its own images only
        latents = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    latents = latents * vae.config.scaling_factor
    log(f"vae trained in {vae_s:.0f} s; scaling factor {vae.config.scaling_factor:.4f}")
    unet, text_encoder, unet_s = train_unet(latents, captions, args.steps, args.seed)
    n = sum(p.numel() for p in unet.parameters())
    log(f"unet ({n / 1e6:.2f} M params) + text encoder trained in {unet_s:.0f} s")
    save_base(Path(args.out), vae, unet, text_encoder)
    log(f"saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
