"""Attach on diffusion transformers: every Linear a FLUX.1/SD3 LoRA targets is fused with every policy; FLS there
equals the float64 oracle (joint attention: an image's text and image tokens decide together by default,
``granularity="token"`` keeps them apart); attach copies no base weight and keeps the factors in the model's dtype."""
import copy

import pytest
import torch
from dit_models import linear_names, random_factors, tiny_flux_pipeline, tiny_sd3_pipeline
from test_fls_oracle import COPIES, IMAGES, OracleHooks

import fusion_engine as fe

pytest.importorskip("peft")
ATOL = 2e-5


@pytest.fixture(scope="module")
def pipes():
    return {"flux": tiny_flux_pipeline(seed=0), "sd3": tiny_sd3_pipeline(seed=0)}


def transformer_inputs(transformer, batch: int, seed: int = 0, dtype=torch.float32) -> dict:
    """Random inputs for one transformer call (8x8 latent tokens, 7 text tokens)."""
    generator = torch.Generator().manual_seed(seed)
    config = transformer.config
    size = 8

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    inputs = {"encoder_hidden_states": randn(batch, 7, config.joint_attention_dim),
              "pooled_projections": randn(batch, config.pooled_projection_dim),
              "timestep": torch.full((batch,), 0.6, dtype=dtype), "return_dict": False}
    if type(transformer).__name__ == "FluxTransformer2DModel":
        rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        inputs.update(hidden_states=randn(batch, size * size, config.in_channels),
                      img_ids=torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(dtype),
                      txt_ids=torch.zeros(7, 3, dtype=dtype))
    else:
        inputs.update(hidden_states=randn(batch, config.in_channels, size, size))
    return inputs


def forward(transformer, inputs):
    with torch.no_grad():
        return transformer(**inputs)[0]


def _loras(transformer, seed: int = 0):
    """A subject (rank 4, alpha 2) and a style (rank 6, alpha 9) on every Linear of the transformer."""
    names = linear_names(transformer)

    def lora(rank, alpha, seed):
        factors = random_factors(transformer, names, rank, seed)
        return fe.LoRA({name: fe.LoRALayer(*factors[name], alpha=alpha) for name in names}, component="transformer")

    return lora(4, 2.0, seed), lora(6, 9.0, seed + 1)


@pytest.mark.parametrize(("model", "granularity"), [("flux", "image"), ("flux", "token"), ("sd3", "image"),
                                                    ("flux", "sample")])
def test_fls_on_a_dit_matches_float64_oracle(pipes, model, granularity):
    """FLUX's single blocks run q/k/v, the MLP input and the output projection on [text; image] tokens: with
    granularity 'image' the oracle averages KL over both kinds of token of an image's rows (uncond and cond
    copies pooled), with 'token' every token decides alone."""
    transformer = copy.deepcopy(pipes[model].transformer).double()
    subject, style = _loras(transformer)
    inputs = transformer_inputs(transformer, batch=IMAGES * COPIES, seed=3, dtype=torch.float64)

    oracle = copy.deepcopy(transformer)
    hooks = OracleHooks(oracle, subject, style, "kl", granularity)
    expected = forward(oracle, inputs)
    hooks.remove()

    with fe.attach(transformer, subject, style, granularity=granularity, backend="reference") as fusion:
        fusion.set_batch_layout(IMAGES, COPIES)
        got = forward(transformer, inputs)
        records = fusion.trace.gather()
    assert fusion.layer_names == linear_names(transformer)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    for record in records:
        name = fusion.layer_names[record.layer]
        assert torch.equal(record.choice.bool(), hooks.decisions[name].expand_as(record.choice)), name
    choices = torch.cat([r.choice.flatten() for r in records])
    assert choices.min() == 0 and choices.max() == 1, "the test needs layers choosing each branch"


def _subject_only(transformer, subject, inputs):
    """diffusers' output with the subject alone, loaded into a copy of the transformer (the outside oracle)."""
    reference = copy.deepcopy(transformer)
    state = {f"{name}.lora_{ab}.weight": getattr(layer, f"lora_{ab.lower()}")
             for name, layer in subject.layers.items() for ab in ("A", "B")}
    reference.load_lora_adapter(state, prefix=None, adapter_name="subject")
    reference.set_adapters(["subject"], [subject.layer_scale(next(iter(subject.layers)))])
    return forward(reference, inputs)


EVERY_POLICY = {"fls": {}, "direct": {}, "klora": {}, "switch": {"tau": 2},
                "blora": {"blocks": {"subject": ["transformer_blocks", "single_transformer_blocks", "context_embedder",
                                                 "x_embedder", "time_text_embed", "norm_out", "proj_out"],
                                     "style": []}},
                "composite": {}}


@pytest.mark.parametrize("model", ["flux", "sd3"])
@pytest.mark.parametrize("policy", list(EVERY_POLICY))
def test_every_linear_is_fused_with_every_policy(pipes, model, policy):
    """Every Linear of the transformer (attention q/k/v/out and the text stream's add_*_proj/to_add_out, FLUX's
    proj_mlp/proj_out, ff/ff_context, the norms' linears, embedders) is swapped; where the policy leaves the
    subject alone at this step (switch, step 0; composite's subject pass; blora with every block the subject's),
    the output is diffusers' with the subject loaded alone."""
    transformer = copy.deepcopy(pipes[model].transformer)
    subject, style = _loras(transformer, seed=10)
    inputs = transformer_inputs(transformer, batch=2, seed=4)
    base = forward(transformer, inputs)
    with fe.attach(transformer, subject, style, policy=policy, **EVERY_POLICY[policy]) as fusion:
        fusion.set_step(0, 4)
        fusion.set_batch_layout(2)
        fusion.set_branch("subject")
        got = forward(transformer, inputs)
    assert fusion.layer_names == linear_names(transformer)
    assert torch.isfinite(got).all() and (got - base).abs().max() > 1e-2
    if policy in ("switch", "composite", "blora"):
        torch.testing.assert_close(got, _subject_only(transformer, subject, inputs), atol=ATOL, rtol=0)
    torch.testing.assert_close(forward(transformer, inputs), base, atol=0, rtol=0)  # detached: the base again


def test_attach_copies_no_base_weight_and_keeps_factors_in_model_dtype(pipes):
    """bfloat16 FLUX: every parameter keeps its storage (no copy of a base weight), every factor buffer is
    bfloat16, and the bytes attach adds are sum over layers of rank * (in + out) * 2."""
    transformer = copy.deepcopy(pipes["flux"].transformer).to(torch.bfloat16)
    subject, style = _loras(transformer, seed=20)
    storage = {name: (p.untyped_storage().data_ptr(), p.dtype) for name, p in transformer.named_parameters()}
    base_bytes = sum(p.numel() * p.element_size() for p in transformer.parameters())

    with fe.attach(transformer, subject, style) as fusion:
        after = {name.replace(".base.", "."): (p.untyped_storage().data_ptr(), p.dtype)
                 for name, p in transformer.named_parameters()}
        assert after == storage
        added, expected = 0, 0
        for layer in fusion.layers:
            base = transformer.get_submodule(layer.name).base
            for lora in (subject, style):
                rank = lora.layers[layer.name].rank
                expected += rank * (base.in_features + base.out_features) * 2
            for buffer in (layer.subject_a, layer.subject_b, layer.style_a, layer.style_b):
                assert buffer.dtype == torch.bfloat16 and buffer.device == base.weight.device
                added += buffer.numel() * buffer.element_size()
            assert layer.subject_gain.numel() == layer.style_gain.numel() == 0
        assert added == expected
        print(f"\nattach on bf16 tiny FLUX: {len(fusion.layers)} layers, +{added} bytes of factors (ranks 4 + 6) "
              f"beside {base_bytes} bytes of base weights")
        forward(transformer, transformer_inputs(transformer, batch=1, dtype=torch.bfloat16))
    assert {name: (p.untyped_storage().data_ptr(), p.dtype) for name, p in transformer.named_parameters()} == storage


def test_fls_through_an_sd3_pipeline_call_matches_float64_oracle(pipes):
    """fe.attach(pipe) on StableDiffusion3Pipeline: the CFG batch [uncond x3, cond x3] is read per call, so each
    image's uncond and cond rows decide together, at every step, as the oracle hooks do on a copy."""
    pipe = copy.deepcopy(pipes["sd3"]).to(torch.float64)
    subject, style = _loras(pipe.transformer, seed=30)
    oracle = copy.deepcopy(pipe)
    hooks = OracleHooks(oracle.transformer, subject, style, "kl", "image")

    def call(pipe):
        generator = torch.Generator().manual_seed(1)

        def randn(*shape):
            return torch.randn(*shape, generator=generator, dtype=torch.float64)

        with torch.no_grad():
            return pipe(prompt_embeds=randn(IMAGES, 7, 32), pooled_prompt_embeds=randn(IMAGES, 64),
                        negative_prompt_embeds=randn(IMAGES, 7, 32), negative_pooled_prompt_embeds=randn(IMAGES, 64),
                        guidance_scale=4.0, num_inference_steps=2, height=16, width=16, output_type="latent",
                        generator=torch.Generator().manual_seed(5)).images

    expected = call(oracle)
    hooks.remove()
    with fe.attach(pipe, subject, style, backend="reference") as fusion:
        got = call(pipe)
        records = fusion.trace.gather()
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    assert (got - call(pipe)).abs().max() > 1e-2
    assert {r.step for r in records} == {0, 1}
    choices = torch.cat([r.choice.flatten() for r in records])
    assert choices.min() == 0 and choices.max() == 1, "the test needs layers choosing each branch"
