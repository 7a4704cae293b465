"""``fusion-engine eval``: every subject-style pair x policy x seed -> images, per-image scores, a report.

Resumable: an image counts as done once its score row is in a CSV under OUT/scores/; a rerun skips it.
Sharding: under ``accelerate launch`` or ``torchrun`` (or any launcher that sets RANK and WORLD_SIZE),
process ``rank`` takes the work items with ``index % world == rank`` and appends to its own CSV file. There
is no communication: rank 0 finishes its share, then waits (polling the CSV files, up to ``wait_timeout``
seconds) until every planned item has a row, and writes OUT/report.md from all rows. If a process died,
rerun the same command (finished items are skipped) or build the report from what exists with
``--report-only``.
"""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .eval_pairs import Pair, load_pairs, write_default_pairs
from .eval_report import append_row, read_rows, shard_csv, write_report
from .metrics import score_images

DEFAULT_POLICIES = ("direct", "klora", "blora", "fls", "fls+llr")
LLR_SUFFIX = "+llr"


@dataclass(frozen=True)
class WorkItem:
    pair: Pair
    policy: str
    seed: int

    @property
    def key(self) -> tuple:
        return (self.pair.name, self.policy, self.seed)

    def image_path(self, out: Path) -> Path:
        return out / "images" / self.pair.name / self.policy / f"seed{self.seed:03d}.png"


@dataclass
class EvalSettings:
    out: Path
    policies: list[str] = field(default_factory=lambda: list(DEFAULT_POLICIES))
    seeds: int = 10
    steps: int = 50
    guidance: float = 5.0
    height: int | None = None
    width: int | None = None
    backend: str = "auto"
    divergence: str = "kl"
    m: float = 10.0
    through_unet: bool = True
    wait_timeout: float = 3600.0
    progress: bool = False
    extra_scores: object = None  # optional: PIL image -> {metric: (1,) array}, e.g. the toy world's measures


def shard_from_env(environ=os.environ) -> tuple[int, int]:
    """(rank, world size) from the launcher's variables (torchrun, accelerate, ...); (0, 1) when there are none."""
    world = int(environ.get("WORLD_SIZE", "1"))
    rank = int(environ.get("RANK", environ.get("LOCAL_RANK", "0")))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world


def parse_policy(name: str) -> tuple[str, bool]:
    """"fls+llr" -> ("fls", True); "klora" -> ("klora", False)."""
    from .policies import POLICIES

    base, llr = (name[: -len(LLR_SUFFIX)], True) if name.endswith(LLR_SUFFIX) else (name, False)
    if base not in POLICIES:
        raise ValueError(f"unknown eval policy {name!r}: use one of {sorted(POLICIES)}, optionally with '+llr'")
    return base, llr


def plan(pairs: list[Pair], policies: list[str], seeds: int) -> list[WorkItem]:
    """Every item, in a fixed order (pair, seed, policy): the same list in every process."""
    for policy in policies:
        parse_policy(policy)
    return [WorkItem(pair, policy, seed) for pair in pairs for seed in range(seeds) for policy in policies]


def _save_atomic(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.stem}.{os.getpid()}.png")
    image.save(scratch)
    os.replace(scratch, path)


class Evaluator:
    """Holds the model, encoders and caches of one process; ``run(items)`` does its share."""

    def __init__(self, pipe, clip, dino, settings: EvalSettings, rank: int = 0):
        from .refine import Refiner

        self.pipe, self.clip, self.dino, self.settings, self.rank = pipe, clip, dino, settings, rank
        self.refiner = Refiner(clip, dino, m=settings.m, through_unet=settings.through_unet)
        self._loras: dict[Path, object] = {}

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def lora(self, path: Path):
        from .lora import load_lora

        if path not in self._loras:
            self._loras[path] = load_lora(path)
        return self._loras[path]

    def _call_options(self, seed: int) -> dict:
        s = self.settings
        return dict(num_inference_steps=s.steps, guidance_scale=s.guidance, height=s.height, width=s.width,
                    generator=torch.Generator().manual_seed(seed), progress=False)

    def references(self, pair: Pair, seed: int):
        """(subject, style) PIL references: the pair's images, or each LoRA alone with the same seed (cached)."""
        from PIL import Image

        from .pipeline import FusionPipeline

        if pair.has_reference_images:
            return Image.open(pair.subject_image).convert("RGB"), Image.open(pair.style_image).convert("RGB")
        images = []
        for role, prompt in (("subject", pair.subject_prompt), ("style", pair.style_prompt)):
            path = self.settings.out / "references" / pair.name / f"seed{seed:03d}_{role}.png"
            if not path.exists():
                loras = {"subject": None, "style": None, role: self.lora(getattr(pair, role))}
                single = FusionPipeline(self.pipe, policy="direct", backend=self.settings.backend, trace=False, **loras)
                _save_atomic(single(prompt, **self._call_options(seed)).images[0], path)
            images.append(Image.open(path).convert("RGB"))
        return tuple(images)

    def generate(self, item: WorkItem):
        """(PIL image, wall seconds, peak memory MB, what the memory figure is) for one item."""
        from .pipeline import FusionPipeline

        s, pair = self.settings, item.pair
        base, llr = parse_policy(item.policy)
        options = {"divergence": s.divergence} if base == "fls" else {}
        pipe = FusionPipeline(self.pipe, self.lora(pair.subject), self.lora(pair.style), policy=base,
                              backend=s.backend, trace=False, refine=self.refiner if llr else None, **options)
        extra = {}
        if llr and pair.has_reference_images:
            extra["reference_images"] = self.references(pair, item.seed)
        elif llr:  # the pipeline makes Ic and Is itself: their cost is part of the method's
            extra = {"subject_prompt": pair.subject_prompt, "style_prompt": pair.style_prompt}
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        image = pipe(pair.prompt, **self._call_options(item.seed), **extra).images[0]
        if cuda:
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - start
        if cuda:
            return image, wall, torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda max allocated"
        return image, wall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu process max RSS"

    def run(self, items: list[WorkItem], done: set) -> int:
        """Generate and score every item not in ``done``; returns how many were made."""
        from PIL import Image

        out, made = self.settings.out, 0
        for item in items:
            if item.key in done:
                continue
            image, wall, peak, mem_kind = self.generate(item)
            path = item.image_path(out)
            _save_atomic(image, path)
            subject_ref, style_ref = self.references(item.pair, item.seed)
            with Image.open(path) as saved:  # score the saved (8-bit) image: reruns and shards see the same
                scores = score_images(self.clip, self.dino, saved.convert("RGB"), subject_ref, style_ref)
                if self.settings.extra_scores is not None:
                    scores.update({k: torch.as_tensor(v) for k, v in self.settings.extra_scores(saved).items()})
            append_row(shard_csv(out, self.rank), {
                "pair": item.pair.name, "policy": item.policy, "seed": item.seed,
                **{metric: f"{value.item():.6f}" for metric, value in scores.items()},
                "wall_s": f"{wall:.4f}", "peak_mem_mb": f"{peak:.1f}", "mem_kind": mem_kind,
                "device": str(self.device), "rank": self.rank, "image": str(path.relative_to(out)),
            })
            made += 1
            if self.settings.progress:
                print(f"[rank {self.rank}] {item.pair.name} {item.policy} seed {item.seed}: {wall:.2f} s")
        return made


def wait_for_rows(out: Path, keys: set, timeout: float, poll: float = 1.0) -> dict:
    """Rows of all shards once every key has one, or what exists when ``timeout`` runs out."""
    deadline = time.monotonic() + timeout
    while True:
        rows = read_rows(out)
        if keys <= rows.keys() or time.monotonic() >= deadline:
            return rows
        time.sleep(poll)


def report(out: Path, items: list[WorkItem], policies: list[str], notes: list[str], rows: dict | None = None):
    """Write OUT/report.md from the rows of the planned items; returns (path, missing count)."""
    keys = {item.key for item in items}
    rows = {key: row for key, row in (rows if rows is not None else read_rows(out)).items() if key in keys}
    return write_report(out, rows, policies, len(items), notes), len(keys - rows.keys())


def resolve_pairs(pairs_path, out: Path, default_pairs: int, unet=None) -> list[Pair]:
    if pairs_path is not None:
        return load_pairs(pairs_path)
    return load_pairs(write_default_pairs(out / "default_pairs", default_pairs, unet))


# -- command line -------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
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


def _device(name: str | None) -> torch.device:
    if name is not None:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _load_pipe(args, device: torch.device):
    if getattr(args, "world", None) == "toy":
        from .toy.world import build_toy_pipeline

        return build_toy_pipeline().to(device)
    if args.model is None:
        from .default import build_tiny_pipeline

        return build_tiny_pipeline(0).to(device)
    from diffusers import DiffusionPipeline

    folder = Path(args.model)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder}: not a local diffusers pipeline folder (no model_index.json)")
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
        args.dtype or ("float16" if device.type == "cuda" else "float32")]
    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_encoders(args, device: torch.device):
    import json

    from .encoders import load_dino, load_openclip, tiny_dino, tiny_openclip

    if getattr(args, "world", None) == "toy":
        from .toy.world import load_judges

        return load_judges(device=device)
    if args.clip is None and args.dino is None:
        return tiny_openclip(0, device), tiny_dino(1, device)
    if args.clip is None or args.dino is None:
        raise ValueError("give both --clip and --dino (or neither, for the tiny random encoders)")
    clip_model = json.loads(Path(args.clip).read_text()) if args.clip.endswith(".json") else args.clip
    return load_openclip(clip_model, args.clip_checkpoint, device=device), load_dino(
        args.dino, args.dino_checkpoint, device=device)


def _describe_encoders(args) -> str:
    if getattr(args, "world", None) == "toy":
        return "the toy world's trained judges (open_clip CLIP, timm ViT shape classifier in the DINO slot)"
    if args.clip is None and args.dino is None:
        return "tiny random encoders (scores are meaningless)"
    return f"OpenCLIP {args.clip} ({args.clip_checkpoint}), DINO {args.dino} ({args.dino_checkpoint})"


def run_eval(args) -> int:
    """The whole command: this process's share, then (rank 0) the report. Exit 1 if items are missing."""
    rank, world = shard_from_env()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    device = _device(args.device)
    toy = getattr(args, "world", None) == "toy"
    if toy and (args.model or args.pairs or args.clip or args.dino):
        raise ValueError("--world toy brings its own model, pairs and judges: drop --model/--pairs/--clip/--dino")
    if toy:
        from .toy.world import write_toy_pairs

        args.pairs = str(write_toy_pairs(out / "toy_pairs"))
    pipe = None if args.report_only and args.pairs else _load_pipe(args, device)
    pairs = resolve_pairs(args.pairs, out, args.default_pairs, pipe.unet if pipe is not None else None)
    items = plan(pairs, policies, args.seeds)
    model = "the trained toy world (fusion_engine/toy)" if toy else args.model or "tiny random default world"
    notes = [f"model: {model}", f"pairs: {len(pairs)}, seeds: {args.seeds}",
             f"sampler: {args.steps} steps, CFG {args.guidance:g}, policies: {', '.join(policies)}",
             f"LLR: m={args.m:g}, {'noise prediction constant' if args.llr_constant_noise else 'through the UNet'}",
             f"encoders: {_describe_encoders(args)}"]
    if toy:
        notes.append("Subject IoU / Style Fid: the toy world's transparent measures (fusion_engine/toy/measures.py)")
    if not args.report_only:
        clip, dino = _load_encoders(args, device)
        settings = EvalSettings(out, policies, args.seeds, args.steps, args.guidance, args.height, args.width,
                                args.backend, args.divergence, args.m, not args.llr_constant_noise,
                                args.wait_timeout, progress=not args.quiet)
        if toy:
            from .toy.measures import transparent_scores

            settings.extra_scores = transparent_scores
        mine = items[rank::world]
        made = Evaluator(pipe, clip, dino, settings, rank).run(mine, set(read_rows(out)))
        print(f"[rank {rank}/{world}] made {made} image(s); {len(mine) - made} were already done")
        if rank != 0:
            return 0
    rows = wait_for_rows(out, {item.key for item in items}, args.wait_timeout if world > 1 else 0.0)
    path, missing = report(out, items, policies, notes, rows)
    print(f"wrote {path}" + (f" ({missing} planned image(s) missing: rerun to finish them)" if missing else ""))
    return 1 if missing else 0
