"""The node while ComfyUI samples: batch layout, cond/uncond split, steps per sampler, restoring the shared model,
error paths, and the example workflow run headless."""
import json
import os
from pathlib import Path
from types import SimpleNamespace

import comfy_helpers as ch
import pytest
import torch
from comfy_helpers import unload_after_each_test  # noqa: F401 (autouse: unload ComfyUI's models after each test)

from fusion_engine.comfyui import NODE_CLASS_MAPPINGS
from fusion_engine.comfyui.fuse import call_options, fusion_state, reuse_decisions, step_of
from fusion_engine.comfyui.nodes import FuseSubjectStyleLoRA, LoRAFusionTrace
from fusion_engine.errors import FusionEngineError

mm, pe, comfy = ch.mm, ch.pe, ch.comfy
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "comfyui" / "fuse_subject_style_api.json"


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras_runtime")
    ch.write_lora(folder, "subject_kohya.safetensors", ch.make_lora_state(11, "kohya"))
    ch.write_lora(folder, "style_diffusers.safetensors", ch.make_lora_state(22, "diffusers"))
    bad = ch.make_lora_state(33, "kohya", kinds=("attn1",))
    bad["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"] = torch.ones(4, 48)
    ch.write_lora(folder, "wrong_shape.safetensors", bad)
    ch.write_lora(folder, "other_model.safetensors", {"lora_unet_single_blocks_0_linear1.lora_down.weight":
                                                      torch.ones(4, 8), "lora_unet_single_blocks_0_linear1"
                                                      ".lora_up.weight": torch.ones(8, 4)})
    ch.register_loras(folder)
    return folder


@pytest.fixture(scope="module")
def base():
    return ch.build_tiny_patcher(seed=4)


def fuse(model, policy="fls", granularity="image", options="", subject="subject_kohya.safetensors",
         style="style_diffusers.safetensors"):
    fused, _ = FuseSubjectStyleLoRA().fuse(model, subject, 1.0, style, 1.0, policy, "kl", granularity,
                                           policy_options=options)
    return fused


def test_an_image_does_not_depend_on_its_batch(base, loras):
    fused = fuse(base)
    pos, neg = ch.make_conds(seed=2)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    both = ch.sample(fused, pos, neg, latent=torch.zeros(2, 4, 8, 8), noise=noise)
    both_trace = {(r.step, r.layer): r.choice for r in fusion_state(fused).trace.gather()}
    for i in range(2):
        alone = ch.sample(fused, pos, neg, latent=torch.zeros(1, 4, 8, 8), noise=noise[i:i + 1])
        ch.assert_fp32_close(both[i:i + 1], alone, rtol=1e-5)
        alone_trace = {(r.step, r.layer): r.choice for r in fusion_state(fused).trace.gather()}
        assert all(torch.equal(both_trace[k][i:i + 1], alone_trace[k]) for k in alone_trace)
    assert all(c.numel() == 2 for c in both_trace.values())  # one decision per image, cond and uncond pooled


def test_cond_uncond_split_keeps_one_decision_per_image(base, loras, monkeypatch):
    """Free memory read as 0: ComfyUI runs uncond and cond as separate denoiser calls; the first decides, the
    second reuses its decisions."""
    steps = 3
    fused = fuse(base)
    pos, neg = ch.make_conds(seed=6)
    ch.sample(fused, pos, neg, steps=steps)
    state = fusion_state(fused)
    assert (state.calls, state.split_calls) == (steps, 0)
    monkeypatch.setattr(comfy.samplers.model_management, "get_free_memory", lambda *a, **k: 0)
    chunks = []
    fused.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test_spy", lambda ex, *a, **k: (
        chunks.append(list(call_options(a, k)["cond_or_uncond"])), ex(*a, **k))[1])
    ch.sample(fused, pos, neg, steps=steps)
    assert chunks == [[1], [0]] * steps  # the split happened
    assert (state.calls, state.split_calls) == (2 * steps, steps)
    records = state.trace.gather()
    assert len(records) == steps * len(state.layers)  # one decision per layer and step, not per chunk
    assert sorted({r.step for r in records}) == list(range(steps))


def test_a_reused_decision_gives_the_layer_output_of_that_decision(base, loras):
    """The split call's path (reuse_decisions) equals the engine layer when the decisions are the layer's own."""
    state = fusion_state(fuse(base, granularity="sample"))
    g = torch.Generator().manual_seed(0)
    kinds = set()
    for layer in state.layers:
        view = layer.base
        module = view.module
        shape = (2, 5, module.in_features) if hasattr(module, "in_features") else (2, module.in_channels, 4, 4)
        x = torch.randn(shape, generator=g)
        state.trace.clear()
        out = layer(x)
        choose = state.trace.gather()[-1].choice.bool()
        torch.testing.assert_close(reuse_decisions(layer, x, choose), out, rtol=1e-6, atol=1e-6)
        flipped = reuse_decisions(layer, x, ~choose)
        assert not torch.allclose(flipped, out)  # the decisions given are the ones applied
        kinds.add(type(layer).__name__)
    assert kinds == {"DynamicLoRALinear", "DynamicLoRAConv2d"}


def test_step_of_maps_intermediate_sigmas_to_their_interval():
    schedule = [10.0, 5.0, 2.0, 0.0]
    assert [step_of(s, schedule) for s in (10.0, 7.0, 5.0, 3.0, 2.0, 0.5, 12.0)] == [
        (0, 3), (0, 3), (1, 3), (1, 3), (2, 3), (2, 3), (0, 3)]


@pytest.mark.filterwarnings("ignore:Should have tb<=t1")  # torchsde, on the SDE sampler's first interval
@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "dpmpp_sde"])
def test_steps_follow_the_schedule_for_each_sampler(base, loras, sampler):
    steps = 4
    fused = fuse(base, "switch", options='{"tau": 1}')
    seen = []

    def spy(executor, *args, **kwargs):
        options = call_options(args, kwargs)
        out = executor(*args, **kwargs)
        seen.append((float(options["sigmas"][0]), [float(s) for s in options["sample_sigmas"]],
                     fusion_state(fused).context.step))
        return out

    fused.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test_spy", spy)
    pos, neg = ch.make_conds(seed=7)
    ch.sample(fused, pos, neg, steps=steps, sampler=sampler)
    assert sorted({step for _, _, step in seen}) == list(range(steps))
    for sigma, schedule, step in seen:
        assert schedule[step] >= sigma * (1 - 1e-5) and (sigma > schedule[step + 1] or sigma == schedule[step])
    if sampler in ("heun", "dpmpp_sde"):
        assert len(seen) > steps  # calls between schedule points were mapped too
    records = fusion_state(fused).trace.gather()
    for record in records:  # switch, tau 1: subject on even steps, style on odd ones (trace codes 1 and 0)
        assert record.choice.tolist() == [1 - record.step % 2]


def test_weights_are_the_originals_after_sampling_and_other_clones_sample_as_before(base, loras):
    pos, neg = ch.make_conds(seed=8)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    plain = ch.sample(base.clone(), pos, neg)
    fused = fuse(base)
    ch.sample(fused, pos, neg, unload=False)
    assert base.object_patches == {} and fusion_state(base) is None
    mm.unload_all_models()
    after = base.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for path in fusion_state(fused).paths.values():
        forward = base.model.get_submodule(path).forward
        assert getattr(forward, "__func__", None) is type(base.model.get_submodule(path)).forward
    assert torch.equal(ch.sample(base.clone(), pos, neg), plain)


def _untouched(model, before):
    after = model.model.state_dict()
    assert model.object_patches == {} and fusion_state(model) is None
    assert all(torch.equal(before[k], after[k]) for k in before)
    for module in model.model.modules():
        forward = vars(module).get("forward")
        assert forward is None or getattr(forward, "__func__", None) is type(module).forward


@pytest.mark.parametrize("subject,message", [
    ("missing.safetensors", "'missing.safetensors' is not in ComfyUI's loras folder"),
    ("wrong_shape.safetensors", "'wrong_shape.safetensors': diffusion_model.input_blocks.1.1.transformer_blocks.0"),
    ("other_model.safetensors", "'other_model.safetensors': none of its 2 keys"),
])
def test_bad_lora_raises_naming_the_file_and_changes_nothing(base, loras, subject, message):
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    with pytest.raises(FusionEngineError) as info:
        fuse(base, subject=subject)
    assert message in str(info.value)
    _untouched(base, before)


def test_unsupported_family_and_options_are_refused(base, loras):
    import comfy.supported_models

    flux = SimpleNamespace(model=SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2),
                                                 model_config=object.__new__(comfy.supported_models.Flux)))
    with pytest.raises(FusionEngineError, match="model family Flux .* not supported"):
        fuse(flux)
    with pytest.raises(FusionEngineError, match="policy_options: not JSON"):
        fuse(base, "switch", options="{tau: 1}")
    with pytest.raises(FusionEngineError, match="tau must be a whole number"):
        fuse(base, "switch", options='{"tau": 0}')
    with pytest.raises(FusionEngineError, match="already carries"):
        fuse(fuse(base))


def test_an_error_during_sampling_leaves_the_shared_model_restored(base, loras, monkeypatch):
    pos, neg = ch.make_conds(seed=10)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    plain = ch.sample(base.clone(), pos, neg)
    fused = fuse(base)
    state = fusion_state(fused)
    calls = []

    def failing(layer, x):
        calls.append(layer.name)
        if len(calls) == 7:
            raise RuntimeError("boom in a fused layer")
        return type(state).forward(state, layer, x)

    monkeypatch.setattr(state, "forward", failing)
    with pytest.raises(RuntimeError, match="boom"):
        ch.sample(fused, pos, neg, unload=False)
    mm.unload_all_models()
    _untouched(base, before)
    assert torch.equal(ch.sample(base.clone(), pos, neg), plain)


def run_api_workflow(workflow, classes):
    """Executes an API-format workflow headless: each node's FUNCTION with its inputs, links resolved in order."""
    results = {}

    def value(node_id):
        if node_id not in results:
            node = workflow[node_id]
            cls = classes[node["class_type"]]
            kwargs = {name: (value(v[0])[v[1]] if isinstance(v, list) else v) for name, v in node["inputs"].items()}
            results[node_id] = getattr(cls(), cls.FUNCTION)(**kwargs)
        return results[node_id]

    for node_id in workflow:
        value(node_id)
    return results


def test_example_workflow_runs_headless_and_produces_an_image(base, loras, tmp_path, monkeypatch):
    """examples/comfyui's API workflow with ComfyUI's own KSampler, VAEDecode, EmptyLatentImage and SaveImage; the
    checkpoint loader and the text encoder are tiny stand-ins (no checkpoint or tokenizer here)."""
    import comfy.sd
    from comfy.nodes import base_nodes

    folder_paths = ch.folder_paths_module()
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    vae = comfy.sd.VAE(sd={}, config={"params": {"embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
        "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in vae.first_stage_model.named_parameters():
            fill = torch.randn(p.shape, generator=g) * 0.05 if p.ndim > 1 else torch.zeros(p.shape)
            p.requires_grad_(False).copy_(fill + float("norm" in name and name.endswith("weight")))

    class TinyCheckpoint:
        FUNCTION = "load"

        def load(self, ckpt_name):
            return base, None, vae

    class TinyTextEncode:
        FUNCTION = "encode"

        def encode(self, clip, text):
            seed = sum(map(ord, text))
            return ([[torch.randn(1, 7, ch.CTX_DIM, generator=torch.Generator().manual_seed(seed)), {}]],)

    workflow = json.loads(EXAMPLE.read_text())
    workflow["5"]["inputs"].update(width=64, height=64)
    workflow["6"]["inputs"].update(steps=3)
    classes = {**{name: getattr(base_nodes, name) for name in
                  ("KSampler", "VAEDecode", "EmptyLatentImage", "SaveImage")},
               **NODE_CLASS_MAPPINGS, "CheckpointLoaderSimple": TinyCheckpoint, "CLIPTextEncode": TinyTextEncode}
    results = run_api_workflow(workflow, classes)
    image = results["7"][0]
    assert image.shape == (1, 16, 16, 3) and image.min() >= 0  # the tiny VAE: 8x8 latent -> 16x16
    assert image.max() <= 1 and image.std() > 0
    trace_image = results["9"][0]
    assert trace_image.ndim == 4 and trace_image.shape[-1] == 3
    saved = sorted(os.listdir(tmp_path))
    assert any(n.startswith("fusion_trace") and n.endswith(".json") for n in saved)
    assert any(n.startswith("fusion_") and n.endswith(".png") for n in saved)
    trace = json.loads(next(tmp_path.glob("fusion_trace*.json")).read_text())
    assert trace["steps"] == [0, 1, 2] and len(trace["layers"]) == len(ch.lora_modules())
    assert LoRAFusionTrace.RETURN_TYPES == ("IMAGE",)


def test_low_vram_loading_keeps_comfyuis_cast_and_weight_patches_in_the_path(base, loras, monkeypatch):
    """ComfyUI's low-VRAM load (forced on CPU: the device read as not-CPU, NO_VRAM) leaves weights unpatched and casts
    them per call with the LoraLoader patch applied on the fly; the fused layers read that cast weight, so the
    result equals the fully loaded run."""
    import fusion_engine.comfyui.fuse as fuse_module

    ch.write_lora(loras, "third_kohya.safetensors", ch.make_lora_state(44, "kohya", kinds=("attn1", "proj")))
    chained, _ = ch.LoraLoader().load_lora(base, None, "third_kohya.safetensors", 1.0, 0.0)
    fused = fuse(chained)
    pos, neg = ch.make_conds(seed=12)
    full = ch.sample(fused, pos, neg)
    casts = []
    real = fuse_module.casts_per_call
    monkeypatch.setattr(fuse_module, "casts_per_call", lambda module: casts.append(real(module)) or casts[-1])
    monkeypatch.setattr(mm, "is_device_cpu", lambda device: False)
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NO_VRAM)
    low = ch.sample(fused, pos, neg)
    assert casts and all(casts)  # every fused call went through ComfyUI's cast
    ch.assert_fp32_close(low, full, rtol=1e-5)
    unpatched = ch.sample(fuse(base), pos, neg)
    assert not torch.allclose(low, unpatched, rtol=1e-3)  # the chained LoRA's on-the-fly patch is in the result


class RecordingClip:
    """A CLIP stand-in with the key set ComfyUI's CLIP key map reads; records clones and patches."""

    KEY = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"

    def __init__(self, log):
        self.log, self.patches = log, []
        self.cond_stage_model = SimpleNamespace(state_dict=lambda: {self.KEY: torch.zeros(8, 8)})

    def clone(self):
        self.log.append("clone")
        return RecordingClip(self.log)

    def add_patches(self, patches, strength):
        self.patches.append((sorted(patches), strength))
        return list(patches)


def test_text_encoder_parts_go_to_a_clip_clone_with_both_deltas(base, loras):
    te = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 8),
          "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(8, 2)}
    ch.write_lora(loras, "subject_with_te.safetensors", {**ch.make_lora_state(11, "kohya"), **te})
    ch.write_lora(loras, "te_only.safetensors", te)
    log = []
    clip = RecordingClip(log)
    _, new_clip = FuseSubjectStyleLoRA().fuse(base, "subject_with_te.safetensors", 0.7, "style_diffusers.safetensors",
                                              1.2, "fls", "kl", "image", clip=clip)
    assert new_clip is not clip and clip.patches == [] and log == ["clone"]
    assert new_clip.patches == [([RecordingClip.KEY], 0.7), ([], 1.2)]  # as LoraLoader: strength times each delta
    with pytest.raises(FusionEngineError, match="have no denoiser layers"):
        FuseSubjectStyleLoRA().fuse(base, "te_only.safetensors", 1.0, "None", 1.0, "fls", "kl", "image", clip=clip)


def test_comfyuis_own_node_loader_finds_the_pack_and_its_lora_list(base, loras):
    """The fork's entry-point loader (comfyui.custom_nodes -> fusion_engine.comfyui) exports both nodes; the LoRA
    menu is ComfyUI's loras folder."""
    from comfy.nodes.package import _import_and_enumerate_nodes_in_module

    import fusion_engine.comfyui as pack

    exported = _import_and_enumerate_nodes_in_module(pack)
    assert {"FusionEngineFuseSubjectStyleLoRA", "FusionEngineLoRAFusionTrace"} <= set(exported.NODE_CLASS_MAPPINGS)
    choices = FuseSubjectStyleLoRA.INPUT_TYPES()["required"]["subject_lora"][0]
    assert choices[0] == "None" and "subject_kohya.safetensors" in choices


def test_fp8_weights_are_refused_before_anything_is_patched(loras):
    model = ch.build_tiny_patcher(seed=5)
    target = model.model.get_submodule("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q")
    target.weight.data = target.weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(FusionEngineError, match=r"attn1.to_q: weights in torch.float8_e4m3fn .* not supported"):
        fuse(model)
    assert model.object_patches == {} and fusion_state(model) is None
