"""Imports go one way: kernels <- ops <- parts <- fusion <- pipeline/refine <- eval <- cli, worlds beside.

Every ``import`` of every module is read from its source (lazy imports inside functions included) and
checked against the layer table below; a module the table does not place fails the test too.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fusion_engine", "csrc_triton")
WORLDS = "worlds"  # beside the engine: a world imports the engine; only the CLI (and worlds) import worlds

# module or package -> layer; a module may import its own layer and the layers below it.
LAYERS = {
    "csrc_triton": 0,  # the Triton kernels
    "fusion_engine.errors": 1,
    "fusion_engine.io": 1,  # crash-safe writes (no project imports)
    "fusion_engine.dtypes": 1,  # dtype names
    "fusion_engine.stats": 1,  # bootstrap intervals (numpy only)
    "fusion_engine.ops": 1,  # ops/reference.py is the kernels' written contract
    "fusion_engine.modules": 2,
    "fusion_engine.policies": 2,
    "fusion_engine.lora": 2,
    "fusion_engine.trace": 2,
    "fusion_engine.context": 2,
    "fusion_engine.fit": 2,
    "fusion_engine.components": 2,  # what an attach does with a LoRA's parts (text encoders, DoRA)
    "fusion_engine.visual": 2,
    "fusion_engine.metrics": 2,
    "fusion_engine.encoders": 2,
    "fusion_engine.prompts": 2,
    "fusion_engine.model_path": 2,
    "fusion_engine.owner": 2,
    "fusion_engine.image_files": 2,  # generated PNGs with their parameters
    "fusion_engine.pool": 2,  # the LoRA pool: stacked factors by slot
    "fusion_engine.pool_trace": 2,
    "fusion_engine.pool_policies": 2,
    "fusion_engine.pool_context": 2,
    "fusion_engine.pool_modules": 2,
    "fusion_engine.fusion": 3,
    "fusion_engine.integration": 3,  # attach to a pipeline object: above fusion, below the pipeline
    "fusion_engine.samplers": 3,  # the lean loop's per-family parts (UNet, FLUX, SD3), used by the pipeline
    "fusion_engine.pool_fusion": 3,  # attach a pool (to a model or a pipeline object)
    "fusion_engine.pipeline": 4,
    "fusion_engine.refine": 4,
    "fusion_engine.serve": 4,  # BatchFusion: requests -> batched calls of a pool-attached pipeline
    "fusion_engine": 4,  # the package itself (the public API: re-exports of layers <= 4); matched exactly
    "fusion_engine.eval": 5,
    "fusion_engine.cli": 6,
    "fusion_engine.comfyui": 6,  # the ComfyUI node pack: a front end beside the CLI (imports ComfyUI when run)
    "fusion_engine.worlds": WORLDS,
}
HIGHEST_FOR_WORLDS = 4  # worlds import the engine up to the pipeline, never eval or the CLI
EXCEPTIONS = {("csrc_triton", "fusion_engine.ops.reference")}  # the kernels' tests read the contract


def layer_of(name: str):
    """The table's entry for ``name`` (the longest matching prefix; the bare package only exactly), else None."""
    keys = [k for k in LAYERS if name == k or (name.startswith(k + ".") and k not in PACKAGES[:1])]
    return LAYERS[max(keys, key=len)] if keys else None


def allowed(importer: str, imported: str) -> bool:
    if any(importer.split(".")[0] == a and imported.startswith(b) for a, b in EXCEPTIONS):
        return True
    mine, theirs = layer_of(importer), layer_of(imported)
    if theirs == WORLDS:
        return mine == WORLDS or mine == LAYERS["fusion_engine.cli"]
    if mine == WORLDS:
        return theirs <= HIGHEST_FOR_WORLDS
    return theirs <= mine


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(source: str, module: str, is_package: bool) -> set[str]:
    """Every project module ``source`` imports, at any depth of the syntax tree, relative imports resolved."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import sub` imports the module pkg.sub; `from pkg import name` imports pkg
            names = [f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base for alias in node.names]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] in PACKAGES)
    return found


def project_modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield module_name(path), path


def wrong_imports(module: str, source: str, is_package: bool = False) -> list[str]:
    return sorted(f"{module} imports {name}" for name in imports(source, module, is_package)
                  if not allowed(module, name))


def test_every_module_has_a_layer():
    assert [m for m, _ in project_modules() if layer_of(m) is None] == []


def test_imports_follow_the_layers():
    wrong = []
    for module, path in project_modules():
        wrong += wrong_imports(module, path.read_text(), path.name == "__init__.py")
    assert wrong == [], "imports against the direction (see LAYERS in tests/test_layout.py):\n" + "\n".join(wrong)


def test_the_check_catches_wrong_imports():
    """The checker itself can fail: upward, lazy, relative and engine->world imports are all caught."""
    assert wrong_imports("fusion_engine.modules", "from .pipeline import FusionPipeline\n") == [
        "fusion_engine.modules imports fusion_engine.pipeline"]
    assert wrong_imports("fusion_engine.ops.reference", "def f():\n    from ..fusion import attach\n") == [
        "fusion_engine.ops.reference imports fusion_engine.fusion"]
    assert wrong_imports("fusion_engine.eval.engine", "from fusion_engine import worlds\n") == [
        "fusion_engine.eval.engine imports fusion_engine.worlds"]
    assert wrong_imports("fusion_engine.pipeline", "import fusion_engine.worlds.toy.world\n") == [
        "fusion_engine.pipeline imports fusion_engine.worlds.toy.world"]
    assert wrong_imports("fusion_engine.worlds.random", "from ..cli import main\n") == [
        "fusion_engine.worlds.random imports fusion_engine.cli"]
    assert wrong_imports("csrc_triton.fls_linear", "from fusion_engine.modules import DynamicLoRALinear\n") == [
        "csrc_triton.fls_linear imports fusion_engine.modules"]
    assert wrong_imports("fusion_engine.policies", "from . import base\n", is_package=True) == []
    assert wrong_imports("csrc_triton.utils", "from fusion_engine.ops.reference import fls_reference\n") == []
    assert wrong_imports("fusion_engine.cli", "from fusion_engine.worlds import load_world\n") == []
