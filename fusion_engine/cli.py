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
    import torch

    import fusion_engine as fe
    from fusion_engine.default import load_default_world
    from fusion_engine.visual import image_grid

    from fusion_engine.default.world import resolve_world
    from fusion_engine.refine import Refiner

    out = Path(args.out)
    kind = resolve_world(args.world)
    world = load_default_world(out / "loras", seed=args.seed, world=kind)
    subject, style = world.subject(), world.style()
    if kind == "toy":
        from fusion_engine.toy.world import load_judges

        clip, dino = load_judges()
        print(f"default world: the trained toy world (fusion_engine/toy); subject {subject}; style {style}")
    else:
        from fusion_engine.encoders import tiny_dino, tiny_openclip

        clip, dino = tiny_openclip(0), tiny_dino(1)
        print(f"default world: tiny random SD pipeline; subject {subject}; style {style}")
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
                      num_images_per_prompt=args.images, generator=torch.Generator().manual_seed(args.seed),
                      progress=not args.quiet, **extra)
        rows.append(result.images)
        labels.append(label)
        if policy == "fls" and not llr:
            fls_trace = result.trace
        print(f"  {label:<13} done")
    grid = image_grid(rows, labels, out / "grid.png", title=f"{world.prompt!r}, {args.steps} steps, seed {args.seed}")
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
        print(f"ignored: {len(lora.ignored)} text-encoder keys (the fusion adapts the denoiser only)")
    print("targets:")
    for name, layer in lora.layers.items():
        print(f"  {name}  rank={layer.rank} alpha={layer.alpha:g} A={tuple(layer.lora_a.shape)}")
    return 0


def cmd_eval(args) -> int:
    from fusion_engine.evaluate import run_eval

    try:
        return run_eval(args)
    except ValueError as error:  # a bad pairs.toml, policy name or encoder choice
        print(f"fusion-engine: error: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
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
    demo.add_argument("--world", default="auto", choices=["auto", "toy", "random"],
                      help="auto: the trained toy world when its weights ship, else the random one")
    demo.set_defaults(run=cmd_demo)

    evaluation = sub.add_parser("eval", help="pairs x policies x seeds -> images, per-image scores, report.md")
    from fusion_engine.evaluate import add_arguments

    add_arguments(evaluation)
    evaluation.set_defaults(run=cmd_eval)

    insp = sub.add_parser("inspect", help="print a LoRA file's format, ranks, alphas and targets")
    insp.add_argument("file")
    insp.set_defaults(run=cmd_inspect)
    return parser


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
