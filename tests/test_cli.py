"""The command line: demo writes its files, inspect describes a file, generate runs from a local folder."""
import json

import pytest
from PIL import Image

import fusion_engine as fe
from fusion_engine.cli.main import GRID_POLICIES, main


def test_demo_writes_grid_heatmap_and_trace(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "2", "--images", "2", "--quiet", "--world", "random"]) == 0
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size[1] >= len(GRID_POLICIES) * 128
    assert (tmp_path / "heatmap.png").stat().st_size > 0
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert trace["policy"] == "fls[kl]" and trace["steps"] == [0, 1]
    assert sorted(p.name for p in (tmp_path / "loras").iterdir()) == [
        "style_szn_kohya.safetensors", "subject_sbu_dog.safetensors"]
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_inspect_prints_format_rank_alpha_targets(tmp_path, loras, capsys, layout):
    path = fe.save_lora(loras[1], tmp_path / "style.safetensors", layout=layout)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"format:  {layout}" in out
    assert "rank:    8" in out and "alpha:   4" in out and "scale:   0.5" in out
    assert "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v  rank=8 alpha=4" in out
    assert "mid_block" not in out


def test_inspect_bad_file_is_a_clean_error(tmp_path, capsys):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 10)
    assert main(["inspect", str(bad)]) == 2
    assert "broken.safetensors" in capsys.readouterr().err


def test_generate_from_a_local_pipeline_folder(tmp_path, tiny_pipe, loras):
    tiny_pipe.save_pretrained(tmp_path / "model")
    subject = fe.save_lora(loras[0], tmp_path / "subject.safetensors")
    style = fe.save_lora(loras[1], tmp_path / "style.safetensors", layout="kohya")
    args = ["generate", "--model", str(tmp_path / "model"), "--subject", str(subject), "--style", str(style),
            "--prompt", "a sbu dog in szn style", "--steps", "2", "--num-images", "2", "--out", str(tmp_path / "out"),
            "--device", "cpu", "--dtype", "float32"]
    assert main(args) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "00001_0_0.json", "00001_0_0.png", "00001_0_1.json", "00001_0_1.png", "00001_heatmap.png", "00001_trace.json"]
