"""fusion-engine generate | demo | eval | inspect | serve"""
from __future__ import annotations

import argparse
import json
import math
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


# -- value types: argparse turns their ArgumentTypeError into the one-line error ------------------------------------
def _number(text: str, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


MAX_COUNT, MAX_STEPS = 100_000, 1000  # beyond these a count is a typo, and would fail deep inside torch/diffusers


def positive_int(text: str) -> int:
    """An integer in [1, MAX_COUNT] (images, seeds, pairs, tau)."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{value} is more than {MAX_COUNT}")
    return value


def step_count(text: str) -> int:
    """Sampling steps: an integer in [1, MAX_STEPS] (the schedulers' 1000 training timesteps)."""
    value = positive_int(text)
    if value > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"{value} is more than {MAX_STEPS} (the schedulers' training timesteps)")
    return value


def seed_int(text: str) -> int:
    value = _number(text, int)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, 2**63)")
    return value


def finite_float(text: str) -> float:
    """A finite number (scales, weights)."""
    return _number(text, float)


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (guidance, the LLR step size m)."""
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g} is not >= 0")
    return value


MAX_GUIDANCE = 50.0  # the service's bound on "guidance" too (serve/schema.py): beyond it an image only saturates


def guidance_scale(text: str) -> float:
    """A CFG / guidance scale: a finite number in [0, MAX_GUIDANCE]."""
    value = non_negative_float(text)
    if value > MAX_GUIDANCE:
        raise argparse.ArgumentTypeError(f"{value:g} is above {MAX_GUIDANCE:g} (CFG scales are single digits; "
                                         "larger ones only saturate the image)")
    return value


def scale_pairs(text: str) -> list[tuple[float, float]]:
    """``1:1,1:0.7,0.7:1``: (subject, style) LoRA strengths, each a finite number >= 0."""
    pairs = []
    for item in (part.strip() for part in text.split(",")):
        if item.count(":") != 1:
            raise argparse.ArgumentTypeError(f"{item!r} is not SUBJECT:STYLE (e.g. 1:0.7)")
        pairs.append(tuple(non_negative_float(value) for value in item.split(":")))
    return pairs


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} is not > 0")
    return value


def replica_range(text: str) -> tuple[int, int]:
    """``MIN:MAX`` replicas for autoscaling: whole numbers, 0 <= MIN <= MAX, MAX >= 1."""
    if text.count(":") != 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN:MAX (e.g. 1:4)")
    low, high = (_number(part.strip(), int) for part in text.split(":"))
    if low < 0 or high < 1 or low > high or high > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{text!r} needs 0 <= MIN <= MAX, 1 <= MAX <= {MAX_COUNT}")
    return low, high


def ray_address(text: str) -> str:
    """A running Ray cluster's address as ``ray.init(address=)`` takes it: ``auto``, ``ray://HOST:PORT`` or
    ``HOST:PORT`` (anything else would make Ray start or search in ways the user did not ask for)."""
    import re

    if text == "auto" or re.fullmatch(r"(ray://)?[A-Za-z0-9.\-]{1,253}:\d{1,5}", text):
        return text
    raise argparse.ArgumentTypeError(f"{text[:60]!r} is not 'auto', 'ray://HOST:PORT' or 'HOST:PORT'")


def true_cfg_scale(text: str) -> float:
    """FLUX's true CFG scale: a finite number > 1 (1 or less turns true CFG off)."""
    value = _number(text, float)
    if value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g} is not > 1 (true CFG runs only above 1; drop --true-cfg for none)")
    return value


def image_size(text: str) -> int:
    """Pixels: a positive multiple of 8 (the SD/SDXL VAE downsamples by 8)."""
    value = _number(text, int)
    if value < 8 or value % 8:
        raise argparse.ArgumentTypeError(f"{value} is not a positive multiple of 8 (the VAE's scale factor)")
    return value


def weight_pair(text: str) -> tuple[float, float]:
    """'1.0,0.8' -> (w_subject, w_style)."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"{text!r}: give two numbers, w_subject,w_style (e.g. 1.0,0.8)")
    return _number(parts[0], float), _number(parts[1], float)


def block_map(text: str) -> dict:
    """blora blocks: 'subject=up_blocks.0.attentions.0;style=up_blocks.0.attentions.1' (several blocks per role
    separated by ','), or the same as JSON: '{"subject": ["up_blocks.0.attentions.0"], "style": [...]}'."""
    if text.lstrip().startswith("{"):
        try:
            blocks = json.loads(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"not valid JSON ({error})") from None
        if not isinstance(blocks, dict) or not all(
                isinstance(v, list) and all(isinstance(b, str) for b in v) for v in blocks.values()):
            raise argparse.ArgumentTypeError('JSON blocks must map a role to a list of names: {"subject": [...]}')
    else:
        blocks = {}
        for part in filter(None, (p.strip() for p in text.split(";"))):
            role, sep, names = part.partition("=")
            if not sep:
                raise argparse.ArgumentTypeError(f"{part!r}: expected ROLE=block[,block...] (e.g. subject=up_blocks.0)")
            blocks[role.strip()] = [n.strip() for n in names.split(",") if n.strip()]
    unknown = sorted(set(blocks) - {"subject", "style"})
    if unknown or not blocks:
        raise argparse.ArgumentTypeError(f"roles must be subject and/or style, got {unknown or 'none'}")
    return blocks


def _fusion_options(args) -> dict:
    options = dict(granularity=args.granularity, backend=args.backend)
    if args.policy == "fls":  # recorded only where it is used
        options = dict(divergence=args.divergence or "kl", **options)
    if args.policy == "blora" and args.blocks is not None:
        options["blocks"] = args.blocks
    if args.policy == "direct" and args.weights is not None:
        options["weights"] = args.weights
    if args.policy == "switch" and args.tau is not None:
        options["tau"] = args.tau
    return options


def _check_out(out: Path) -> None:
    """``--out`` must be a folder or a path a folder can be made at: no file there or above it."""
    from fusion_engine.errors import OptionError

    existing = next((path for path in (out, *out.parents) if path.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "" if existing == out else f" ({existing} above it)"
        raise OptionError(f"--out {out}: is a file{where}; give a folder (the outputs are written into it)")


def _check_generate(args) -> None:
    """Every mistake in the flags, found before anything heavy is loaded."""
    import torch

    from fusion_engine.errors import OptionError

    _check_out(Path(args.out))
    if args.subject is None and args.style is None:
        raise OptionError("give --subject, --style or both (a LoRA .safetensors each)")
    for flag, policy in (("blocks", "blora"), ("weights", "direct"), ("tau", "switch"), ("divergence", "fls")):
        if getattr(args, flag) is not None and args.policy != policy:
            raise OptionError(f"--{flag} is an option of --policy {policy}, not of --policy {args.policy}")
    if args.policy == "composite" and (args.subject is None or args.style is None):
        raise OptionError("--policy composite averages a subject pass and a style pass: give --subject and --style")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise OptionError(f"--device {args.device!r}: not a device name (cpu, cuda, cuda:1, mps)") from None
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise OptionError(f"--device {args.device}: not a device that can run the model (cpu, cuda, cuda:1, mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device {args.device}: CUDA is not available here (torch {torch.__version__}); "
                          "use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise OptionError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"--device {args.device}: MPS is not available here; use --device cpu")
    if args.backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise OptionError("--backend triton needs a CUDA device (or, for tests only, the Triton interpreter: "
                          "TRITON_INTERPRET=1, thousands of times slower); on CPU use --backend reference or auto")
    llr_flags = [f for f in ("clip", "clip_checkpoint", "dino", "dino_checkpoint", "subject_prompt", "style_prompt")
                 if getattr(args, f) is not None]
    if not args.llr and llr_flags:
        raise OptionError(f"--{llr_flags[0].replace('_', '-')} is an option of --llr; add --llr or drop it")
    if args.llr:
        missing = [f"--{f.replace('_', '-')}" for f in ("clip", "dino", "subject_prompt", "style_prompt")
                   if getattr(args, f) is None]
        if missing:
            raise OptionError(f"--llr needs {', '.join(missing)} (the encoders that score the image, and the "
                              "prompts of the two references)")
        if args.subject is None or args.style is None:
            raise OptionError("--llr refines towards a subject and a style reference: give --subject and --style")
        for flag in ("clip_checkpoint", "dino_checkpoint"):
            path = getattr(args, flag)
            if path is not None and not Path(path).is_file():
                raise OptionError(f"--{flag.replace('_', '-')} {path}: no such file")


FLUX_GUIDANCE, CFG_GUIDANCE = 3.5, 5.0  # --guidance defaults: FluxPipeline's own guidance_scale; the SD default


def _check_guidance_flags(args, class_name: str) -> None:
    """Per family, before the pipeline loads: ``--guidance``'s default, and ``--true-cfg``/``--negative-prompt``.

    On FLUX a negative prompt is used only by true CFG, so it needs ``--true-cfg`` (and ``--true-cfg`` needs it);
    other families run CFG with ``--guidance`` and refuse ``--true-cfg``.
    """
    from fusion_engine.errors import OptionError

    flux = class_name.startswith("Flux")
    if args.guidance is None:
        args.guidance = FLUX_GUIDANCE if flux else CFG_GUIDANCE
    if not flux:
        if args.true_cfg is not None:
            raise OptionError(f"--true-cfg is FLUX's true CFG; {class_name} runs classifier-free guidance with "
                              "--guidance (and --negative-prompt): drop --true-cfg")
        return
    if args.negative_prompt is not None and args.true_cfg is None:
        raise OptionError("--negative-prompt on a FLUX pipeline: FLUX uses a negative prompt only with true CFG; "
                          "add --true-cfg SCALE (> 1; two passes per step, uncond and cond as one batch) or drop it")
    if args.true_cfg is not None and args.negative_prompt is None:
        raise OptionError("--true-cfg on a FLUX pipeline runs the uncond pass on a negative prompt: add "
                          "--negative-prompt (e.g. \"blurry, low quality\"), or drop --true-cfg")


def _set_scheduler(pipe, name: str) -> None:
    """Replace ``pipe.scheduler`` by the compatible diffusers scheduler class ``name``, same config."""
    from fusion_engine.errors import OptionError

    compatible = {cls.__name__: cls for cls in pipe.scheduler.compatibles}
    compatible.setdefault(type(pipe.scheduler).__name__, type(pipe.scheduler))
    if name not in compatible:
        raise OptionError(f"--scheduler {name}: not a scheduler this pipeline can use; compatible: "
                          f"{', '.join(sorted(compatible))}")
    try:  # a missing extra (torchsde) or a config it cannot run from (EDM's sigmas) shows here, not mid-sampling
        scheduler = compatible[name].from_config(pipe.scheduler.config)
        scheduler.set_timesteps(2)
    except Exception as error:  # noqa: BLE001 - diffusers raises ImportError, TypeError, ValueError, ...
        message = " ".join(str(error).split())[:300] or type(error).__name__
        raise OptionError(f"--scheduler {name}: cannot run from this pipeline's scheduler config ({message})") \
            from None
    pipe.scheduler = scheduler


def _refiner(args, device):
    from fusion_engine.refine import Refiner
    from fusion_engine.scoring.encoders import load_dino, load_openclip

    clip_model = args.clip
    if clip_model.endswith(".json"):
        try:
            clip_model = json.loads(Path(clip_model).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            from fusion_engine.errors import OptionError

            raise OptionError(f"--clip {args.clip}: cannot read the OpenCLIP config ({error})") from None
    clip = load_openclip(clip_model, args.clip_checkpoint, device=device)
    dino = load_dino(args.dino, args.dino_checkpoint, device=device)
    return Refiner(clip, dino, m=args.m)


def _image_record(args, pipe, height: int, width: int) -> dict:
    """What each image's PNG text and JSON sidecar say about how it was made."""
    import fusion_engine as fe

    def lora(path, scale):
        return None if path is None else {"file": str(Path(path).resolve()), "scale": scale}

    llr = None
    if args.llr:
        llr = {"m": args.m, "clip": args.clip, "clip_checkpoint": args.clip_checkpoint, "dino": args.dino,
               "dino_checkpoint": args.dino_checkpoint, "subject_prompt": args.subject_prompt,
               "style_prompt": args.style_prompt}
    return {
        "prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": args.seed,
        "num_images": args.num_images, "steps": args.steps, "guidance": args.guidance, "true_cfg": args.true_cfg,
        "height": height, "width": width, "model": str(Path(args.model).resolve()),
        "scheduler": type(pipe.scheduler).__name__,
        "dtype": args.dtype, "device": args.device, "subject": lora(args.subject, args.subject_scale),
        "style": lora(args.style, args.style_scale), "policy": args.policy, "options": _fusion_options(args),
        "llr": llr, "version": fe.__version__,
    }


def _quiet_loading() -> None:
    """No 'Loading pipeline components' bars from diffusers and transformers (--quiet)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def cmd_generate(args) -> int:
    import torch

    import fusion_engine as fe
    from fusion_engine.cli.image_files import claim_run, save_run
    from fusion_engine.integration.model_path import check_supported, pipeline_class_name
    from fusion_engine.utils.dtypes import torch_dtype
    from fusion_engine.utils.io import atomic_write

    _check_generate(args)
    if args.quiet:
        _quiet_loading()
    subject = fe.load_lora(args.subject, args.subject_scale) if args.subject is not None else None
    style = fe.load_lora(args.style, args.style_scale) if args.style is not None else None
    folder = check_supported(args.model)
    _check_guidance_flags(args, pipeline_class_name(folder))
    refine = _refiner(args, torch.device(args.device)) if args.llr else None
    pipe = fe.FusionPipeline.from_pretrained(
        folder, subject=subject, style=style, policy=args.policy, torch_dtype=torch_dtype(args.dtype),
        device=args.device, refine=refine, **_fusion_options(args))
    if args.scheduler is not None:
        _set_scheduler(pipe.pipe, args.scheduler)
    default, multiple = pipe.default_size(), pipe.size_multiple()
    height, width = args.height or default, args.width or default
    for flag, value in (("height", height), ("width", width)):
        if value % multiple:
            raise fe.errors.OptionError(f"--{flag} {value}: not a multiple of {multiple} (this pipeline's pixels per "
                                        "latent token side)")
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    extra = {"subject_prompt": args.subject_prompt, "style_prompt": args.style_prompt} if args.llr else {}
    if args.true_cfg is not None:
        extra["true_cfg_scale"] = args.true_cfg
    # prompt and negative as lists: diffusers' encode_prompt refuses a str negative beside the list prompt
    # FusionPipeline hands it
    negative = [args.negative_prompt] if args.negative_prompt is not None else None
    result = pipe([args.prompt], negative, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  num_images_per_prompt=args.num_images, height=height, width=width, generator=generator,
                  progress=not args.quiet, **extra)
    out = Path(args.out)
    with claim_run(out) as number:  # held until the trace is written: a concurrent run takes another number
        paths = save_run(result.images, out, _image_record(args, pipe, height, width), number)
        written = [str(p) for p in paths]
        if result.trace is not None and len(result.trace):
            run = f"{number:05d}"
            with atomic_write(out / f"{run}_trace.json", overwrite=False) as scratch:
                result.trace.save_json(scratch)
            with atomic_write(out / f"{run}_heatmap.png", overwrite=False) as scratch:
                result.trace.heatmap(scratch)
            written += [str(out / f"{run}_trace.json"), str(out / f"{run}_heatmap.png")]
    print("wrote " + ", ".join(written) + " (each PNG with a .json sidecar)")
    return 0


def cmd_demo(args) -> int:
    import fusion_engine as fe
    from fusion_engine.refine import Refiner
    from fusion_engine.utils.visual import image_grid
    from fusion_engine.worlds import load_world, resolve_world
    from fusion_engine.worlds.base import seed_latents

    out = Path(args.out)
    _check_out(out)  # before a minute of sampling, not at the end
    kind = resolve_world(args.world)
    world = load_world(kind, folder=out / "loras", seed=args.seed)
    subject, style = world.subject(), world.style()
    measures = None
    if kind == "toy":
        from fusion_engine.worlds.toy.world import load_judges, world_measures

        measures = world_measures()  # the shipped world's decisions (its own rival shapes and styles)
        clip, dino = load_judges()
        print(f"default world: the trained toy world (fusion_engine/worlds/toy); subject {subject}; style {style}")
    else:
        from fusion_engine.scoring.encoders import tiny_dino, tiny_openclip

        clip, dino = tiny_openclip(0), tiny_dino(1)
        print(f"default world: tiny random SD pipeline; subject {subject}; style {style}")
    seeds = list(range(args.seed, args.seed + args.images))  # column i is seed args.seed + i, as in the eval
    rows, labels, fls_trace, single = [], [], None, {}
    for label, policy, which in GRID_POLICIES:
        llr = policy.endswith("+llr")
        policy = policy.removesuffix("+llr")
        pipe = fe.FusionPipeline.from_pipe(
            world.pipe, subject=subject if which != "style" else None, style=style if which != "subject" else None,
            policy=policy, **({"weights": (1.0, 1.0)} if policy == "direct" else {}), backend=args.backend,
            refine=Refiner(clip, dino) if llr else None,
        )
        prompt = {"subject": world.subject_prompt, "style": world.style_prompt}.get(which, world.prompt)
        alone = which != "both"  # a single-LoRA row, kept as a tensor for LLR
        # LLR's references (Eqs. 14-15) are exactly the subject-only and style-only rows (the same prompts, seeds
        # and sampler): hand it those rows' tensors rather than sampling them again.
        extra = {"reference_images": (single["subject"], single["style"])} if llr else {}
        result = pipe(prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      num_images_per_prompt=len(seeds), latents=seed_latents(world.pipe, seeds),
                      progress=not args.quiet, output_type="pt" if alone else "pil", **extra)
        if alone:
            single[which] = result.images
            processor = world.pipe.image_processor
            result.images = processor.numpy_to_pil(processor.pt_to_numpy(result.images))
        rows.append(result.images)
        if measures is not None:  # the toy world's transparent scores, mean over the row
            recognised, styled = measures.recognised_as_subject(result.images), measures.carries_style(result.images)
            scores = measures.transparent_scores(result.images)
            label = (f"{label}\nboth {int(scores['joint'].sum())}/{len(seeds)}"
                     f"\nSubject IoU {scores['subject_iou'].mean():.2f} ({recognised.sum()}/{len(seeds)})"
                     f"\nStyle Fid {scores['style_fid'].mean():.2f} ({styled.sum()}/{len(seeds)})")
        labels.append(label)
        if policy == "fls" and not llr:
            fls_trace = result.trace
        print(f"  {label.splitlines()[0]:<13} done" + (f"  ({', '.join(label.splitlines()[1:])})" if measures else ""))
    title = f"{world.prompt!r}, {args.steps} steps, CFG {args.guidance:g}, seeds {seeds[0]}..{seeds[-1]}"
    if measures is not None:
        title += "  (n/N: recognised as the subject / carrying the style; both: the two in one image)"
    grid = image_grid(rows, labels, out / "grid.png", title=title)
    fls_trace.save_json(out / "trace.json")
    fls_trace.heatmap(out / "heatmap.png", title="fls[kl] choices (orange: subject, blue: style)")
    print(f"wrote {grid}, {out / 'heatmap.png'}, {out / 'trace.json'}")
    return 0


def cmd_inspect(args) -> int:
    import fusion_engine as fe
    from fusion_engine.lora.families import describe_family

    lora = fe.load_lora(args.file)
    print(f"file:    {lora.source}")
    print(f"format:  {lora.layout}")
    print(f"family:  {lora.family} ({describe_family(lora.family)})")
    conv = sum(layer.is_conv for layer in lora.layers.values())
    print(f"layers:  {len(lora.layers)} {lora.component} layers ({conv} conv)")
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
    from fusion_engine.utils.dtypes import torch_dtype

    out = Path(args.out)
    options = dict(
        out=out, pairs=args.pairs, model=args.model, device=args.device,
        dtype=torch_dtype(args.dtype) if args.dtype else None,
        clip_model=args.clip, clip_checkpoint=args.clip_checkpoint, dino_model=args.dino,
        dino_checkpoint=args.dino_checkpoint, policies=[p.strip() for p in args.policies.split(",") if p.strip()],
        seeds=args.seeds, steps=args.steps, guidance=args.guidance, height=args.height, width=args.width,
        backend=args.backend, divergence=args.divergence, m=args.m, through_unet=not args.llr_constant_noise,
        wait_timeout=args.wait_timeout, report_only=args.report_only, progress=not args.quiet,
        on_mismatch=args.on_mismatch, scales=args.scales,
    )
    if args.world == "toy":
        if args.model or args.pairs or args.clip or args.dino:
            raise OptionError("--world toy brings its own model, pairs and judges: drop --model/--pairs/--clip/--dino")
        from fusion_engine.eval.engine import REFERENCE_ROWS
        from fusion_engine.worlds.toy.world import build_toy_pipeline, load_judges, world_scores, write_toy_pairs

        policies = [*(row for row in REFERENCE_ROWS if row not in options["policies"]), *options["policies"]]
        options.update(
            policies=policies, pairs=write_toy_pairs(out / "toy_pairs"),
            pipe=build_toy_pipeline() if not args.report_only else None, extra_scores=world_scores(),
            model_label="the trained toy world (fusion_engine/worlds/toy)",
            encoders_label=("the toy world's trained judges (open_clip CLIP; timm ViT shape + look classifier "
                            "in the DINO slot)"),
            notes=["Joint success / Subject IoU / Style Fid: the toy world's transparent measures "
                   "(fusion_engine/worlds/toy/measures.py); joint success: recognised as the subject and carrying "
                   "the style in the same image. The learned CLIP / DINO scores are the judges that guide LLR, so "
                   "they score LLR's own objective",
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
    except ValueError as error:  # a bad pairs.toml, policy name or encoder choice (library ValueErrors included)
        return _fail(str(error))


class _UsageError(Exception):
    """A flag argparse refused; ``main`` prints it as the one error line."""


class _Parser(argparse.ArgumentParser):
    """argparse with one error line (``fusion-engine: error: ...``) and no exit: ``main`` returns 2."""

    def error(self, message):
        raise _UsageError(f"{self.prog.removeprefix('fusion-engine').strip() or 'usage'}: {message}")


class _Version(argparse.Action):
    """--version, read only when asked (importing the package loads torch)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from fusion_engine import __version__

        print(f"fusion-engine {__version__}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    from fusion_engine.ops import BACKENDS, DIVERGENCES
    from fusion_engine.policies import POLICIES
    from fusion_engine.runtime.context import GRANULARITIES
    from fusion_engine.utils.dtypes import DTYPES
    from fusion_engine.worlds import WORLDS

    parser = _Parser(prog="fusion-engine", description=__doc__)
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True)

    def fusion_flags(p, policies):
        p.add_argument("--policy", default="fls", choices=policies)
        p.add_argument("--divergence", default=None, choices=DIVERGENCES, help="fls only (default kl)")
        p.add_argument("--granularity", default="image", choices=GRANULARITIES,
                       help="what one decision covers (default: one per image, CFG halves together)")
        p.add_argument("--backend", default="auto", choices=BACKENDS)

    gen = sub.add_parser("generate", help="sample with a subject and/or a style LoRA fused")
    gen.add_argument("--model", required=True, help="local diffusers pipeline folder (model_index.json)")
    gen.add_argument("--subject", default=None, help="subject LoRA .safetensors (give --subject, --style or both)")
    gen.add_argument("--style", default=None, help="style LoRA .safetensors")
    gen.add_argument("--subject-scale", type=finite_float, default=1.0)
    gen.add_argument("--style-scale", type=finite_float, default=1.0)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None, help="on FLUX only with --true-cfg")
    gen.add_argument("--steps", type=step_count, default=50)
    gen.add_argument("--guidance", type=guidance_scale, default=None,
                     help="CFG scale (default 5 on SD 1.x/2.x, SDXL and SD3; <= 1 turns CFG off); on FLUX the "
                          "distilled guidance embedding (default 3.5, FluxPipeline's own)")
    gen.add_argument("--true-cfg", type=true_cfg_scale, default=None,
                     help="FLUX only: true CFG scale (> 1), with --negative-prompt; uncond and cond run as one batch")
    gen.add_argument("--num-images", type=positive_int, default=1)
    gen.add_argument("--height", type=image_size, default=None, help="pixels, a multiple of 8 (default: the model's)")
    gen.add_argument("--width", type=image_size, default=None)
    gen.add_argument("--seed", type=seed_int, default=0)
    gen.add_argument("--scheduler", default=None,
                     help="a diffusers scheduler class name from the pipeline's compatibles, e.g. "
                          "DPMSolverMultistepScheduler (default: the folder's own)")
    gen.add_argument("--device", default="cuda" if _cuda() else "cpu")
    gen.add_argument("--dtype", default="float16" if _cuda() else "float32", choices=list(DTYPES))
    gen.add_argument("--out", required=True, help="folder; files are named RUN_SEED_INDEX.png and never overwritten")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    fusion_flags(gen, list(POLICIES))
    gen.add_argument("--blocks", type=block_map, default=None,
                     help="blora: 'subject=up_blocks.0.attentions.0;style=up_blocks.0.attentions.1' or JSON "
                          "(default: SDXL's B-LoRA blocks)")
    gen.add_argument("--weights", type=weight_pair, default=None, help="direct: w_subject,w_style (default 1,1)")
    gen.add_argument("--tau", type=positive_int, default=None, help="switch: steps per turn (default 5)")
    llr = gen.add_argument_group("Latent-Level Refinement (--llr)")
    llr.add_argument("--llr", action="store_true", help="guide the latents towards the two references (slow)")
    llr.add_argument("--clip", default=None, help="OpenCLIP architecture name, or a JSON model config file")
    llr.add_argument("--clip-checkpoint", default=None, help="local OpenCLIP checkpoint")
    llr.add_argument("--dino", default=None, help="timm model name, e.g. vit_base_patch16_224.dino")
    llr.add_argument("--dino-checkpoint", default=None, help="local DINO checkpoint")
    llr.add_argument("--m", type=non_negative_float, default=10.0, help="LLR step size (paper: 10)")
    llr.add_argument("--subject-prompt", default=None, help="prompt of the subject reference (the subject LoRA alone)")
    llr.add_argument("--style-prompt", default=None, help="prompt of the style reference (the style LoRA alone)")
    gen.set_defaults(run=cmd_generate)

    demo = sub.add_parser("demo", help="every policy on the embedded default world (no downloads, CPU)")
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("--steps", type=step_count, default=20)
    demo.add_argument("--images", type=positive_int, default=4)
    demo.add_argument("--guidance", type=guidance_scale, default=5.0)
    demo.add_argument("--seed", type=seed_int, default=0)
    demo.add_argument("--backend", default="auto", choices=BACKENDS)
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

    srv = sub.add_parser("serve", help="the HTTP service on Ray Serve (pip install -e '.[serve]'; docs/SERVING.md)")
    _serve_flags(srv)
    srv.set_defaults(run=cmd_serve)
    return parser


def _serve_flags(parser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="HTTP address (default loopback only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=positive_int, default=8000)
    parser.add_argument("--model", default=None, help="local diffusers folder (default: the embedded toy world)")
    parser.add_argument("--loras", default=None, help="catalogue folder of NAME.safetensors (default: the toy's)")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=positive_int, default=None, help="a fixed replica count (default 1)")
    scale.add_argument("--autoscale", type=replica_range, default=None, metavar="MIN:MAX",
                       help="Ray Serve autoscaling between MIN and MAX replicas (MIN may be 0)")
    parser.add_argument("--target-ongoing-requests", type=positive_float, default=None,
                        help="with --autoscale: requests per replica the autoscaler aims at (default: "
                             "--max-batch-size, one full batch each)")
    parser.add_argument("--num-cpus", type=non_negative_float, default=1.0, help="CPUs per replica")
    parser.add_argument("--num-gpus", type=non_negative_float, default=0.0, help="GPUs per replica")
    parser.add_argument("--max-batch-size", type=positive_int, default=8)
    parser.add_argument("--batch-wait-timeout-s", type=non_negative_float, default=0.05)
    parser.add_argument("--max-queue", type=positive_int, default=64, help="waiting requests per replica (then 503)")
    parser.add_argument("--budget-mb", type=positive_int, default=256, help="LoRA pool budget per replica (LRU)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads per replica")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set "
                                                        "FUSION_ENGINE_API_KEY)")
    parser.add_argument("--address", type=ray_address, default=None,
                        help="a running Ray cluster ('auto', 'ray://HOST:PORT'); default: a local Ray")
    parser.add_argument("--ray-cpus", type=positive_int, default=2, help="CPUs of the local Ray")


def cmd_serve(args) -> int:
    try:
        from fusion_engine.serve.app import API_KEY_ENV, ServeConfig
        from fusion_engine.serve.runner import serve_forever
    except ImportError as error:
        return _fail(f"serve needs Ray Serve: pip install -e '.[serve]' ({error})")
    if args.target_ongoing_requests is not None and args.autoscale is None:
        raise _UsageError("serve: --target-ongoing-requests needs --autoscale MIN:MAX")
    low, high = args.autoscale or (None, None)
    config = ServeConfig(model=args.model, loras=args.loras, replicas=args.replicas or 1, min_replicas=low,
                         max_replicas=high, target_ongoing_requests=args.target_ongoing_requests,
                         num_cpus=args.num_cpus,
                         num_gpus=args.num_gpus, max_batch_size=args.max_batch_size,
                         batch_wait_timeout_s=args.batch_wait_timeout_s, max_queue=args.max_queue,
                         budget_bytes=args.budget_mb << 20, threads=args.threads,
                         api_key=args.api_key or os.environ.get(API_KEY_ENV)).check()
    if args.address is None:  # a local Ray: the replicas see this machine's files, so check them before Ray starts
        _check_serve_paths(args.model, args.loras)
    return serve_forever(config, args.host, args.port, args.address, args.ray_cpus)


def _check_serve_paths(model, loras) -> None:
    """``--model`` a local pipeline folder and ``--loras`` a folder, checked here in one line each instead of by a
    replica after Ray's start (on a cluster, ``--address``, the paths are the worker nodes' and are not checked)."""
    from fusion_engine.errors import OptionError
    from fusion_engine.integration.model_path import local_pipeline_folder

    if model is not None:
        local_pipeline_folder(model)
    if loras is not None and not Path(loras).is_dir():
        raise OptionError(f"serve: --loras {loras}: no such folder (the LoRA catalogue is a folder of .safetensors)")


def _eval_flags(parser) -> None:
    from fusion_engine.eval import DEFAULT_POLICIES
    from fusion_engine.ops import BACKENDS, DIVERGENCES
    from fusion_engine.utils.dtypes import DTYPES
    from fusion_engine.worlds import WORLDS

    parser.add_argument("--world", default=None, choices=[world for world in WORLDS if world != "auto"],
                        help="toy: the trained toy world's model, LoRA pair, judges and transparent measures "
                             "(--model/--pairs/--clip/--dino then stay unset)")
    parser.add_argument("--pairs", default=None, help="pairs.toml (default: N random pairs on the tiny default)")
    parser.add_argument("--default-pairs", type=positive_int, default=2, help="pairs made when --pairs is not given")
    parser.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                        help="comma-separated; any policy, '+llr' adds Latent-Level Refinement")
    parser.add_argument("--seeds", type=positive_int, default=10, help="seeds 0..N-1 per pair and policy")
    parser.add_argument("--scales", type=scale_pairs, default=None,
                        help="sweep (subject, style) LoRA strengths, e.g. 1:1,1:0.7,0.7:1: one report row group per "
                             "scale pair (default: full strength only)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=None, help="local diffusers pipeline folder (default: the tiny world)")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if CUDA is there, else cpu")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--steps", type=step_count, default=50)
    parser.add_argument("--guidance", type=guidance_scale, default=5.0)
    parser.add_argument("--height", type=image_size, default=None, help="pixels, a multiple of 8")
    parser.add_argument("--width", type=image_size, default=None)
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--divergence", default="kl", choices=DIVERGENCES)
    parser.add_argument("--m", type=non_negative_float, default=10.0, help="LLR step size")
    parser.add_argument("--llr-constant-noise", action="store_true",
                        help="LLR without the UNet backward (noise prediction treated as a constant)")
    parser.add_argument("--clip", default=None, help="OpenCLIP architecture name, or a JSON model config file")
    parser.add_argument("--clip-checkpoint", default=None, help="local OpenCLIP checkpoint (.safetensors, .bin)")
    parser.add_argument("--dino", default=None, help="timm model name, e.g. vit_base_patch16_224.dino")
    parser.add_argument("--dino-checkpoint", default=None, help="local DINO checkpoint (.safetensors, .pth)")
    parser.add_argument("--report-only", action="store_true", help="only build OUT/report.md from the CSV files")
    rerun = parser.add_mutually_exclusive_group()
    rerun.add_argument("--resume-anyway", action="store_const", dest="on_mismatch", const="resume",
                       default="refuse", help="OUT was made with other settings (OUT/settings.json): keep its rows "
                                              "anyway (the report lists the differences)")
    rerun.add_argument("--restart", action="store_const", dest="on_mismatch", const="restart",
                       help="OUT was made with other settings: move its results to OUT/superseded/<time>/ and "
                            "start over")
    parser.add_argument("--wait-timeout", type=non_negative_float, default=3600.0,
                        help="sharded runs: how long rank 0 waits for the other shards before reporting")
    parser.add_argument("--quiet", action="store_true")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - a broken torch install shows up later with a real error
        return False


def main(argv=None) -> int:
    """Run one command; every user mistake ends in one ``fusion-engine: error: ...`` line and exit code 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models load from local paths only
    from fusion_engine.errors import FusionEngineError

    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except _UsageError as error:
        return _fail(f"{error} (see --help)")
    except (FusionEngineError, OSError) as error:  # a bad file, flag value or folder: the message names it
        if isinstance(error, BrokenPipeError):  # `fusion-engine inspect f | head`: the reader left, that is fine
            sys.stderr.close()
            return 0
        return _fail(str(error) if isinstance(error, FusionEngineError) or not error.filename
                     else f"{error.filename}: {error.strerror}")


def _fail(message: str) -> int:
    print(f"fusion-engine: error: {' '.join(message.split())}", file=sys.stderr)  # one line, whatever the message
    return 2


if __name__ == "__main__":
    sys.exit(main())
