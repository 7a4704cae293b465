"""Train the toy world's base model: a tiny AutoencoderKL on every shape x look (the world's generic image
codec), then a UNet2DConditionModel and a CLIPTextModel on every base shape x base style (the subject and the
held-out style excluded). Seeded; CPU. ``--world v2``: the second world (``worlds/toy/v2.py``: 60 of 80
combinations, a world-sized vocabulary).

Resumable (``training/toy/resume.py``): every checkpoint (``--checkpoint-every``) and the last step write
``OUT/checkpoint-<step>/resume_state.pt``; ``--resume`` continues the UNet phase from the newest one, with the
VAE that ``OUT/vae_only/`` holds (a VAE trained and recorded there is reused even before the first UNet state),
and gives the same weights as a run never stopped (same ``--threads``). ``--branch-from STATE`` starts a new run
from another run's state instead (the offset-noise pilots of ``runs/v2_run2/PILOT_OFFSET_NOISE.md`` branched from
run 2's step-2000 state), and every state and ``times_base.json`` record where it branched.

    python -m training.toy.train_base --out toy_weights [--world v1|v2] [--steps 1000] [--vae-steps 400]
        [--batch 32] [--stop-after N] [--resume] [--noise-offset 0.1] [--branch-from STATE]
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fusion_engine.errors import InputFileNotFoundError, OptionError
from fusion_engine.worlds.toy import configs
from fusion_engine.worlds.toy import data as v1

from . import resume as resuming
from .common import DEFAULT_OUT, adapt_threads, alphas_cumprod, diffusion_loss, log, token_ids

PREFIX = "checkpoint-"  # OUT/checkpoint-<step>/: the EMA weights, -raw the raw ones, resume_state.pt
VAE_RECORD = "train_args.json"  # in OUT/vae_only/, written last: the VAE there is complete, with these settings


def train_vae(images: torch.Tensor, steps: int, seed: int, batch: int = 32):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**configs.VAE)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.1 + 0.9 * max(0.0, 1 - s / steps))
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        x = images[torch.randint(len(images), (batch,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            adapt_threads()
            log(f"vae step {step} loss {loss.item():.5f} ({time.perf_counter() - start:.0f} s)")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
        recon = torch.cat([vae.decode(latents[i:i + 256]).sample for i in range(0, len(images), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    log(f"vae reconstruction MSE {F.mse_loss(recon, images).item():.5f} (images in [-1, 1])")
    return vae, time.perf_counter() - start


def world_recipe(world: str) -> dict:
    """{unet, text_encoder, tokenizer (or None: CLIP's), base_dataset, autoencoder_dataset} of ``world``."""
    if world == "v1":
        return {"unet": configs.UNET, "text_encoder": configs.TEXT_ENCODER, "tokenizer": None,
                "base_dataset": v1.base_dataset, "autoencoder_dataset": v1.autoencoder_dataset}
    from fusion_engine.worlds.toy import v2

    return {**v2.base_configs(), "base_dataset": v2.base_dataset, "autoencoder_dataset": v2.autoencoder_dataset}


def save_base(out: Path, vae, unet, text_encoder, recipe: dict | None = None) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for name, model in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out / f"{name}.safetensors"))
    recipe = recipe or world_recipe("v1")
    config = {"vae": dict(configs.VAE, scaling_factor=vae.config.scaling_factor), "unet": recipe["unet"],
              "text_encoder": recipe["text_encoder"], "scheduler": configs.SCHEDULER}
    if recipe["tokenizer"] is not None:
        config["tokenizer"] = recipe["tokenizer"]
    if "world" in recipe:  # which world's measures judge it (worlds/toy/world.world_scores)
        config["world"] = recipe["world"]
    (out / "base_config.json").write_text(json.dumps(config, indent=1))


def save_vae(out: Path, vae, record: dict | None = None) -> None:
    """``record``: the settings it was trained with (and its time), written last and atomically, so that a resumed
    run can reuse a complete VAE (``load_vae``)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / VAE_RECORD).unlink(missing_ok=True)
    save_file({k: v.detach().contiguous() for k, v in vae.state_dict().items()}, str(out / "vae.safetensors"))
    (out / "vae_config.json").write_text(json.dumps(dict(configs.VAE, scaling_factor=vae.config.scaling_factor)))
    if record is not None:
        (out / f"{VAE_RECORD}.partial").write_text(json.dumps(record))
        (out / f"{VAE_RECORD}.partial").replace(out / VAE_RECORD)


def load_vae(folder: Path, settings: dict):
    """(vae, record) from ``folder`` (``save_vae``'s) if it holds a complete VAE trained with ``settings``;
    ``None`` if it holds none; refused, naming the field, if it holds one trained with other settings."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    if not (folder / VAE_RECORD).is_file():
        return None
    record = json.loads((folder / VAE_RECORD).read_text())
    resuming.check_settings(folder / VAE_RECORD, record["settings"], settings)
    vae = AutoencoderKL(**configs.VAE)
    vae.load_state_dict(load_file(str(folder / "vae.safetensors")))
    vae.register_to_config(scaling_factor=json.loads((folder / "vae_config.json").read_text())["scaling_factor"])
    return vae.eval().requires_grad_(False), record


UNET_LR, UNET_EMA = 1e-3, 0.995


def train_unet(vae, latents, captions, steps: int, seed: int, out: Path, batch: int = 64, lr: float = UNET_LR,
               ema_decay: float = UNET_EMA, checkpoint_every: int = 400, stop_after: int | None = None,
               recipe: dict | None = None, record: dict | None = None, resume: dict | None = None,
               noise_offset: float = 0.0):
    """``steps`` sets the learning-rate schedule; ``stop_after`` ends the run early (the schedule unchanged).
    Each checkpoint and the last step write a resume state with ``record`` in it (``{"settings": ...}``: what a
    resumed run must repeat); ``resume``, such a state, continues its run (or, branched, another run's).
    ``noise_offset``: ``common.diffusion_loss``'s."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from fusion_engine.worlds.tokenizer import clip_tokenizer, world_tokenizer

    recipe = recipe or world_recipe("v1")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**recipe["unet"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**recipe["text_encoder"]))
    ema = [copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)]
    words = recipe["tokenizer"]
    ids = token_ids(world_tokenizer(words["words"]) if words else clip_tokenizer(), captions)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    warmup = 50
    def lr_at(s):  # linear warm-up, then cosine to 0.1x
        cosine = 0.5 * (1 + torch.cos(torch.tensor(s / steps * 3.14159)).item())
        return min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * cosine)

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(seed + 1)
    alphas = alphas_cumprod()
    first, running, before = 0, None, 0.0
    if resume is not None:
        for name, model in (("unet", unet), ("text_encoder", text_encoder), ("ema_unet", ema[0]),
                            ("ema_text_encoder", ema[1])):
            model.load_state_dict(resume[name])
        first, running, before = resuming.restore_loop(resume, optimizer, schedule, generator)
    end = min(steps, stop_after or steps)

    def save_state(done: int) -> None:
        resuming.save_state(out, PREFIX, done, {
            "settings": {}, **(record or {}),
            **resuming.loop_state(done, running, before + time.perf_counter() - start, optimizer, schedule, generator),
            "unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(), "ema_unet": ema[0].state_dict(),
            "ema_text_encoder": ema[1].state_dict()})

    start = time.perf_counter()
    for step in range(first, end):
        index = torch.randint(len(latents), (batch,), generator=generator)
        loss = diffusion_loss(unet, latents[index], text_encoder(ids[index])[0], generator, alphas,
                              noise_offset=noise_offset)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for shadow, model in zip(ema, (unet, text_encoder)):
                for e, p in zip(shadow.parameters(), model.parameters()):
                    e.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            adapt_threads()
            log(f"unet step {step} loss {running:.4f} ({time.perf_counter() - start:.0f} s, "
                f"{torch.get_num_threads()} threads)")
        if (step + 1) % checkpoint_every == 0 and step + 1 < end:
            save_base(out / f"{PREFIX}{step + 1}", vae, ema[0], ema[1], recipe)
            save_base(out / f"{PREFIX}{step + 1}-raw", vae, unet, text_encoder, recipe)
            save_state(step + 1)
    if end > first:  # the last step's state: a run stopped by --stop-after goes on from here
        save_state(end)
    seconds = before + time.perf_counter() - start
    return unet.eval(), text_encoder.eval(), ema[0].eval(), ema[1].eval(), seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--stop-after", type=int, default=None,
                        help="end after this many steps, the schedule still the one of --steps (the shipped base: 400)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--world", choices=["v1", "v2"], default="v1")
    parser.add_argument("--checkpoint-every", type=int, default=400)
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest resume state in --out (same arguments; refused otherwise)")
    parser.add_argument("--noise-offset", type=float, default=0.0,
                        help="offset noise (common.diffusion_loss): 0 off; diffusers' --noise_offset suggests 0.1")
    parser.add_argument("--branch-from", default=None, metavar="STATE",
                        help="start the UNet phase from another run's resume state (its weights, EMA, optimizer, "
                             "schedule, step and RNG) with this run's settings; --out must hold that run's "
                             "vae_only/. Recorded in every state and in times_base.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        return train(args, out)
    except OptionError as error:
        parser.error(str(error))


def branch_state(path: Path, args, out: Path, vae_settings: dict) -> tuple[dict, dict, tuple]:
    """Another run's resume state, to start this run's UNet phase from (``--branch-from``), the record of it
    (``{"state", "step", "sha256", "settings"}``: the parent's settings, so that what changed stays visible), and
    ``load_vae``'s answer for the parent's VAE in ``out/vae_only``."""
    if not path.is_file():
        raise InputFileNotFoundError(f"{path}: --branch-from names no resume state")
    vae = load_vae(out / "vae_only", vae_settings)
    if vae is None:
        raise OptionError(f"{out / 'vae_only'}: --branch-from needs the parent run's finished VAE there (copy its "
                          "vae_only/ folder)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["step"] >= args.steps:
        raise OptionError(f"{path}: the state is at step {state['step']}, not before this run's end ({args.steps})")
    changed = {k: [state["settings"].get(k), v] for k, v in resuming.run_settings(args).items()
               if state["settings"].get(k) != v and k != "branch_from"}
    log(f"branching from {path} (step {state['step']}); settings changed (there, here): {changed}")
    return state, {"state": str(path), "step": state["step"], "sha256": resuming.file_digest(path),
                   "settings": state["settings"]}, vae


def train(args, out: Path) -> int:
    torch.set_num_threads(args.threads)
    adapt_threads(args.threads)
    vae_settings = {"vae_steps": args.vae_steps, "seed": args.seed, "world": args.world, "threads": args.threads}
    settings = resuming.run_settings(args, lr=UNET_LR, ema_decay=UNET_EMA)
    resume, reused = None, None
    if args.resume:
        found = resuming.load_latest(out, PREFIX, settings)
        reused = load_vae(out / "vae_only", vae_settings)
        if found is None and reused is None:
            raise resuming.require_state(out, PREFIX)
        resume = found and found[1]
        if resume and resume["step"] > min(args.steps, args.stop_after or args.steps):
            raise OptionError(f"{found[0]}: the state is at step {resume['step']}, past this run's end "
                              f"(--stop-after {args.stop_after})")
    else:
        resuming.discard_states(out, PREFIX)
    if resume is None and args.branch_from:
        resume, branched, reused = branch_state(Path(args.branch_from), args, out, vae_settings)
    else:  # a resumed branch keeps its record
        branched = (resume or {}).get("branched_from")
    recipe = world_recipe(args.world)
    images, captions = recipe["base_dataset"](seed=args.seed)
    log(f"base data ({args.world}): {len(images)} images, e.g. {captions[-1]!r}")
    if reused is None:
        vae, vae_s = train_vae(recipe["autoencoder_dataset"](seed=args.seed + 3), args.vae_steps, args.seed)
        log(f"vae trained in {vae_s:.0f} s; scaling factor {vae.config.scaling_factor:.4f}")
        save_vae(out / "vae_only", vae, {"settings": vae_settings, "seconds": vae_s})
    else:
        vae, vae_s = reused[0], reused[1]["seconds"]
        log(f"vae reused from {out / 'vae_only'} (trained in {vae_s:.0f} s); UNet from step "
            f"{resume['step'] if resume else 0}")
    vae_digest = resuming.file_digest(out / "vae_only" / "vae.safetensors")
    if resume is not None:  # the UNet's latents come from this VAE: it must be the one the state was trained on
        resuming.check_settings(out / "vae_only" / "vae.safetensors", {"vae_sha256": resume["vae_sha256"]},
                                {"vae_sha256": vae_digest})
    with torch.no_grad():  # the base model's latents: its own images only
        latents = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    latents = latents * vae.config.scaling_factor
    unet, text_encoder, ema_unet, ema_text, unet_s = train_unet(vae, latents, captions, args.steps, args.seed, out,
                                                                batch=args.batch, stop_after=args.stop_after,
                                                                checkpoint_every=args.checkpoint_every, recipe=recipe,
                                                                resume=resume, noise_offset=args.noise_offset,
                                                                record={"settings": settings, "vae_sha256": vae_digest,
                                                                        "branched_from": branched})
    log(f"unet ({sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params) + text encoder trained in "
        f"{unet_s:.0f} s")
    save_base(out / "raw", vae, unet, text_encoder, recipe)
    save_base(out, vae, ema_unet, ema_text, recipe)
    (out / "times_base.json").write_text(json.dumps({"vae_s": round(vae_s), "unet_s": round(unet_s),
                                                     "steps": args.steps, "stop_after": args.stop_after,
                                                     "vae_steps": args.vae_steps, "world": args.world,
                                                     "noise_offset": args.noise_offset,
                                                     "branched_from": branched,
                                                     "resumed_from": resume and resume["step"]}))
    log(f"saved to {out} (EMA weights; the raw last step in {out / 'raw'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
