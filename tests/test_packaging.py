"""The kernels' source folder ``csrc_triton/`` is installed as ``fusion_engine.kernels`` (pyproject.toml,
``[tool.setuptools.package-dir]``), never as a generic top-level ``csrc_triton`` package, and is imported by that
name everywhere: a source checkout gets the same name through the stand-in ``fusion_engine/kernels/__init__.py``,
which no wheel may carry in place of ``csrc_triton/__init__.py``."""
import ast
import importlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_FILES = sorted(path.name for path in (ROOT / "csrc_triton").glob("*.py"))
# where Python that may import the kernels lives (integrations/: the ComfyUI folder; training/: the toy world's)
CODE_FOLDERS = ("fusion_engine", "csrc_triton", "tests", "bench", "scripts", "examples", "training", "integrations")
OLD_NAME = re.compile(r"csrc_triton(\.\w+)*")

_BUILD = r"""
import sys
from setuptools import build_meta
print(getattr(build_meta, sys.argv[1])(sys.argv[2]))
"""


def _build(kind: str, source: Path, out: Path) -> Path:
    """build_wheel / build_sdist of the project at ``source`` (setuptools' PEP 517 hooks, offline), the file made."""
    res = subprocess.run([sys.executable, "-c", _BUILD, kind, str(out)], cwd=source, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out / res.stdout.strip().splitlines()[-1]


def _check_wheel(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        init = zf.read("fusion_engine/kernels/__init__.py")
    tops = {name.split("/")[0] for name in names}
    assert tops == {"fusion_engine", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, tops
    assert sorted(n.rpartition("/")[2] for n in names if n.startswith("fusion_engine/kernels/")) == KERNEL_FILES
    # csrc_triton's own __init__ (it exports the launchers), not the source-checkout stand-in
    assert init == (ROOT / "csrc_triton" / "__init__.py").read_bytes()


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory):
    """The files a build reads, copied (a build writes build/ and *.egg-info next to its sources); the toy
    weights left out (the kernels' layout is the point here, and 38 MB would only slow the zip)."""
    pytest.importorskip("setuptools", minversion="68")  # pyproject.toml's build requirement
    dest = tmp_path_factory.mktemp("project") / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.safetensors", "*.egg-info", "build")
    for folder in ("fusion_engine", "csrc_triton"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
    for name in ("pyproject.toml", "MANIFEST.in", "README.md"):
        if (ROOT / name).is_file():
            shutil.copy(ROOT / name, dest / name)
    # the stand-in newer than csrc_triton/'s files: a build that took it for package data of fusion_engine would then
    # copy it over csrc_triton/__init__.py (setuptools copies a file only over an older one), whatever the checkout's
    # own mtimes happen to be
    later = max(path.stat().st_mtime for path in (dest / "csrc_triton").glob("*.py")) + 60
    os.utime(dest / "fusion_engine" / "kernels" / "__init__.py", (later, later))
    return dest


def test_the_wheel_holds_the_kernels_as_fusion_engine_kernels(project_copy, tmp_path):
    _check_wheel(_build("build_wheel", project_copy, tmp_path))


def test_a_wheel_built_from_the_sdist_holds_them_too(project_copy, tmp_path):
    """pip builds from the sdist: it must carry the stand-in (without it, packages.find lists no
    fusion_engine.kernels) and the wheel built from it must still take csrc_triton/__init__.py, not the stand-in."""
    sdist = _build("build_sdist", project_copy, tmp_path)
    with tarfile.open(sdist) as tf:
        tf.extractall(tmp_path / "unpacked", filter="data")
    (source,) = (tmp_path / "unpacked").iterdir()
    assert (source / "fusion_engine" / "kernels" / "__init__.py").is_file()
    _check_wheel(_build("build_wheel", source, tmp_path / "from_sdist"))


def old_name_uses(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, name) of each use of the kernels' old top-level name in ``source``: an absolute ``import`` or
    ``from`` of it, a module name given to import_module / importorskip / __import__, or a dotted module name in a
    string (a sys.modules key). The bare folder name and its paths in prose (``csrc_triton/utils.py``) are fine."""
    found = set()  # a set: a dotted name given to import_module is both a call's argument and a string
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else []
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "importorskip", "__import__") and node.args:
            names = [getattr(node.args[0], "value", "")]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value:
            names = [node.value]
        else:
            continue
        found.update((node.lineno, name) for name in names if isinstance(name, str) and OLD_NAME.fullmatch(name))
    return sorted(found)


def test_nothing_imports_the_folder_name():
    """Every import of the kernels names fusion_engine.kernels (relative imports inside csrc_triton/ stay
    relative): no module of the project, its tests, benchmarks, scripts or examples needs ``import csrc_triton``."""
    found = [f"{path.relative_to(ROOT)}:{line}: {name}" for folder in CODE_FOLDERS
             for path in sorted((ROOT / folder).rglob("*.py")) for line, name in old_name_uses(path.read_text())]
    assert found == [], found


def test_the_old_name_check_can_fail():
    source = ("import csrc_triton\nfrom csrc_triton.utils import MAX_RANK\nimport importlib, pytest, sys\n"
              "importlib.import_module('csrc_triton')\npytest.importorskip('csrc_triton.testing')\n"
              "sys.modules['csrc_triton.fls_linear']\n")
    assert [line for line, _ in old_name_uses(source)] == [1, 2, 4, 5, 6]
    fine = ("from .utils import MAX_RANK\nimport fusion_engine.kernels\npath = 'csrc_triton/utils.py'\n"
            "folder = 'csrc_triton'\n")
    assert old_name_uses(fine) == []


def test_the_kernels_are_one_set_of_modules():
    """Imported (the stand-in in a checkout, the mapping when installed) and run once, the kernels are modules
    named fusion_engine.kernels.* whose files are csrc_triton/'s, and nothing named csrc_triton* is loaded: one copy,
    so Triton's JIT caches and the launch plans are not split between two names."""
    kernels = pytest.importorskip("fusion_engine.kernels")
    if not kernels.INTERPRET:  # pragma: no cover - a GPU machine without TRITON_INTERPRET
        pytest.skip("the kernel call below runs interpreted on CPU tensors")
    import torch

    x, w = torch.randn(3, 8), torch.randn(5, 8)
    a, b = torch.randn(2, 8), torch.randn(5, 2)
    out = kernels.mix_linear_fwd(x, w, None, a, b, a, b, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out, x @ w.T + (x @ a.T) @ b.T, rtol=1e-4, atol=1e-4)
    for name in KERNEL_FILES:  # testing.py too, which the package itself does not import
        if name != "__init__.py":
            importlib.import_module(f"fusion_engine.kernels.{name[:-3]}")
    loaded = {name: module for name, module in sys.modules.items() if name.startswith("fusion_engine.kernels")}
    assert len(loaded) == len(KERNEL_FILES)
    assert {name: Path(m.__file__).resolve().parent for name, m in loaded.items()} == {
        name: (ROOT / "csrc_triton").resolve() for name in loaded}
    assert [name for name in sys.modules if name.split(".")[0] == "csrc_triton"] == []
