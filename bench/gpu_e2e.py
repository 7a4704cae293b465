"""End-to-end GPU benchmark: one denoiser call of the real SDXL UNet / FLUX.1 transformer per setup (issue 22, item 5).

    python bench/gpu_e2e.py                      # GPU: SDXL then FLUX, bf16, 1024x1024, rank 64, default depths
    python bench/gpu_e2e.py --models sdxl --depth 10   # full SDXL depth (10 transformer layers in the deepest blocks)
    python bench/gpu_e2e.py --smoke              # CPU, fp32, tiny widths/depth/resolution, reference backend only

Models: diffusers' ``UNet2DConditionModel`` with the SDXL base config and ``FluxTransformer2DModel`` with the
FLUX.1-dev config, both written below (no download), random weights in bf16. SDXL runs with CFG (batch 2 per
image); FLUX with its guidance embedding and true CFG off (batch 1 per image). ``--depth`` reduces the depth for time:
SDXL keeps its 3 levels and 2 resnets per level and caps the transformer layers per block at ``depth`` (full: 10);
FLUX keeps ``depth`` double blocks and ``2 * depth`` single blocks (full: 19 and 38). The depth is printed and
written with every row.

LoRAs: random rank-``--rank`` factors (alpha = rank) on every attention projection (SDXL: to_q/k/v/out.0 of attn1
and attn2; FLUX: to_q/k/v/out.0, add_q/k/v_proj, to_add_out, both feed-forwards, proj_mlp/proj_out of the single
blocks), drawn like bench/gpu_table.py's (deltas ~20% of the base output).

Setups, one denoiser call each, in order of value (a run cut short keeps the most important rows):
merged weights (diffusers ``fuse_lora`` of both adapters: the floor), diffusers/PEFT two adapters unmerged
(``set_adapters``), ``fe.attach`` fls on triton with right and with forced-wrong speculation guesses (the bounds of
the fix-up rate; ``fusion_engine.runtime.speculation``), the pool of 8 distinct pairs for 8 images in one call vs 8
per-request calls of the single-pair attach (sampling only: attach/detach per request not modelled), fls with the base
GEMM forced into cuBLAS (the split variant, ``base="cublas"``) and into the kernel at every layer (fe.attach has no
base= option: the launcher's size-class choice is overridden for the row), direct and klora on triton, then
fls/direct/klora on the reference backend. Each eager and replayed from a CUDA graph captured by hand
(``torch.cuda.graph``); a setup that cannot be captured gets a row saying why. torch.compile is left out: minutes
of compile per setup do not fit the loan.

Per row: ms per call, images/s, peak memory (GiB allocated), ratio to merged (same mode, per image). Rows go to
``<out-dir>/e2e.jsonl`` and ``e2e.csv`` as each finishes. Before the rows, a roofline floor per targeted linear shape
(FLOPs, bytes, exps of FLS's softmaxes) from the card's peak rates.

FLS+LLR per image (issue 22, item 2), last, after every model's denoiser rows, on a budget of its own
(``--llr-budget-s``, from the end of ``--budget-s``): per model, one whole ``fe.FusionPipeline`` call for one image at
the run's resolution with ``--llr-steps`` steps (default 4; a 1-step warm-up call first), "fe fls (pipeline, 1 image)"
then "fe fls + LLR (pipeline, 1 image)" (``refine=fe.Refiner(clip, dino, m=10, compile=False)``, references generated
from subject/style prompts: two single-LoRA samplings, guided passes on the reference backend, the Refiner's default).
The pipeline (``StableDiffusionXLPipeline`` / ``FluxPipeline``) wraps the benchmark's denoiser (same config, depth and
seed) with a VAE and text encoders (SDXL: CLIP ViT-L + bigG text; FLUX: CLIP ViT-L text + T5-XXL) built from the real
configs with random weights, fed by synthetic tokenizers (no vocabulary files offline; the encoders still run on
full-length sequences); LLR's CLIP (ViT-L/14 image tower) and DINO (ViT-B/16) are transformers models of the real
sizes with random weights in the library's ``ImageEncoder`` (open_clip and timm are not on the GPU image). Eager only:
LLR takes gradients, which no CUDA graph replays. Each row: ms per image, peak memory (fls alone runs before LLR's
encoders are built, so its peak holds none of theirs); the LLR row's note gives its time and peak as multiples of fls
alone. An LLR call that runs out of memory is measured again with gradient checkpointing, and its note says so.
``--smoke`` runs the same code with tiny widths at 64x64, 1 step, no warm-up.
Estimated cost on an H100, both models: 20-30 s (about 1.4 PFLOP of UNet/transformer, VAE and encoder passes by
torch's FLOP counter on the real configs, backward as 2x forward, plus the parts' random init and eager launch cost).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
from gpu_table import capture  # bench/ is on the path when this runs as a script

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SDXL_CONFIG = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SDXL_SMOKE = dict(block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4), cross_attention_dim=32,
                  addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)
SDXL_TEXT = (77, 2048, 1280)  # (tokens, context width, pooled width)
FLUX_CONFIG = dict(  # black-forest-labs/FLUX.1-dev transformer/config.json
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_SMOKE = dict(attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                  axes_dims_rope=(4, 6, 6))
FLUX_TEXT = 512
DEFAULT_DEPTH = {"sdxl": 10, "flux": 4}  # SDXL whole; FLUX 4 double + 8 single blocks (of 19 + 38) for time
SDXL_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
FLUX_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2", "proj_mlp", "proj_out")
LORA_B_STD = (0.2, 0.25)  # as bench/gpu_table.py: (subject, style) deltas ~20-25% of the base output
POOL_PAIRS = 8  # --smoke: 2
STEP = (10, 30)  # the denoising step every fused call is told (klora's pattern depends on it)
# peak rates for the roofline floor: dense bf16 tensor FLOP/s, HBM bytes/s, MUFU exp/s (132 SMs x 16/clk x 1.75 GHz)
PEAKS = {"H100": (989e12, 3.35e12, 3.7e12), "H200": (989e12, 4.8e12, 3.7e12)}
FLS_EXPS_PER_ELEMENT = 3  # softmax of y0 and y1, and q = softmax(y1) reused: 2-3 exps per output element (issue 22)

CSV_FIELDS = ["model", "depth", "setup", "mode", "ms_per_call", "images_per_call", "images_per_s", "peak_gib",
              "ratio_to_merged", "observed_flip_rate", "note"]

# FLS+LLR rows: one whole FusionPipeline call (text encoders, sampling, VAE decode; LLR: reference images, CLIP/DINO)
LLR_STEPS = 4  # sampling steps per measured call (the warm-up call runs 1)
LLR_BUDGET_S = 40  # --llr-budget-s: the pipeline rows' own time, after --budget-s
LLR_PROMPTS = {"prompt": "a sbu dog in szn style", "subject_prompt": "a photo of sbu dog",
               "style_prompt": "a painting in szn style"}
VAE_CONFIG = dict(  # the SDXL VAE's config (madebyollin/sdxl-vae-fp16-fix, stabilityai's sdxl vae): 4 levels, x8
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu",
    norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
FLUX_VAE = dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False)  # FLUX.1-dev vae/config.json: the same blocks, 16 latent channels
VAE_SMOKE = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,  # SDXL, FLUX
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                   bos_token_id=0, eos_token_id=2, pad_token_id=1)
CLIP_G_TEXT = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,  # SDXL's 2nd
                   num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                   bos_token_id=0, eos_token_id=2, pad_token_id=1)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,  # FLUX's 2nd
              feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False)
TEXT_SMOKE = {  # widths the smoke denoisers take: SDXL context 16 + 16 = 32, pooled 16; FLUX context 32, pooled 16
    "clip_l": dict(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                   projection_dim=16),
    "clip_g": dict(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                   projection_dim=16),
    "t5": dict(vocab_size=1000, d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=1),
}
CLIP_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,  # ViT-L/14
                   patch_size=14, image_size=224, projection_dim=768, hidden_act="quick_gelu")
DINO_VIT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,  # ViT-B/16
                patch_size=16, image_size=224, layer_norm_eps=1e-6)  # DINO ViT-B/16, docs/EVALUATION.md's
ENCODER_SMOKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=8,
                     image_size=32)


# ----------------------------------------------------------------------------- models and inputs

def build_model(name: str, depth: int, smoke: bool, device, dtype) -> nn.Module:
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    torch.manual_seed(0)
    if name == "sdxl":
        config = {**SDXL_CONFIG, **(SDXL_SMOKE if smoke else {})}
        full = SDXL_CONFIG["transformer_layers_per_block"]
        config["transformer_layers_per_block"] = tuple(min(n, depth) for n in full)
        cls = UNet2DConditionModel
    else:
        config = {**FLUX_CONFIG, **(FLUX_SMOKE if smoke else {}), "num_layers": min(19, depth),
                  "num_single_layers": min(38, 2 * depth)}
        cls = FluxTransformer2DModel
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the run's dtype: FLUX in fp32 first would not fit beside its bf16 copy
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(default)
    return model.to(dtype).eval().requires_grad_(False)


def model_inputs(name: str, model: nn.Module, images: int, resolution: int, smoke: bool, device, dtype,
                 seed: int = 0) -> dict:
    """Keyword arguments of one denoiser call for ``images`` images (SDXL: CFG batch 2 * images, copy-major)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    latent = resolution // 8
    cfg = model.config
    if name == "sdxl":
        batch, (tokens, width, pooled) = 2 * images, SDXL_TEXT
        if smoke:
            width = cfg.cross_attention_dim
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=dtype)
        return dict(sample=rand(batch, 4, latent, latent), timestep=torch.full((batch,), 500.0, device=device),
                    encoder_hidden_states=rand(batch, tokens, width),
                    added_cond_kwargs={"text_embeds": rand(batch, pooled),
                                       "time_ids": time_ids.repeat(batch, 1).to(device)})
    side, text = latent // 2, (8 if smoke else FLUX_TEXT)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return dict(hidden_states=rand(images, side * side, cfg.in_channels),
                encoder_hidden_states=rand(images, text, cfg.joint_attention_dim),
                pooled_projections=rand(images, cfg.pooled_projection_dim),
                timestep=torch.full((images,), 0.5, device=device, dtype=dtype),
                img_ids=img_ids.reshape(-1, 3).to(device, dtype),
                txt_ids=torch.zeros(text, 3, device=device, dtype=dtype),
                guidance=torch.full((images,), 3.5, device=device, dtype=dtype), return_dict=False)


def copies(name: str) -> int:
    return 2 if name == "sdxl" else 1


def target_names(name: str, model: nn.Module) -> list[str]:
    suffixes = SDXL_TARGETS if name == "sdxl" else FLUX_TARGETS
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and n.endswith(suffixes)]


def random_factors(model, names, rank: int, b_std: float, seed: int) -> dict:
    """name -> (A (r, K), B (N, r)) on the model's device and dtype."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for n in names:
        w = model.get_submodule(n).weight
        (N, K), dev = w.shape, w.device
        a = torch.randn(rank, K, generator=g) * K ** -0.5
        b = torch.randn(N, rank, generator=g) * (b_std * rank ** -0.5)
        out[n] = (a.to(dev, w.dtype), b.to(dev, w.dtype))
    return out


def fe_lora(factors: dict, rank: int, component: str):
    import fusion_engine as fe

    layers = {n: fe.LoRALayer(lora_a=a, lora_b=b, alpha=float(rank)) for n, (a, b) in factors.items()}
    return fe.LoRA(layers, source="random", component=component)


# ----------------------------------------------------------------------------- timing

class Timer:
    def __init__(self, device, reps: int, warmup: int = 2):
        self.cuda, self.reps, self.warmup = torch.device(device).type == "cuda", reps, warmup

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def eager(self, fn) -> float:
        """Median ms of ``reps`` calls after the warm-up calls (Triton compiles there)."""
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    def graph(self, fn) -> float:
        """Median ms of ``reps`` replays of fn captured by hand into a CUDA graph (warmed on a side stream)."""
        g = capture(fn)
        g.replay()
        return self.eager(g.replay)


# ----------------------------------------------------------------------------- roofline

def linear_shapes(model: nn.Module, names, call) -> dict:
    """(M, K, N) -> how many targeted linears of one call have that shape (recorded by forward hooks)."""
    counts, handles = {}, []

    def hook(module, args, output):
        x = args[0]
        key = (x.numel() // x.shape[-1], module.in_features, module.out_features)
        counts[key] = counts.get(key, 0) + 1

    for n in names:
        handles.append(model.get_submodule(n).register_forward_hook(hook))
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    return counts


def roofline(counts: dict, rank: int, bytes_per: int, card: str, emit) -> None:
    """Per shape: the merged linear's FLOPs and bytes, FLS's extra FLOPs (two shrinks and expands) and exps, and the
    floor time of each from the card's peak rates (the slowest of compute, memory and exp throughput)."""
    flops_s, bw, exp_s = next((v for k, v in PEAKS.items() if k in card), PEAKS["H100"])
    emit(f"roofline floor per targeted linear shape ({card if any(k in card for k in PEAKS) else 'H100 rates'}: "
         f"{flops_s / 1e12:.0f} TFLOP/s, {bw / 1e12:.2f} TB/s, {exp_s / 1e12:.1f} Texp/s), rank {rank}:")
    emit("| M x K x N | count | merged GFLOP | merged MB | merged floor us | FLS GFLOP | FLS Mexp | FLS floor us |")
    emit("|---|---|---|---|---|---|---|---|")
    total = [0.0, 0.0]
    for (M, K, N), count in sorted(counts.items()):
        flops, nbytes = 2 * M * K * N, bytes_per * (M * K + N * K + M * N)
        fls_flops = flops + 2 * (2 * M * K * rank + 2 * M * rank * N)
        fls_bytes = nbytes + bytes_per * 2 * rank * (K + N)
        exps = FLS_EXPS_PER_ELEMENT * M * N
        merged_us = max(flops / flops_s, nbytes / bw) * 1e6
        fls_us = max(fls_flops / flops_s, fls_bytes / bw, exps / exp_s) * 1e6
        total[0] += count * merged_us
        total[1] += count * fls_us
        emit(f"| {M} x {K} x {N} | {count} | {flops / 1e9:.2f} | {nbytes / 1e6:.1f} | {merged_us:.1f} | "
             f"{fls_flops / 1e9:.2f} | {exps / 1e6:.1f} | {fls_us:.1f} |")
    emit(f"sum over the call's targeted linears: merged floor {total[0] / 1e3:.2f} ms, "
         f"FLS floor {total[1] / 1e3:.2f} ms "
         f"({total[1] / max(total[0], 1e-12):.2f}x)")


# ----------------------------------------------------------------------------- rows

class Recorder:
    def __init__(self, out_dir: Path, budget_s: float):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl, self.csv = out_dir / "e2e.jsonl", out_dir / "e2e.csv"
        if not self.csv.exists():
            with open(self.csv, "w", newline="") as f:
                csv.writer(f).writerow(CSV_FIELDS)
        self.t0, self.budget_s, self.merged = time.time(), budget_s, {}
        self.deadline = self.t0 + budget_s
        self.lines = []

    def emit(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def over_budget(self) -> bool:
        return time.time() > self.deadline

    def share_budget(self, models_left: int, end: float | None = None) -> None:
        """The next model gets an equal share of the time left until ``end`` (default: the start plus --budget-s),
        so a slow first model cannot starve the second."""
        left = (self.t0 + self.budget_s if end is None else end) - time.time()
        self.deadline = time.time() + max(left, 0) / max(models_left, 1)

    def write(self, row: dict) -> None:
        row = {k: row.get(k) for k in CSV_FIELDS}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.writer(f).writerow([row[k] for k in CSV_FIELDS])
        ms, note = row["ms_per_call"], row["note"] or ""
        peak = "n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.2f} GiB"
        cells = ("skipped | | | " if ms is None else
                 f"{ms:.2f} ms | {row['images_per_s']:.2f} img/s | {peak} | "
                 + (f"{row['ratio_to_merged']:.2f}x" if row["ratio_to_merged"] is not None else "n/a"))
        flips = "" if row["observed_flip_rate"] is None else f" | flips {row['observed_flip_rate']:.3f}"
        self.emit(f"| {row['model']} d{row['depth']} | {row['setup']} | {row['mode']} | {cells}{flips} | {note} |")


class Bench:
    """One model's rows: setups applied to one model in turn (adapters added and removed, fusions attached and
    detached), each timed eager and from a CUDA graph."""

    def __init__(self, args, name: str, rec: Recorder):
        self.args, self.name, self.rec = args, name, rec
        self.device = "cpu" if args.smoke else "cuda"
        self.dtype = torch.float32 if args.smoke else torch.bfloat16
        self.depth = args.depth if args.depth is not None else (1 if args.smoke else DEFAULT_DEPTH[name])
        self.resolution = 128 if args.smoke else args.resolution
        self.timer = Timer(self.device, args.reps, warmup=1 if args.smoke else 2)
        self.pairs = 2 if args.smoke else POOL_PAIRS
        self.model = build_model(name, self.depth, args.smoke, self.device, self.dtype)
        self.names = target_names(name, self.model)
        self.inputs = {n: model_inputs(name, self.model, n, self.resolution, args.smoke, self.device, self.dtype)
                       for n in (1, self.pairs)}
        r = args.rank
        self.pair = [random_factors(self.model, self.names, r, LORA_B_STD[i], seed=1 + i) for i in range(2)]
        self.component = "unet" if name == "sdxl" else "transformer"
        self.modes = ["eager"] + (["graph"] if self.timer.cuda else [])

    # --- helpers
    def call(self, images: int = 1):
        inputs = self.inputs[images]
        return lambda: self.model(**inputs)

    def row(self, setup: str, fn, images: int = 1, note: str = "", flips=None, modes=None) -> None:
        for mode in modes or self.modes:
            base = {"model": self.name, "depth": self.depth, "setup": setup, "mode": mode, "images_per_call": images}
            if self.rec.over_budget():
                self.rec.write({**base, "note": "skipped: over --budget-s"})
                continue
            try:
                if self.timer.cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                with torch.no_grad():
                    ms = self.timer.eager(fn) if mode == "eager" else self.timer.graph(fn)
                peak = torch.cuda.max_memory_allocated() / 2 ** 30 if self.timer.cuda else None
            except Exception as e:  # noqa: BLE001 - one failed setup (e.g. not capturable) must not end the run
                self.rec.write({**base, "note": f"failed: {type(e).__name__}: {str(e)[:200]}"})
                continue
            if setup.startswith("merged"):
                self.rec.merged[(self.name, mode)] = ms / images
            merged = self.rec.merged.get((self.name, mode))
            self.rec.write({**base, "ms_per_call": ms, "images_per_s": images * 1e3 / ms, "peak_gib": peak,
                            "ratio_to_merged": None if merged is None else ms / images / merged,
                            "observed_flip_rate": flips, "note": note})

    def skip(self, setup: str, reason: str) -> None:
        for mode in self.modes:
            self.rec.write({"model": self.name, "depth": self.depth, "setup": setup, "mode": mode,
                            "images_per_call": 1, "note": f"skipped: {reason}"})

    # --- setups
    def peft_rows(self) -> None:
        from peft import LoraConfig

        r = self.args.rank
        for i, adapter in enumerate(("subject", "style")):
            self.model.add_adapter(LoraConfig(r=r, lora_alpha=r, target_modules=self.names, init_lora_weights=False),
                                   adapter_name=adapter)
            with torch.no_grad():
                for n, (a, b) in self.pair[i].items():
                    layer = self.model.get_submodule(n)
                    layer.lora_A[adapter].weight.copy_(a)
                    layer.lora_B[adapter].weight.copy_(b)
        self.model.set_adapters(["subject", "style"], [1.0, 1.0])
        self.model.fuse_lora(adapter_names=["subject", "style"])
        self.row("merged (fuse_lora, both adapters)", self.call())
        self.model.unfuse_lora()
        self.row("diffusers/PEFT 2 adapters unmerged (set_adapters)", self.call())
        self.model.unload_lora()

    def attach(self, policy: str, backend: str, **options):
        import fusion_engine as fe

        fusion = fe.attach(self.model, fe_lora(self.pair[0], self.args.rank, self.component),
                           fe_lora(self.pair[1], self.args.rank, self.component), policy=policy, backend=backend,
                           trace=False, **options)
        fusion.set_batch_layout(1, copies(self.name))
        fusion.set_step(*STEP)
        return fusion

    def flip_rate(self) -> float:
        """Share of (layer, group) decisions that changed between consecutive eager calls on new latents and
        timesteps (random weights: an arbitrary rate, between the forced-right and forced-wrong bounds)."""
        from fusion_engine.runtime.speculation import fused_layers, guess_buffers

        layers, changed, total = fused_layers(self.model), 0, 0
        with torch.no_grad():
            for seed in range(1, 4):
                before = [b.clone() for m in layers for b in guess_buffers(m)]
                self.model(**model_inputs(self.name, self.model, 1, self.resolution, self.args.smoke, self.device,
                                          self.dtype, seed=seed))
                after = [b for m in layers for b in guess_buffers(m)]
                changed += sum(int((x != y).sum()) for x, y in zip(before, after))
                total += sum(x.numel() for x in before)
        return changed / max(total, 1)

    def fls_triton_rows(self) -> None:
        from fusion_engine.runtime.speculation import force_wrong_guesses

        with self.attach("fls", "triton"):
            self.row("fe fls triton (size-class base), right guesses (fix-up rate 0)", self.call())
            flips = self.flip_rate()
            with force_wrong_guesses(self.model):
                self.row("fe fls triton (size-class base), forced-wrong guesses (fix-up rate 1)", self.call(),
                         flips=flips, note="flips: observed rate on new inputs, random weights")

    def split_rows(self) -> None:
        """fls on triton with the base GEMM forced into the kernel ("fused") and into cuBLAS ("cublas", the split
        variant) at every layer, beside the size-class choice of the rows above. fe.attach has no base= option, so
        the launchers' size-class table is overridden for the row (``fusion_engine.kernels.testing.forced_base``)."""
        from fusion_engine.kernels import testing

        for base in ("cublas", "fused"):
            with testing.forced_base(base), self.attach("fls", "triton"):
                self.row(f"fe fls triton, base forced {base!r} at every layer", self.call())

    def pool_rows(self, backend: str) -> None:
        import fusion_engine as fe

        r, P = self.args.rank, self.pairs
        pool = fe.LoRAPool(device=self.device, dtype=self.dtype)
        for i in range(P):
            for j, role in enumerate(("s", "t")):
                factors = random_factors(self.model, self.names, r, LORA_B_STD[j], 100 + 2 * i + j)
                pool.add(f"{role}{i}", fe_lora(factors, r, self.component))
        with fe.attach(self.model, pool=pool, policy="fls", backend=backend, trace=False) as fusion:
            fusion.set_batch_layout(P, copies(self.name))
            fusion.set_step(*STEP)
            fusion.set_loras([(f"s{i}", f"t{i}") for i in range(P)])
            self.row(f"pool fls {backend}: {P} pairs, {P} images, one call", self.call(P), images=P)
        del pool
        with self.attach("fls", backend):
            one = self.call()
            self.row(f"per request fls {backend}: {P} single-pair calls (attach/detach not modelled)",
                     lambda: [one() for _ in range(P)], images=P)

    def run(self) -> None:
        rec, cuda = self.rec, self.timer.cuda
        rec.emit(f"## {self.name}: depth {self.depth} ({self.depth_words()}), {self.resolution}x{self.resolution}, "
                 f"{len(self.names)} LoRA linears, rank {self.args.rank}, {str(self.dtype).replace('torch.', '')}, "
                 f"{'CFG batch 2' if self.name == 'sdxl' else 'guidance embedding, true CFG off, batch 1'} per image")
        card = torch.cuda.get_device_name() if cuda else "CPU"
        shapes = linear_shapes(self.model, self.names, self.call())
        roofline(shapes, self.args.rank, self.dtype.itemsize, card, rec.emit)
        rec.emit("| model | setup | mode | ms/call | images/s | peak | x merged | note |")
        rec.emit("|---|---|---|---|---|---|---|---|")
        self.peft_rows()
        if cuda:
            self.fls_triton_rows()
            self.pool_rows("triton")
            self.split_rows()
            for policy in ("direct", "klora"):
                with self.attach(policy, "triton"):
                    self.row(f"fe {policy} triton", self.call())
        else:
            self.skip("fe fls triton (and split, pool, direct, klora on triton)",
                      "no CUDA device: the triton rows need a GPU (reference backend rows below)")
        for policy in ("fls", "direct", "klora"):
            with self.attach(policy, "reference"):
                self.row(f"fe {policy} reference", self.call())
        if not cuda:
            self.pool_rows("reference")

    def depth_words(self) -> str:
        if self.name == "sdxl":
            return f"transformer layers per block {self.model.config.transformer_layers_per_block} of (1, 2, 10)"
        return f"{self.model.config.num_layers}/19 double + {self.model.config.num_single_layers}/38 single blocks"


# ----------------------------------------------------------------------------- whole pipeline: FLS and FLS+LLR

class SyntheticTokenizer:
    """Stands in for a tokenizer (no vocabulary files offline): every text becomes ``model_max_length`` ids drawn
    from its words (begin, words, end, padding), so the real-size text encoders run on full-length sequences."""

    def __init__(self, model_max_length: int, vocab_size: int):
        self.model_max_length, self.vocab_size, self.added_tokens_encoder = model_max_length, vocab_size, {}

    def tokenize(self, text: str) -> list[str]:
        return text.split()

    def __call__(self, text, padding=None, max_length=None, return_tensors="pt", **_):
        texts = [text] if isinstance(text, str) else list(text)
        length = max_length or self.model_max_length
        rows = []
        for t in texts:
            words = [3 + sum(map(ord, w)) % (self.vocab_size - 5) for w in t.split()][:length - 2]
            ids = [self.vocab_size - 2, *words, self.vocab_size - 1]  # begin, words, end (the largest id, as CLIP's)
            rows.append(ids + [0] * (length - len(ids)) if padding == "max_length" else ids)
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return SimpleNamespace(input_ids=ids, attention_mask=(ids != 0).long())  # what the pipelines read

    def batch_decode(self, ids, **_) -> list[str]:
        return [" ".join(map(str, row.tolist())) for row in ids]


def build_pipeline(name: str, denoiser: nn.Module, smoke: bool, device, dtype):
    """The model's diffusers pipeline around ``denoiser``: its VAE and text encoders from the real configs (smoke:
    tiny widths), random weights, built on ``device`` in ``dtype``; synthetic tokenizers; the default scheduler."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def text(key, config):
        return {**config, **(TEXT_SMOKE[key] if smoke else {})}

    vae = {**VAE_CONFIG, **(FLUX_VAE if name == "flux" else {}), **(VAE_SMOKE if smoke else {})}
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            parts = {"vae": AutoencoderKL(**vae), "text_encoder": CLIPTextModel(CLIPTextConfig(**text("clip_l",
                                                                                                    CLIP_L_TEXT)))}
            if name == "sdxl":
                parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**text("clip_g", CLIP_G_TEXT)))
            else:
                parts["text_encoder_2"] = T5EncoderModel(T5Config(**text("t5", T5_XXL)))
    finally:
        torch.set_default_dtype(default)
    for part in parts.values():
        part.to(device, dtype).eval().requires_grad_(False)
    clip_vocab = parts["text_encoder"].config.vocab_size
    if name == "sdxl":
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           steps_offset=1, timestep_spacing="leading")  # SDXL base's scheduler
        return StableDiffusionXLPipeline(unet=denoiser, scheduler=scheduler, add_watermarker=False, **parts,
                                         tokenizer=SyntheticTokenizer(77, clip_vocab),
                                         tokenizer_2=SyntheticTokenizer(77, clip_vocab))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)  # FLUX.1-dev's
    return FluxPipeline(transformer=denoiser, scheduler=scheduler, tokenizer=SyntheticTokenizer(77, clip_vocab),
                        tokenizer_2=SyntheticTokenizer(FLUX_TEXT, parts["text_encoder_2"].config.vocab_size), **parts)


class VisionTower(nn.Module):
    """A transformers vision model as an ``ImageEncoder`` backbone: pixels -> CLIP's projected image embedding, or
    the final-norm CLS token (DINO's, as timm's ``num_classes=0`` ViT gives it)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels)
        return out.image_embeds if hasattr(out, "image_embeds") else out.last_hidden_state[:, 0]


def build_encoders(smoke: bool, device, dtype):
    """LLR's CLIP (ViT-L/14 image tower + projection) and DINO (ViT-B/16) at real size, random weights, built with
    transformers (the GPU image has no open_clip/timm: both need torchvision) and wrapped in the library's
    ``ImageEncoder`` (its preprocessing, differentiable); smoke: tiny widths, the same classes."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, ViTConfig, ViTModel

    from fusion_engine.scoring.encoders import IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, OPENAI_STD, ImageEncoder

    clip_config = {**CLIP_VISION, **(ENCODER_SMOKE if smoke else {}), **({"projection_dim": 16} if smoke else {})}
    dino_config = {**DINO_VIT, **(ENCODER_SMOKE if smoke else {})}
    torch.manual_seed(0)
    with torch.device(device):
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**clip_config))
        dino = ViTModel(ViTConfig(**dino_config), add_pooling_layer=False)
    return (ImageEncoder(VisionTower(clip.to(dtype)), clip_config["image_size"], OPENAI_MEAN, OPENAI_STD,
                         "clip[ViT-L/14 config]").to(device),
            ImageEncoder(VisionTower(dino.to(dtype)), dino_config["image_size"], IMAGENET_MEAN, IMAGENET_STD,
                         "dino[ViT-B/16 config]").to(device))


def millions(module: nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.0f}"


class PipelineRows:
    """Last rows of a run: one whole ``fe.FusionPipeline`` call for one image, fls alone and fls + LLR (``refine=``),
    around the benchmark's denoiser (rebuilt: same config, depth and seed) with a VAE, text encoders and LLR's
    CLIP/DINO encoders at real size. Eager only: LLR's guided steps take gradients, which no CUDA graph replays."""

    def __init__(self, args, name: str, rec: Recorder):
        self.args, self.name, self.rec = args, name, rec
        self.smoke = args.smoke
        self.device = "cpu" if self.smoke else "cuda"
        self.dtype = torch.float32 if self.smoke else torch.bfloat16
        self.depth = args.depth if args.depth is not None else (1 if self.smoke else DEFAULT_DEPTH[name])
        self.resolution = 64 if self.smoke else args.resolution
        self.steps = 1 if self.smoke else args.llr_steps  # smoke: 1 step and no warm-up call (the code path only)
        self.backend = "reference" if self.smoke else "triton"
        self.timer = Timer(self.device, 1, warmup=0)  # one timed call after a 1-step warm-up call (measure)
        self.ms_fls = self.peak_fls = None

    def base(self, setup: str) -> dict:
        return {"model": self.name, "depth": self.depth, "setup": setup, "mode": "eager", "images_per_call": 1}

    def run(self) -> None:
        import fusion_engine as fe

        setups = ("fe fls (pipeline, 1 image)", "fe fls + LLR (pipeline, 1 image)")
        if self.rec.over_budget():
            for setup in setups:
                self.rec.write({**self.base(setup), "note": "skipped: over --llr-budget-s"})
            return
        t = time.time()
        model = build_model(self.name, self.depth, self.smoke, self.device, self.dtype)
        names, component = target_names(self.name, model), "unet" if self.name == "sdxl" else "transformer"
        pair = [fe_lora(random_factors(model, names, self.args.rank, LORA_B_STD[i], seed=1 + i), self.args.rank,
                        component) for i in range(2)]
        pipe = build_pipeline(self.name, model, self.smoke, self.device, self.dtype)
        warm_up = "no warm-up" if self.smoke else "warm-up call: 1 step"
        self.rec.emit(f"## {self.name} pipeline rows: {self.resolution}x{self.resolution}, {self.steps} step(s) "
                      f"({warm_up}), 1 image, fls on {self.backend}; LLR: m=10, guided passes on the reference "
                      f"backend (Refiner's default), score eager (compile=False), references generated from "
                      f"subject/style prompts (2 single-LoRA samplings); built in {time.time() - t:.1f} s")
        self.rec.emit(f"parts: VAE {millions(pipe.vae)}M, text encoders {millions(pipe.text_encoder)}M + "
                      f"{millions(pipe.text_encoder_2)}M parameters (synthetic tokenizers), random weights")
        self.measure(setups[0], fe.FusionPipeline(pipe, *pair, policy="fls", backend=self.backend, trace=False), {})
        clip, dino = build_encoders(self.smoke, self.device, self.dtype)  # after fls alone: not in its peak
        self.rec.emit(f"LLR encoders: CLIP {millions(clip)}M, DINO {millions(dino)}M parameters, random weights")
        llr = fe.FusionPipeline(pipe, *pair, policy="fls", backend=self.backend, trace=False,
                                refine=fe.Refiner(clip, dino, m=10.0, compile=False))
        self.measure(setups[1], llr, {k: v for k, v in LLR_PROMPTS.items() if k != "prompt"})

    def measure(self, setup: str, pipeline, extra: dict) -> None:
        """One row: a warm-up call of 1 step, then one timed call of ``self.steps`` steps, peak memory from a reset
        before it. An LLR call that runs out of memory is measured again with gradient checkpointing."""
        base = self.base(setup)
        if self.rec.over_budget():
            self.rec.write({**base, "note": "skipped: over --llr-budget-s"})
            return

        def call(steps: int):
            return pipeline(LLR_PROMPTS["prompt"], num_inference_steps=steps, height=self.resolution,
                            width=self.resolution, generator=torch.Generator("cpu").manual_seed(0),
                            output_type="pt", progress=False, **extra)

        steps = f"{self.steps} step{'s' if self.steps > 1 else ''}"
        refiner, note = pipeline.refine, f"{steps}, eager only (LLR takes gradients: no CUDA graph)"
        ms = peak = failed = None
        try:
            ms, peak = self.timed(call)
        except torch.cuda.OutOfMemoryError as e:
            failed = e if refiner is None or refiner.gradient_checkpointing else None
            if failed is None:
                self.rec.emit(f"{setup}: out of memory ({str(e)[:120]}); again with gradient checkpointing")
        except Exception as e:  # noqa: BLE001 - one failed row must not end the run
            failed = e
        if ms is None and failed is None:  # out of memory: outside the except block, its frames' tensors are freed
            free_cuda(self.args)
            refiner.gradient_checkpointing = True
            note += "; gradient checkpointing (out of memory without)"
            try:
                ms, peak = self.timed(call)
            except Exception as e:  # noqa: BLE001
                failed = e
        if failed is not None:
            self.rec.write({**base, "note": f"failed: {type(failed).__name__}: {str(failed)[:200]}"})
            return
        if refiner is None:
            self.ms_fls, self.peak_fls = ms, peak
            note += "; the whole call: text encoders, sampling, VAE decode"
        elif self.ms_fls is not None:
            ratios = f"time x fls pipeline {ms / self.ms_fls:.2f}"
            if peak is not None and self.peak_fls:
                ratios += f", peak x fls pipeline {peak / self.peak_fls:.2f}"
            note = f"{ratios}; {note}"
        self.rec.write({**base, "ms_per_call": ms, "images_per_s": 1e3 / ms, "peak_gib": peak, "note": note})

    def timed(self, call) -> tuple[float, float | None]:
        if not self.smoke:
            call(1)  # warm-up: every path once (Triton compiles, cuDNN plans, the allocator's pools)
        if self.timer.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ms = self.timer.eager(lambda: call(self.steps))
        return ms, torch.cuda.max_memory_allocated() / 2 ** 30 if self.timer.cuda else None


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, fp32, tiny widths/depth/resolution, reference only")
    p.add_argument("--models", nargs="+", choices=["sdxl", "flux"], default=["sdxl", "flux"])
    p.add_argument("--depth", type=int, help=f"reduced depth (default {DEFAULT_DEPTH}; smoke 1)")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--reps", type=int, default=5, help="timed calls per row (after 2 warm-up calls; smoke: 1)")
    p.add_argument("--budget-s", type=float, default=540, help="rows starting after this many seconds are skipped")
    p.add_argument("--llr-budget-s", type=float, default=LLR_BUDGET_S,
                   help="the whole-pipeline rows (fls, fls + LLR) run last, until --budget-s + this many seconds "
                   "from the start (0: skipped)")
    p.add_argument("--llr-steps", type=int, default=LLR_STEPS, help="sampling steps of the whole-pipeline rows")
    p.add_argument("--out-dir", type=Path, help="where e2e.jsonl / e2e.csv / e2e.md go "
                   "(default bench/results/<date>-<card>/)")
    args = p.parse_args(argv)
    if args.smoke:
        args.rank = min(args.rank, 4)
        args.reps = min(args.reps, 2)
    return args


def free_cuda(args) -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available() and not args.smoke:
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or use --smoke for a CPU logic check")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    card = "cpu-smoke" if args.smoke else torch.cuda.get_device_name().replace(" ", "-")
    out_dir = args.out_dir or REPO / "bench" / "results" / f"{datetime.date.today():%Y-%m-%d}-{card}"
    rec = Recorder(out_dir, args.budget_s)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    import diffusers
    import triton

    rec.emit(f"# gpu_e2e: {card}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, "
             f"torch {torch.__version__}, triton {triton.__version__}, diffusers {diffusers.__version__}")
    for i, name in enumerate(args.models):
        rec.share_budget(len(args.models) - i)
        bench = Bench(args, name, rec)
        bench.run()
        del bench
        free_cuda(args)
    end = rec.t0 + args.budget_s + args.llr_budget_s  # the least valuable rows, last, on a budget of their own
    for i, name in enumerate(args.models):
        rec.share_budget(len(args.models) - i, end)
        PipelineRows(args, name, rec).run()
        free_cuda(args)
    rec.emit(f"total {time.time() - rec.t0:.0f} s; rows in {out_dir}")
    with open(out_dir / "e2e.md", "a") as f:
        f.write("\n".join(rec.lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
