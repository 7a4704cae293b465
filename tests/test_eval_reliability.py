"""eval under crashes and reruns: torn CSV headers and rows are skipped, reported and made again; a rerun with
other settings refuses (or resumes / restarts when told); pairs.toml values of the wrong type name file, pair
and key."""
import json
import shutil

import pytest

from fusion_engine.cli import main
from fusion_engine.errors import OptionError
from fusion_engine.eval import EvalSettings, load_pairs
from fusion_engine.eval.report import COLUMNS, append_row, read_rows

ARGS = ["--policies", "direct", "--seeds", "2", "--steps", "1", "--default-pairs", "1", "--quiet"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_finished")
    assert main(["eval", "--out", str(out), *ARGS]) == 0
    return out


def _keys(out):
    return sorted(read_rows(out))


def test_torn_row_and_torn_header_are_skipped_reported_and_made_again(finished, tmp_path, capsys):
    out = tmp_path / "torn_row"
    shutil.copytree(finished, out)
    csv_path = out / "scores" / "scores.rank0.csv"
    whole = csv_path.read_bytes()
    lines = whole.splitlines(keepends=True)
    assert len(lines) == 3  # header + 2 rows
    csv_path.write_bytes(b"".join(lines[:2]) + lines[2][:17])  # a crash inside the last row
    problems = []
    assert len(read_rows(out, problems)) == 1
    assert problems == [f"{csv_path}: 1 torn line(s) skipped (their images are made again by a rerun)"]
    capsys.readouterr()
    assert main(["eval", "--out", str(out), *ARGS]) == 0
    captured = capsys.readouterr()
    assert "made 1 image(s); 1 were already done" in captured.out
    assert "torn line(s) skipped" in captured.err
    assert _keys(out) == _keys(finished)
    text = csv_path.read_text()
    assert text.startswith(lines[0].decode()) and lines[2][:17].decode() + "\n" in text  # the new row: own line
    report = (out / "report.md").read_text()
    assert "images scored: 2 of 2 planned" in report and "torn line(s) skipped" in report

    out = tmp_path / "torn_header"
    shutil.copytree(finished, out)
    csv_path = out / "scores" / "scores.rank0.csv"
    csv_path.write_bytes(whole[:11])  # a crash inside the header: no row follows it
    problems = []
    assert read_rows(out, problems) == {} and "torn header" in problems[0]
    assert main(["eval", "--out", str(out), *ARGS]) == 0
    assert "made 2 image(s); 0 were already done" in capsys.readouterr().out
    assert _keys(out) == _keys(finished)
    assert (out / "scores" / "scores.rank0.csv.torn").read_bytes() == whole[:11]  # kept aside, not glued onto
    assert "images scored: 2 of 2 planned" in (out / "report.md").read_text()


def test_append_row_writes_whole_lines(tmp_path):
    path = tmp_path / "scores" / "scores.rank0.csv"
    row = {c: "1" for c in COLUMNS} | {"pair": "p", "policy": "direct", "image": "images/x.png"}
    append_row(path, row)
    path.write_bytes(path.read_bytes() + b"p,fls,0,0.1")  # another writer died mid-row
    append_row(path, {**row, "seed": "2"})
    lines = path.read_text().split("\n")
    assert lines[0] == ",".join(COLUMNS) and lines[2] == "p,fls,0,0.1" and lines[3].startswith("p,direct,2,")
    assert sorted(read_rows(tmp_path)) == [("p", "direct", 1), ("p", "direct", 2)]


def test_rerun_with_other_settings_refuses_resumes_or_restarts(finished, tmp_path, capsys):
    out = tmp_path / "rerun"
    shutil.copytree(finished, out)
    recorded = json.loads((out / "settings.json").read_text())
    assert recorded["steps"] == 1 and recorded["guidance"] == 5.0 and recorded["model"] == "tiny random default world"
    before = (out / "scores" / "scores.rank0.csv").read_bytes()
    changed = [a if a != "1" or i != ARGS.index("--steps") + 1 else "2" for i, a in enumerate(ARGS)]
    assert main(["eval", "--out", str(out), *changed, "--guidance", "3", "--m", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    for fragment in ("holds results made with other settings", "steps: 1 -> 2", "guidance: 5.0 -> 3.0",
                     "m: 10.0 -> 4.0", "--resume-anyway", "--restart"):
        assert fragment in err, err
    assert (out / "scores" / "scores.rank0.csv").read_bytes() == before  # nothing touched
    # resume anyway: old rows kept, the report says the settings differ
    assert main(["eval", "--out", str(out), *changed, "--resume-anyway"]) == 0
    assert "made 0 image(s)" in capsys.readouterr().out
    assert "resumed with settings that differ" in (out / "report.md").read_text()
    assert json.loads((out / "settings.json").read_text())["steps"] == 1  # the rows' settings stay recorded
    # restart: old results moved aside, everything made again under the new settings
    assert main(["eval", "--out", str(out), *changed, "--restart"]) == 0
    assert "made 2 image(s); 0 were already done" in capsys.readouterr().out
    assert json.loads((out / "settings.json").read_text())["steps"] == 2
    (aside,) = (out / "superseded").iterdir()
    assert (aside / "scores" / "scores.rank0.csv").read_bytes() == before
    # more seeds or policies extend the same table: no refusal
    assert main(["eval", "--out", str(out), *changed, "--seeds", "3"]) == 0
    assert "made 1 image(s); 2 were already done" in capsys.readouterr().out


def test_changed_lora_file_is_a_differing_setting(finished, tmp_path, capsys):
    out = tmp_path / "lora"
    shutil.copytree(finished, out)
    pairs = out / "default_pairs" / "pairs.toml"
    settings = ["--pairs", str(pairs), *ARGS]
    assert main(["eval", "--out", str(out), *settings]) == 0  # same files, same content
    subject = next((out / "default_pairs").glob("subject_*.safetensors"))
    style = next((out / "default_pairs").glob("style_*.safetensors"))
    shutil.copy(style, subject)
    capsys.readouterr()
    assert main(["eval", "--out", str(out), *settings]) == 2
    err = capsys.readouterr().err
    assert f"pair tiny0 subject: '{subject.name}" in err and "sha256" in err


def test_settings_validated_from_python(tmp_path):
    for bad, message in (({"seeds": -3}, "seeds must be an integer >= 1"), ({"seeds": 0}, "seeds must be"),
                         ({"height": 7}, "height must be an integer >= 8 and a multiple of 8"),
                         ({"steps": 0}, "steps must be"), ({"guidance": float("nan")}, "guidance must be a finite"),
                         ({"on_mismatch": "maybe"}, "on_mismatch='maybe'")):
        with pytest.raises(OptionError, match=message):
            EvalSettings(out=tmp_path, **bad)


PAIR = {"name": '"p"', "subject": '"s.safetensors"', "style": '"t.safetensors"', "prompt": '"a dog"',
        "subject_prompt": '"a dog"', "style_prompt": '"a painting"'}


@pytest.mark.parametrize(("override", "message"), [
    ({"subject": "5"}, "pair 0 ('p'): subject must be a string, got int 5"),
    ({"name": "3"}, "pair 0: name must be a string, got int 3"),
    ({"prompt": '["a dog", "a cat"]'}, "pair 0 ('p'): prompt is a list; one pair has one prompt"),
    ({"style_prompt": "true"}, "pair 0 ('p'): style_prompt must be a string, got bool True"),
    ({"subject_image": '"a.png"'}, "gives one reference image"),
])
def test_pairs_toml_wrong_types_name_file_pair_and_key(tmp_path, capsys, override, message):
    path = tmp_path / "pairs.toml"
    path.write_text("[[pair]]\n" + "".join(f"{k} = {v}\n" for k, v in {**PAIR, **override}.items()))
    with pytest.raises(OptionError) as error:
        load_pairs(path)
    assert str(error.value) == f"{path}: {message}" or (str(error.value).startswith(f"{path}: ")
                                                        and message in str(error.value))
    assert main(["eval", "--out", str(tmp_path / "o"), "--pairs", str(path), "--report-only"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fusion-engine: error: ") and message in err and "Traceback" not in err


def test_pairs_toml_that_is_not_toml(tmp_path):
    path = tmp_path / "pairs.toml"
    path.write_text("[[pair]\nname = ")
    with pytest.raises(OptionError, match="pairs.toml: not valid TOML"):
        load_pairs(path)
    with pytest.raises(FileNotFoundError, match="no such pairs file"):
        load_pairs(tmp_path / "missing.toml")


def test_eval_device_without_cuda_is_one_line(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["eval", "--out", str(tmp_path), "--device", "cuda", *ARGS]) == 2
    err = capsys.readouterr().err
    assert err == "fusion-engine: error: device 'cuda': CUDA is not available here; use cpu\n"
