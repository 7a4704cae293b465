"""Fuzzing: real LoRA files, mutated (bytes, header, keys, shapes, dtypes, values, truncation), either load to a valid
LoRA or raise a FusionEngineError, never anything else. Profiles (tests/conftest.py): "ci" by default, a few seconds;
HYPOTHESIS_PROFILE=deep for thousands of examples outside CI."""
import contextlib
import json
import math
import struct

import pytest
import torch
from safetensors.torch import load, save_file

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fusion_engine as fe  # noqa: E402
from fusion_engine.errors import FusionEngineError  # noqa: E402
from fusion_engine.lora.checks import FACTOR_DTYPES  # noqa: E402
from fusion_engine.worlds.random import default_loras  # noqa: E402

LAYOUTS = ("peft", "kohya", "diffusers")
SAFETENSORS_DTYPES = ("F16", "BF16", "F32", "F64", "I8", "U8", "I32", "I64", "BOOL", "F8_E4M3", "F8_E5M2", "Q4", "")
TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int64, torch.bool,
                torch.float8_e4m3fn, torch.float8_e5m2)


class RealFiles(dict):
    """Layout -> file bytes, with a short repr so a failing example prints readably."""

    def __repr__(self):
        return f"<real LoRA files: {', '.join(f'{k} ({len(v)} B)' for k, v in self.items())}>"


@pytest.fixture(scope="module")
def real_files(_tiny_pipe_master, tmp_path_factory):
    """Small real LoRA files (4 layers, the subject's rank-4 factors, alpha 4) in every layout, as bytes."""
    subject, _ = default_loras(_tiny_pipe_master.unet, seed=0)
    small = fe.LoRA({name: subject.layers[name] for name in sorted(subject.layers)[:4]})
    folder = tmp_path_factory.mktemp("fuzz")
    return RealFiles({layout: fe.save_lora(small, folder / f"{layout}.safetensors", layout=layout).read_bytes()
            for layout in LAYOUTS})


@pytest.fixture(scope="module")
def work_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz_work") / "mutant.safetensors"


def _assert_valid_or_library_error(path):
    try:
        lora = fe.load_lora(path)
    except FusionEngineError:
        return
    assert lora.components  # UNet and/or text-encoder layers
    for component in lora.components:
        part = lora.for_component(component)
        for name, layer in part.layers.items():
            down, up = layer.lora_a, layer.lora_b
            assert down.dtype in FACTOR_DTYPES and up.dtype in FACTOR_DTYPES, name
            assert down.ndim in (2, 4) and up.ndim == down.ndim and down.shape[0] == up.shape[1] > 0, name
            assert torch.isfinite(down).all() and torch.isfinite(up).all(), name
            assert math.isfinite(layer.alpha) and math.isfinite(part.layer_scale(name)), name
            assert layer.magnitude is None or layer.magnitude.shape == (up.shape[0],), name


def _split(data: bytes):
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


# -- raw bytes -----------------------------------------------------------------------------------------------------
@given(layout=st.sampled_from(LAYOUTS), edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=8),
       keep=st.one_of(st.none(), st.floats(0, 1)))
def test_byte_flips_and_truncation(real_files, work_file, layout, edits, keep):
    data = bytearray(real_files[layout])
    for where, value in edits:
        data[min(int(where * len(data)), len(data) - 1)] = value
    if keep is not None:
        data = data[: int(keep * len(data))]
    work_file.write_bytes(bytes(data))
    _assert_valid_or_library_error(work_file)


# -- the JSON header -----------------------------------------------------------------------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 10**6) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                        max_size=3), max_leaves=6)
header_edit = st.one_of(
    st.tuples(st.just("shape"), st.lists(st.integers(0, 300), max_size=4)),
    st.tuples(st.just("dtype"), st.sampled_from(SAFETENSORS_DTYPES)),
    st.tuples(st.just("offsets"), st.lists(st.integers(0, 5000), min_size=2, max_size=2)),
    st.tuples(st.just("rename"), st.text(max_size=40)),
    st.tuples(st.just("delete"), st.none()),
    st.tuples(st.just("raw"), json_values),
    st.tuples(st.just("metadata"), st.dictionaries(st.sampled_from(["format", "lora_adapter_metadata"]),
                                                   st.text(max_size=30) | st.just('{"unet.lora_alpha": "x"}'))),
)


@given(layout=st.sampled_from(LAYOUTS), picks=st.lists(st.tuples(st.integers(0, 100), header_edit), min_size=1,
                                                       max_size=3))
def test_header_mutations(real_files, work_file, layout, picks):
    header, body = _split(real_files[layout])
    for pick, (kind, value) in picks:
        keys = sorted(k for k in header if k != "__metadata__")
        if not keys:
            break
        key = keys[pick % len(keys)]
        if kind == "rename":
            header[value] = header.pop(key)
        elif kind == "delete":
            del header[key]
        elif kind == "raw":
            header[key] = value
        elif kind == "metadata":
            header["__metadata__"] = value
        elif isinstance(header[key], dict):
            header[key][{"shape": "shape", "dtype": "dtype", "offsets": "data_offsets"}[kind]] = value
    work_file.write_bytes(_join(header, body))
    _assert_valid_or_library_error(work_file)


# -- keys, shapes, dtypes and values, written by safetensors itself --------------------------------------------------
tensor_edit = st.one_of(
    st.tuples(st.just("rename"), st.sampled_from(["", "lora_", ".weight", "unet.", "lora_unet_", "_", ".alpha",
                                                  "text_encoder.", ".lora_A", ".lora.up", "lora_down"])),
    st.tuples(st.just("shape"), st.lists(st.integers(0, 70), min_size=0, max_size=4)),
    st.tuples(st.just("dtype"), st.sampled_from(TORCH_DTYPES)),
    st.tuples(st.just("poison"), st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30, 0.0])),
    st.tuples(st.just("delete"), st.none()),
    st.tuples(st.just("duplicate"), st.text(alphabet="abc_.0123456789", max_size=12)),
)


@given(layout=st.sampled_from(LAYOUTS), picks=st.lists(st.tuples(st.integers(0, 100), st.integers(0, 60), tensor_edit),
                                                       min_size=1, max_size=4))
@example(layout="peft", picks=[(0, 0, ("shape", []))])  # a 0-d factor: found by the deep profile
def test_key_shape_dtype_and_value_mutations(real_files, work_file, layout, picks):
    state = load(real_files[layout])
    for pick, cut, (kind, value) in picks:
        if not state:
            break
        key = sorted(state)[pick % len(state)]
        if kind == "rename":
            new = key[:cut] + value + key[cut:]
            state[new] = state.pop(key)
        elif kind == "shape":
            state[key] = torch.randn(tuple(value)) if math.prod(value) <= 20000 else state[key]
        elif kind == "dtype":
            state[key] = state[key].to(value)
        elif kind == "poison" and state[key].numel():
            flat = state[key].float().flatten()
            flat[cut % flat.numel()] = value
            state[key] = flat.reshape(state[key].shape).to(state[key].dtype)
        elif kind == "delete":
            del state[key]
        elif kind == "duplicate":
            state[key + value] = state[key].clone()
    if not state:
        return
    save_file({k: v.contiguous() for k, v in state.items()}, str(work_file), metadata={"format": "pt"})
    _assert_valid_or_library_error(work_file)
    _assert_valid_or_library_error_in_memory(state)


def _assert_valid_or_library_error_in_memory(state):
    with contextlib.suppress(FusionEngineError):
        fe.load_lora(dict(state))


# -- PEFT alpha_pattern keys from a file -------------------------------------------------------------------------------
@given(pattern=st.text(alphabet="ab_.*^$\\(+|", max_size=10),
       modules=st.lists(st.text(alphabet="ab_.", max_size=12), min_size=1, max_size=6))
@example(pattern="a.b", modules=["x.a_b", "xa.b", "a.b"])
@example(pattern="^.*b", modules=["a.b", "b"])
def test_accepted_patterns_match_exactly_as_peft_and_the_rest_are_refused(pattern, modules):
    """PEFT: ``re.match(rf"(.*\\.)?({pattern})$", module)``. Accepted patterns give the same answer for every
    module name; anything else is a ``FusionEngineError`` (never a hang, never a bare ``re.error``)."""
    import re

    from fusion_engine.lora.patterns import compile_patterns, first_match

    try:
        compiled = compile_patterns({pattern: 1}, len(modules), "alpha_pattern", "<fuzz>")
    except FusionEngineError:
        return
    for module in modules:
        assert (first_match(compiled, module) is not None) == bool(re.match(rf"(.*\.)?({pattern})$", module)), module
