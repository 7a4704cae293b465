"""A pair is the uniform case of the one runtime: its numbers must not move (issue 21, phase two).

Every case attaches one pair twice in this process, once with the frozen copy of the single-pair runtime as it was
before the runtime became one (``tests/frozen_pair/``, main at ddb77f6) and once with the live code, runs the same
forwards on the reference backend in float32 on CPU, and requires the outputs, the input gradients, every decision
and every score to be bitwise equal, and ``trace.to_dict()`` (what ``trace.json`` holds) to be equal. No stored
goldens: float sums differ across CPU instruction sets, so both sides run here, on this CPU.

Cases (generated, tiny shapes): all six policies, the four divergences, the four granularities, DoRA on either side,
subject-only and style-only pairs, LoRA scales, conv (LoCon) and linear layers, input gradients (what LLR runs),
text encoders (fls and direct, per prompt and per token) and whole ``fe.attach(pipe, ...)`` pipeline calls with
text-encoder parts.
"""
import copy
import itertools
import json

import pytest
import torch
import torch.nn as nn
from frozen_pair import attach as frozen_attach
from frozen_pair import fusion as frozen_fusion

import fusion_engine as fe
from fusion_engine.lora import LoRA, LoRALayer

DIM, CHANNELS, STEPS = 8, 4, 4


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(DIM, DIM)])

    def forward(self, t):
        weights = torch.softmax(self.to_q(t) @ self.to_k(t).transpose(1, 2), -1)
        return t + self.to_out[0](weights @ self.to_v(t))


class UpBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(), Attention()])


class TinyNet(nn.Module):
    """conv_in (3x3) -> two attentions over the pixels (named as SDXL's B-LoRA blocks) -> conv_out (1x1)."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(CHANNELS, DIM, 3, padding=1)
        self.up_blocks = nn.ModuleList([UpBlock()])
        self.conv_out = nn.Conv2d(DIM, CHANNELS, 1)

    def forward(self, x, cross_attention_kwargs=None):
        h = self.conv_in(x)
        t = h.flatten(2).transpose(1, 2)
        for attention in self.up_blocks[0].attentions:
            t = attention(t)
        return self.conv_out(t.transpose(1, 2).reshape(h.shape))


def make_lora(net, seed, rank, skip=(), dora=False) -> LoRA:
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in net.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or name in skip:
            continue
        weight = module.weight
        kernel = tuple(weight.shape[2:])
        lora_a = torch.randn(rank, *weight.shape[1:], generator=generator) / weight[0].numel() ** 0.5
        lora_b = torch.randn(weight.shape[0], rank, *([1, 1] if kernel else []), generator=generator) * 2.0
        magnitude = None
        if dora:
            norms = weight.detach().flatten(1).norm(dim=1)
            magnitude = norms * (0.5 + torch.rand(norms.shape, generator=generator))
        layers[name] = LoRALayer(lora_a=lora_a, lora_b=lora_b, alpha=rank / 2, magnitude=magnitude)
    return LoRA(layers=layers, source=f"<seed {seed}>", layout="peft")


POLICIES = [("fls", {"divergence": d}) for d in ("kl", "js", "cosine", "dot")] + [
    ("direct", {}), ("direct", {"weights": (0.7, 1.3)}), ("klora", {}), ("blora", {}), ("switch", {"tau": 1}),
    ("composite", {}),
]
GRANULARITIES = ("image", "sample", "token", "batch")


def _cases():
    cases = []
    for (policy, options), granularity in itertools.product(POLICIES, GRANULARITIES):
        for variant in ("plain", "dora", "subject-only", "style-only", "scaled", "grad"):
            if variant in ("subject-only", "style-only") and policy in ("klora", "blora"):
                continue  # klora and blora need both: covered by the plain variants
            if variant == "grad" and policy != "fls" and granularity != "image":
                continue
            cases.append((policy, options, granularity, variant))
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def net_and_loras():
    torch.manual_seed(0)
    net = TinyNet().float()
    return net, {
        "plain": (make_lora(net, 1, 2), make_lora(net, 2, 3, skip=("up_blocks.0.attentions.0.to_v", "conv_out"))),
        "dora": (make_lora(net, 3, 2, dora=True), make_lora(net, 4, 3, skip=("conv_out",))),
    }


def run(attach, net, subject, style, policy, options, granularity, variant):
    """(outputs, input gradients, trace.to_dict(), raw records) of two steps with an image layout of 2 x 2 copies."""
    options = dict(options)
    if policy != "fls":
        options.pop("divergence", None)
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(4, CHANNELS, 3, 3, generator=generator)
    scale = 0.6 if variant == "scaled" else 1.0
    fusion = attach(net, subject, style, policy=policy, granularity=granularity, backend="reference", **options)
    outs, grads = [], []
    try:
        if granularity != "sample":
            fusion.set_batch_layout(2, 2)
        for step in (0, 2):
            fusion.set_step(step, STEPS)
            if policy == "composite":
                fusion.set_branch("subject" if step == 0 else "style")
            inputs = x.clone().requires_grad_(variant == "grad")
            with torch.set_grad_enabled(variant == "grad"):
                out = net(inputs, cross_attention_kwargs={"scale": scale})
            if variant == "grad":
                out.square().sum().backward()
                grads.append(inputs.grad)
            outs.append(out.detach())
        records = [(r.step, r.layer, r.choice, r.score_subject, r.score_style) for r in fusion.trace.gather()]
        return outs, grads, json.dumps(fusion.trace.to_dict()), records
    finally:
        fusion.detach()


def assert_records_equal(before, after):
    assert len(before) == len(after) > 0
    for old, new in zip(before, after):
        assert old[:2] == new[:2]
        assert old[2].dtype == new[2].dtype and torch.equal(old[2], new[2])
        for old_score, new_score in zip(old[3:], new[3:]):
            assert (old_score is None) == (new_score is None)
            if old_score is not None:
                assert torch.equal(old_score, new_score)


@pytest.mark.parametrize("policy,options,granularity,variant", CASES,
                         ids=[f"{p}-{'-'.join(map(str, o.values()))}-{g}-{v}" for p, o, g, v in CASES])
def test_a_pair_is_bitwise_what_the_frozen_pair_runtime_gives(net_and_loras, policy, options, granularity, variant):
    net, loras = net_and_loras
    subject, style = loras["dora" if variant == "dora" else "plain"]
    subject = None if variant == "style-only" else subject
    style = None if variant == "subject-only" else style
    before = run(frozen_fusion.attach_model, net, subject, style, policy, options, granularity, variant)
    after = run(fe.attach, net, subject, style, policy, options, granularity, variant)
    for old, new in zip(before[0] + before[1], after[0] + after[1]):
        assert torch.equal(old, new)
    assert before[2] == after[2]
    assert_records_equal(before[3], after[3])


TEXT_CASES = list(itertools.product(("fls", "direct"), ("sample", "token"), (False, True)))


@pytest.mark.parametrize("policy,granularity,dora", TEXT_CASES)
def test_a_text_encoder_pair_is_bitwise_what_the_frozen_runtime_gives(tiny_pipe, policy, granularity, dora):
    from test_dora import with_magnitudes
    from test_text_encoder import text_targets

    from fusion_engine.worlds.random import random_lora

    encoder = tiny_pipe.text_encoder
    subject = random_lora(encoder, text_targets(encoder), rank=4, alpha=2.0, strength=2.0, seed=5)
    style = random_lora(encoder, text_targets(encoder)[::2], rank=2, alpha=2.0, strength=2.0, seed=6)
    if dora:
        subject = with_magnitudes(subject, encoder, seed=7)
    ids = torch.randint(0, encoder.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    results = []
    for attach in (frozen_fusion.attach_model, fe.attach):
        fusion = attach(encoder, subject, style, policy=policy, granularity=granularity, backend="reference")
        try:
            with torch.no_grad():
                out = encoder(ids).last_hidden_state
            records = [(r.step, r.layer, r.choice, r.score_subject, r.score_style) for r in fusion.trace.gather()]
            results.append((out, json.dumps(fusion.trace.to_dict()), records))
        finally:
            fusion.detach()
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]
    assert_records_equal(results[0][2], results[1][2])


PIPELINE_CASES = [("fls", "image"), ("fls", "sample"), ("direct", "image"), ("switch", "image")]


@pytest.mark.parametrize("policy,granularity", PIPELINE_CASES)
def test_a_pipeline_pair_with_text_parts_is_bitwise_what_the_frozen_runtime_gives(tiny_pipe, policy, granularity):
    from test_text_encoder import lora_with_text_parts

    subject = lora_with_text_parts(tiny_pipe, seed=3)
    style = lora_with_text_parts(tiny_pipe, seed=9, alphas=(4.0, 2.0))
    options = {"tau": 1} if policy == "switch" else {}
    results = []
    for attach in (frozen_attach.attach_pipeline, fe.attach):
        pipe = copy.copy(tiny_pipe)  # one pipeline object per side: each runtime swaps the class of its own
        handle = attach(pipe, subject, style, policy=policy, granularity=granularity, backend="reference", **options)
        try:
            images = pipe(["a sbu dog", "a szn cat"], num_inference_steps=2, guidance_scale=5.0, output_type="pt",
                          generator=torch.Generator().manual_seed(0)).images
            results.append((images, json.dumps(handle.trace.to_dict())))
        finally:
            handle.detach()
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]


def test_the_cases_cover_what_issue_21_asks():
    total = len(CASES) + len(TEXT_CASES) + len(PIPELINE_CASES)
    assert total >= 200
    assert {c[0] for c in CASES} == {"fls", "direct", "klora", "blora", "switch", "composite"}
    assert {c[2] for c in CASES} == set(GRANULARITIES)
    assert {c[3] for c in CASES} >= {"dora", "grad", "subject-only", "style-only"}
