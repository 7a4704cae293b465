"""The trained toy world: it loads from the shipped files, its transparent measures behave as defined, and
the sanity conditions of a valid world hold (each LoRA alone wins its own measure)."""
import numpy as np
import pytest
import torch

from fusion_engine.toy import measures
from fusion_engine.toy.data import HELD_STYLE, SHAPES, STYLES, SUBJECT_SHAPE, render, silhouette
from fusion_engine.toy.world import WEIGHTS, toy_weights_present

shipped = pytest.mark.skipif(not toy_weights_present(), reason="toy world weights not in the package")


# -- transparent measures on hand-made images -------------------------------------------------------------
def test_subject_fidelity_is_mask_iou_with_the_silhouette():
    assert measures.subject_fidelity(render(SUBJECT_SHAPE, "solid"))[0] == pytest.approx(1.0)
    assert measures.subject_fidelity(render(SUBJECT_SHAPE, HELD_STYLE))[0] == pytest.approx(1.0)  # any style
    shifted = render(SUBJECT_SHAPE, "stripes", np.random.default_rng(3))  # jittered within the renderer's range
    assert measures.subject_fidelity(shifted)[0] > 0.9
    others = measures.subject_fidelity([render(s, "solid") for s in SHAPES if s != SUBJECT_SHAPE])
    assert np.all(others < 0.8)
    blank = np.zeros((16, 16, 3))
    assert measures.subject_fidelity(blank)[0] == 0.0
    mask = silhouette(SUBJECT_SHAPE)
    assert measures.iou(mask, mask) == 1.0 and measures.iou(mask, ~mask) == 0.0


def test_style_fidelity_prefers_the_held_out_style_whatever_the_shape():
    held = measures.style_fidelity([render(s, HELD_STYLE) for s in SHAPES])
    for style in STYLES:
        if style != HELD_STYLE:
            other = measures.style_fidelity([render(s, style) for s in SHAPES])
            assert held.min() > other.max() + 0.3, style
    scores = measures.style_fidelity(torch.rand(4, 3, 16, 16))  # tensors work too, scores stay in [0, 1]
    assert scores.shape == (4,) and np.all((scores >= 0) & (scores <= 1))


# -- the shipped world ------------------------------------------------------------------------------------
@shipped
def test_world_loads_from_the_shipped_files():
    from fusion_engine.worlds import load_world
    from fusion_engine.toy.world import load_judges

    total = sum(f.stat().st_size for f in WEIGHTS.iterdir() if f.suffix == ".safetensors")
    assert total <= 20 * 2**20
    world = load_world("toy")
    subject, style = world.subject(), world.style()
    assert subject.layout == "peft" and style.layout == "kohya"
    assert all(name.endswith(("to_q", "to_k", "to_v", "to_out.0")) for name in subject.layers)
    assert set(subject.layers) == set(style.layers)
    clip, dino = load_judges()
    image = torch.from_numpy(render(SUBJECT_SHAPE, HELD_STYLE)).permute(2, 0, 1)[None]
    assert clip(image).shape[0] == 1 and dino(image).shape[0] == 1


@shipped
def test_dino_slot_judge_tells_shapes_apart_across_styles():
    from fusion_engine.metrics import embed
    from fusion_engine.toy.world import load_judges

    _, dino = load_judges()
    images = torch.stack([torch.from_numpy(render(s, st)).permute(2, 0, 1) for s in SHAPES for st in STYLES])
    e = torch.nn.functional.normalize(embed(dino, images), dim=-1)
    same = torch.tensor([[a // len(STYLES) == b // len(STYLES) for b in range(len(e))] for a in range(len(e))])
    sim = e @ e.T
    assert sim[same].mean() > sim[~same].mean() + 0.2


@shipped
def test_each_lora_alone_wins_its_own_measure():
    """The world's validity: subject LoRA alone > style LoRA alone on subject fidelity, and the reverse on
    style fidelity (averaged over a few seeds, a handful of steps)."""
    import fusion_engine as fe
    from fusion_engine.toy.world import load_toy_world

    world = load_toy_world()
    scores = {}
    for role, prompt in (("subject", world.subject_prompt), ("style", world.style_prompt)):
        loras = {"subject": world.subject() if role == "subject" else None,
                 "style": world.style() if role == "style" else None}
        pipe = fe.FusionPipeline.from_pipe(world.pipe, policy="direct", trace=False, **loras)
        images = pipe(prompt, num_inference_steps=10, guidance_scale=5.0, num_images_per_prompt=6,
                      generator=torch.Generator().manual_seed(0), progress=False).images
        scores[role] = (measures.subject_fidelity(images).mean(), measures.style_fidelity(images).mean())
    assert scores["subject"][0] > scores["style"][0], scores
    assert scores["style"][1] > scores["subject"][1], scores


@shipped
def test_eval_world_toy_reports_learned_and_transparent_measures(tmp_path):
    from fusion_engine.cli import main

    out = tmp_path / "eval"
    assert main(["eval", "--world", "toy", "--out", str(out), "--seeds", "2", "--steps", "2",
                 "--policies", "direct,fls", "--quiet"]) == 0
    report = (out / "report.md").read_text()
    assert "| method | Style Sim | CLIP Score | DINO Score | Subject IoU | Style Fid | images |" in report
    assert "| fls | " in report and "toy world" in report


@shipped
def test_demo_defaults_to_the_toy_world(tmp_path, capsys):
    from PIL import Image

    from fusion_engine.cli import GRID_POLICIES, main

    assert main(["demo", "--out", str(tmp_path), "--steps", "2", "--images", "1", "--quiet"]) == 0
    assert "trained toy world" in capsys.readouterr().out
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size[1] >= len(GRID_POLICIES) * 128
    assert (tmp_path / "heatmap.png").stat().st_size > 0


@shipped
def test_eval_world_toy_reports_references_intervals_and_paired_differences(tmp_path):
    from fusion_engine.cli import main
    from fusion_engine.eval.report import CI_HEADING, PAIRED_HEADING

    out = tmp_path / "eval"
    assert main(["eval", "--world", "toy", "--out", str(out), "--seeds", "2", "--steps", "2",
                 "--policies", "direct,fls", "--quiet"]) == 0
    report = (out / "report.md").read_text()
    assert "| method | Style Sim | CLIP Score | DINO Score | Subject IoU | Style Fid | images |" in report
    assert CI_HEADING in report and PAIRED_HEADING in report and "toy world" in report
    for row in ("| subject-only | ", "| style-only | ", "| direct | ", "| fls | "):
        assert row in report.split(CI_HEADING)[1].split(PAIRED_HEADING)[0], row
    paired = report.split(PAIRED_HEADING)[1].split("## Cost")[0]
    assert "| fls | " in paired and "| direct | " not in paired and "| 2 |" in paired


@shipped
def test_demo_defaults_to_the_toy_world_and_labels_rows_with_the_transparent_scores(tmp_path, capsys):
    from PIL import Image

    from fusion_engine.cli import GRID_POLICIES, main

    assert main(["demo", "--out", str(tmp_path), "--steps", "2", "--images", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "trained toy world" in printed and "Subject IoU" in printed and "Style Fid" in printed
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size[1] >= len(GRID_POLICIES) * 128
    assert (tmp_path / "heatmap.png").stat().st_size > 0
