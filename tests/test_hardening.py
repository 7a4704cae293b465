"""Hardening (issue 5): every bad input gets a library error that names the fault; no fault leaves a model
half-patched; attach/detach cycles leak nothing; fp16 and degenerate LoRAs give valid decisions."""
import copy
import gc
import inspect
import json
import struct
import tracemalloc

import pytest
import torch
from conftest import unet_inputs, unet_out
from safetensors.torch import save_file

import fusion_engine as fe
from fusion_engine import errors
from fusion_engine.ops import reference
from fusion_engine.policies import Policy
from fusion_engine.runtime.layers import DynamicLoRALayer
from fusion_engine.worlds.random import attention_targets, random_lora

LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
KOHYA = "lora_unet_" + LAYER.replace(".", "_")


def _peft(down, up):
    return {f"unet.{LAYER}.lora_A.weight": down, f"unet.{LAYER}.lora_B.weight": up}


def _header(path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def _write_with_header(path, header, body):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return path


@pytest.fixture
def style_file(tmp_path, loras):
    return fe.save_lora(loras[1], tmp_path / "style.safetensors", layout="kohya")


# -- the hierarchy -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("error, builtin", [
    (errors.LoRAFileError, ValueError), (errors.LoRAFileNotFoundError, FileNotFoundError),
    (errors.LoRALayoutError, ValueError), (errors.LoRAShapeError, ValueError), (errors.LoRADtypeError, ValueError),
    (errors.LoRAValueError, ValueError), (errors.ModelMismatchError, ValueError),
    (errors.AlreadyAttachedError, ValueError), (errors.BatchLayoutError, RuntimeError),
    (errors.BatchLayoutError, ValueError), (errors.StepRangeError, ValueError),
    (errors.ModelPathError, FileNotFoundError),
])
def test_every_error_is_a_library_error_and_the_builtin_callers_expect(error, builtin):
    assert issubclass(error, errors.FusionEngineError) and issubclass(error, builtin)


# -- bad files -----------------------------------------------------------------------------------------------------
def test_pickle_checkpoint_renamed_to_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.ones(3)}, path)
    with pytest.raises(errors.LoRAFileError, match=r"model\.safetensors: not a safetensors file: it is a zip"):
        fe.load_lora(path)


def test_truncated_file_names_the_key_and_missing_bytes(tmp_path, style_file):
    data = style_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 1000])
    truncated = r"cut\.safetensors: truncated: key 'lora_unet_.*' ends at .*1000 missing"
    with pytest.raises(errors.LoRAFileError, match=truncated):
        fe.load_lora(cut)
    cut.write_bytes(data[:5])
    with pytest.raises(errors.LoRAFileError, match="truncated: 5 bytes"):
        fe.load_lora(cut)


def test_header_that_lies_about_a_shape(tmp_path, style_file):
    header, body = _header(style_file)
    key = next(k for k, v in header.items() if k.endswith("lora_down.weight") and len(v["shape"]) == 2)
    rows, cols = header[key]["shape"]
    header[key]["shape"] = [rows, cols * 2]
    path = _write_with_header(tmp_path / "lie.safetensors", header, body)
    pattern = rf"lie\.safetensors: header lies about key '{key}': F32 shape \({rows}, {cols * 2}\) needs"
    with pytest.raises(errors.LoRAFileError, match=pattern):
        fe.load_lora(path)


def test_header_that_lies_about_offsets(tmp_path, style_file):
    header, body = _header(style_file)
    entries = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    (begin, end), key = entries[1]
    header[key]["data_offsets"] = [begin - 4, end - 4]  # overlaps its neighbour, same length
    path = _write_with_header(tmp_path / "overlap.safetensors", header, body)
    with pytest.raises(errors.LoRAFileError, match=rf"header lies about key '{key}'.*overlaps the previous tensor"):
        fe.load_lora(path)


def test_unknown_key_layout_lists_keys():
    with pytest.raises(errors.LoRALayoutError, match=r"unknown key layout.*model\.diffusion_model\.out\.weight"):
        fe.load_lora({"model.diffusion_model.out.weight": torch.randn(4, 4)})


def test_rank_zero_and_rank_disagreement_are_shape_errors():
    with pytest.raises(errors.LoRAShapeError, match=r"to_q: A \(0, 64\) and B \(64, 0\): an empty factor"):
        fe.load_lora(_peft(torch.randn(0, 64), torch.randn(64, 0)))
    with pytest.raises(errors.LoRAShapeError, match="ranks disagree"):
        fe.load_lora(_peft(torch.randn(4, 64), torch.randn(64, 3)))


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.float8_e4m3fn, torch.complex64])
def test_unsupported_dtype_names_key_shape_and_dtype(dtype):
    down = torch.ones(4, 64).to(dtype)
    with pytest.raises(errors.LoRADtypeError, match=rf"lora_A\.weight' \(4, 64\) {str(dtype)[6:]}: unsupported dtype"):
        fe.load_lora(_peft(down, torch.randn(64, 4)))


def test_int8_file_is_refused_by_key(tmp_path):
    path = tmp_path / "quantized.safetensors"
    save_file({f"{KOHYA}.lora_down.weight": torch.ones(4, 64, dtype=torch.int8),
               f"{KOHYA}.lora_up.weight": torch.ones(64, 4, dtype=torch.int8)}, str(path))
    quantized = r"quantized\.safetensors: key 'lora_unet_.*lora_down\.weight'.*int8"
    with pytest.raises(errors.LoRADtypeError, match=quantized):
        fe.load_lora(path)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_factor_or_alpha_names_key_and_index(bad):
    up = torch.randn(64, 4)
    up[5, 2] = bad
    poisoned = r"lora_B\.weight' \(64, 4\) float32 holds .*first at index \(5, 2\)"
    with pytest.raises(errors.LoRAValueError, match=poisoned):
        fe.load_lora(_peft(torch.randn(4, 64), up))
    kohya = {f"{KOHYA}.lora_down.weight": torch.randn(4, 64), f"{KOHYA}.lora_up.weight": torch.randn(64, 4),
             f"{KOHYA}.alpha": torch.tensor(bad)}
    with pytest.raises(errors.LoRAValueError, match=r"to_q\.alpha'"):
        fe.load_lora(kohya)


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="is a folder; pass the .safetensors file inside it"):
        fe.load_lora(tmp_path)


# -- models that do not fit ----------------------------------------------------------------------------------------
def _sdxl_like_unet():
    """SDXL's shape in miniature: 2 layers per block, 2-deep transformers, 64-wide text features."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=64, norm_num_groups=8, transformer_layers_per_block=(1, 2),
    )


def test_lora_for_another_base_model_reads_well(tiny_pipe, loras):
    sd_unet, xl_unet = tiny_pipe.unet, _sdxl_like_unet()
    xl_lora = random_lora(xl_unet, attention_targets(xl_unet), rank=4, alpha=4.0, strength=1.0, seed=0)
    xl_lora.source = "sdxl_style.safetensors"
    with pytest.raises(errors.ModelMismatchError) as caught:
        fe.attach(sd_unet, loras[0], xl_lora)  # an SDXL LoRA on an SD1.5-like UNet
    message = str(caught.value)
    total = len(xl_lora.layers)
    assert "style LoRA (sdxl_style.safetensors): " in message and "targets match this model" in message
    assert f"of {total} targets match" in message and "missing (e.g. " in message
    assert "looks made for another base model" in message and "64-wide text features, this model's 32" in message
    assert "subject LoRA" not in message  # the subject fits: only the culprit is summarised
    assert not any(isinstance(m, DynamicLoRALayer) for m in sd_unet.modules())

    with pytest.raises(errors.ModelMismatchError, match=r"subject LoRA \(<random>\): \d+ of 32 targets match.*"
                                                        r"32-wide text features, this model's 64"):
        fe.attach(xl_unet, loras[0])  # and the reverse


def test_attaching_to_an_attached_model_or_its_copy(tiny_pipe, loras):
    unet = tiny_pipe.unet
    with fe.attach(unet, *loras):
        with pytest.raises(errors.AlreadyAttachedError, match="already has a fusion attached"):
            fe.attach(unet, *loras)
        clone = copy.deepcopy(unet)  # carries fused layers but is not registered as attached
        with pytest.raises(errors.AlreadyAttachedError, match=r"already holds 32 fused layer\(s\)"):
            fe.attach(clone, *loras)


# -- batches that cannot be grouped -------------------------------------------------------------------------------
def test_batch_layouts_that_cannot_be_grouped(tiny_pipe, loras):
    unet = tiny_pipe.unet
    with fe.attach(unet, *loras) as fusion:
        with pytest.raises(errors.BatchLayoutError, match="images=0"):
            fusion.set_batch_layout(images=0, copies=2)
        fusion.set_batch_layout(images=3, copies=2)
        pooled = r"batch of 4 .* 3 image\(s\) x 2 copies = 6.*cannot be pooled"
        with pytest.raises(errors.BatchLayoutError, match=pooled):
            unet_out(unet, unet_inputs(unet, batch=4))
        with pytest.raises(errors.StepRangeError, match=r"step 5 is outside \[0, 5\)"):
            fusion.set_step(5, 5)
    with pytest.raises(errors.BatchLayoutError, match="unknown granularity 'pixel'"):
        fe.attach(unet, *loras, granularity="pixel")


@pytest.mark.parametrize("prompt, options, pattern", [
    ([], {}, "prompt list is empty"),
    ("a dog", {"num_images_per_prompt": 0}, "num_images_per_prompt must be a whole number >= 1, got 0"),
    (["a dog", "a cat"], {"negative_prompt": ["blurry"]}, "1 negative prompts for 2 prompts"),
])
def test_pipeline_prompts_that_cannot_form_a_batch(tiny_pipe, loras, prompt, options, pattern):
    pipe = fe.FusionPipeline(tiny_pipe, *loras)
    with pytest.raises(errors.BatchLayoutError, match=pattern):
        pipe(prompt, num_inference_steps=2, progress=False, output_type="latent", **options)
    assert fe.runtime.fusion.attached_fusion(tiny_pipe.unet) is None


# -- model paths ---------------------------------------------------------------------------------------------------
def test_model_paths_that_are_not_local_pipeline_folders(tmp_path, loras, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.ModelPathError, match=r"'stabilityai/sdxl'.*Hub id; only local folders are accepted"):
        fe.FusionPipeline.from_pretrained("stabilityai/sdxl", *loras)
    with pytest.raises(FileNotFoundError, match=r"missing: no such folder.*model_index\.json"):
        fe.FusionPipeline.from_pretrained(tmp_path / "missing", *loras)
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(errors.ModelPathError, match="is a file, not a pipeline folder.*from_single_file"):
        fe.FusionPipeline.from_pretrained(tmp_path / "model.safetensors", *loras)


# -- faults --------------------------------------------------------------------------------------------------------
def _snapshot(unet, inputs):
    return ({k: v.clone() for k, v in unet.state_dict().items()}, dict(unet.named_modules()), unet_out(unet, inputs))


def _assert_as_before(unet, snapshot, inputs):
    state, modules, output = snapshot
    now = unet.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert all(module is modules[name] for name, module in unet.named_modules())
    assert fe.runtime.fusion.attached_fusion(unet) is None
    assert torch.equal(unet_out(unet, inputs), output)


class FailingPolicy(Policy):
    """Direct merge that raises inside a fused layer's forward at one step and layer."""

    name, needs_step = "failing", True

    def __init__(self, step, error):
        self.step, self.error = step, error

    def weights(self, layer, context):
        if context.current_step() == self.step and layer.index == 5:
            raise self.error
        return 1.0, 1.0


@pytest.mark.parametrize("error", [RuntimeError("boom in layer 5"), KeyboardInterrupt()])
def test_fault_inside_a_fused_forward_mid_sampling_leaves_model_detached(tiny_pipe, loras, error):
    unet = tiny_pipe.unet
    inputs = unet_inputs(unet, batch=1)
    snapshot = _snapshot(unet, inputs)
    with pytest.raises(type(error)):
        fe.FusionPipeline(tiny_pipe, *loras, policy=FailingPolicy(2, error))(
            "a dog", num_inference_steps=4, progress=False, output_type="latent")
    _assert_as_before(unet, snapshot, inputs)
    fe.FusionPipeline(tiny_pipe, *loras)("a dog", num_inference_steps=2, progress=False, output_type="latent")


def test_fault_inside_the_fls_op_mid_sampling_leaves_model_detached(tiny_pipe, loras, monkeypatch):
    unet = tiny_pipe.unet
    inputs = unet_inputs(unet, batch=1)
    snapshot = _snapshot(unet, inputs)
    original, calls = reference.fls_linear, {"n": 0}

    def fls_linear(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 32 * 2 + 7:  # step 2 of 4, layer 7
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(reference, "fls_linear", fls_linear)
    with pytest.raises(KeyboardInterrupt):
        fe.FusionPipeline(tiny_pipe, *loras)("a dog", num_inference_steps=4, progress=False, output_type="latent")
    monkeypatch.setattr(reference, "fls_linear", original)
    _assert_as_before(unet, snapshot, inputs)


@pytest.mark.parametrize("after_set", [False, True], ids=["raise-before-set", "raise-after-set"])
def test_failure_in_the_middle_of_the_swap_rolls_back(tiny_pipe, loras, monkeypatch, after_set):
    unet = tiny_pipe.unet
    inputs = unet_inputs(unet, batch=1)
    snapshot = _snapshot(unet, inputs)
    real_set, calls = fe.runtime.fusion._set_module, {"n": 0}

    def flaky_set(model, name, module):
        calls["n"] += 1
        if calls["n"] == 6 and not after_set:
            raise KeyboardInterrupt
        real_set(model, name, module)
        if calls["n"] == 6 and after_set:  # the worst case: the swap happened, then the error
            raise RuntimeError("hook failed after the swap")

    monkeypatch.setattr(fe.runtime.fusion, "_set_module", flaky_set)
    with pytest.raises((KeyboardInterrupt, RuntimeError)):
        fe.attach(unet, *loras)
    monkeypatch.setattr(fe.runtime.fusion, "_set_module", real_set)
    _assert_as_before(unet, snapshot, inputs)
    fe.attach(unet, *loras).detach()


def test_failure_in_policy_setup_changes_nothing(tiny_pipe, loras):
    class BrokenSetup(Policy):
        name = "broken"

        def setup(self, layers):
            raise ValueError("cannot precompute")

    unet = tiny_pipe.unet
    inputs = unet_inputs(unet, batch=1)
    snapshot = _snapshot(unet, inputs)
    with pytest.raises(ValueError, match="cannot precompute"):
        fe.attach(unet, *loras, policy=BrokenSetup())
    _assert_as_before(unet, snapshot, inputs)


def _live_tensors() -> int:
    return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def _python_heap_filters():
    """Leave out tracemalloc's own bookkeeping and the attribute-name strings that ``get_submodule`` splits off:
    CPython's type method cache (4096 slots) keeps the last names looked up alive, a bounded cache, not a leak."""
    lines, first = inspect.getsourcelines(torch.nn.Module.get_submodule)
    split_line = first + next(i for i, line in enumerate(lines) if '.split(".")' in line)
    return [tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, inspect.getsourcefile(torch.nn.Module), lineno=split_line)]


def _python_heap(filters) -> int:
    return sum(stat.size for stat in tracemalloc.take_snapshot().filter_traces(filters).statistics("filename"))


def test_fifty_attach_detach_cycles_leak_nothing(tiny_pipe, loras):
    unet = tiny_pipe.unet
    subject, style = (fe.LoRA({n: fe.LoRALayer(layer.lora_a.double(), layer.lora_b.double(), layer.alpha)
                               for n, layer in lora.layers.items()})
                      for lora in loras)  # float64 factors: every attach allocates fresh float32 buffers
    tokens = torch.randn(2, 64, 64)

    def cycle(full_forward=False):
        with fe.attach(unet, subject, style) as fusion:
            fusion.set_step(0, 1)
            if full_forward:
                unet_out(unet, unet_inputs(unet, batch=2))
            else:  # one fused layer: trace, group cache and op, at 1/30 of a UNet call's cost on 2 cores
                fusion.layers[0](tokens)

    cycle(full_forward=True)
    for _ in range(10):  # warm-up: lazy imports, dispatcher and allocator caches
        cycle()
    gc.collect()
    tracemalloc.start()
    try:
        filters = _python_heap_filters()
        base_py, base_tensors, base_rss = _python_heap(filters), _live_tensors(), _rss_bytes()
        held = fe.attach(unet, subject, style)  # what ONE attach keeps alive: the unit a leak would repeat
        one_attach_py, one_attach_tensors = _python_heap(filters) - base_py, _live_tensors() - base_tensors
        held.detach()
        del held
        for _ in range(50):
            cycle()
        gc.collect()
        growth_py, growth_tensors = _python_heap(filters) - base_py, _live_tensors() - base_tensors
        growth_rss = _rss_bytes() - base_rss
    finally:
        tracemalloc.stop()
    print(f"\none attach holds {one_attach_py} B of Python heap and {one_attach_tensors} tensors; after 50 cycles: "
          f"{growth_py:+} B, {growth_tensors:+} tensors, RSS {growth_rss / 2**20:+.2f} MiB")
    assert one_attach_tensors >= 4 * 32  # four factor buffers per fused layer: the measurement sees them
    # A leak of 1/200 of an attach per cycle would add up to a quarter of one attach over 50 cycles.
    assert growth_tensors < one_attach_tensors / 4
    assert growth_py < one_attach_py / 4
    assert growth_rss < 16 * 2**20  # allocator noise only; leaked float32 buffers would grow it every cycle


# -- numerics ------------------------------------------------------------------------------------------------------
def _fls_case(dtype, scale, seed=0, m=24, k=40, n=48, rank=4):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    x = (rand(m, k) * scale).to(dtype)
    weight, bias = (rand(n, k) / k**0.5).to(dtype), rand(n).to(dtype)
    subject_a, subject_b = rand(rank, k).to(dtype), rand(n, rank).to(dtype)
    style_a, style_b = rand(rank, k).to(dtype), rand(n, rank).to(dtype)
    row_group = torch.arange(m) // 6
    return x, weight, bias, subject_a, subject_b, style_a, style_b, row_group, 4


@pytest.mark.parametrize("divergence", reference.DIVERGENCES)
def test_fp16_large_activations_give_finite_scores_and_the_fp64_decisions(divergence):
    # |y0| up to ~2e3, |d| ~1e4
    x, w, bias, subject_a, subject_b, style_a, style_b, rg, groups = _fls_case(torch.float16, scale=300.0)
    out, subject_score, style_score, choice = reference.fls_linear(
        x, w, bias, subject_a, subject_b, 0.05, style_a, style_b, 0.04, rg, groups, divergence)
    assert torch.isfinite(subject_score).all() and torch.isfinite(style_score).all() and choice.dtype == torch.bool
    assert subject_score.dtype == torch.float32 and out.dtype == torch.float16
    as64 = [t.double() if t.is_floating_point() else t for t in (x, w, bias, subject_a, subject_b, style_a, style_b)]
    _, oc, os_, ochoice = reference.fls_linear(*as64[:5], 0.05, *as64[5:], 0.04, rg, groups, divergence)
    clear = (oc - os_).abs() > 1e-3 * (oc.abs() + os_.abs())  # only compare decisions that are not near-ties
    assert clear.any() and torch.equal(choice[clear], ochoice[clear])


def test_fp16_unet_with_large_inputs_gives_finite_trace(tiny_pipe, loras):
    unet = tiny_pipe.unet.half()
    sample, t, context = unet_inputs(unet, batch=2)
    with fe.attach(unet, *loras, divergence="kl") as fusion:
        unet_out(unet, (sample.half() * 100, t, context.half() * 100))
        records = fusion.trace.gather()
    assert all(torch.isfinite(r.score_subject).all() and torch.isfinite(r.score_style).all() for r in records)


def _adversarial_deltas(y0):
    """Non-zero deltas that a zero delta can tie or beat: constant along channels, parallel to y0."""
    return {"constant": torch.full_like(y0, 0.3), "parallel": 0.2 * y0, "random": torch.randn_like(y0)}


@pytest.mark.parametrize("divergence", reference.DIVERGENCES)
@pytest.mark.parametrize("zero_role", ["subject", "style"])
def test_all_zero_delta_never_wins_over_a_non_zero_one(divergence, zero_role):
    y0 = torch.randn(12, 16, generator=torch.Generator().manual_seed(1)) + 2.0
    row_group = torch.arange(12) // 4
    for kind, delta in _adversarial_deltas(y0).items():
        zero = torch.zeros_like(y0)
        subject_delta, style_delta = (zero, delta) if zero_role == "subject" else (delta, zero)
        _, _, _, choice = reference.fls_select(y0, subject_delta, style_delta, row_group, 3, divergence, True, True)
        assert torch.equal(choice, torch.full((3,), zero_role == "style")), (kind, choice)


@pytest.mark.parametrize("divergence", reference.DIVERGENCES)
def test_zero_b_lora_is_never_chosen_through_attach(tiny_pipe, loras, divergence):
    unet = tiny_pipe.unet
    subject, style = loras
    silent = fe.LoRA({n: fe.LoRALayer(layer.lora_a, torch.zeros_like(layer.lora_b), layer.alpha)
                      for n, layer in subject.layers.items()})
    with fe.attach(unet, silent, style, divergence=divergence) as fusion:
        unet_out(unet, unet_inputs(unet, batch=2))
        records = fusion.trace.gather()
    fused_with_style = {i for i, name in enumerate(fusion.layer_names) if name in style.layers}
    for record in records:
        if record.layer in fused_with_style:
            assert not record.choice.eq(1).any(), (fusion.layer_names[record.layer], record.choice)


@pytest.mark.parametrize("divergence", reference.DIVERGENCES)
def test_exact_ties_go_to_the_subject(divergence):
    x, w, bias, a, b, _, _, rg, groups = _fls_case(torch.float32, scale=1.0)
    out, subject_score, style_score, choice = reference.fls_linear(
        x, w, bias, a, b, 0.5, a, b, 0.5, rg, groups, divergence)
    assert torch.equal(subject_score, style_score) and choice.all()
    zero = torch.zeros_like(b)  # both deltas zero: a tie too (a no-op either way)
    _, _, _, choice = reference.fls_linear(x, w, bias, a, zero, 0.5, a, zero, 0.5, rg, groups, divergence)
    assert choice.all()
