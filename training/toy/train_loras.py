"""Train the toy world's two LoRAs on the frozen base model. Seeded; CPU.

Targets (``--targets``): ``attention``, the attention projections (to_q, to_k, to_v, to_out.0: the paper's
recipe); ``attention+ff``, those and each transformer block's feed-forward linears (ff.net.0.proj, ff.net.2:
100 layers); ``all``, those and each resnet's two 3x3 convolutions (conv LoRAs, kohya's LoCon: 122 layers).
The shipped settings (``scripts/train_toy_world.sh``):

* subject: DreamBooth-style, 12 images of the mushroom in its own colours ("a sks mushroom"), rank 16,
  alpha 16, attention+ff, 600 steps at lr 2e-3, saved in the PEFT (diffusers) layout;
* style: 36 images of the held-out style on the base shapes ("a circle in zzt style" / "an image in zzt
  style"), rank 32, alpha 16, all (convs included), 4800 steps at lr 3e-3 decaying (cosine) to 0.1x, the
  factors' EMA kept (``--ema 0.999``), saved in the kohya layout.

Both use DreamBooth's prior preservation: a quarter of every batch (``--prior-share``) is the base world's own
images and captions (rendered, not sampled: this world's prior is known exactly), so each LoRA changes what its
token asks for and leaves the rest of the model (the empty prompt of CFG included) close to the base.

``--world v2`` (issue 24): the second world's data (``worlds/toy/v2.py``: the style on its 10 base shapes, the
prior from its 60 seen combinations, the subject's DreamBooth images on varied grounds) and ``--alpha A``:
one alpha for both LoRAs (the first world's roles had their own, 8 and 4 x rank / 8), so one recipe trains both.

Resumable (``training/toy/resume.py``): every ``--checkpoint-every`` steps and at the last one each LoRA writes
``OUT/checkpoint-<role>-<step>/resume_state.pt``; ``--resume`` continues each role from its newest state (a role
with none starts), with the same arguments and the same base files, and gives the same LoRA as a run never
stopped (same ``--threads``).

    python -m training.toy.train_loras --out toy_weights [--steps 500] [--batch 8] [--lr 2e-3] [--only subject|style]
        [--rank 8] [--targets attention|attention+ff|all] [--cosine] [--ema 0.999] [--world v1|v2] [--alpha A]
        [--stop-after N] [--checkpoint-every 400] [--resume] [--noise-offset 0.1]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fusion_engine.errors import OptionError
from fusion_engine.worlds.toy import data as v1
from fusion_engine.worlds.toy.world import STYLE_FILE, SUBJECT_FILE, load_toy_world

from . import resume as resuming
from .common import DEFAULT_OUT, adapt_threads, alphas_cumprod, diffusion_loss, log, token_ids

BASE_FILES = ("unet.safetensors", "text_encoder.safetensors", "vae.safetensors")  # what a LoRA is trained on


class LoRAConv2d(nn.Module):
    """``base(x) + (alpha / rank) * up(down(x))``: down is the base's kernel, stride and padding into ``rank``
    channels, up a 1x1 conv (kohya's conv LoRA, "LoCon"); A Gaussian, B zero at the start."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base, self.rank, self.alpha = base, rank, alpha
        fan_in = base.in_channels * base.kernel_size[0] * base.kernel_size[1]
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_channels, *base.kernel_size, generator=generator)
                                   / fan_in**0.5)
        self.lora_b = nn.Parameter(torch.zeros(base.out_channels, rank, 1, 1))

    def forward(self, x):
        return self.base(x) + (self.alpha / self.rank) * F.conv2d(self.base._conv_forward(x, self.lora_a, None),
                                                                   self.lora_b)


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * x A^T B^T``, with A Gaussian and B zero at the start (PEFT's init)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base, self.rank, self.alpha = base, rank, alpha
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, generator=generator) / base.in_features**0.5)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + (self.alpha / self.rank) * F.linear(F.linear(x, self.lora_a), self.lora_b)


FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")  # a transformer block's GEGLU input and output linears
RESNET_CONVS = ("conv1", "conv2")  # a resnet block's two 3x3 convolutions


def lora_targets(unet, targets: str) -> list[str]:
    """``"attention"``: the paper's targets (to_q/k/v/out.0); ``"attention+ff"``: and each block's feed-forward;
    ``"all"``: and each resnet block's two convolutions (where palette and texture are drawn)."""
    from fusion_engine.worlds.random import attention_targets

    names = attention_targets(unet)
    if targets in ("attention+ff", "all"):
        names += [n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and n.endswith(FEED_FORWARD)]
    if targets == "all":
        names += [n for n, m in unet.named_modules() if type(m) is nn.Conv2d and ".resnets." in n
                  and n.endswith(RESNET_CONVS)]
    return names


def inject(unet, rank: int, alpha: float, seed: int, targets: str) -> dict[str, nn.Module]:
    generator = torch.Generator().manual_seed(seed)
    wrapped = {}
    for name in lora_targets(unet, targets):
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name)
        base = parent[int(child)] if child.isdigit() else getattr(parent, child)  # to_out.0
        layer = (LoRAConv2d if isinstance(base, nn.Conv2d) else LoRALinear)(base, rank, alpha, generator)
        if child.isdigit():
            parent[int(child)] = layer
        else:
            setattr(parent, child, layer)
        wrapped[name] = layer
    return wrapped


def encode(world, images, captions):
    pipe = world.pipe
    with torch.no_grad():
        context = torch.cat([pipe.text_encoder(ids[None])[0] for ids in token_ids(pipe.tokenizer, captions)])
        latents = torch.cat([pipe.vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    return latents * pipe.vae.config.scaling_factor, context


def train_lora(world, data, prior, *, rank, alpha, steps, seed, lr, targets, batch=16, prior_share=0.5,
               cosine=False, ema_decay=0.0, stop_after=None, checkpoint=None, resume=None, noise_offset=0.0):
    """Train one LoRA; ``ema_decay`` > 0 returns the factors' exponential moving average (with the base's
    warm-up, ``min(decay, (1 + step) / (10 + step))``) instead of the last step's. ``stop_after`` ends the run
    early (the schedule still the one of ``steps``). ``checkpoint``: ``{"out", "prefix", "every", "record"}``,
    where and how often resume states are written (and at the last step), ``record`` in each;
    ``resume``, such a state, continues its run. ``noise_offset``: ``common.diffusion_loss``'s."""
    from fusion_engine.lora import LoRA, LoRALayer

    torch.manual_seed(seed)
    unet = copy.deepcopy(world.pipe.unet).requires_grad_(False)
    layers = inject(unet, rank, alpha, seed, targets)
    params = [p for layer in layers.values() for p in (layer.lora_a, layer.lora_b)]
    shadows = [p.detach().clone() for p in params] if ema_decay > 0 else None
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    decay = (lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))) if cosine else (lambda s: 1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)  # cosine: to 0.1x over the run
    (latents, context), (prior_latents, prior_context) = data, prior
    n_prior = round(batch * prior_share)
    alphas = alphas_cumprod()
    generator = torch.Generator().manual_seed(seed + 1)
    first, running, before = 0, None, 0.0
    if resume is not None:
        with torch.no_grad():
            for param, saved in zip(params, resume["params"]):
                param.copy_(saved)
            for shadow, saved in zip(shadows or [], resume["shadows"] or []):
                shadow.copy_(saved)
        first, running, before = resuming.restore_loop(resume, optimizer, schedule, generator)
    end = min(steps, stop_after or steps)

    def save_state(done: int) -> None:
        resuming.save_state(checkpoint["out"], checkpoint["prefix"], done, {
            "settings": {}, **checkpoint["record"],
            **resuming.loop_state(done, running, before + time.perf_counter() - start, optimizer, schedule, generator),
            "params": [p.detach() for p in params], "shadows": shadows})

    start = time.perf_counter()
    for step in range(first, end):
        index = torch.randint(len(latents), (batch - n_prior,), generator=generator)
        prior_index = torch.randint(len(prior_latents), (n_prior,), generator=generator)
        x0 = torch.cat([latents[index], prior_latents[prior_index]])
        ctx = torch.cat([context[index], prior_context[prior_index]])
        loss = diffusion_loss(unet, x0, ctx, generator, alphas, min_snr=None, noise_offset=noise_offset)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if shadows is not None:
            with torch.no_grad():
                decay_now = min(ema_decay, (1 + step) / (10 + step))
                for shadow, param in zip(shadows, params):
                    shadow.lerp_(param, 1.0 - decay_now)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            adapt_threads()
            log(f"lora step {step} loss {running:.4f} ({time.perf_counter() - start:.0f} s)")
        if checkpoint is not None and (step + 1) % checkpoint["every"] == 0 and step + 1 < end:
            save_state(step + 1)
    if checkpoint is not None and end > first:  # the last step's: a run stopped by --stop-after goes on from here
        save_state(end)
    final = iter(shadows if shadows is not None else [p.detach().clone() for p in params])
    factors = {name: LoRALayer(lora_a=next(final), lora_b=next(final), alpha=float(alpha)) for name in layers}
    lora = LoRA(layers=factors, source="<trained>", layout="peft")
    return lora, before + time.perf_counter() - start


def prefix(role: str) -> str:
    """Where a role's resume states go: ``OUT/checkpoint-<role>-<step>/``."""
    return f"checkpoint-{role}-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=8, help="half of it the subject's or style's images, half prior")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prior-share", type=float, default=0.25, help="share of each batch from the base world")
    parser.add_argument("--only", choices=["subject", "style"], default=None)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--cosine", action="store_true", help="decay the learning rate to 0.1x (cosine)")
    parser.add_argument("--targets", choices=["attention", "attention+ff", "all"], default="attention")
    parser.add_argument("--ema", type=float, default=0.0, help="save the LoRA's EMA with this decay (0: the last step)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--world", choices=["v1", "v2"], default="v1")
    parser.add_argument("--alpha", type=float, default=None,
                        help="one alpha for the LoRA(s) trained (default: the first world's per-role alphas)")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="end after this many steps, the schedule still the one of --steps")
    parser.add_argument("--checkpoint-every", type=int, default=400, help="steps between resume states")
    parser.add_argument("--resume", action="store_true",
                        help="continue each LoRA from its newest resume state in --out (same arguments and base)")
    parser.add_argument("--noise-offset", type=float, default=0.0,
                        help="offset noise (common.diffusion_loss), as the base was trained with")
    args = parser.parse_args(argv)
    try:
        return train(args, Path(args.out))
    except OptionError as error:
        parser.error(str(error))


def train(args, out: Path) -> int:
    from fusion_engine.lora import save_lora

    torch.set_num_threads(args.threads)
    roles = [role for role in ("subject", "style") if args.only in (None, role)]
    base = {f"base_{name}_sha256": resuming.file_digest(out / name) for name in BASE_FILES if (out / name).is_file()}
    states = {}  # role: (settings, the state it resumes or None)
    for role in roles:
        settings = resuming.run_settings(args, role=role, **base)
        found = resuming.load_latest(out, prefix(role), settings) if args.resume else None
        if found and found[1]["step"] > min(args.steps, args.stop_after or args.steps):
            raise OptionError(f"{found[0]}: the state is at step {found[1]['step']}, past this run's end "
                              f"(--stop-after {args.stop_after})")
        if not args.resume:
            resuming.discard_states(out, prefix(role))
        states[role] = (settings, found and found[1])
    if args.resume and not any(state for _, state in states.values()):
        raise resuming.require_state(out, prefix(args.only or "<role>"))
    world = load_toy_world(out, require_loras=False)
    if args.world == "v2":
        from fusion_engine.worlds.toy import v2

        base_dataset, subject_dataset, style_dataset, prior_per_combo = (v2.base_dataset, v2.subject_dataset,
                                                                          v2.style_dataset, 4)
    else:
        base_dataset, subject_dataset, style_dataset, prior_per_combo = (v1.base_dataset, v1.subject_dataset,
                                                                          v1.style_dataset, 8)
    prior = encode(world, *base_dataset(per_combo=prior_per_combo, seed=args.seed + 5))
    recipes = {  # role: (dataset, seed offsets of data and training, alpha per 8 of rank, file layout, file name)
        "subject": (subject_dataset, 1, 10, 8.0, "peft", SUBJECT_FILE),
        "style": (style_dataset, 2, 20, 4.0, "kohya", STYLE_FILE),
    }
    for role, (dataset, data_seed, train_seed, alpha, layout, file) in recipes.items():
        if role not in states:
            continue
        settings, resume = states[role]
        images, captions = dataset(seed=args.seed + data_seed)
        checkpoint = {"out": out, "prefix": prefix(role), "every": args.checkpoint_every,
                      "record": {"settings": settings}}
        lora, seconds = train_lora(world, encode(world, images, captions), prior, rank=args.rank,
                                   alpha=args.alpha if args.alpha is not None else alpha * args.rank / 8,
                                   steps=args.steps, seed=args.seed + train_seed,
                                   lr=args.lr, targets=args.targets, batch=args.batch, prior_share=args.prior_share,
                                   cosine=args.cosine, ema_decay=args.ema, stop_after=args.stop_after,
                                   checkpoint=checkpoint, resume=resume, noise_offset=args.noise_offset)
        save_lora(lora, out / file, layout=layout)
        (out / f"times_{role}.json").write_text(json.dumps({"seconds": round(seconds), "steps": args.steps,
                                                            "batch": args.batch, "lr": args.lr,
                                                            "prior_share": args.prior_share, "rank": args.rank,
                                                            "targets": args.targets, "cosine": args.cosine,
                                                            "ema": args.ema, "world": args.world,
                                                            "noise_offset": args.noise_offset,
                                                            "alpha": lora.alphas(), "stop_after": args.stop_after,
                                                            "resumed_from": resume and resume["step"]}))
        log(f"{role} LoRA: {len(images)} images, {args.steps} steps, {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
