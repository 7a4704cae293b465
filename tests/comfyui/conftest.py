"""ComfyUI node tests: they run against ComfyUI's real code, on CPU, with a tiny SD1.5-architecture model.

Without ComfyUI in the environment they skip. To run them: ``pip install`` ComfyUI from its git repository (or the
pip-installable fork, .ci/comfyui shows how), then ``pytest tests/comfyui`` (docs/COMFYUI.md).
"""
import os
import sys

import pytest

os.environ.setdefault("COMFYUI_CPU", "true")
os.environ.setdefault("COMFYUI_DISABLE_KNOWN_MODELS", "true")
for flag in ("--cpu", "--disable-known-models"):  # seen by ComfyUI's argument parser when comfy is first imported
    if flag not in sys.argv:
        sys.argv.append(flag)

try:
    import comfy.model_management  # noqa: F401
except ImportError as error:
    COMFY_MISSING = f"ComfyUI cannot be imported ({error})"
else:
    COMFY_MISSING = None

HOW_TO = ("{}: these tests need ComfyUI. pip install ComfyUI from its git repository (e.g. the pip-installable fork: "
          "pip install git+https://github.com/hiddenswitch/ComfyUI), or run .ci/comfyui, which unpacks the vendored "
          "copy into a venv of its own; see docs/COMFYUI.md")


@pytest.fixture(autouse=True)
def _unload_after_each_test():
    """The fork's clones keep their own load bookkeeping: unload after every test so no test samples another's
    patched model (vendor NOTES.md)."""
    yield
    if COMFY_MISSING is None:
        import comfy.model_management

        comfy.model_management.unload_all_models()
