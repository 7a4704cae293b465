"""fusion-engine generate: unique names per run, the generation parameters in each PNG and its sidecar, every
policy's flags reaching the policy, one LoRA alone, another scheduler, and LLR."""
import json

import pytest
from PIL import Image

import fusion_engine as fe
from fusion_engine.cli import main
from fusion_engine.cli.image_files import a1111_parameters, read_parameters


@pytest.fixture(scope="module")
def folder(pipeline_folder):
    return pipeline_folder


def _argv(folder, out, *extra, loras=("subject", "style")):
    files = [a for role in loras for a in (f"--{role}", str(folder / f"{role}.safetensors"))]
    return ["generate", "--model", str(folder / "model"), *files, "--prompt", "a sbu dog, in szn style",
            "--steps", "2", "--device", "cpu", "--dtype", "float32", "--quiet", "--out", str(out), *extra]


def _pngs(out):
    return sorted(p.name for p in out.glob("*.png") if "heatmap" not in p.name)


def test_png_metadata_round_trip(folder, tmp_path):
    out = tmp_path / "out"
    assert main(_argv(folder, out, "--negative-prompt", "blurry", "--seed", "7", "--num-images", "2",
                      "--guidance", "4.5", "--height", "40", "--width", "48", "--subject-scale", "0.8")) == 0
    assert _pngs(out) == ["00001_7_0.png", "00001_7_1.png"]
    info = read_parameters(out / "00001_7_1.png")
    assert info == json.loads((out / "00001_7_1.json").read_text())
    expected = {
        "prompt": "a sbu dog, in szn style", "negative_prompt": "blurry", "seed": 7, "index": 1, "num_images": 2,
        "run": 1, "steps": 2, "guidance": 4.5, "height": 40, "width": 48, "policy": "fls",
        "model": str((folder / "model").resolve()), "scheduler": "EulerDiscreteScheduler", "dtype": "float32",
        "subject": {"file": str((folder / "subject.safetensors").resolve()), "scale": 0.8},
        "style": {"file": str((folder / "style.safetensors").resolve()), "scale": 1.0},
        "options": {"divergence": "kl", "granularity": "image", "backend": "auto"}, "llr": None,
        "version": fe.__version__,
    }
    assert {k: info[k] for k in expected} == expected
    with Image.open(out / "00001_7_1.png") as image:
        assert image.size == (48, 40)
        parameters = image.text["parameters"]
    assert parameters == a1111_parameters(info)
    first, negative, fields = parameters.split("\n")
    assert first == "a sbu dog, in szn style" and negative == "Negative prompt: blurry"
    for field in ("Steps: 2", "Sampler: EulerDiscreteScheduler", "CFG scale: 4.5", "Seed: 7", "Batch index: 1",
                  "Size: 48x40", '"subject: subject.safetensors (0.8), style: style.safetensors (1)"', "Fusion: fls"):
        assert field in fields, fields
    trace = json.loads((out / "00001_trace.json").read_text())
    assert trace["steps"] == [0, 1]


def test_no_overwrite_across_runs(folder, tmp_path):
    out = tmp_path / "out"
    assert main(_argv(folder, out)) == 0
    first = (out / "00001_0_0.png").read_bytes()
    (out / "notes.txt").write_text("mine")  # foreign files are left alone
    assert main(_argv(folder, out, "--seed", "3")) == 0
    assert main(_argv(folder, out)) == 0
    assert _pngs(out) == ["00001_0_0.png", "00002_3_0.png", "00003_0_0.png"]
    assert (out / "00001_0_0.png").read_bytes() == first
    with Image.open(out / "00001_0_0.png") as one, Image.open(out / "00003_0_0.png") as three:
        assert one.tobytes() == three.tobytes()  # same settings, same pixels, under its own name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no scratch files left behind


def test_one_lora_and_policy_flags(folder, tmp_path):
    out = tmp_path / "out"
    assert main(_argv(folder, out, loras=("style",))) == 0
    assert read_parameters(out / "00001_0_0.png")["subject"] is None
    blocks = "subject=up_blocks.0.attentions.0;style=up_blocks.0.attentions.1"
    for extra in (["--policy", "blora", "--blocks", blocks], ["--policy", "direct", "--weights", "1,0.5"],
                  ["--policy", "switch", "--tau", "1"], ["--scheduler", "DDIMScheduler"]):
        assert main(_argv(folder, out, *extra)) == 0
    infos = [read_parameters(out / f"{run:05d}_0_0.png") for run in (2, 3, 4, 5)]
    assert infos[0]["options"]["blocks"] == {"subject": ["up_blocks.0.attentions.0"],
                                             "style": ["up_blocks.0.attentions.1"]}
    assert infos[1]["options"]["weights"] == [1.0, 0.5]
    assert infos[2]["options"]["tau"] == 1
    assert infos[3]["scheduler"] == "DDIMScheduler"
    # the policies really got their options: blora's trace names its blocks, switch's turn comes every step
    assert "up_blocks.0.attentions.1" in json.loads((out / "00002_trace.json").read_text())["policy"]
    assert json.loads((out / "00004_trace.json").read_text())["policy"] == "switch[tau=1]"


def test_blora_blocks_that_match_nothing_is_a_clean_error(folder, tmp_path, capsys):
    assert main(_argv(folder, tmp_path / "out", "--policy", "blora", "--blocks", "subject=nowhere")) == 2
    err = capsys.readouterr().err
    assert err.startswith("fusion-engine: error: blora: no fused layer") and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_llr_from_the_command_line(folder, tmp_path, monkeypatch):
    """--llr loads the encoders named by the flags (tiny random ones stand in here) and refines."""
    from fusion_engine.scoring import encoders

    asked, clip, dino = [], encoders.tiny_openclip(0), encoders.tiny_dino(1)
    monkeypatch.setattr(encoders, "load_openclip", lambda *a, **k: asked.append(("clip", a)) or clip)
    monkeypatch.setattr(encoders, "load_dino", lambda *a, **k: asked.append(("dino", a)) or dino)
    out = tmp_path / "out"
    checkpoint = tmp_path / "clip.safetensors"
    checkpoint.write_bytes(b"x")
    assert main(_argv(folder, out, "--llr", "--clip", "ViT-B-32", "--clip-checkpoint", str(checkpoint), "--dino",
                      "vit_small_patch16_224.dino", "--m", "2", "--subject-prompt", "a sbu dog",
                      "--style-prompt", "a painting in szn style")) == 0
    assert asked == [("clip", ("ViT-B-32", str(checkpoint))), ("dino", ("vit_small_patch16_224.dino", None))]
    llr = read_parameters(out / "00001_0_0.png")["llr"]
    assert llr["m"] == 2.0 and llr["subject_prompt"] == "a sbu dog"
