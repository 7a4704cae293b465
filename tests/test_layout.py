"""Imports go one way, down this table, and never in a circle:

    kernels <- errors, utils <- ops <- lora, policies, scoring, samplers <- runtime
    <- integration, refine <- api (the package's front door) <- eval <- cli;  worlds beside (they use the API)

Every ``import`` of every module is read from its source (lazy imports inside functions included) and checked
against the layer table below; a module the table does not place fails the test too. The same imports, as a graph,
must hold no circle (a module importing, through others, itself). The kernels' source folder ``csrc_triton/`` is read
as what a wheel installs it as, the package ``fusion_engine.kernels``.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "fusion_engine"
# module name -> its source folder (pyproject.toml's [tool.setuptools.package-dir])
SOURCES = {PACKAGE: ROOT / "fusion_engine", "fusion_engine.kernels": ROOT / "csrc_triton"}
# the source checkout's stand-in, which loads csrc_triton/__init__.py in its place (it is not installed)
STAND_IN = ROOT / "fusion_engine" / "kernels" / "__init__.py"
WORLDS = "worlds"  # beside the engine: a world imports the engine; only the CLI (and worlds) import worlds

# module or package -> layer; a module may import its own layer and the layers below it.
LAYERS = {
    "fusion_engine.kernels": 0,  # the Triton kernels (source folder csrc_triton/)
    "fusion_engine.errors": 1,  # every error the library raises on purpose
    "fusion_engine.utils": 1,  # crash-safe writes, dtype names, images, deprecated names (no engine imports)
    "fusion_engine.ops": 2,  # ops/reference.py is the kernels' written contract; ops/__init__ picks the backend
    "fusion_engine.lora": 3,  # LoRA files: load, check, align, write
    "fusion_engine.policies": 3,  # the fusion rules (a pair's and a pool's)
    "fusion_engine.scoring": 3,  # encoders, metrics, bootstrap intervals: used by refine and eval
    "fusion_engine.samplers": 3,  # the lean loop's per-family parts (UNet, FLUX, SD3) and prompt encoding
    "fusion_engine.runtime": 4,  # stand-in layers, context, trace, the LoRA pool, attach to a model
    "fusion_engine.runtime.speculation": 4,  # forces the kernels' speculation guess wrong (benchmarks, tests)
    "fusion_engine.integration": 5,  # diffusers pipelines: attach, FusionPipeline, BatchFusion, model paths
    "fusion_engine.refine": 5,  # LLR
    "fusion_engine.api": 6,  # the public front door
    "fusion_engine": 6,  # the package itself (re-exports the API); matched exactly
    "fusion_engine.eval": 7,
    "fusion_engine.cli": 8,
    "fusion_engine.serve": 8,  # the Ray Serve service: a front end beside the CLI (it serves the toy world by default)
    "fusion_engine.comfyui": 8,  # the ComfyUI node pack: a front end beside the CLI (imports ComfyUI when run)
    "fusion_engine.worlds": WORLDS,
}
HIGHEST_FOR_WORLDS = LAYERS["fusion_engine.api"]  # worlds import the engine up to the API, never eval or the CLI
EXCEPTIONS = {("fusion_engine.kernels", "fusion_engine.ops.reference")}  # the kernels' tests read the contract


def layer_of(name: str):
    """The table's entry for ``name`` (the longest matching prefix; the bare package only exactly), else None."""
    keys = [k for k in LAYERS if name == k or (name.startswith(k + ".") and k != PACKAGE)]
    return LAYERS[max(keys, key=len)] if keys else None


def allowed(importer: str, imported: str) -> bool:
    if any((importer == a or importer.startswith(a + ".")) and imported.startswith(b) for a, b in EXCEPTIONS):
        return True
    mine, theirs = layer_of(importer), layer_of(imported)
    if theirs == WORLDS:
        return mine == WORLDS or mine == LAYERS["fusion_engine.cli"]
    if mine == WORLDS:
        return theirs <= HIGHEST_FOR_WORLDS
    return theirs <= mine


def module_name(path: Path) -> str:
    prefix = max((p for p, folder in SOURCES.items() if path.is_relative_to(folder)), key=len)
    folder = SOURCES[prefix]
    parts = prefix.split(".") + list(path.relative_to(folder).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    prefix = max((p for p in SOURCES if name == p or name.startswith(p + ".")), key=len, default=None)
    if prefix is None:
        return False
    path = SOURCES[prefix].joinpath(*name[len(prefix):].split(".")[1:])
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
        found.update(name for name in names if name.split(".")[0] == PACKAGE)
    return found


def project_modules():
    for folder in SOURCES.values():
        for path in sorted(folder.rglob("*.py")):
            if path != STAND_IN:
                yield module_name(path), path


def wrong_imports(module: str, source: str, is_package: bool = False) -> list[str]:
    return sorted(f"{module} imports {name}" for name in imports(source, module, is_package)
                  if not allowed(module, name))


def import_graph() -> dict[str, set[str]]:
    return {module: imports(path.read_text(), module, path.name == "__init__.py") - {module}
            for module, path in project_modules()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted: the import circles."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_every_module_has_a_layer():
    assert [m for m, _ in project_modules() if layer_of(m) is None] == []


def test_imports_follow_the_layers():
    wrong = []
    for module, path in project_modules():
        wrong += wrong_imports(module, path.read_text(), path.name == "__init__.py")
    assert wrong == [], "imports against the direction (see LAYERS in tests/test_layout.py):\n" + "\n".join(wrong)


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_the_root_holds_only_the_front_door_and_the_errors():
    """The package root is the API and the errors; everything else lives in a folder that names its layer."""
    root = sorted(path.name for path in (ROOT / "fusion_engine").glob("*.py"))
    assert root == ["__init__.py", "api.py", "errors.py"]


def test_the_check_catches_wrong_imports():
    """The checker itself can fail: upward, lazy, relative and engine->world imports are all caught."""
    assert wrong_imports("fusion_engine.runtime.layers", "from ..integration.pipeline import FusionPipeline\n") == [
        "fusion_engine.runtime.layers imports fusion_engine.integration.pipeline"]
    assert wrong_imports("fusion_engine.ops.reference", "def f():\n    from ..runtime.fusion import attach\n") == [
        "fusion_engine.ops.reference imports fusion_engine.runtime.fusion"]
    assert wrong_imports("fusion_engine.runtime.fusion", "from ..integration.attach import PipelineAttachment\n") \
        == ["fusion_engine.runtime.fusion imports fusion_engine.integration.attach"]
    assert wrong_imports("fusion_engine.integration.batching", "from .. import api\n") == [
        "fusion_engine.integration.batching imports fusion_engine.api"]
    assert wrong_imports("fusion_engine.eval.engine", "from fusion_engine import worlds\n") == [
        "fusion_engine.eval.engine imports fusion_engine.worlds"]
    assert wrong_imports("fusion_engine.integration.pipeline", "import fusion_engine.worlds.toy.world\n") == [
        "fusion_engine.integration.pipeline imports fusion_engine.worlds.toy.world"]
    assert wrong_imports("fusion_engine.worlds.random", "from ..cli import main\n") == [
        "fusion_engine.worlds.random imports fusion_engine.cli.main"]
    assert wrong_imports("fusion_engine.kernels.fls_linear", "from ..runtime.layers import DynamicLoRALayer\n") == [
        "fusion_engine.kernels.fls_linear imports fusion_engine.runtime.layers"]
    assert wrong_imports("fusion_engine.policies", "from . import base\n", is_package=True) == []
    assert wrong_imports("fusion_engine.kernels.utils", "from fusion_engine.ops.reference import fls_reference\n") == []
    assert wrong_imports("fusion_engine.kernels.testing", "from ..ops import reference\n") == []
    assert wrong_imports("fusion_engine.kernels.utils", "from fusion_engine.ops import pooled\n") == [
        "fusion_engine.kernels.utils imports fusion_engine.ops.pooled"]
    assert wrong_imports("fusion_engine.cli.main", "from fusion_engine.worlds import load_world\n") == []
    assert wrong_imports("fusion_engine.api", "from .integration.pipeline import FusionPipeline\n") == []


def test_the_kernels_folder_is_read_as_fusion_engine_kernels():
    """csrc_triton/'s files are the modules fusion_engine.kernels.*, at layer 0; relative imports resolve there."""
    modules = dict(project_modules())
    assert modules["fusion_engine.kernels"] == ROOT / "csrc_triton" / "__init__.py"
    assert modules["fusion_engine.kernels.fls_linear"] == ROOT / "csrc_triton" / "fls_linear.py"
    assert not any(name.startswith("csrc_triton") for name in modules)
    assert layer_of("fusion_engine.kernels.utils") == 0
    assert imports("from .utils import MAX_RANK\n", "fusion_engine.kernels.fls_linear", False) == {
        "fusion_engine.kernels.utils"}


def test_the_check_catches_circles():
    """A circle is found whatever its length and wherever it starts; a one-way chain is not one."""
    assert circles({"a": {"b"}, "b": {"a"}}) == [["a", "b"]]
    assert circles({"x": {"a"}, "a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    graph = import_graph()  # a circle put in: the pipeline attach importing BatchFusion, which imports it
    graph["fusion_engine.integration.attach"] = graph["fusion_engine.integration.attach"] | {
        "fusion_engine.integration.batching"}
    assert ["fusion_engine.integration.attach", "fusion_engine.integration.batching"] in circles(graph)
