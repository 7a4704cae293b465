"""Host (Python) cost of one LoRA layer call on the Triton path, measured without a GPU.

The real launchers (csrc_triton/*.py) run through Triton's real JIT path: argument binding and
specialisation, the kernel cache lookup, a real sm_90 compile (ptxas included) on the first call,
and the launch call itself, under a stand-in driver whose launcher never launches (it only reads
every tensor argument's ``data_ptr()``, as the CUDA launcher does). Tensors live on the CPU, so
what is timed is the host work a GPU user pays per layer call in eager mode: argument checks,
allocations, shrink / speculate / fix-up launch preparation, torch.library dispatch, the module's
own bookkeeping. The GPU work itself is not timed (it runs asynchronously behind it on a GPU).

Rows (per layer call, microseconds; each also as a ratio to ``F.linear`` at the same shape, timed
in the same run, real CPU compute included):

* ``module``: the fused stand-in module's forward inside an attached model (see below for the
  per-forward hooks); its baseline is the same model with plain ``nn.Linear`` layers
  (the merged-weight model).
* ``op``: the ``fusion_engine.ops`` call alone, as the module makes it; ``launcher``: the
  ``fusion_engine.kernels`` launcher alone (no torch.library dispatch).
* ``reference`` rows run the pure-torch path on the CPU, real compute included (the GPU-less user's
  path); ``reference compiled``: the same model under ``torch.compile`` (Inductor, CPU), skipped
  with ``--no-compile`` and in ``--smoke``.

Usage:
    python bench/launch_overhead.py [--smoke] [--json PATH] [--repeats 5] [--calls 300]

The first run compiles the kernels for sm_90 (seconds each; cached by Triton after that). Timings
use this process's CPU time by default (``--clock cpu``: time spent waiting for a shared CPU is not
counted; ``--clock wall`` for elapsed time). They are still noisy on a shared CPU: every row is
``--repeats`` rounds of ``--calls`` calls; the table shows the best round (the least disturbed: the
ratios use it) and the median round. Module rows divide a forward of the ``--layers``-layer model by
its layers, so the fusion's per-forward hooks (owner lock, coefficient table, trace collection) are
spread over them (an SDXL UNet spreads them over 560-700 layers).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler and launch path, never the interpreter
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

RECORDED: list | None = None  # while a list, every launch is appended to it (see verify_replays)


class _StandInLauncher:
    """Takes a launch as the CUDA launcher does (grid, stream, function, metadata, hooks, args) and reads each
    tensor argument's data pointer, as the real one does; launches nothing."""

    def __init__(self, src, metadata):
        pass

    def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter_hook,
                 exit_hook, *args):
        for arg in args:
            if isinstance(arg, torch.Tensor):
                arg.data_ptr()
        if RECORDED is not None:
            RECORDED.append((self, (grid_x, grid_y, grid_z), stream, packed_metadata, args))


class _StandInUtils:
    @staticmethod
    def get_device_properties(device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

    @staticmethod
    def load_binary(name, kernel, shared, device):
        return 0, 0, 0, 0, 1024  # module, function, registers, spills, max threads per block


class StandInDriver:
    """Enough of a CUDA driver for Triton to compile for sm_90 and go through its launch path; tensors stay on
    the CPU and nothing runs on a device."""

    launcher_cls = _StandInLauncher
    utils = _StandInUtils()

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


driver.set_active(StandInDriver())

import fusion_engine as fe  # noqa: E402
import fusion_engine.kernels.testing as kernel_testing  # noqa: E402
import fusion_engine.kernels.utils as kernel_utils  # noqa: E402
from fusion_engine import kernels, ops  # noqa: E402

# The ops refuse CPU tensors unless the kernels are interpreted; here they are compiled for sm_90 and launched
# by the stand-in driver, so let the device check pass for CPU tensors (the kernels' tile configs still come
# from the real GPU table: fusion_engine.kernels.utils.INTERPRET stays False).
kernels.INTERPRET = True
assert not kernel_utils.INTERPRET

# the phase-one names; an older tree (run for a before/after table) has prev_choose and set_assignment instead
_PREV_CHOICE = "prev_choice" if "prev_choice" in inspect.signature(ops.fls_linear).parameters else "prev_choose"


_PLAN_MODULES = ("fls_linear", "mix_linear", "pooled_fls_linear", "pooled_mix_linear")


def _recorded(call) -> list:
    """The launches ``call()`` makes, as the stand-in launcher received them: (launcher, grid, stream, metadata,
    args)."""
    global RECORDED
    RECORDED = []
    try:
        call()
        return RECORDED
    finally:
        RECORDED = None


def _launches(call, inputs) -> list:
    """The launches ``call()`` makes (``_recorded``) with every tensor argument written as (shape, stride, dtype,
    which input it is or "scratch/output")."""
    launches = _recorded(call)
    by_pointer = {t.data_ptr(): i for i, t in enumerate(inputs)}

    def describe(arg):
        if not isinstance(arg, torch.Tensor):
            return arg
        return tuple(arg.shape), arg.stride(), arg.dtype, by_pointer.get(arg.data_ptr(), "scratch/output")

    return [(launcher, grid, stream, packed, tuple(map(describe, args)))
            for launcher, grid, stream, packed, args in launches]


def verify_replays(cases) -> int | None:
    """For each (name, call, inputs): the first call goes through Triton's JIT (plans cleared), the second replays
    its plan; both must make the same launches: the same compiled kernels, grids and scalar arguments, the same
    input tensors in the same argument slots. Returns the number of launches compared (None for launchers without
    plans, e.g. this script run on an older tree for a before/after table)."""
    if not all(hasattr(getattr(kernels, module), "_PLANS") for module in _PLAN_MODULES):
        return None
    compared = 0
    for name, call, inputs in cases:
        for module in _PLAN_MODULES:
            getattr(kernels, module)._PLANS.clear()
        jit = _launches(call, inputs)
        if not any(getattr(kernels, module)._PLANS for module in _PLAN_MODULES):
            raise AssertionError(f"{name}: the call kept no plan, so nothing would be replayed")
        replay = _launches(call, inputs)
        if not jit or jit != replay:
            raise AssertionError(f"{name}: the planned launches differ from the JIT's:\n{jit}\n{replay}")
        compared += len(jit)
    return compared


def stand_in_cost(cases, repeats: int = 2000) -> dict:
    """{launcher row name: (launches per call, microseconds per call the stand-in launcher itself spends)}: the
    launcher rows include the stand-in's Python loop over the arguments, which Triton's CUDA launcher runs in C, so
    this is what a reader may subtract from them (an upper bound on what the real launcher costs for it)."""
    costs = {}
    for name, call, _ in cases:
        recorded = _recorded(call)
        start = time.process_time()
        for _ in range(repeats):
            for launcher, grid, stream, packed, args in recorded:
                launcher(*grid, stream, None, packed, None, None, None, *args)
        costs[name] = (len(recorded), (time.process_time() - start) / repeats * 1e6)
    return costs


class LayerStack(nn.Module):
    """``layers`` square Linear layers applied in turn: a model whose every layer a LoRA targets."""

    def __init__(self, layers: int, dim: int, dtype: torch.dtype):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim, dtype=dtype) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def make_lora(model: LayerStack, rank: int, seed: int) -> fe.LoRA:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for i, layer in enumerate(model.layers):
        dim = layer.in_features
        layers[f"layers.{i}"] = fe.LoRALayer(torch.randn(rank, dim, generator=g) * 0.1,
                                             torch.randn(dim, rank, generator=g) * 0.1, float(rank))
    return fe.LoRA(layers, source=f"bench-{seed}")


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def time_calls(fn, calls: int, repeats: int, warmup: int, clock=time.process_time) -> list[float]:
    """Microseconds per call of each of ``repeats`` rounds of ``calls`` calls."""
    for _ in range(warmup):
        fn()
    rounds = []
    for _ in range(repeats):
        start = clock()
        for _ in range(calls):
            fn()
        rounds.append((clock() - start) / calls * 1e6)
    return rounds


class Bench:
    def __init__(self, args):
        self.args = args
        self.dtype = getattr(torch, args.dtype)
        self.images, self.tokens, self.dim, self.rank = args.images, args.tokens, args.dim, args.rank
        torch.manual_seed(0)
        self.model = LayerStack(args.layers, self.dim, self.dtype).eval()
        self.subject, self.style = make_lora(self.model, self.rank, 1), make_lora(self.model, self.rank, 2)
        self.x = torch.randn(self.images, self.tokens, self.dim, dtype=self.dtype)
        self.rows = self.x.reshape(-1, self.dim)
        self.rows_out = []
        self.replay_cases = []

    # -- timing helpers ------------------------------------------------------------------------------------------
    def measure(self, fn, per_call_divisor: int = 1, calls: int | None = None) -> list[float]:
        calls = calls or self.args.calls
        with torch.no_grad():
            rounds = time_calls(fn, max(1, calls // per_call_divisor), self.args.repeats, self.args.warmup,
                                CLOCKS[self.args.clock])
        return [r / per_call_divisor for r in rounds]

    def add(self, name: str, path: str, rounds: list[float], baseline: str):
        self.rows_out.append({"name": name, "path": path, "us": min(rounds), "median_us": statistics.median(rounds),
                              "max_us": max(rounds), "rounds_us": rounds, "baseline": baseline})

    def model_rounds(self, model) -> list[float]:
        return self.measure(lambda: model(self.x), per_call_divisor=len(model.layers))

    def add_module(self, name: str, model):
        """A row per layer call: the model's forward time / its layers (the fusion's per-forward hooks spread over
        them)."""
        self.add(name, "module", self.model_rounds(model), "merged model (nn.Linear)")

    # -- the cases -------------------------------------------------------------------------------------------------
    def baselines(self):
        layer = self.model.layers[0]
        w, b = layer.weight, layer.bias
        self.add("F.linear", "op", self.measure(lambda: F.linear(self.rows, w, b)), "F.linear")
        self.add_module("merged model (nn.Linear)", self.model)
        tiny = (torch.randn(2, 8, dtype=self.dtype), torch.randn(8, 8, dtype=self.dtype),
                torch.randn(8, dtype=self.dtype))
        self.add("F.linear 2x8x8 (dispatch floor)", "op", self.measure(lambda: F.linear(*tiny)), "F.linear")

    def attached(self, pool: bool = False, **options):
        model, subject, style = copy.deepcopy(self.model), self.subject, self.style
        if pool:  # every image its own pair (a uniform assignment would run the pair ops)
            lora_pool = fe.LoRAPool(dtype=self.dtype)
            assignment = []
            for image in range(self.images):
                names = (f"s{image}", f"t{image}")
                lora_pool.add(names[0], subject if image == 0 else make_lora(self.model, self.rank, 10 + 2 * image))
                lora_pool.add(names[1], style if image == 0 else make_lora(self.model, self.rank, 11 + 2 * image))
                assignment.append(names)
            fusion = fe.attach(model, pool=lora_pool, **options)
            (getattr(fusion, "set_loras", None) or fusion.set_assignment)(assignment)
        else:
            fusion = fe.attach(model, subject, style, **options)
        fusion.set_batch_layout(images=self.images, copies=1)
        fusion.set_step(0, 10)
        return model, fusion

    def add_attached(self, name: str, pool: bool = False, **options):
        """The module row of ``name``: the fusion attached to a copy of the model, measured, detached."""
        model, fusion = self.attached(pool, **options)
        with fusion:
            self.add_module(name, model)

    def pair_case(self, name: str, policy: str, base: str | None = None):
        # base: the split / fused variant forced for every size class, the module rows included (their calls pass no
        # base=); the plans of the other variant dropped, so no module row replays one
        with kernel_testing.forced_base(base) if base is not None else contextlib.nullcontext():
            self.add_attached(name, policy=policy, backend="triton")
            model, fusion = self.attached(policy=policy, backend="triton")
            with fusion:
                layer = model.layers[0]
                self.pair_op_rows(name, layer, policy, base)

    def pair_op_rows(self, name: str, layer, policy: str, base: str | None):
        rows, weight, bias = self.rows, layer.base.weight, layer.base.bias
        factors = (layer.subject_a, layer.subject_b, layer.style_a, layer.style_b)
        if policy == "fls":
            row_group, groups = layer.context.row_groups(self.images, self.tokens, rows.device)
            guess = torch.ones(groups, dtype=torch.bool)
            subject_scale, style_scale = layer.lora_scales

            def op():
                return ops.fls_linear(rows, weight, bias, factors[0], factors[1], subject_scale, factors[2],
                                      factors[3], style_scale, row_group, groups, "kl", backend="triton",
                                      base=base, **{_PREV_CHOICE: guess})

            def launcher():
                return kernels.fls_linear_fwd(rows, weight, bias, factors[0], factors[1], subject_scale,
                                                  factors[2], factors[3], style_scale, row_group, groups, "kl",
                                                  guess, base)
        else:
            coef = torch.tensor([1.0, 1.0])

            def op():
                return ops.mix_linear(rows, weight, bias, *factors, coef, backend="triton")

            def launcher():
                return kernels.mix_linear_fwd(rows, weight, bias, *factors, coef)
        self.add(name, "op", self.measure(op), "F.linear")
        self.add(name, "launcher", self.measure(launcher), "F.linear")
        self.replay_cases.append((name, launcher, (rows, weight, bias, *factors)))

    def pool_case(self, name: str, policy: str):
        self.add_attached(name, pool=True, policy=policy, backend="triton")
        model, fusion = self.attached(pool=True, policy=policy, backend="triton")
        with fusion:
            layer, context = model.layers[0], fusion.context
            held = context.pool.layer(layer.name)
            rows, weight, bias = self.rows, layer.base.weight, layer.base.bias
            slots = context.sample_slots(self.images, rows.device)
            if policy == "fls":
                row_group, groups = context.row_groups(self.images, self.tokens, rows.device)
                guess = torch.zeros(groups, dtype=torch.int64)
                scales = held.scales * context.lora_scale

                def op():
                    return ops.pooled_fls_linear(rows, weight, bias, held.a, held.b, scales, held.present, slots,
                                                 row_group, groups, "kl", backend="triton", prev_choice=guess)

                def launcher():
                    return kernels.pooled_fls_linear_fwd(rows, weight, bias, held.a, held.b, scales, held.present,
                                                             slots, row_group, groups, "kl", guess)
            else:
                weights = context.sample_weights(self.images, rows.device, layer.name)

                def op():
                    return ops.pooled_mix_linear(rows, weight, bias, held.a, held.b, held.scales, slots, weights,
                                                 backend="triton")

                def launcher():
                    return kernels.pooled_mix_linear_fwd(rows, weight, bias, held.a, held.b, held.scales, slots,
                                                             weights)
            self.add(name, "op", self.measure(op), "F.linear")
            self.add(name, "launcher", self.measure(launcher), "F.linear")
            self.replay_cases.append((name, launcher, (rows, weight, bias, held.a, held.b)))

    def reference_cases(self, compiled: bool):
        self.add_attached("reference fls", policy="fls", backend="reference")
        model, fusion = self.attached(policy="fls", backend="reference")
        with fusion:
            layer = model.layers[0]
            row_group, groups = layer.context.row_groups(self.images, self.tokens, self.rows.device)
            subject_scale, style_scale = layer.lora_scales
            args = (self.rows, layer.base.weight, layer.base.bias, layer.subject_a, layer.subject_b, subject_scale,
                    layer.style_a, layer.style_b, style_scale, row_group, groups, "kl")
            self.add("reference fls", "op", self.measure(lambda: ops.fls_linear(*args, backend="reference")),
                     "F.linear")
            if compiled:
                import torch._dynamo
                from torch._dynamo.utils import counters

                torch._dynamo.reset()
                counters.clear()
                compiled_model = torch.compile(model)
                start = time.perf_counter()
                with torch.no_grad():
                    compiled_model(self.x)
                self.compile_s = time.perf_counter() - start
                self.graph_breaks = sum(counters["graph_break"].values())
                # one depth only (a compile takes minutes): per layer = per forward / layers, hooks included
                self.add("reference fls compiled (inductor, per forward / layers)", "module",
                         self.model_rounds(compiled_model), "merged model (nn.Linear)")
                torch._dynamo.reset()

    def run(self):
        args = self.args
        self.baselines()
        self.pair_case("fls fused", "fls", base="fused")
        self.pair_case("fls split (cublas base)", "fls", base="cublas")
        self.pair_case("mix (direct)", "direct")
        self.pool_case("pooled fls", "fls")
        self.pool_case("pooled mix (direct)", "direct")
        self.reference_cases(compiled=not args.no_compile)
        self.replays_verified = verify_replays(self.replay_cases)
        self.stand_in = stand_in_cost(self.replay_cases, 50 if args.smoke else 2000)
        base = {row["name"]: row["us"] for row in self.rows_out if row["name"] == row["baseline"]}
        for row in self.rows_out:
            row["ratio"] = row["us"] / base[row["baseline"]]
        return self.rows_out


def describe(args) -> dict:
    return {"dtype": args.dtype, "images": args.images, "tokens": args.tokens, "dim": args.dim, "rank": args.rank,
            "layers": args.layers, "clock": args.clock, "calls": args.calls, "repeats": args.repeats,
            "torch": torch.__version__, "triton": __import__("triton").__version__, "cpus": os.cpu_count(),
            "python": sys.version.split()[0]}


def table(rows: list[dict]) -> str:
    lines = ["| layer call | path | us / call (best round) | median round | ratio (best) | baseline |",
             "|---|---|---:|---:|---:|---|"]
    for row in rows:
        lines.append(f"| {row['name']} | {row['path']} | {row['us']:.1f} | {row['median_us']:.1f} "
                     f"| {row['ratio']:.2f}x | {row['baseline']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few calls per row, no torch.compile: seconds")
    parser.add_argument("--json", type=Path, help="also write the rows and the setup as JSON here")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--images", type=int, default=2, help="decision groups (images) in the batch")
    parser.add_argument("--tokens", type=int, default=32, help="rows per image")
    parser.add_argument("--dim", type=int, default=64, help="K = N of every layer")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=16, help="layers of the model the module rows run in")
    parser.add_argument("--calls", type=int, default=200, help="layer calls per round")
    parser.add_argument("--repeats", type=int, default=15, help="rounds per row")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls first (compiles the kernels)")
    parser.add_argument("--clock", default="cpu", choices=tuple(CLOCKS),
                        help="cpu: this process's CPU time (robust on a shared machine; the default), wall: elapsed")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile (Inductor) reference row")
    args = parser.parse_args(argv)
    if args.smoke:
        args.calls, args.repeats, args.warmup, args.no_compile = 16, 2, 2, True
    torch.set_num_threads(1)
    bench = Bench(args)
    rows = bench.run()
    setup = describe(args)
    print(f"launch overhead per layer call, stand-in sm_90 driver (nothing launches), {setup}")
    if hasattr(bench, "compile_s"):
        print(f"torch.compile: first call {bench.compile_s:.1f} s, {bench.graph_breaks} graph break(s)")
    if bench.replays_verified is None:
        print("planned launches: none (these launchers keep no plans)")
    else:
        print(f"planned launches identical to the JIT's: {bench.replays_verified} launches of "
              f"{len(bench.replay_cases)} launchers")
    print(table(rows))
    print("the stand-in launcher's own Python per launcher call (inside the launcher rows above; Triton's CUDA "
          "launcher does this in C): " + ", ".join(f"{name} {launches} launches {us:.1f} us"
                                                   for name, (launches, us) in bench.stand_in.items()))
    if args.json:
        report = {"setup": setup, "rows": rows, "stand_in_launcher_us": {
            name: {"launches": launches, "us": us} for name, (launches, us) in bench.stand_in.items()}}
        if hasattr(bench, "compile_s"):
            report["compile"] = {"first_call_s": bench.compile_s, "graph_breaks": bench.graph_breaks}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
