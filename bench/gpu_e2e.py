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
(FLOPs, bytes, exps of FLS's softmaxes) from the card's peak rates. FLS+LLR is not measured here: LLR needs the
whole pipeline (VAE decode, CLIP/DINO encoders and their gradients), which a denoiser-only benchmark does not have.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

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

    def share_budget(self, models_left: int) -> None:
        """The next model gets an equal share of the time left (a slow first model cannot starve the second)."""
        left = self.t0 + self.budget_s - time.time()
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
        the launcher's size-class function is overridden for the row (``forced_base``)."""
        for base in ("cublas", "fused"):
            setup = f"fe fls triton, base forced {base!r} at every layer"
            try:
                force = forced_base(base)
            except AttributeError as e:
                self.skip(setup, str(e))
                continue
            with force, self.attach("fls", "triton"):
                self.row(setup, self.call())

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
        self.skip("FLS+LLR per image", "LLR needs the whole pipeline (VAE, CLIP/DINO encoders and gradients): "
                  "not in a denoiser-only benchmark")

    def depth_words(self) -> str:
        if self.name == "sdxl":
            return f"transformer layers per block {self.model.config.transformer_layers_per_block} of (1, 2, 10)"
        return f"{self.model.config.num_layers}/19 double + {self.model.config.num_single_layers}/38 single blocks"


class forced_base:
    """Within the block, the fused FLS launcher puts every layer's base GEMM where ``base`` says ("fused": in the
    Triton kernel; "cublas": the split variant) instead of its size-class choice (``fls_base_config``)."""

    def __init__(self, base: str):
        self.module = importlib.import_module("fusion_engine.kernels.fls_linear")
        if not hasattr(self.module, "fls_base_config"):
            raise AttributeError("fusion_engine.kernels.fls_linear has no fls_base_config to override any more")
        self.base, self.saved = base, None

    def __enter__(self):
        self.saved = self.module.fls_base_config
        self.module.fls_base_config = lambda M, N, K: self.base
        return self

    def __exit__(self, *exc):
        self.module.fls_base_config = self.saved


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
    p.add_argument("--out-dir", type=Path, help="where e2e.jsonl / e2e.csv / e2e.md go "
                   "(default bench/results/<date>-<card>/)")
    args = p.parse_args(argv)
    if args.smoke:
        args.rank = min(args.rank, 4)
        args.reps = min(args.reps, 2)
    return args


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
        if torch.cuda.is_available() and not args.smoke:
            torch.cuda.empty_cache()
    rec.emit(f"total {time.time() - rec.t0:.0f} s; rows in {out_dir}")
    with open(out_dir / "e2e.md", "a") as f:
        f.write("\n".join(rec.lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
