"""Renamed public names (issue 21): the old name still works for one release, warns once (FutureWarning), and
gives exactly what the new name gives."""
import warnings

import pytest
import torch

import fusion_engine as fe
from fusion_engine import ops
from fusion_engine.utils import deprecation
from fusion_engine.worlds.random import default_loras


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(deprecation, "_WARNED", set())


def warned(action):
    """(result, the FutureWarning messages ``action()`` raised)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = action()
    return result, [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


def test_old_package_names_warn_once_and_are_the_new_ones():
    value, messages = warned(lambda: fe.PipelineFusion)
    assert value is fe.PipelineAttachment and messages == [
        "fusion_engine.PipelineFusion is deprecated and goes in the next release: use fusion_engine.PipelineAttachment"]
    assert warned(lambda: fe.PipelineFusion) == (fe.PipelineAttachment, [])  # once per name
    value, messages = warned(lambda: fe.serve.BatchFusion)
    assert value is fe.BatchFusion and len(messages) == 1 and "fusion_engine.serve" in messages[0]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fe.nope  # noqa: B018
    assert "PipelineFusion" not in fe.__all__ and "serve" not in fe.__all__  # a star import warns about nothing


def test_the_public_names_are_importable_from_the_package():
    for name in fe.__all__:
        assert getattr(fe, name) is not None, name
    assert fe.trace.DEFAULT_MAX_RECORDS == 10_000  # the module, as the README uses it


def test_prev_choose_is_prev_choice():
    torch.manual_seed(0)
    x, w = torch.randn(4, 6), torch.randn(5, 6)
    a, b = torch.randn(2, 6), torch.randn(5, 2)
    args = (x, w, None, a, b, 1.0, a, -b, 0.5, torch.zeros(4, dtype=torch.int32), 1, "kl")
    new = ops.fls_linear(*args, prev_choice=torch.ones(1, dtype=torch.bool))
    old, messages = warned(lambda: ops.fls_linear(*args, prev_choose=torch.ones(1, dtype=torch.bool)))
    assert all(torch.equal(n, o) for n, o in zip(new, old)) and len(messages) == 1 and "prev_choice=" in messages[0]
    with pytest.raises(fe.OptionError, match="pass only prev_choice="):
        ops.fls_linear(*args, prev_choice=torch.ones(1, dtype=torch.bool), prev_choose=torch.ones(1, dtype=torch.bool))


def test_pairs_and_set_assignment_are_loras_and_set_loras(tiny_pipe):
    subject, style = default_loras(tiny_pipe.unet, seed=0)
    pool = fe.LoRAPool().add("s", subject).add("t", style)
    call = dict(num_inference_steps=1, output_type="pt", guidance_scale=4.0, generator=torch.Generator())
    with fe.attach(tiny_pipe, pool=pool) as fusion:
        new = tiny_pipe(["a", "b"], loras=[("s", "t"), "t"], **{**call, "generator": torch.Generator().manual_seed(0)})
        old, messages = warned(lambda: tiny_pipe(["a", "b"], pairs=[("s", "t"), "t"],
                                                 **{**call, "generator": torch.Generator().manual_seed(0)}))
        assert torch.equal(new.images, old.images) and messages == [
            "pairs= is deprecated and goes in the next release: use loras="]
        with pytest.raises(fe.OptionError, match="pass only loras="):
            tiny_pipe(["a"], loras=["s"], pairs=["s"], **call)
        _, messages = warned(lambda: fusion.set_assignment(["s", "t"]))
        assert fusion.fusion.loras == [("s",), ("t",)] and len(messages) == 1 and "use set_loras" in messages[0]
        assert warned(lambda: fusion.fusion.assignment)[0] == fusion.fusion.loras
    out = fe.FusionPipeline(tiny_pipe, pool=pool)(["a"], loras=["t"], num_inference_steps=1, output_type="pt")
    assert out.loras == [("t",)]
    value, messages = warned(lambda: out.pairs)
    assert value == out.loras and "use FusionPipelineOutput.loras" in messages[0]
