"""The kernel modules share their constants by importing them, never by defining a name twice: a constant name defined
in two modules of fusion_engine.kernels (source folder csrc_triton/) must mean the same value in both (issue 22:
``_GROUP_ROWS`` and ``_STAT_Y0_SQNORM`` once named different slots of the pair and pooled kernels' buffers)."""
from __future__ import annotations

import importlib
import os
import pkgutil

os.environ["TRITON_INTERPRET"] = "1"  # as the other kernel tests: must precede the first import of triton

import pytest  # noqa: E402

pytest.importorskip("triton")
kernels = pytest.importorskip("fusion_engine.kernels")
import triton.language as tl  # noqa: E402

_PLAIN = (int, float, str, bool)


def _constant(value):
    """The comparable value of a module-level constant, or None for what is not one (functions, dicts, modules)."""
    if isinstance(value, tl.constexpr):
        return ("constexpr", value.value)
    if isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)):
        return value
    return None


def constants_by_name(modules) -> dict[str, dict[str, object]]:
    """name -> {module: value} for every upper-case module-level constant (``_X`` or ``X``)."""
    found: dict[str, dict[str, object]] = {}
    for module in modules:
        for name, value in vars(module).items():
            if name.lstrip("_").upper() != name.lstrip("_") or name.startswith("__"):
                continue
            constant = _constant(value)
            if constant is not None:
                found.setdefault(name, {})[module.__name__] = constant
    return found


def clashes(modules) -> dict[str, dict[str, object]]:
    found = constants_by_name(modules)
    return {name: where for name, where in found.items() if len(set(map(repr, where.values()))) > 1}


def _kernel_modules():
    return [importlib.import_module(f"{kernels.__name__}.{info.name}")
            for info in pkgutil.iter_modules(kernels.__path__)]


def test_no_constant_name_means_two_values_across_kernel_modules():
    modules = _kernel_modules()
    assert {f"fusion_engine.kernels.{name}" for name in ("fls_linear", "pooled_fls_linear", "utils")} <= {
        m.__name__ for m in modules}
    assert clashes(modules) == {}


def test_the_check_finds_a_clash():
    """The check is not vacuous: the pre-fix layout (``_GROUP_ROWS`` at slot 2 in the pair kernel, 0 in the pool's)
    is reported, and the shared codes the pooled kernels import are seen in both modules."""
    import types

    pair, pool = types.ModuleType("pair"), types.ModuleType("pool")
    pair._GROUP_ROWS, pool._GROUP_ROWS = tl.constexpr(2), tl.constexpr(0)
    pair._SAME, pool._SAME = (1, 2), (1, 2)
    assert clashes([pair, pool]) == {"_GROUP_ROWS": {"pair": ("constexpr", 2), "pool": ("constexpr", 0)}}
    seen = constants_by_name(_kernel_modules())["_DIVERGENCE_KL"]
    assert {"fusion_engine.kernels.fls_linear", "fusion_engine.kernels.pooled_fls_linear"} <= set(seen)
