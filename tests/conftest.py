import copy
import os

os.environ["HF_HUB_OFFLINE"] = "1"
# Triton reads TRITON_INTERPRET once, when triton.language is first imported, and some test
# dependencies (peft, via its imports) import it at collection time: so the interpreter is switched
# on here, before anything else, for the whole run on machines without an NVIDIA driver.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from fusion_engine.worlds.random import build_tiny_pipeline, default_loras

try:  # fuzz profiles: "ci" (default, small and reproducible) and "deep" (HYPOTHESIS_PROFILE=deep, outside CI)
    from hypothesis import HealthCheck, settings

    settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True, database=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("deep", max_examples=3000, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is a test extra; only tests/test_fuzz.py needs it
    pass


# What a CI run must have: the test extras (peft: diffusers' own LoRA loading, the parity tests' outside oracle;
# hypothesis: the fuzzers) and torch's triton (the kernel tests). Their test files skip themselves without them,
# which is right on a laptop and wrong in CI, where a skip would hide dozens of tests: with CI set, a missing one
# stops the run before any test.
CI_REQUIRED = ("peft", "hypothesis", "triton")


def ci_missing(environ, find_spec) -> list[str]:
    """The CI_REQUIRED modules ``find_spec`` cannot find, when ``environ`` says CI (``CI`` set, not false/0)."""
    if environ.get("CI", "").strip().lower() in ("", "0", "false", "no"):
        return []
    return [name for name in CI_REQUIRED if find_spec(name) is None]


def pytest_sessionstart(session):
    import importlib.util

    missing = ci_missing(os.environ, importlib.util.find_spec)
    if missing:
        raise pytest.UsageError(f"CI is set but {missing} cannot be imported: their tests would be skipped, not run; "
                                "install the test extras (pip install -e '.[test]')")


@pytest.fixture(scope="session")
def _tiny_pipe_master():
    return build_tiny_pipeline(seed=0)


@pytest.fixture
def tiny_pipe(_tiny_pipe_master):
    """A fresh copy per test, so a test that mutates the model cannot leak into another."""
    return copy.deepcopy(_tiny_pipe_master)


@pytest.fixture(scope="session")
def _tiny_flux_master():
    from fusion_engine.worlds.dit import build_tiny_flux

    return build_tiny_flux(0)


@pytest.fixture
def tiny_flux(_tiny_flux_master):
    """A fresh copy of the tiny FLUX pipeline per test, as ``tiny_pipe``."""
    return copy.deepcopy(_tiny_flux_master)


@pytest.fixture
def loras(tiny_pipe):
    return default_loras(tiny_pipe.unet, seed=0)


def unet_inputs(unet, batch: int, seed: int = 0, tokens: int = 7):
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    sample = torch.randn(batch, unet.config.in_channels, size, size, generator=generator)
    context = torch.randn(batch, tokens, unet.config.cross_attention_dim, generator=generator)
    return sample, torch.tensor(500), context


def unet_out(unet, inputs):
    with torch.no_grad():
        sample, t, context = inputs
        return unet(sample, t, encoder_hidden_states=context).sample


@pytest.fixture(scope="session")
def pipeline_folder(tmp_path_factory, _tiny_pipe_master):
    """The tiny pipeline saved as a local diffusers folder (``model/``) beside a subject LoRA
    (``subject.safetensors``, PEFT layout) and a style LoRA (``style.safetensors``, kohya layout)."""
    from fusion_engine.lora import save_lora

    root = tmp_path_factory.mktemp("pipeline_folder")
    _tiny_pipe_master.save_pretrained(root / "model")
    subject, style = default_loras(_tiny_pipe_master.unet, seed=0)
    save_lora(subject, root / "subject.safetensors")
    save_lora(style, root / "style.safetensors", layout="kohya")
    return root
