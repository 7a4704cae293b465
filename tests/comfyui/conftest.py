"""ComfyUI node tests: they run against ComfyUI's real code, on CPU, with a tiny SD1.5-architecture model.

Without ComfyUI in the environment they skip. To run them: ``pip install`` ComfyUI from its git repository (or the
pip-installable fork, .ci/comfyui shows how), then ``pytest tests/comfyui`` (docs/COMFYUI.md).
"""
import os
import sys

import pytest

os.environ.setdefault("COMFYUI_CPU", "true")
os.environ.setdefault("COMFYUI_DISABLE_KNOWN_MODELS", "true")
# Before any `import comfy` (comfy_helpers imports it): ComfyUI's argument parser reads these when first imported.
for flag in ("--cpu", "--disable-known-models"):
    if flag not in sys.argv:
        sys.argv.append(flag)


@pytest.fixture(autouse=True)
def _unload_after_each_test():
    """The fork's clones keep their own load bookkeeping: unload after every test so no test samples another's
    patched model (vendor NOTES.md)."""
    yield
    model_management = sys.modules.get("comfy.model_management")  # None where ComfyUI is absent (tests skipped)
    if model_management is not None:
        model_management.unload_all_models()
