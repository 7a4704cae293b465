"""The evaluation engine: every subject-style pair x policy x seed -> images, per-image scores, a report.

Resumable: an image counts as done once its score row is in a CSV under OUT/scores/; a rerun skips it.
Sharding (``sharding.py``): under ``accelerate launch`` or ``torchrun`` (or any launcher that sets RANK and
WORLD_SIZE), process ``rank`` takes the work items with ``index % world == rank`` and appends to its own CSV
file. There is no communication: rank 0 finishes its share, then waits (polling the CSV files, up to
``wait_timeout`` seconds) until every planned item has a row, and writes OUT/report.md from all rows. If a
process died, rerun the same command (finished items are skipped) or build the report from what exists with
``report_only``.
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import OptionError
from ..scoring.metrics import score_images
from ..utils.io import save_image
from .pairs import Pair, load_pairs
from .recorded import check_recorded, settings_record
from .report import append_row, read_rows, shard_csv, write_report
from .settings import EvalSettings
from .sharding import shard_from_env, wait_for_rows

LLR_SUFFIX = "+llr"
# Rows that are not fusion policies: one LoRA alone with its own prompt (the references of a pair without
# reference images), made and scored like the policies' images so the report shows what fusion starts from.
REFERENCE_ROWS = {"subject-only": "subject", "style-only": "style"}


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


def parse_policy(name: str) -> tuple[str, bool]:
    """"fls+llr" -> ("fls", True); "klora" -> ("klora", False); "subject-only" -> ("subject-only", False)."""
    from ..policies import POLICIES

    if name in REFERENCE_ROWS:
        return name, False
    base, llr = (name[: -len(LLR_SUFFIX)], True) if name.endswith(LLR_SUFFIX) else (name, False)
    if base not in POLICIES:
        raise OptionError(f"unknown eval policy {name!r}: use one of {sorted(POLICIES)}, optionally with '+llr'")
    return base, llr


def plan(pairs: list[Pair], policies: list[str], seeds: int) -> list[WorkItem]:
    """Every item, in a fixed order (pair, seed, policy): the same list in every process."""
    for policy in policies:
        parse_policy(policy)
    return [WorkItem(pair, policy, seed) for pair in pairs for seed in range(seeds) for policy in policies]


class Evaluator:
    """Holds the model, encoders and caches of one process; ``run(items)`` does its share."""

    def __init__(self, pipe, clip, dino, settings: EvalSettings, rank: int = 0):
        from ..refine import Refiner

        self.pipe, self.clip, self.dino, self.settings, self.rank = pipe, clip, dino, settings, rank
        self.refiner = Refiner(clip, dino, m=settings.m, through_unet=settings.through_unet)
        self._loras: dict[Path, object] = {}
        self._reference_seconds: dict[Path, float] = {}

    @property
    def device(self) -> torch.device:
        return _denoiser(self.pipe).device

    def lora(self, path: Path):
        from ..lora import load_lora

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

        if pair.has_reference_images:
            return Image.open(pair.subject_image).convert("RGB"), Image.open(pair.style_image).convert("RGB")
        return self.reference(pair, seed, "subject"), self.reference(pair, seed, "style")

    def _reference_path(self, pair: Pair, seed: int, role: str) -> Path:
        return self.settings.out / "references" / pair.name / f"seed{seed:03d}_{role}.png"

    def reference(self, pair: Pair, seed: int, role: str):
        """The ``role`` LoRA alone with its own prompt and this seed, made once and cached as a PNG."""
        from PIL import Image

        from ..integration.pipeline import FusionPipeline

        path = self._reference_path(pair, seed, role)
        if not path.exists():
            start = time.perf_counter()
            loras = {"subject": None, "style": None, role: self.lora(getattr(pair, role))}
            single = FusionPipeline(self.pipe, policy="direct", backend=self.settings.backend, trace=False, **loras)
            prompt = pair.subject_prompt if role == "subject" else pair.style_prompt
            save_image(single(prompt, **self._call_options(seed)).images[0], path)
            self._reference_seconds[path] = time.perf_counter() - start
        return Image.open(path).convert("RGB")

    def generate(self, item: WorkItem):
        """(PIL image, wall seconds, peak memory MB, what the memory figure is) for one item."""
        from ..integration.pipeline import FusionPipeline

        s, pair = self.settings, item.pair
        if item.policy in REFERENCE_ROWS:  # the LoRA alone: the reference this seed's fused images are scored by
            if pair.has_reference_images:
                raise OptionError(f"{item.policy!r} rows need a pair without reference images ({pair.name})")
            role = REFERENCE_ROWS[item.policy]
            image = self.reference(pair, item.seed, role)
            seconds = self._reference_seconds.get(self._reference_path(pair, item.seed, role), float("nan"))
            return image, seconds, *self._peak_memory()
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
        return image, wall, *self._peak_memory()

    def _peak_memory(self) -> tuple[float, str]:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda max allocated"
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu process max RSS"

    def run(self, items: list[WorkItem], done: set) -> int:
        """Generate and score every item not in ``done``; returns how many were made."""
        from PIL import Image

        out, made = self.settings.out, 0
        for item in items:
            if item.key in done:
                continue
            image, wall, peak, mem_kind = self.generate(item)
            path = item.image_path(out)
            save_image(image, path)
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


def report(out: Path, items: list[WorkItem], policies: list[str], notes: list[str], rows: dict | None = None,
           problems: list[str] = ()):
    """Write OUT/report.md from the rows of the planned items; returns (path, missing count)."""
    keys = {item.key for item in items}
    rows = {key: row for key, row in (rows if rows is not None else read_rows(out)).items() if key in keys}
    return write_report(out, rows, policies, len(items), notes, problems), len(keys - rows.keys())


def _denoiser(pipe):
    """The pipeline's denoiser: ``pipe.unet`` (SD, SDXL) or ``pipe.transformer`` (FLUX, SD3)."""
    from ..integration.attach import denoiser_name

    return getattr(pipe, denoiser_name(pipe))


def _check_size(settings: EvalSettings, pipe) -> None:
    """Height and width must be multiples of the pixels per latent token side (the VAE's downsampling factor,
    8 for SD/SDXL; times 2 for FLUX's packing, times the patch size for SD3)."""
    from ..integration.attach import pipeline_base_class
    from ..samplers import sampler_for

    sampler = sampler_for(pipe, pipeline_base_class(pipe)) if pipe is not None else None
    factor = sampler.size_multiple() if sampler is not None else getattr(pipe, "vae_scale_factor", 8) or 8
    for name in ("height", "width"):
        value = getattr(settings, name)
        if value is not None and value % factor:
            raise OptionError(f"{name} must be a multiple of {factor} (pixels per latent token side), got {value}")


def run(settings: EvalSettings) -> int:
    """This process's share of the items, then (rank 0) the report.

    Args:
        settings: what to evaluate and how (``EvalSettings``).

    Returns:
        0 when every planned image has a score row, 1 when some are missing (rerun to finish them).

    Example:
        >>> from fusion_engine.eval import EvalSettings, run
        >>> run(EvalSettings(out="eval_out", model="./sd15", pairs="pairs.toml", seeds=2))
    """
    from .loading import describe_encoders, load_encoders, load_pipe, resolve_device

    s = settings
    rank, world = shard_from_env()
    out = s.out
    out.mkdir(parents=True, exist_ok=True)
    policies = list(s.policies)
    if s.pairs is None and s.make_pairs is None:
        raise OptionError("EvalSettings needs pairs= (a pairs.toml) or make_pairs= (a writer of one)")
    device = resolve_device(s.device)
    pipe = None if s.report_only and s.pairs is not None else load_pipe(s, device)
    pairs = load_pairs(s.pairs if s.pairs is not None else s.make_pairs(out / "default_pairs", unet=_denoiser(pipe)))
    items = plan(pairs, policies, s.seeds)
    _check_size(s, pipe)
    model = s.model_label or (str(Path(s.model).resolve()) if s.model is not None else "a pipeline given by the caller")
    differing = check_recorded(out, settings_record(s, pairs, model, describe_encoders(s)), s.on_mismatch, rank, world)
    size = f", {s.width or 'default'}x{s.height or 'default'} px" if s.height or s.width else ""
    notes = [f"model: {model}", f"pairs: {len(pairs)}, seeds: {s.seeds}",
             f"sampler: {s.steps} steps, CFG {s.guidance:g}{size}, policies: {', '.join(policies)}",
             f"LLR: m={s.m:g}, {'through the UNet' if s.through_unet else 'noise prediction constant'}",
             f"encoders: {describe_encoders(s)}", *s.notes]
    if differing:
        notes.append("**resumed with settings that differ from the earlier rows'** (settings.json): "
                     + "; ".join(differing))
    if not s.report_only:
        clip, dino = load_encoders(s, device)
        mine = items[rank::world]
        made = Evaluator(pipe, clip, dino, s, rank).run(mine, set(read_rows(out)))
        print(f"[rank {rank}/{world}] made {made} image(s); {len(mine) - made} were already done")
        if rank != 0:
            return 0
    rows = wait_for_rows(out, {item.key for item in items}, s.wait_timeout if world > 1 else 0.0)
    problems: list[str] = []
    read_rows(out, problems)  # what the reader skipped, for the report
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    path, missing = report(out, items, policies, notes, rows, problems)
    print(f"wrote {path}" + (f" ({missing} planned image(s) missing: rerun to finish them)" if missing else ""))
    return 1 if missing else 0
