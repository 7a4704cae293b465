"""fusion-engine generate | demo | eval | inspect"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

GRID_POLICIES = (  # (label, policy, which LoRAs)
    ("subject only", "direct", "subject"),
    ("style only", "direct", "style"),
    ("direct", "direct", "both"),
    ("klora", "klora", "both"),
    ("blora", "blora", "both"),
    ("switch", "switch", "both"),
    ("fls (kl)", "fls", "both"),
    ("fls+llr", "fls+llr", "both"),
)


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _fusion_options(args) -> dict:
    return dict(divergence=args.divergence, granularity=args.granularity, backend=args.backend)


def cmd_generate(args) -> int:
    import torch

    import fusion_engine as fe

    pipe = fe.FusionPipeline.from_pretrained(
        args.model, subject=fe.load_lora(args.subject, args.subject_scale), style=fe.load_lora(args.style, args.style_scale),
        policy=args.policy, torch_dtype=_torch_dtype(args.dtype), device=args.device, **_fusion_options(args),
    )
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    result = pipe(args.prompt, args.negative_prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  num_images_per_prompt=args.num_images, height=args.height, width=args.width, generator=generator)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(result.images):
        image.save(out / f"image_{i:03d}.png")
    if result.trace is not None and len(result.trace):
        result.trace.save_json(out / "trace.json")
        result.trace.heatmap(out / "heatmap.png")
    print(f"wrote {len(result.images)} image(s), trace.json and heatmap.png to {out}")
    return 0


def cmd_demo(args) -> int:
    import fusion_engine as fe
    from fusion_engine.refine import Refiner
    from fusion_engine.visual import image_grid
    from fusion_engine.worlds import load_world, resolve_world
    from fusion_engine.worlds.base import seed_latents

    out = Path(args.out)
    kind = resolve_world(args.world)
    world = load_world(kind, folder=out / "loras", seed=args.seed)
    subject, style = world.subject(), world.style()
    measures = None
    if kind == "toy":
        from fusion_engine.worlds.toy import measures
        from fusion_engine.worlds.toy.world import load_judges

        clip, dino = load_judges()
        print(f"default world: the trained toy world (fusion_engine/worlds/toy); subject {subject}; style {style}")
    else:
        from fusion_engine.encoders import tiny_dino, tiny_openclip

        clip, dino = tiny_openclip(0), tiny_dino(1)
        print(f"default world: tiny random SD pipeline; subject {subject}; style {style}")
    seeds = list(range(args.seed, args.seed + args.images))  # column i is seed args.seed + i, as in the eval
    rows, labels, fls_trace = [], [], None
    for label, policy, which in GRID_POLICIES:
        llr = policy.endswith("+llr")
        policy = policy.removesuffix("+llr")
        pipe = fe.FusionPipeline.from_pipe(
            world.pipe, subject=subject if which != "style" else None, style=style if which != "subject" else None,
            policy=policy, **({"weights": (1.0, 1.0)} if policy == "direct" else {}), backend=args.backend,
            refine=Refiner(clip, dino) if llr else None,
        )
        prompt = {"subject": world.subject_prompt, "style": world.style_prompt}.get(which, world.prompt)
        extra = {"subject_prompt": world.subject_prompt, "style_prompt": world.style_prompt} if llr else {}
        result = pipe(prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      num_images_per_prompt=len(seeds), latents=seed_latents(world.pipe, seeds),
                      progress=not args.quiet, **extra)
        rows.append(result.images)
        if measures is not None:  # the toy world's transparent scores, mean over the row
            recognised, styled = measures.recognised_as_subject(result.images), measures.carries_style(result.images)
            scores = measures.transparent_scores(result.images)
            label = (f"{label}\nSubject IoU {scores['subject_iou'].mean():.2f} ({recognised.sum()}/{len(seeds)})"
                     f"\nStyle Fid {scores['style_fid'].mean():.2f} ({styled.sum()}/{len(seeds)})")
        labels.append(label)
        if policy == "fls" and not llr:
            fls_trace = result.trace
        print(f"  {label.splitlines()[0]:<13} done" + (f"  ({', '.join(label.splitlines()[1:])})" if measures else ""))
    title = f"{world.prompt!r}, {args.steps} steps, CFG {args.guidance:g}, seeds {seeds[0]}..{seeds[-1]}"
    if measures is not None:
        title += "  (n/N: recognised as the subject / carrying the style)"
    grid = image_grid(rows, labels, out / "grid.png", title=title)
    fls_trace.save_json(out / "trace.json")
    fls_trace.heatmap(out / "heatmap.png", title="fls[kl] choices (orange: subject, blue: style)")
    print(f"wrote {grid}, {out / 'heatmap.png'}, {out / 'trace.json'}")
    return 0


def cmd_inspect(args) -> int:
    import fusion_engine as fe

    lora = fe.load_lora(args.file)
    print(f"file:    {lora.source}")
    print(f"format:  {lora.layout}")
    print(f"layers:  {len(lora.layers)} UNet layers ({sum(l.is_conv for l in lora.layers.values())} conv)")
    print(f"rank:    {', '.join(map(str, lora.ranks()))}")
    print(f"alpha:   {', '.join(f'{a:g}' for a in lora.alphas())}")
    scales = sorted({lora.layer_scale(n) for n in lora.layers})
    print(f"scale:   {', '.join(f'{s:g}' for s in scales)} (alpha / rank)")
    if lora.ignored:
        print(f"ignored: {len(lora.ignored)} text-encoder keys (left out by text_encoder=False)")
    for component, layers in lora.components.items():
        dora = sum(layer.is_dora for layer in layers.values())
        print(f"{component}: {len(layers)} layers" + (f" ({dora} DoRA)" if dora else ""))
        for name, layer in layers.items():
            print(f"  {name}  rank={layer.rank} alpha={layer.alpha:g} A={tuple(layer.lora_a.shape)}"
                  + (" dora" if layer.is_dora else ""))
    return 0


def _eval_settings(args):
    """EvalSettings from the flags: --world picks the model, pairs and judges; else --model/--pairs/--clip/--dino,
    each defaulting to the random world (the tiny pipeline, random LoRA pairs, tiny random encoders)."""
    from functools import partial

    from fusion_engine.errors import OptionError
    from fusion_engine.eval import EvalSettings
    from fusion_engine.eval.loading import resolve_device

    out = Path(args.out)
    options = dict(
        out=out, pairs=args.pairs, model=args.model, device=args.device,
        dtype=_torch_dtype(args.dtype) if args.dtype else None,
        clip_model=args.clip, clip_checkpoint=args.clip_checkpoint, dino_model=args.dino,
        dino_checkpoint=args.dino_checkpoint, policies=[p.strip() for p in args.policies.split(",") if p.strip()],
        seeds=args.seeds, steps=args.steps, guidance=args.guidance, height=args.height, width=args.width,
        backend=args.backend, divergence=args.divergence, m=args.m, through_unet=not args.llr_constant_noise,
        wait_timeout=args.wait_timeout, report_only=args.report_only, progress=not args.quiet,
    )
    if args.world == "toy":
        if args.model or args.pairs or args.clip or args.dino:
            raise OptionError("--world toy brings its own model, pairs and judges: drop --model/--pairs/--clip/--dino")
        from fusion_engine.eval.engine import REFERENCE_ROWS
        from fusion_engine.worlds.toy.measures import transparent_scores
        from fusion_engine.worlds.toy.world import build_toy_pipeline, load_judges, write_toy_pairs

        policies = [*(row for row in REFERENCE_ROWS if row not in options["policies"]), *options["policies"]]
        options.update(
            policies=policies, pairs=write_toy_pairs(out / "toy_pairs"),
            pipe=build_toy_pipeline() if not args.report_only else None, extra_scores=transparent_scores,
            model_label="the trained toy world (fusion_engine/worlds/toy)",
            encoders_label=("the toy world's trained judges (open_clip CLIP; timm ViT shape + look classifier "
                            "in the DINO slot)"),
            notes=["Subject IoU / Style Fid: the toy world's transparent measures "
                   "(fusion_engine/worlds/toy/measures.py)",
                   "subject-only / style-only: each LoRA alone with its own prompt, the same seed (the references "
                   "the learned scores compare with, so their own CLIP / DINO / Style Sim are 100 by construction)"])
        if not args.report_only:
            options["clip"], options["dino"] = load_judges(device=resolve_device(args.device))
        return EvalSettings(**options)
    from fusion_engine.worlds.random import build_tiny_pipeline, write_random_pairs

    options["make_pairs"] = partial(write_random_pairs, count=args.default_pairs)
    if args.model is None:
        needs_pipe = not (args.report_only and args.pairs)  # a report from existing rows needs no model
        options.update(pipe=build_tiny_pipeline(0) if needs_pipe else None, model_label="tiny random default world")
    return EvalSettings(**options)


def cmd_eval(args) -> int:
    from fusion_engine.eval import run

    try:
        return run(_eval_settings(args))
    except ValueError as error:  # a bad pairs.toml, policy name or encoder choice
        print(f"fusion-engine: error: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    from fusion_engine.worlds import WORLDS

    parser = argparse.ArgumentParser(prog="fusion-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def fusion_flags(p, policies):
        p.add_argument("--policy", default="fls", choices=policies)
        p.add_argument("--divergence", default="kl", choices=["kl", "js", "cosine", "dot"])
        p.add_argument("--granularity", default="image", choices=["image", "sample", "token", "batch"])
        p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton"])

    gen = sub.add_parser("generate", help="sample with a subject and a style LoRA fused")
    gen.add_argument("--model", required=True, help="local diffusers pipeline folder (model_index.json)")
    gen.add_argument("--subject", required=True, help="subject LoRA .safetensors")
    gen.add_argument("--style", required=True, help="style LoRA .safetensors")
    gen.add_argument("--subject-scale", type=float, default=1.0)
    gen.add_argument("--style-scale", type=float, default=1.0)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--guidance", type=float, default=5.0)
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="cuda" if _cuda() else "cpu")
    gen.add_argument("--dtype", default="float16" if _cuda() else "float32", choices=["float32", "float16", "bfloat16"])
    gen.add_argument("--out", required=True)
    fusion_flags(gen, ["fls", "direct", "klora", "blora", "switch", "composite"])
    gen.set_defaults(run=cmd_generate)

    demo = sub.add_parser("demo", help="every policy on the embedded default world (no downloads, CPU)")
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--images", type=int, default=4)
    demo.add_argument("--guidance", type=float, default=5.0)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--backend", default="auto", choices=["auto", "reference", "triton"])
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--world", default="auto", choices=WORLDS,
                      help="auto: the trained toy world when its weights ship, else the random one")
    demo.set_defaults(run=cmd_demo)

    evaluation = sub.add_parser("eval", help="pairs x policies x seeds -> images, per-image scores, report.md")
    _eval_flags(evaluation)
    evaluation.set_defaults(run=cmd_eval)

    insp = sub.add_parser("inspect", help="print a LoRA file's format, ranks, alphas and targets")
    insp.add_argument("file")
    insp.set_defaults(run=cmd_inspect)
    return parser


def _eval_flags(parser) -> None:
    from fusion_engine.eval import DEFAULT_POLICIES

    parser.add_argument("--world", default=None, choices=["toy", "random"],
                        help="toy: the trained toy world's model, LoRA pair, judges and transparent measures "
                             "(--model/--pairs/--clip/--dino then stay unset)")
    parser.add_argument("--pairs", default=None, help="pairs.toml (default: N random pairs on the tiny default)")
    parser.add_argument("--default-pairs", type=int, default=2, help="pairs made when --pairs is not given")
    parser.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                        help="comma-separated; any policy, '+llr' adds Latent-Level Refinement")
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 per pair and policy")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=None, help="local diffusers pipeline folder (default: the tiny world)")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if CUDA is there, else cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--backend", default="auto", choices=["auto", "reference", "triton"])
    parser.add_argument("--divergence", default="kl", choices=["kl", "js", "cosine", "dot"])
    parser.add_argument("--m", type=float, default=10.0, help="LLR step size")
    parser.add_argument("--llr-constant-noise", action="store_true",
                        help="LLR without the UNet backward (noise prediction treated as a constant)")
    parser.add_argument("--clip", default=None, help="OpenCLIP architecture name, or a JSON model config file")
    parser.add_argument("--clip-checkpoint", default=None, help="local OpenCLIP checkpoint (.safetensors, .bin)")
    parser.add_argument("--dino", default=None, help="timm model name, e.g. vit_base_patch16_224.dino")
    parser.add_argument("--dino-checkpoint", default=None, help="local DINO checkpoint (.safetensors, .pth)")
    parser.add_argument("--report-only", action="store_true", help="only build OUT/report.md from the CSV files")
    parser.add_argument("--wait-timeout", type=float, default=3600.0,
                        help="sharded runs: how long rank 0 waits for the other shards before reporting")
    parser.add_argument("--quiet", action="store_true")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - a broken torch install shows up later with a real error
        return False


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models load from local paths only
    args = build_parser().parse_args(argv)
    from fusion_engine.errors import FusionEngineError

    try:
        return args.run(args)
    except (FusionEngineError, FileNotFoundError) as error:
        print(f"fusion-engine: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `fusion-engine inspect f | head`: the reader left, that is fine
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
