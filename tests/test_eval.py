"""fusion-engine eval on the tiny default: end to end, resumable, and sharded across 2 processes."""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fusion_engine.cli import main
from fusion_engine.errors import OptionError
from fusion_engine.eval import EvalSettings, parse_policy, run, shard_from_env
from fusion_engine.eval.report import SCORES_HEADING

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--policies", "direct,fls+llr", "--seeds", "1", "--steps", "2", "--default-pairs", "2", "--quiet"]
SCORE_COLUMNS = ("pair", "policy", "seed", "style_sim", "clip_score", "dino_score", "image")


def _rows(out):
    rows = []
    for path in sorted((out / "scores").glob("*.csv")):
        with path.open(newline="") as handle:
            rows += [tuple(row[c] for c in SCORE_COLUMNS) for row in csv.DictReader(handle)]
    return sorted(rows)


def _scores_section(out):
    text = (out / "report.md").read_text()
    return text[text.index(SCORES_HEADING):text.index("## Cost")]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_single")
    assert main(["eval", "--out", str(out), *ARGS]) == 0
    return out


def test_eval_writes_images_scores_and_report(single_run):
    out = single_run
    images = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png"))
    assert images == [f"images/tiny{i}/{policy}/seed000.png" for i in (0, 1) for policy in ("direct", "fls+llr")]
    with Image.open(out / images[0]) as image:
        assert image.size == (32, 32)
    rows = _rows(out)
    assert len(rows) == 4 and all(-1 <= float(r[3]) <= 1 for r in rows)
    report = (out / "report.md").read_text()
    assert "| method | Style Sim | CLIP Score | DINO Score | images |" in report
    for policy in ("direct", "fls+llr"):
        assert f"\n| {policy} | " in _scores_section(out)
        assert f"\n| {policy} | " in report[report.index("## Cost"):]
    assert "images scored: 4 of 4 planned" in report
    assert sorted(p.name for p in (out / "references" / "tiny0").iterdir()) == ["seed000_style.png",
                                                                               "seed000_subject.png"]


def test_rerun_skips_finished_images_and_finishes_missing_ones(single_run, tmp_path, capsys):
    out = tmp_path / "resume"
    shutil.copytree(single_run, out)
    before = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    assert main(["eval", "--out", str(out), *ARGS]) == 0
    assert "made 0 image(s); 4 were already done" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == before
    # drop one finished row (as if the process died before writing it): only that image is made again
    csv_path = out / "scores" / "scores.rank0.csv"
    lines = csv_path.read_text().splitlines(keepends=True)
    csv_path.write_text("".join(lines[:-1]))
    assert main(["eval", "--out", str(out), *ARGS]) == 0
    assert "made 1 image(s); 3 were already done" in capsys.readouterr().out
    assert len(_rows(out)) == 4


def test_two_process_sharded_run_gives_the_same_table(single_run, tmp_path):
    out = tmp_path / "sharded"
    command = [sys.executable, "-m", "fusion_engine.cli", "eval", "--out", str(out), *ARGS, "--wait-timeout", "240"]
    # the shards use the thread count of the single run: float sums differ between thread counts
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads()), "WORLD_SIZE": "2",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    processes = [subprocess.Popen(command, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert "[rank 0/2] made 2 image(s)" in outputs[0] and "[rank 1/2] made 2 image(s)" in outputs[1]
    assert sorted(p.name for p in (out / "scores").iterdir()) == ["scores.rank0.csv", "scores.rank1.csv"]
    assert _rows(out) == _rows(single_run)
    assert _scores_section(out) == _scores_section(single_run)


def test_report_only_and_missing_items(single_run, tmp_path, capsys):
    out = tmp_path / "partial"
    (out / "scores").mkdir(parents=True)
    lines = (single_run / "scores" / "scores.rank0.csv").read_text().splitlines(keepends=True)
    (out / "scores" / "scores.rank0.csv").write_text("".join(lines[:3]))  # header + 2 of 4 rows
    pairs = single_run / "default_pairs" / "pairs.toml"
    assert main(["eval", "--out", str(out), "--pairs", str(pairs), *ARGS, "--report-only"]) == 1
    assert "2 planned image(s) missing" in capsys.readouterr().out
    assert "images scored: 2 of 4 planned (**2 missing**)" in (out / "report.md").read_text()


def test_pairs_with_user_reference_images(single_run, tmp_path):
    folder = single_run / "default_pairs"
    for name in ("dog.png", "style.png"):
        Image.new("RGB", (48, 40), (200, 30, 30) if name == "dog.png" else (20, 20, 220)).save(tmp_path / name)
    (tmp_path / "pairs.toml").write_text(
        f'[[pair]]\nname = "given"\nsubject = "{folder / "subject_0.safetensors"}"\n'
        f'style = "{folder / "style_0.safetensors"}"\nprompt = "a sbu dog in szn style"\n'
        'subject_prompt = "a photo of sbu dog"\nstyle_prompt = "a painting in szn style"\n'
        'subject_image = "dog.png"\nstyle_image = "style.png"\n')
    out = tmp_path / "out"
    assert main(["eval", "--out", str(out), "--pairs", str(tmp_path / "pairs.toml"), "--policies", "fls+llr",
                 "--seeds", "1", "--steps", "2", "--quiet"]) == 0
    assert not (out / "references").exists()  # the given images were used, nothing generated
    assert len(_rows(out)) == 1


def test_bad_inputs_are_clean_errors(tmp_path, capsys):
    (tmp_path / "pairs.toml").write_text('[[pair]]\nname = "x"\n')
    assert main(["eval", "--out", str(tmp_path / "o"), "--pairs", str(tmp_path / "pairs.toml")]) == 2
    assert "lacks" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown eval policy"):
        parse_policy("nope+llr")
    assert parse_policy("klora+llr") == ("klora", True)
    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    assert shard_from_env({}) == (0, 1)
    with pytest.raises(ValueError, match="outside"):
        shard_from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_run_from_python_with_settings(single_run, tmp_path, capsys):
    """``run(EvalSettings(...))`` without the CLI: keyword-only settings, a clear error when the model or the
    pairs are not given, and a report rebuilt from existing rows with no model at all."""
    with pytest.raises(TypeError):
        EvalSettings(tmp_path)  # keyword-only
    with pytest.raises(OptionError, match="pairs="):
        run(EvalSettings(out=tmp_path / "no_pairs"))
    with pytest.raises(OptionError, match="model="):
        run(EvalSettings(out=tmp_path / "no_model", pairs=single_run / "default_pairs" / "pairs.toml"))
    out = tmp_path / "report_only"
    shutil.copytree(single_run / "scores", out / "scores")
    settings = EvalSettings(out=out, pairs=single_run / "default_pairs" / "pairs.toml", report_only=True,
                            policies=["direct", "fls+llr"], seeds=1, steps=2)
    assert run(settings) == 0
    assert "images scored: 4 of 4 planned" in (out / "report.md").read_text()
    assert _scores_section(out) == _scores_section(single_run)
