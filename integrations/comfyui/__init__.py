"""fusion_engine's ComfyUI node pack: put this folder (a symlink is enough) in ComfyUI/custom_nodes/.

The nodes live in the fusion_engine package (fusion_engine/comfyui/). When that package is not installed in
ComfyUI's Python, a symlinked folder finds it in the repository it points into.
"""
import os
import sys

try:
    import fusion_engine.comfyui as _pack
except ImportError:
    _repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    if not os.path.isfile(os.path.join(_repo, "fusion_engine", "__init__.py")):
        raise ImportError(
            "fusion_engine is not installed in ComfyUI's Python: run `pip install --no-deps -e <fusion_engine repo>` "
            "and `pip install -r requirements.txt` from this folder (docs/COMFYUI.md)"
        ) from None
    sys.path.insert(0, _repo)
    import fusion_engine.comfyui as _pack

NODE_CLASS_MAPPINGS = _pack.NODE_CLASS_MAPPINGS
NODE_DISPLAY_NAME_MAPPINGS = _pack.NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
