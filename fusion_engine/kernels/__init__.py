"""``fusion_engine.kernels`` in a source checkout: the Triton kernels live in the repository's top-level folder
``csrc_triton/``. A wheel or an editable install maps that folder to this name (pyproject.toml,
``[tool.setuptools.package-dir]``) and does not install this file; a checkout run from PYTHONPATH finds this file
instead, and it loads ``csrc_triton/__init__.py`` as ``fusion_engine.kernels`` in its own place. Either way the
kernels are one set of modules, ``fusion_engine.kernels.*`` with ``__path__`` the folder ``csrc_triton/``, never
also imported as ``csrc_triton.*`` (Triton's JIT caches and launch plans live on those module objects).
"""
import importlib.util
import sys
from pathlib import Path

_SOURCE = Path(__file__).resolve().parents[2] / "csrc_triton" / "__init__.py"
if not _SOURCE.is_file():
    raise ImportError(f"fusion_engine.kernels: the kernels' source {_SOURCE} is missing (this stand-in only works in "
                      "a source checkout; install the project with pip to get the kernels under this name)")
_spec = importlib.util.spec_from_file_location(__name__, _SOURCE, submodule_search_locations=[str(_SOURCE.parent)])
_module = importlib.util.module_from_spec(_spec)
sys.modules[__name__] = _module  # the import system returns what sys.modules holds after this file runs
_spec.loader.exec_module(_module)
