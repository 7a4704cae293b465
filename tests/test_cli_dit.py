"""fusion-engine generate and eval on a tiny FLUX folder (save_pretrained of a tiny random FluxPipeline)."""
import csv
import re

import pytest
import torch
from PIL import Image

from fusion_engine.cli import main
from fusion_engine.cli.image_files import read_parameters
from fusion_engine.lora import load_lora, save_lora
from fusion_engine.worlds.dit import build_tiny_flux, dit_loras

SIZE = ["--height", "32", "--width", "32"]


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    """``model/`` (a FluxPipeline folder), ``subject.safetensors`` and ``style.safetensors`` (PEFT layout, keys
    ``transformer.<module name>``; the loader reads them back as a FLUX.1 LoRA's transformer part)."""
    root = tmp_path_factory.mktemp("flux_folder")
    pipe = build_tiny_flux(0)
    pipe.save_pretrained(root / "model")
    for role, lora in zip(("subject", "style"), dit_loras(pipe.transformer, 0)):
        path = save_lora(lora, root / f"{role}.safetensors", layout="peft")
        back = load_lora(path)
        assert back.component == "transformer" and back.family == "flux"
        assert back.layers.keys() == lora.layers.keys()
        for name, layer in lora.layers.items():
            assert torch.equal(back.layers[name].lora_a, layer.lora_a)
            assert torch.equal(back.layers[name].lora_b, layer.lora_b)
            assert back.layer_scale(name) == lora.layer_scale(name)
    return root


def test_generate_runs_a_flux_folder(flux_folder, tmp_path):
    out = tmp_path / "out"
    argv = ["generate", "--model", str(flux_folder / "model"), "--subject", str(flux_folder / "subject.safetensors"),
            "--style", str(flux_folder / "style.safetensors"), "--prompt", "a sbu dog in szn style", "--steps", "2",
            "--guidance", "3.5", "--seed", "4", "--device", "cpu", "--dtype", "float32", "--quiet", "--out", str(out),
            *SIZE]
    assert main(argv) == 0
    info = read_parameters(out / "00001_4_0.png")
    assert info["scheduler"] == "FlowMatchEulerDiscreteScheduler" and info["policy"] == "fls"
    with Image.open(out / "00001_4_0.png") as image:
        assert image.size == (32, 32)
    assert (out / "00001_trace.json").is_file() and (out / "00001_heatmap.png").is_file()


def test_eval_runs_flux_pairs(flux_folder, tmp_path):
    (tmp_path / "pairs.toml").write_text(
        f'[[pair]]\nname = "flux"\nsubject = "{flux_folder / "subject.safetensors"}"\n'
        f'style = "{flux_folder / "style.safetensors"}"\nprompt = "a sbu dog in szn style"\n'
        'subject_prompt = "a photo of sbu dog"\nstyle_prompt = "a painting in szn style"\n')
    out = tmp_path / "out"
    assert main(["eval", "--out", str(out), "--pairs", str(tmp_path / "pairs.toml"), "--model",
                 str(flux_folder / "model"), "--policies", "direct,fls,fls+llr", "--seeds", "1", "--steps", "2",
                 "--device", "cpu", "--dtype", "float32", "--quiet", *SIZE]) == 0
    with (out / "scores" / "scores.rank0.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["policy"] for row in rows) == ["direct", "fls", "fls+llr"]
    assert all(0 < float(row["style_sim"]) <= 100 for row in rows)
    assert "fls+llr" in (out / "report.md").read_text()


def _flux_generate(flux_folder, out, *extra):
    return ["generate", "--model", str(flux_folder / "model"), "--subject", str(flux_folder / "subject.safetensors"),
            "--style", str(flux_folder / "style.safetensors"), "--prompt", "a sbu dog in szn style", "--steps", "2",
            "--seed", "4", "--device", "cpu", "--dtype", "float32", "--quiet", "--out", str(out), *SIZE, *extra]


def _pixels(path):
    with Image.open(path) as image:
        return torch.tensor(list(image.getdata()), dtype=torch.float32)


def test_generate_true_cfg_on_flux_runs_and_changes_the_image(flux_folder, tmp_path):
    plain, true_cfg = tmp_path / "plain", tmp_path / "true_cfg"
    assert main(_flux_generate(flux_folder, plain)) == 0
    assert main(_flux_generate(flux_folder, true_cfg, "--true-cfg", "4", "--negative-prompt", "blurry")) == 0
    info = read_parameters(true_cfg / "00001_4_0.png")
    assert info["true_cfg"] == 4.0 and info["negative_prompt"] == "blurry"
    assert read_parameters(plain / "00001_4_0.png")["true_cfg"] is None
    assert not torch.equal(_pixels(plain / "00001_4_0.png"), _pixels(true_cfg / "00001_4_0.png"))
    assert (true_cfg / "00001_trace.json").is_file()  # tests/test_dit_pipeline.py: one decision per image


def test_generate_guidance_defaults_per_family(flux_folder, pipeline_folder, tmp_path):
    """FLUX: FluxPipeline's own 3.5 (the distilled guidance embedding); SD: 5, as before."""
    assert main(_flux_generate(flux_folder, tmp_path / "flux", "--steps", "1")) == 0
    assert read_parameters(tmp_path / "flux" / "00001_4_0.png")["guidance"] == 3.5
    sd = ["generate", "--model", str(pipeline_folder / "model"), "--subject",
          str(pipeline_folder / "subject.safetensors"), "--prompt", "a dog", "--steps", "1", "--seed", "4",
          "--device", "cpu", "--quiet", "--out", str(tmp_path / "sd")]
    assert main(sd) == 0
    assert read_parameters(tmp_path / "sd" / "00001_4_0.png")["guidance"] == 5.0


@pytest.mark.parametrize(("extra", "message"), [
    (["--negative-prompt", "blurry"], "--negative-prompt on a FLUX pipeline: .* add --true-cfg"),
    (["--true-cfg", "4"], "--true-cfg on a FLUX pipeline .* add --negative-prompt"),
    (["--true-cfg", "1", "--negative-prompt", "blurry"], "--true-cfg: 1 is not > 1"),
])
def test_generate_refuses_flux_true_cfg_flags_alone(flux_folder, tmp_path, capsys, extra, message):
    assert main(_flux_generate(flux_folder, tmp_path / "out", *extra)) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_generate_refuses_true_cfg_on_a_unet_folder(pipeline_folder, tmp_path, capsys):
    argv = ["generate", "--model", str(pipeline_folder / "model"), "--subject",
            str(pipeline_folder / "subject.safetensors"), "--prompt", "a dog", "--negative-prompt", "blurry",
            "--true-cfg", "4", "--steps", "1", "--device", "cpu", "--quiet", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--true-cfg is FLUX's true CFG" in err and "StableDiffusionPipeline" in err
