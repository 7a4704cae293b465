"""Issue 11, LoRA files as a hostile uploader would send them: no file drives unbounded work (regexes in
the metadata, huge headers, large files in no LoRA layout), and valid files are never refused."""
import json
import re
import struct

import pytest
import torch
from safetensors.torch import save_file
from timeouts import time_limit  # noqa: F401  (autouse: every test here fails instead of hanging)

import fusion_engine as fe
from fusion_engine import errors
from fusion_engine.lora import lora_to_state_dict
from fusion_engine.lora.patterns import MAX_PATTERNS, compile_patterns, first_match
from fusion_engine.lora.safetensors_header import MAX_TENSORS

TIME_LIMIT_S = 60
LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
KOHYA = "lora_unet_" + LAYER.replace(".", "_")


def _peft_file(path, layers, config):
    """A PEFT-layout file as diffusers writes it, with ``config`` as its adapter metadata."""
    state = {}
    for name, (lora_a, lora_b) in layers.items():
        state[f"unet.{name}.lora_A.weight"], state[f"unet.{name}.lora_B.weight"] = lora_a, lora_b
    save_file(state, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    return path


def _write_raw(path, header: dict, body: bytes = b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return path


# -- regexes from a file --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["(.+)+!", "(a|aa)*b", "[a-z]+\\d", "to_q|to_k", "x{2,}", "a+"])
def test_regex_in_alpha_pattern_is_refused_quickly_by_name(tmp_path, pattern):
    path = _peft_file(tmp_path / "evil.safetensors", {LAYER: (torch.randn(4, 64), torch.randn(64, 4))},
                      {"unet.lora_alpha": 4, "unet.alpha_pattern": {pattern: 8}})
    with pytest.raises(errors.LoRAFormatError, match=rf"evil\.safetensors: adapter metadata alpha_pattern key "
                                                    rf"{re.escape(repr(pattern))} uses regex syntax"):
        fe.load_lora(path)  # today's main never returned from (.+)+! (the time limit fails it)


def test_rank_pattern_is_never_evaluated(tmp_path):
    """Ranks come from the factor shapes; a pathological rank_pattern costs nothing."""
    path = _peft_file(tmp_path / "ranks.safetensors", {LAYER: (torch.randn(4, 64), torch.randn(64, 4))},
                      {"unet.lora_alpha": 2, "unet.rank_pattern": {"(.+)+!": 8}})
    lora = fe.load_lora(path)
    assert lora.layers[LAYER].rank == 4 and lora.layers[LAYER].alpha == 2


def test_too_many_patterns_or_too_long_a_pattern_is_refused(tmp_path):
    layers = {LAYER: (torch.randn(4, 64), torch.randn(64, 4))}
    many = {f"block{i}.to_q": 2 for i in range(MAX_PATTERNS + 1)}
    path = _peft_file(tmp_path / "many.safetensors", layers, {"unet.alpha_pattern": many})
    with pytest.raises(errors.LoRAFormatError, match=rf"many\.safetensors: .*alpha_pattern holds {MAX_PATTERNS + 1} "
                                                    "patterns for 1 modules"):
        fe.load_lora(path)
    path = _peft_file(tmp_path / "long.safetensors", layers, {"unet.alpha_pattern": {"a" * 600: 2}})
    with pytest.raises(errors.LoRAFormatError, match=r"long\.safetensors: .*is 600 characters long"):
        fe.load_lora(path)


PEFT_STYLE_PATTERNS = [
    LAYER, "attn1.to_q", "to_k", "^" + LAYER.replace("to_q", "to_v"), ".*attn2.to_out.0", "to_q$", "attn1\\.to_v",
    "up_blocks.*attn2.to_k", "transformer_blocks.0.attn1", "to.q", "^to_q", "1.to_k", "blocks.0.attentions.*to_v",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_k",
]


def test_patterns_match_as_peft_matches_them(tiny_pipe):
    """Same first-matching key as ``peft.utils.other.get_pattern_key`` for every module and pattern order."""
    from peft.utils.other import get_pattern_key

    modules = [name for name, module in tiny_pipe.unet.named_modules() if isinstance(module, torch.nn.Linear)]
    for patterns in (PEFT_STYLE_PATTERNS, PEFT_STYLE_PATTERNS[::-1]):
        compiled = compile_patterns(dict.fromkeys(patterns, 1), len(modules), "alpha_pattern", "<test>")
        hits = 0
        for module in modules:
            expected = get_pattern_key(patterns, module)
            ours = first_match(compiled, module)
            assert (ours or module) == expected, module
            hits += ours is not None
        assert hits > len(modules) // 4  # the patterns do select many modules


def test_alpha_pattern_of_a_real_file_still_gives_per_layer_alphas(tmp_path, loras):
    subject, _ = loras
    layers = dict(sorted(subject.layers.items())[:3])
    first, second, third = layers
    lora = fe.LoRA({name: fe.LoRALayer(layer.lora_a, layer.lora_b, alpha) for (name, layer), alpha
                    in zip(layers.items(), (4.0, 4.0, 1.5))})
    loaded = fe.load_lora(fe.save_lora(lora, tmp_path / "alphas.safetensors", layout="peft"))
    assert [loaded.layers[n].alpha for n in (first, second, third)] == [4.0, 4.0, 1.5]


# -- the safetensors header ------------------------------------------------------------------------------------------
def _padded_real_file(path, state, low_byte: int, second_byte: int | None = None):
    """A file safetensors itself writes, its metadata padded until the header length's low byte is ``low_byte``."""
    for pad in range(0, 4096):
        save_file(state, str(path), metadata={"format": "pt", "note": "x" * pad})
        head = path.read_bytes()[:2]
        if head[0] == low_byte and (second_byte is None or head[1] == second_byte):
            return path
    raise AssertionError("no padding gave that header length")


@pytest.mark.parametrize("second_byte", [None, 2])  # 0x80 0x02 is also how a protocol-2 pickle starts
def test_valid_file_whose_header_length_starts_like_a_pickle_loads(tmp_path, loras, second_byte):
    subject, _ = loras
    small = fe.LoRA(dict(sorted(subject.layers.items())[:1]))  # header < 640 bytes before padding
    path = _padded_real_file(tmp_path / "lucky.safetensors", lora_to_state_dict(small, "kohya"), 0x80, second_byte)
    loaded = fe.load_lora(path)
    for name, layer in small.layers.items():
        assert torch.equal(loaded.layers[name].lora_a, layer.lora_a) and loaded.layers[name].alpha == layer.alpha


def test_a_real_pickle_is_still_refused_as_one(tmp_path):
    import pickle

    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"w": list(range(100))}, protocol=2))
    with pytest.raises(errors.LoRAFileError, match="not a safetensors file: it is a Python pickle"):
        fe.load_lora(path)


@pytest.mark.parametrize("shape", [[2**63, 0], [0, 2**64], [2**62, 2**62, 0]])
def test_header_shape_beyond_int64_names_key_and_shape(tmp_path, shape):
    header = {f"{KOHYA}.lora_down.weight": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]},
              f"{KOHYA}.lora_up.weight": {"dtype": "F32", "shape": [64, 4], "data_offsets": [0, 1024]}}
    path = _write_raw(tmp_path / "huge.safetensors", header, bytes(1024))
    with pytest.raises(errors.LoRAFileError, match=rf"huge\.safetensors: key '{KOHYA}\.lora_down\.weight': header "
                                                 rf"shape {re.escape(str(shape))} is too large"):
        fe.load_lora(path)


def test_header_of_many_zero_size_tensors_is_refused_while_parsing(tmp_path):
    """The issue's 98 MB header took minutes and GBs; parsing now stops at the first entry over the limit."""
    count = 4 * MAX_TENSORS
    header = {f"{KOHYA}_{i}.lora_down.weight": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
              for i in range(count)}
    path = _write_raw(tmp_path / "zeros.safetensors", header)
    with pytest.raises(errors.LoRAFileError, match=rf"zeros\.safetensors: its header holds more than {MAX_TENSORS} "
                                                 "entries"):
        fe.load_lora(path)


class _CountingReads:
    """Counts every way safetensors can read tensor data."""

    def __init__(self, monkeypatch):
        import safetensors
        import safetensors.torch

        self.calls = []
        for module, name in ((safetensors.torch, "load_file"), (safetensors.torch, "load"),
                             (safetensors, "safe_open"), (safetensors.torch, "safe_open")):
            original = getattr(module, name)
            monkeypatch.setattr(module, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            self.calls.append(name)
            return original(*args, **kwargs)
        return counted


def test_large_file_in_no_lora_layout_is_refused_from_its_header(tmp_path, monkeypatch):
    """The issue's 256 MB case (peak RSS 2.8x the file), scaled down: no tensor byte is read before the error."""
    state = {f"model.diffusion_model.block{i}.weight": torch.randn(256, 256) for i in range(32)}  # 8 MiB
    path = tmp_path / "checkpoint.safetensors"
    save_file(state, str(path))
    reads = _CountingReads(monkeypatch)
    with pytest.raises(errors.LoRALayoutError, match=r"checkpoint\.safetensors: unknown key layout: none of its 32 "
                                                   r"keys .*model\.diffusion_model\.block0\.weight"):
        fe.load_lora(path)
    assert reads.calls == []
    state = {f"{KOHYA}.lora_down.weight": torch.randn(4, 64), f"{KOHYA}.lora_up.weight": torch.randn(64, 4)}
    save_file(state, str(path))
    assert fe.load_lora(path).layers and reads.calls  # the wrapper does see a real read


def test_lycoris_file_is_refused_by_name_from_its_header(tmp_path, monkeypatch):
    """``lycoris_`` keys follow no LoRA layout: the LyCORIS message still wins, before any tensor is read."""
    prefix = "lycoris_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    path = tmp_path / "loha.safetensors"
    save_file({f"{prefix}.{key}": torch.randn(4, 4) for key in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")},
              str(path))
    reads = _CountingReads(monkeypatch)
    with pytest.raises(errors.LoRALayoutError, match=r"loha\.safetensors: a LyCORIS LoHa file"):
        fe.load_lora(path)
    assert reads.calls == []
