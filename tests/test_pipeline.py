"""FusionPipeline: batch independence, determinism, schedulers, trace files."""
import json

import pytest
import torch

import fusion_engine as fe
from fusion_engine.runtime.trace import STYLE, SUBJECT

STEPS = 4


def _latents(n, seed=0):
    return torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def _run(pipe, prompt, latents, **kw):
    options = dict(num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent", progress=False)
    return pipe(prompt, latents=latents, **{**options, **kw})


@pytest.mark.parametrize("granularity", ["image", "sample", "token"])
def test_image_does_not_depend_on_the_rest_of_the_batch(tiny_pipe, loras, granularity):
    pipe = fe.FusionPipeline(tiny_pipe, *loras, policy="fls", granularity=granularity)
    batch = _latents(3)
    prompts = ["a sbu dog in szn style", "a cat", "a red car in szn style"]
    alone = _run(pipe, prompts[:1], batch[:1])
    together = _run(pipe, prompts, batch)
    # float32 GEMMs block differently for other batch sizes: ~1e-5 drift over the steps, not more
    torch.testing.assert_close(together.images[:1], alone.images, atol=1e-4, rtol=1e-4)
    for a, b in zip(alone.trace.gather(), together.trace.gather()):
        assert (a.step, a.layer) == (b.step, b.layer)
        if granularity == "image":
            assert a.choice.numel() == 1 and a.choice[0] == b.choice[0]
        elif granularity == "sample":  # UNet rows are [uncond0, uncond1, uncond2, cond0, cond1, cond2]
            assert torch.equal(a.choice, b.choice[[0, 3]])
        else:  # one group per token: image 0's tokens are the first and fourth sixth of the rows
            tokens = a.choice.numel() // 2
            rows = torch.cat([torch.arange(tokens), torch.arange(3 * tokens, 4 * tokens)])
            assert torch.equal(a.choice, b.choice[rows])


def test_batch_granularity_couples_images(tiny_pipe, loras):
    """The naive reading (one decision for the whole batch) is offered, and it is visibly different."""
    pipe = fe.FusionPipeline(tiny_pipe, *loras, policy="fls", granularity="batch")
    trace = _run(pipe, ["a", "b", "c"], _latents(3)).trace
    assert all(r.choice.numel() == 1 for r in trace.gather())


def test_same_seed_same_bytes(tiny_pipe, loras):
    pipe = fe.FusionPipeline(tiny_pipe, *loras, policy="fls")
    kwargs = dict(num_inference_steps=STEPS, output_type="pt", progress=False)
    first = pipe("a sbu dog in szn style", generator=torch.Generator().manual_seed(7), **kwargs)
    second = pipe("a sbu dog in szn style", generator=torch.Generator().manual_seed(7), **kwargs)
    other = pipe("a sbu dog in szn style", generator=torch.Generator().manual_seed(8), **kwargs)
    assert first.images.numpy().tobytes() == second.images.numpy().tobytes()
    assert first.trace.to_dict() == second.trace.to_dict()
    assert not torch.equal(first.images, other.images)


def test_pipeline_detaches_even_when_sampling_fails(tiny_pipe, loras):
    pipe = fe.FusionPipeline(tiny_pipe, *loras, policy="fls")
    calls = {"n": 0}
    original_step = tiny_pipe.scheduler.step

    def failing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original_step(*args, **kwargs)

    tiny_pipe.scheduler.step = failing_step
    with pytest.raises(KeyboardInterrupt):
        pipe("a dog", num_inference_steps=STEPS, progress=False)
    tiny_pipe.scheduler.step = original_step
    assert fe.runtime.fusion.attached_fusion(tiny_pipe.unet) is None
    assert all(type(m).__name__ != "DynamicLoRALinear" for m in tiny_pipe.unet.modules())


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DDIMScheduler"])
def test_schedulers_and_pil_output(tiny_pipe, loras, scheduler):
    import diffusers

    tiny_pipe.scheduler = getattr(diffusers, scheduler).from_config(tiny_pipe.scheduler.config)
    result = fe.FusionPipeline(tiny_pipe, *loras)("a dog", num_inference_steps=3, num_images_per_prompt=2,
                                                  generator=torch.Generator().manual_seed(0), progress=False)
    assert len(result.images) == 2 and result.images[0].size == (32, 32)
    assert result.trace.steps == [0, 1, 2]


def test_trace_records_every_step_layer_and_image(tmp_path, tiny_pipe, loras):
    result = fe.FusionPipeline(tiny_pipe, *loras)(
        "a dog", num_inference_steps=3, num_images_per_prompt=2, output_type="latent", progress=False)
    trace = result.trace
    assert len(trace) == 3 * 32
    assert trace.subject_fraction().shape == (3, 32)
    data = json.loads(trace.save_json(tmp_path / "trace.json").read_text())
    assert data["policy"] == "fls[kl]" and len(data["records"]) == 96 and data["steps"] == [0, 1, 2]
    record = data["records"][0]
    assert record["groups"] == 2 and set(record["choice"]) <= {"subject", "style"}
    assert len(record["score_subject"]) == 2
    codes = torch.cat([r.choice for r in trace.gather()])
    assert set(codes.tolist()) <= {SUBJECT, STYLE}
    from PIL import Image

    with Image.open(trace.heatmap(tmp_path / "heatmap.png")) as image:
        assert image.size[0] > 100 and image.size[1] > 32


def test_composite_needs_both_loras(tiny_pipe, loras):
    with pytest.raises(fe.AttachError, match="needs both"):
        fe.FusionPipeline(tiny_pipe, loras[0], None, policy="composite")


def test_from_pretrained_loads_a_local_folder_only(tmp_path, tiny_pipe, loras):
    tiny_pipe.save_pretrained(tmp_path / "tiny")
    pipe = fe.FusionPipeline.from_pretrained(tmp_path / "tiny", *loras, policy="direct")
    out = pipe("a dog", num_inference_steps=2, output_type="latent", progress=False,
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 4, 16, 16)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        fe.FusionPipeline.from_pretrained(tmp_path / "missing", *loras)
