"""FLS against an independent float64 implementation of the paper's Eqs. 8-13, written here with
forward hooks on the original layers (no library code on the oracle side)."""
import copy

import pytest
import torch
from conftest import unet_inputs

import fusion_engine as fe

IMAGES, COPIES = 3, 2  # a CFG batch: [uncond x3, cond x3]


def oracle_score(y1, y0, divergence):
    """Per-row perturbation of y1 against y0, from the definitions (float64)."""
    if divergence in ("kl", "js"):
        p1, p0 = torch.softmax(y1, -1), torch.softmax(y0, -1)
        if divergence == "kl":
            return (p1 * (p1.log() - p0.log())).sum(-1)
        m = (p1 + p0) / 2
        return 0.5 * (p1 * (p1 / m).log()).sum(-1) + 0.5 * (p0 * (p0 / m).log()).sum(-1)
    dot = (y1 * y0).sum(-1)
    if divergence == "dot":
        return -dot
    return 1 - dot / (y1.norm(dim=-1) * y0.norm(dim=-1))


def oracle_groups(batch, rows_per_sample, granularity):
    rows = torch.arange(batch * rows_per_sample)
    sample = rows // rows_per_sample
    return {"image": sample % IMAGES, "sample": sample, "token": rows, "batch": torch.zeros_like(rows)}[granularity]


class OracleHooks:
    """Replace each targeted layer's output with the FLS choice, recording decisions by layer."""

    def __init__(self, unet, subject, style, divergence, granularity):
        self.decisions, self.handles = {}, []
        for name in sorted(set(subject.layers) | set(style.layers)):
            module = unet.get_submodule(name)
            self.handles.append(module.register_forward_hook(self._hook(name, subject, style, divergence, granularity)))

    def _hook(self, name, subject, style, divergence, granularity):
        def delta(lora, x):
            if name not in lora.layers:
                return None
            layer = lora.layers[name]
            scale = layer.alpha / layer.rank
            return scale * (x @ layer.lora_a.double().T @ layer.lora_b.double().T)

        def hook(module, inputs, y0):
            x = inputs[0]
            subject_delta, style_delta = delta(subject, x), delta(style, x)
            if style_delta is None or subject_delta is None:  # one LoRA absent: the present one is the answer
                chosen = subject_delta if style_delta is None else style_delta
                self.decisions[name] = torch.tensor([style_delta is None])
                return y0 + chosen
            batch, rows_per_sample = x.shape[0], x[0].numel() // x.shape[-1]
            groups = oracle_groups(batch, rows_per_sample, granularity)
            flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
            s_c = oracle_score(flat(y0 + subject_delta), flat(y0), divergence)
            s_s = oracle_score(flat(y0 + style_delta), flat(y0), divergence)
            n = int(groups.max()) + 1
            mean = lambda s: torch.stack([s[groups == g].mean() for g in range(n)])  # noqa: E731
            take_subject = mean(s_c) >= mean(s_s)
            self.decisions[name] = take_subject
            rows = take_subject[groups].reshape(*y0.shape[:-1], 1)
            return torch.where(rows, y0 + subject_delta, y0 + style_delta)

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("granularity", ["image", "sample", "token", "batch"])
@pytest.mark.parametrize("divergence", ["kl", "js", "cosine", "dot"])
def test_fls_matches_float64_oracle(tiny_pipe, loras, divergence, granularity):
    subject, style = loras
    unet = tiny_pipe.unet.double()
    sample, t, context = unet_inputs(unet, batch=IMAGES * COPIES, seed=3)
    sample, context = sample.double(), context.double()

    oracle_unet = copy.deepcopy(unet)
    hooks = OracleHooks(oracle_unet, subject, style, divergence, granularity)
    with torch.no_grad():
        expected = oracle_unet(sample, t, encoder_hidden_states=context).sample
    hooks.remove()

    with fe.attach(unet, subject, style, policy="fls", divergence=divergence, granularity=granularity,
                   backend="reference") as fusion:
        fusion.set_batch_layout(IMAGES, COPIES)
        with torch.no_grad():
            got = unet(sample, t, encoder_hidden_states=context).sample
        records = fusion.trace.gather()

    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    assert len(records) == len(hooks.decisions)
    for record in records:
        name = fusion.layer_names[record.layer]
        oracle = hooks.decisions[name]
        assert torch.equal(record.choice.bool(), oracle.expand_as(record.choice)), name
    flat = torch.cat([r.choice for r in records if r.score_subject is not None])
    assert flat.min() == 0 and flat.max() == 1, "the test needs layers choosing each branch"


@pytest.mark.parametrize("divergence", ["kl", "js", "cosine", "dot"])
def test_locon_conv_fls_matches_float64_oracle(divergence):
    """Conv layers (kohya LoCon): the channel dimension per pixel, pixels of one image pooled."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(6, 10, 3, padding=1, stride=2)).double()
    conv = model[0]

    def locon(rank, alpha, seed):
        g = torch.Generator().manual_seed(seed)
        return fe.LoRA({"0": fe.LoRALayer(torch.randn(rank, 6, 3, 3, generator=g, dtype=torch.float64) * 0.3,
                                          torch.randn(10, rank, 1, 1, generator=g, dtype=torch.float64), alpha)})

    subject, style = locon(2, 2.0, 1), locon(3, 3.0, 2)
    x = torch.randn(4, 6, 9, 9, dtype=torch.float64)
    y0 = conv(x)

    def delta(lora):
        layer = lora.layers["0"]
        hidden = torch.nn.functional.conv2d(x, layer.lora_a, stride=2, padding=1)
        return layer.alpha / layer.rank * torch.nn.functional.conv2d(hidden, layer.lora_b)

    subject_delta, style_delta = delta(subject), delta(style)
    channels_last = lambda t: t.permute(0, 2, 3, 1).reshape(4, -1, 10)  # noqa: E731
    s_c = oracle_score(channels_last(y0 + subject_delta), channels_last(y0), divergence).mean(1)
    s_s = oracle_score(channels_last(y0 + style_delta), channels_last(y0), divergence).mean(1)
    take_subject = s_c >= s_s
    expected = torch.where(take_subject[:, None, None, None], y0 + subject_delta, y0 + style_delta)

    with fe.attach(model, subject, style, policy="fls", divergence=divergence, granularity="sample") as fusion:
        with torch.no_grad():
            got = model(x)
        record = fusion.trace.gather()[0]
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    assert torch.equal(record.choice.bool(), take_subject)
    assert 0 < int(take_subject.sum()) < 4 or divergence == "dot", "want both branches chosen somewhere"
