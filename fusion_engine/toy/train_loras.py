"""Train the toy world's two LoRAs on the frozen base model, on the attention projections (to_q, to_k, to_v,
to_out.0) as in the paper's recipe, rank and steps scaled down. Seeded; CPU.

* subject: DreamBooth-style, 6 images of the held-out shape ("a sks star"), rank 4, alpha 4, PEFT layout;
* style: 24 images of the held-out style on the base shapes ("... in zzt style"), rank 8, alpha 4, kohya.

    python -m fusion_engine.toy.train_loras [--steps 600] [--lr 3e-3]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import style_dataset, subject_dataset
from .train_base import WEIGHTS, log
from .world import STYLE_FILE, SUBJECT_FILE


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * x A^T B^T``, with A Gaussian and B zero at the start (PEFT's init)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base, self.rank, self.alpha = base, rank, alpha
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, generator=generator) / base.in_features**0.5)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + (self.alpha / self.rank) * F.linear(F.linear(x, self.lora_a), self.lora_b)


def inject(unet, rank: int, alpha: float, seed: int) -> dict[str, LoRALinear]:
    from ..worlds.random import attention_targets

    generator = torch.Generator().manual_seed(seed)
    wrapped = {}
    for name in attention_targets(unet):
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name)
        if child.isdigit():  # to_out.0
            layer = LoRALinear(parent[int(child)], rank, alpha, generator)
            parent[int(child)] = layer
        else:
            layer = LoRALinear(getattr(parent, child), rank, alpha, generator)
            setattr(parent, child, layer)
        wrapped[name] = layer
    return wrapped


def train_lora(world, images, captions, *, rank, alpha, steps, seed, lr=2e-3, batch=16):
    import copy

    from diffusers import DDPMScheduler

    from ..lora import LoRA, LoRALayer
    from .configs import SCHEDULER

    torch.manual_seed(seed)
    unet = copy.deepcopy(world.pipe.unet).requires_grad_(False)
    layers = inject(unet, rank, alpha, seed)
    params = [p for layer in layers.values() for p in (layer.lora_a, layer.lora_b)]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    tokenizer, text_encoder, vae = world.pipe.tokenizer, world.pipe.text_encoder, world.pipe.vae
    with torch.no_grad():
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        context_all = text_encoder(ids)[0]
        latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    alphas = DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k != "timestep_spacing"}).alphas_cumprod
    generator = torch.Generator().manual_seed(seed + 1)
    start, running = time.perf_counter(), None
    for step in range(steps):
        index = torch.randint(len(latents), (batch,), generator=generator)
        x0, context = latents[index], context_all[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=context).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            log(f"lora step {step} loss {running:.4f} ({time.perf_counter() - start:.0f} s)")
    lora = LoRA(layers={name: LoRALayer(lora_a=layer.lora_a.detach().clone(), lora_b=layer.lora_b.detach().clone(),
                                        alpha=float(alpha))
                        for name, layer in layers.items()}, source="<trained>", layout="peft")
    return lora, time.perf_counter() - start


def main(argv=None) -> int:
    from ..lora import save_lora
    from .world import load_toy_world

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(WEIGHTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    world = load_toy_world(Path(args.out), require_loras=False)
    images, captions = subject_dataset(seed=args.seed + 1)
    subject, seconds = train_lora(world, images, captions, rank=4, alpha=4.0, steps=args.steps, seed=args.seed + 10,
                                 lr=args.lr)
    save_lora(subject, Path(args.out) / SUBJECT_FILE, layout="peft")
    log(f"subject LoRA: {len(images)} images, {args.steps} steps, {seconds:.0f} s")
    images, captions = style_dataset(seed=args.seed + 2)
    style, seconds = train_lora(world, images, captions, rank=8, alpha=4.0, steps=args.steps, seed=args.seed + 20,
                               lr=args.lr)
    save_lora(style, Path(args.out) / STYLE_FILE, layout="kohya")
    log(f"style LoRA: {len(images)} images, {args.steps} steps, {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
