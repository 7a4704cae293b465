"""The ComfyUI node pack's packaging, checked without ComfyUI: it loads as a custom-node folder, never imports
ComfyUI (or itself) at ``import fusion_engine``, and its metadata never installs torch. The node behaviour is tested
against ComfyUI's real code in tests/comfyui/."""
import importlib.util
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / "integrations" / "comfyui"


def test_import_fusion_engine_imports_neither_comfyui_nor_the_node_pack():
    code = ("import sys, fusion_engine; bad = sorted(m for m in sys.modules if m == 'comfy' or m.startswith("
            "('comfy.', 'fusion_engine.comfyui', 'folder_paths'))); print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_custom_node_folder_exports_both_nodes_without_comfyui_installed():
    spec = importlib.util.spec_from_file_location("fusion_engine_custom_nodes", PACK / "__init__.py",
                                                  submodule_search_locations=[str(PACK)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert set(module.NODE_DISPLAY_NAME_MAPPINGS.values()) == {"Fuse Subject + Style LoRA", "LoRA Fusion Trace"}
    assert module.NODE_CLASS_MAPPINGS.keys() == module.NODE_DISPLAY_NAME_MAPPINGS.keys()
    for cls in module.NODE_CLASS_MAPPINGS.values():
        assert callable(getattr(cls, cls.FUNCTION)) and cls.RETURN_TYPES


def test_pack_metadata_for_comfyui_manager_and_registry_never_installs_torch():
    meta = tomllib.loads((PACK / "pyproject.toml").read_text())
    assert {"PublisherId", "DisplayName", "Icon"} <= meta["tool"]["comfy"].keys()
    requirements = [line.split("#")[0].strip() for line in (PACK / "requirements.txt").read_text().splitlines()]
    named = {r.split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in requirements if r}
    assert not named & {"torch", "torchvision", "torchaudio", "xformers", "triton", "fusion_engine", "fusion-engine"}
    assert all(not d.lower().startswith(("torch", "triton")) for d in meta["project"]["dependencies"])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["comfyui.custom_nodes"]["fusion_engine"] == "fusion_engine.comfyui"
