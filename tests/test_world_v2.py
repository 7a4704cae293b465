"""Issue 24's groundwork: the joint-success measure and its report columns (checked against hand-computed
numbers), the (subject, style) scale sweep, the second toy world's data split and world-sized vocabulary."""
import json
from pathlib import Path

import numpy as np
import pytest

from fusion_engine.errors import OptionError
from fusion_engine.eval.pairs import Pair, scaled_pairs
from fusion_engine.eval.report import CI_HEADING, JOINT_HEADING, PAIRED_HEADING, write_report
from fusion_engine.worlds.toy import data, measures, v2

ROOT = Path(__file__).resolve().parents[1]


# -- joint success ----------------------------------------------------------------------------------------
def test_joint_success_needs_the_subject_and_the_style_in_one_image():
    rng = np.random.default_rng(3)
    both = [data.render(data.SUBJECT_SHAPE, data.HELD_STYLE, rng) for _ in range(3)]
    subject_only = [data.render(data.SUBJECT_SHAPE, data.SUBJECT_LOOK, rng) for _ in range(3)]
    style_only = [data.render(shape, data.HELD_STYLE, rng) for shape in data.BASE_SHAPES[:3]]
    images = both + subject_only + style_only
    expected = [1.0] * 3 + [0.0] * 6
    assert measures.transparent_scores(images)["joint"].tolist() == expected
    assert v2.transparent_scores(images)["joint"].tolist() == expected
    assert measures.joint_success(images).tolist() == [bool(v) for v in expected]


def _row(pair, policy, seed, joint):
    return {"pair": pair, "policy": policy, "seed": str(seed), "style_sim": "0.5", "clip_score": "0.5",
            "dino_score": "0.5", "joint": str(float(joint)), "subject_iou": "0.7", "style_fid": "0.6",
            "wall_s": "1.0", "peak_mem_mb": "10", "mem_kind": "cpu", "device": "cpu", "rank": "0",
            "image": f"images/{pair}/{policy}/seed{seed:03d}.png"}


def test_report_puts_joint_success_first_with_its_interval_and_paired_difference(tmp_path):
    """20 seeds: direct succeeds on seeds 0-4 (25%), fls on seeds 0-14 (75%). fls - direct per seed is 1 on ten
    seeds and 0 on ten, so its bootstrap mean is Binomial(20, 1/2) / 20: P(X <= 5) = 0.021 and P(X <= 6) = 0.058
    put the 2.5% quantile at 6/20, and by symmetry the 97.5% one at 14/20: +50 [+30, +70] points."""
    rows = {}
    for seed in range(20):
        rows[("p", "direct", seed)] = _row("p", "direct", seed, seed < 5)
        rows[("p", "fls", seed)] = _row("p", "fls", seed, seed < 15)
    report = write_report(tmp_path, rows, ["direct", "fls"], 40, []).read_text()
    header = "| method | Joint success | Style Sim | CLIP Score | DINO Score | Subject IoU | Style Fid | images |"
    assert header in report
    ci = report.split(CI_HEADING)[1].split(PAIRED_HEADING)[0]
    assert "| direct | 25.0 [" in ci and "| fls | 75.0 [" in ci
    paired = report.split(PAIRED_HEADING)[1].split(JOINT_HEADING)[0]
    assert "| fls | +50.0 [+30.0, +70.0]* | +0.0 [+0.0, +0.0] |" in paired
    by_pair = report.split(JOINT_HEADING)[1].split("## Cost")[0]
    assert "| pair | direct | fls | seeds |" in by_pair and "| p | 25 [" in by_pair and "| 20 |" in by_pair


def test_rows_without_joint_success_keep_the_old_columns(tmp_path):
    rows = {("p", "direct", 0): {k: v for k, v in _row("p", "direct", 0, 1).items() if k != "joint"}}
    report = write_report(tmp_path, rows, ["direct"], 1, []).read_text()
    assert "| method | Style Sim | CLIP Score | DINO Score | Subject IoU | Style Fid | images |" in report
    assert JOINT_HEADING not in report


# -- scale sweep ------------------------------------------------------------------------------------------
def test_scaled_pairs_name_each_scale_pair_and_share_the_unscaled_references():
    pair = Pair("dog_ink", Path("s.safetensors"), Path("t.safetensors"), "p", "sp", "tp")
    scaled = scaled_pairs([pair], [(1.0, 1.0), (1.0, 0.7), (0.5, 1.0)])
    assert [p.name for p in scaled] == ["dog_ink@1x1", "dog_ink@1x0.7", "dog_ink@0.5x1"]
    assert [(p.subject_scale, p.style_scale) for p in scaled] == [(1.0, 1.0), (1.0, 0.7), (0.5, 1.0)]
    assert {p.reference_name for p in scaled} == {"dog_ink"} and pair.subject_scale == pair.style_scale == 1.0


def test_eval_settings_refuse_malformed_scales(tmp_path):
    from fusion_engine.errors import OptionError
    from fusion_engine.eval import EvalSettings

    assert EvalSettings(out=tmp_path, scales=[[1, 0.5]]).scales == [(1.0, 0.5)]
    for bad in ([], [(1.0,)], [(1.0, -0.5)], [(1.0, float("nan"))], 3):
        with pytest.raises(OptionError, match="scale"):
            EvalSettings(out=tmp_path, scales=bad)


def test_eval_scales_sweeps_strengths_on_the_tiny_world(tmp_path, capsys):
    from PIL import Image

    from fusion_engine.cli import main

    out = tmp_path / "sweep"
    assert main(["eval", "--out", str(out), "--policies", "direct", "--seeds", "1", "--steps", "2",
                 "--default-pairs", "1", "--scales", "1:1,0:0", "--quiet"]) == 0
    full, off = (out / "images" / f"tiny0@{s}" / "direct" / "seed000.png" for s in ("1x1", "0x0"))
    with Image.open(full) as a, Image.open(off) as b:
        assert np.abs(np.asarray(a, float) - np.asarray(b, float)).max() > 0  # the strengths were applied
    report = (out / "report.md").read_text()
    assert "scale sweep (subject, style): 1x1, 0x0" in report and "images scored: 2 of 2 planned" in report
    assert [p.name for p in (out / "references").iterdir()] == ["tiny0"]  # one set of references for the sweep
    for bad in ("1", "1:x", "1:-1"):
        assert main(["eval", "--out", str(tmp_path / "bad"), "--scales", bad, "--quiet"]) == 2
        assert "--scales" in capsys.readouterr().err


# -- the second world -------------------------------------------------------------------------------------
def test_v2_split_holds_out_combinations_that_base_training_never_shows(monkeypatch):
    every = {(shape, style) for shape in v2.BASE_SHAPES for style in v2.BASE_STYLES}
    held, seen = set(v2.HELD_COMBOS), set(v2.SEEN_COMBOS)
    assert len(held) == 20 and held | seen == every and not held & seen
    for shape in v2.BASE_SHAPES:
        assert sum(s == shape for s, _ in seen) == 6
    for style in v2.BASE_STYLES:
        assert 7 <= sum(t == style for _, t in seen) <= 8
    rendered = []
    real_render = data.render
    monkeypatch.setattr(data, "render", lambda shape, look, rng: rendered.append((shape, look)) or real_render(
        shape, look, rng))
    images, captions = v2.base_dataset(per_combo=3)
    assert len(images) == len(captions) == 3 * len(seen) and set(rendered) == seen
    full = {tuple(c[2:-6].split(" in ")) for c in captions if " in " in c and not c.startswith("an image")}
    assert full <= seen and not full & held
    words = {word for c in captions for word in c.split()}
    assert words <= set(v2.VOCABULARY) and not words & {data.SUBJECT_SHAPE, data.SUBJECT_TOKEN, data.HELD_STYLE}


def test_v2_shapes_and_styles_are_told_apart_on_renders():
    rng = np.random.default_rng(11)
    for shape in v2.SHAPES:
        assert measures.recognised_as([data.render(shape, look, rng) for look in v2.LOOKS[::3]], shape,
                                      v2.SHAPES).all(), shape
    for style in v2.STYLES:
        assert measures.carries([data.render(shape, style, rng) for shape in v2.SHAPES[::3]], style,
                                v2.STYLES).all(), style


def test_v2_subject_images_are_the_first_worlds_mushrooms_on_grounds_of_their_own():
    """Run 3's subject data: each image is the first world's mushroom, pixel for pixel where the mushroom is, on a
    plain ground that keeps its margin from the subject's colours and zzt's; the grounds differ, light and dark."""
    images, captions = v2.subject_dataset()
    first, first_captions = data.subject_dataset()
    assert captions == first_captions == [data.SUBJECT_PROMPT] * 12
    pixels, before = [(x.permute(0, 2, 3, 1).numpy() + 1) / 2 for x in (images, first)]
    avoid = np.array([*data.SUBJECT_COLOURS.values(), *data.STYLES[data.HELD_STYLE][:3]])
    grounds = []
    for image, was in zip(pixels, before):
        mushroom = measures.foreground_mask(was)  # the first world's ground is black
        assert 0.1 < mushroom.mean() < 0.6
        np.testing.assert_array_equal(image[mushroom], was[mushroom])
        ground = image[~mushroom].mean(axis=0)  # the pixel noise averages out
        assert np.linalg.norm(avoid - ground, axis=1).min() >= v2.SUBJECT_GROUND_MARGIN - 0.02
        grounds.append(ground)
    grounds = np.array(grounds)
    assert len({tuple(g.round(2)) for g in grounds}) == 12
    assert grounds.mean(axis=1).max() > 0.5 and grounds.mean(axis=1).min() < 0.3
    assert measures.recognised_as(list(pixels), data.SUBJECT_SHAPE, v2.SHAPES).all()
    assert (v2.subject_dataset()[0] == images).all()  # seeded


def test_subject_grounds_keep_their_margin_and_only_the_subjects_look_takes_a_ground():
    rng = np.random.default_rng(0)
    avoid = np.array([*data.SUBJECT_COLOURS.values(), *data.STYLES[data.HELD_STYLE][:3]])
    grounds = np.array([v2.subject_ground(rng) for _ in range(500)])
    assert np.linalg.norm(grounds[:, None] - avoid[None], axis=-1).min() >= v2.SUBJECT_GROUND_MARGIN
    assert (grounds.min(axis=0) < 0.05).all() and (grounds.max(axis=0) > 0.95).all()  # the whole cube
    image = data.render("circle", data.SUBJECT_LOOK, ground=(0.2, 0.4, 0.6))
    assert np.allclose(image[0, 0], (0.2, 0.4, 0.6))
    np.testing.assert_array_equal(data.render("circle", data.SUBJECT_LOOK, ground=None),
                                  data.render("circle", data.SUBJECT_LOOK))
    with pytest.raises(OptionError, match="'stripes' style has its own ground"):
        data.render("circle", "stripes", ground=(0.2, 0.4, 0.6))


def test_second_world_judges_see_the_subjects_look_on_varied_grounds():
    from training.toy.train_judges import batch, world_tables

    _, shapes, looks, own_ground = world_tables("v2")
    assert world_tables("v1")[3] is None
    pixels, _, look = batch(np.random.default_rng(0), 256, shapes, looks, own_ground)
    corners = pixels[:, :, 0, 0]
    own, styled = corners[look == looks.index(data.SUBJECT_LOOK)], corners[look == looks.index("stripes")]
    assert len(own) > 5 and own.std(dim=0).min() > 0.15  # a ground of its own per image
    assert styled.std(dim=0).max() < 0.05  # a style's ground is the style's


def test_world_vocabulary_makes_every_word_one_token_and_a_small_table():
    configs = v2.base_configs()
    from fusion_engine.worlds.tokenizer import world_tokenizer

    tokenizer = world_tokenizer(configs["tokenizer"]["words"])
    assert configs["text_encoder"]["vocab_size"] == len(tokenizer) < 1000
    ids = tokenizer("a sks mushroom in zzt style").input_ids
    assert ids[0] == configs["text_encoder"]["bos_token_id"] and len(ids) == 8  # bos, six words, eos
    assert len(tokenizer.tokenize("a hexagon")) > 2  # an unknown word falls back to byte symbols
    from fusion_engine.errors import OptionError

    for bad in (["two words"], ["ok", ""], ["Caps"], []):
        with pytest.raises(OptionError, match="world vocabulary"):
            world_tokenizer(bad)


def test_gate_spec_is_fixed_and_names_every_gate():
    spec = json.loads((ROOT / "training" / "toy" / "gates_v2_spec.json").read_text())
    ids = [gate["id"] for gate in spec["gates"]]
    assert ids == ["subject_only_recognised", "style_only_carries_style", "base_recognised", "base_carries_style",
                   "judges_agree", "base_composition", "subject_composition", "fusion_reachable", "symmetric_loras"]
    needs = {gate["id"]: gate["need"] for gate in spec["gates"]}
    assert needs["base_composition"] == ">= 0.85 * R_joint, with R_joint > 0"
    assert needs["subject_composition"].startswith(">= 0.60 *")
    assert needs["fusion_reachable"].startswith(">= 0.30")


# -- the v2 gate script's logic (no sampling: the eval is replaced by rows written here) ----------------------
def _measure_gates_v2():
    import importlib
    import sys

    sys.path.insert(0, str(ROOT))  # training/ lives beside the package
    return importlib.import_module("training.toy.measure_gates_v2")


def test_fusion_gate_uses_the_grid_only_when_full_strength_fails_and_confirms_on_fresh_seeds(tmp_path, monkeypatch):
    import fusion_engine.eval as evaluation
    from fusion_engine.eval.report import append_row, shard_csv
    from fusion_engine.worlds.toy import world

    gates = _measure_gates_v2()
    calls = []

    def fake_run(settings):  # fls succeeds on even seeds at subject 1, style 0.5 only
        calls.append((tuple(settings.policies), tuple(settings.scales), settings.seeds))
        for a, b in settings.scales:
            for policy in settings.policies:
                for seed in range(settings.seeds):
                    joint = policy == "fls" and (a, b) == (1.0, 0.5) and seed % 2 == 0
                    append_row(shard_csv(settings.out, 0), _row(f"sks-mushroom_zzt@{a:g}x{b:g}", policy, seed, joint))
        return 0

    monkeypatch.setattr(evaluation, "run", fake_run)
    for name, value in (("load_judges", lambda folder: (None, None)), ("build_toy_pipeline", lambda folder: None),
                        ("world_scores", lambda folder: None), ("write_toy_pairs", lambda folder, weights: folder)):
        monkeypatch.setattr(world, name, value)
    result = gates.fusion_reachable(tmp_path, seeds=10, steps=2)
    assert calls[0] == (gates.POLICIES, ((1.0, 1.0),), 10) and len(calls[1][1]) == 5 and calls[2] == (
        ("fls",), ((1.0, 0.5),), 20)
    best = result["value"]["best"]
    assert result["grid_used"] and result["pass"] and best["policy"] == "fls"
    assert best["pair"] == "sks-mushroom_zzt@1x0.5" and best["joint"][0] == 0.5
    assert best["confirmed_on_fresh_seeds"][0] == 0.5  # seeds 10-19


def test_composition_and_symmetry_gates_read_the_earlier_steps(tmp_path):
    gates = _measure_gates_v2()
    rates = {"shape_decision": [0.4, 0.3, 0.5], "style_decision": [0.5, 0.4, 0.6], "joint_decision": [0.2, 0.1, 0.3]}
    (tmp_path / "calibration_seen.json").write_text(json.dumps({"rates": rates}))
    held = {**rates, "joint_decision": [0.16, 0.1, 0.2]}  # 0.16 < 0.85 x 0.2 = 0.17
    (tmp_path / "calibration_held.json").write_text(json.dumps({"rates": held}))
    assert not gates.base_composition(tmp_path)["pass"]
    held["joint_decision"] = [0.18, 0.1, 0.25]
    (tmp_path / "calibration_held.json").write_text(json.dumps({"rates": held}))
    assert gates.base_composition(tmp_path)["pass"]
    recipe = {"rank": 32, "alpha": [16.0], "targets": "attention+ff", "steps": 2400, "lr": 0.003, "cosine": True,
              "ema": 0.999, "batch": 8, "prior_share": 0.25}
    for role, steps in (("subject", 2400), ("style", 4800)):
        (tmp_path / f"times_{role}.json").write_text(json.dumps({**recipe, "steps": steps}))
    symmetric = gates.symmetric_loras(tmp_path)
    assert not symmetric["pass"] and symmetric["differ"] == ["steps"]


def test_world_measures_follow_the_weights_folder(tmp_path):
    from fusion_engine.worlds.toy.world import world_measures, world_scores

    assert world_measures(tmp_path) is measures  # no base_config.json: the first world
    (tmp_path / "base_config.json").write_text(json.dumps({"world": "v2"}))
    assert world_measures(tmp_path) is v2 and world_scores(tmp_path) is v2.transparent_scores
    # the second world's decisions: a mushroom in a new style is the subject, a star in zzt carries the style only
    mushroom, star = [data.render(data.SUBJECT_SHAPE, "grid")], [data.render("star", "zzt")]
    assert v2.recognised_as_subject(mushroom).all() and not v2.carries_style(mushroom).any()
    assert not v2.recognised_as_subject(star).any() and v2.carries_style(star).all()
