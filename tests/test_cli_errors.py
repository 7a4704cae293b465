"""fusion-engine generate/eval: every user mistake is one `fusion-engine: error: ...` line and exit code 2."""
import json

import pytest

import fusion_engine as fe
from fusion_engine.cli import main


@pytest.fixture(scope="module")
def folder(pipeline_folder):
    return pipeline_folder


def _generate(folder, *extra, out=None):
    return ["generate", "--model", str(folder / "model"), "--subject", str(folder / "subject.safetensors"),
            "--style", str(folder / "style.safetensors"), "--prompt", "a sbu dog", "--steps", "1",
            "--device", "cpu", "--dtype", "float32", "--quiet", "--out", str(out or folder / "out"), *extra]


def _one_error_line(capsys, argv, *fragments):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fusion-engine: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(("extra", "fragments"), [
    (["--steps", "0"], ["--steps", "0 is not >= 1"]),
    (["--steps", "two"], ["--steps", "'two' is not an integer"]),
    (["--guidance", "-3"], ["--guidance", "-3 is not >= 0"]),
    (["--guidance", "nan"], ["--guidance", "not a finite number"]),
    (["--guidance", "1e20"], ["--guidance", "1e+20 is above 50"]),
    (["--height", "60"], ["--height", "60 is not a positive multiple of 8"]),
    (["--width", "7"], ["--width", "multiple of 8"]),
    (["--num-images", "0"], ["--num-images", "not >= 1"]),
    (["--subject-scale", "inf"], ["--subject-scale", "not a finite number"]),
    (["--policy", "direct", "--weights", "1"], ["--weights", "two numbers"]),
    (["--policy", "direct", "--weights", "1,nan"], ["--weights", "not a finite number"]),
    (["--policy", "switch", "--tau", "0"], ["--tau", "not >= 1"]),
    (["--policy", "blora", "--blocks", "subject"], ["--blocks", "ROLE=block"]),
    (["--policy", "blora", "--blocks", "content=up_blocks.0"], ["--blocks", "roles must be subject and/or style"]),
    (["--policy", "blora", "--blocks", "{bad json"], ["--blocks", "not valid JSON"]),
    (["--tau", "3"], ["--tau is an option of --policy switch, not of --policy fls"]),
    (["--policy", "nope"], ["--policy", "invalid choice"]),
    (["--device", "cuda:7"], ["--device cuda:7"]),
    (["--device", "toaster"], ["--device 'toaster': not a device name"]),
    (["--scheduler", "NoSuchScheduler"], ["--scheduler NoSuchScheduler", "compatible:", "DDIMScheduler"]),
    (["--clip", "ViT-B-32"], ["--clip is an option of --llr"]),
    (["--llr"], ["--llr needs --clip, --dino, --subject-prompt, --style-prompt"]),
])
def test_generate_flag_mistakes(folder, capsys, extra, fragments):
    _one_error_line(capsys, _generate(folder, *extra), *fragments)


def test_generate_needs_a_lora_and_a_free_output_folder(folder, capsys, tmp_path):
    argv = [a for a in _generate(folder) if a not in ("--subject", "--style") and not a.endswith(".safetensors")]
    _one_error_line(capsys, argv, "give --subject, --style or both")
    (tmp_path / "taken.png").write_bytes(b"x")
    _one_error_line(capsys, _generate(folder, out=tmp_path / "taken.png"), "taken.png: is a file; give a folder")
    _one_error_line(capsys, ["generate", "--prompt", "x", "--out", str(tmp_path)], "required", "--model")
    _one_error_line(capsys, ["nope"], "invalid choice")


def test_generate_triton_on_cpu_without_the_interpreter(folder, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _one_error_line(capsys, _generate(folder, "--backend", "triton"), "--backend triton needs a CUDA device",
                    "--backend reference")


def test_generate_cuda_without_a_gpu(folder, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _one_error_line(capsys, _generate(folder, "--device", "cuda"), "--device cuda: CUDA is not available here")


def test_generate_bad_files_and_folders(folder, capsys, tmp_path, monkeypatch):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 10)
    argv = _generate(folder)
    argv[argv.index("--style") + 1] = str(broken)
    _one_error_line(capsys, argv, "broken.safetensors")
    argv[argv.index("--style") + 1] = str(tmp_path / "missing.safetensors")
    _one_error_line(capsys, argv, "missing.safetensors")
    # a transformer pipeline of a family not driven (FLUX and SD3 are): named as such
    pixart = tmp_path / "pixart"
    pixart.mkdir()
    (pixart / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline",
                                                         "transformer": ["x", "y"]}))
    argv = _generate(folder)
    argv[argv.index("--model") + 1] = str(pixart)
    _one_error_line(capsys, argv, "PixArtSigmaPipeline", "transformer", "FLUX and SD3")
    # a mistyped relative path is a missing folder, never a Hub id
    monkeypatch.chdir(folder)
    for typo, hint in (("./modle", "no such folder"), ("model/sd15", "model exists, but not sd15 in it")):
        argv[argv.index("--model") + 1] = typo
        line = _one_error_line(capsys, argv, typo, hint)
        assert "Hub" not in line
    argv[argv.index("--model") + 1] = "runwayml/sd15"
    _one_error_line(capsys, argv, "Hugging Face Hub id", "huggingface-cli download")


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"fusion-engine {fe.__version__}"


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--seeds", "-3"], "--seeds: -3 is not >= 1"),
    (["--seeds", "0"], "--seeds: 0 is not >= 1"),
    (["--height", "7"], "--height: 7 is not a positive multiple of 8"),
    (["--steps", "0"], "--steps: 0 is not >= 1"),
    (["--guidance", "inf"], "--guidance: 'inf' is not a finite number"),
    (["--guidance", "51"], "--guidance: 51 is above 50"),
    (["--resume-anyway", "--restart"], "not allowed with argument"),
])
def test_eval_flag_mistakes(tmp_path, capsys, extra, fragment):
    _one_error_line(capsys, ["eval", "--out", str(tmp_path), *extra], fragment)
    assert not any(tmp_path.iterdir())  # refused before anything was written
