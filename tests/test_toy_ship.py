"""Shipping a trained second toy world (training/toy/ship.py): refused unless the training folder is complete, every
gate fixed before training passed and the files fit the budget; the destination is replaced all or nothing, and
the card is written from the shipped JSONs. A fake training folder of tiny files stands in for a real one."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # training/ lives beside the package

from fusion_engine.errors import InputFileNotFoundError, OptionError  # noqa: E402
from training.toy import ship  # noqa: E402

SPEC = json.loads(ship.SPEC.read_text())
RUN = SPEC["runs"][-1]  # the fake folder claims the spec's newest run


def _weights(path: Path, values: float) -> None:
    from safetensors.numpy import save_file

    save_file({"w": np.full((4, 3), values, np.float32), "b": np.zeros(5, np.float16)}, str(path))


def _gate(value, passed=True):
    return {"value": value, "need": ">= 0.8", "pass": passed}


def fake_out(folder: Path) -> Path:
    """A training folder with every shipped file: tiny weights, small JSONs of the real files' shape."""
    folder.mkdir()
    for index, name in enumerate(ship.WEIGHT_FILES):
        _weights(folder / name, index)
        (folder / name).chmod(0o600)  # as the trainers' files are
    gates = {gate["id"]: _gate(0.9 if gate.get("kept_from") else [0.5, 0.4, 0.6]) for gate in SPEC["gates"]}
    gates["judges_agree"] = _gate({"clip": {"subject": True, "style": True}, "dino": {"subject": True, "style": True}})
    kept = {gate["id"]: gates[gate["id"]] for gate in SPEC["gates"] if gate.get("kept_from") == "v1"}
    gates["fusion_reachable"].update(value={"best": {"pair": "sks-mushroom_zzt@1x1", "policy": "klora",
                                                     "joint": [0.42, 0.3, 0.56],
                                                     "confirmed_on_fresh_seeds": [0.38, 0.26, 0.5]}},
                                     grid_used=False, cells={"sks-mushroom_zzt@1x1 klora": [0.42, 0.3, 0.56]})
    rates = {"shape_decision": [0.61, 0.58, 0.64], "style_decision": [0.57, 0.54, 0.6],
             "joint_decision": [0.33, 0.3, 0.36]}
    calibration = {"rates": rates, "per_shape": {"star": rates}, "per_style": {"waves": rates}, "images": 1200,
                   "settings": {"sampler": "Euler", "steps": 20, "guidance": 5.0, "seeds_per_combination": 20},
                   "wall_s": 600.5, "machine": "2 torch thread(s), 2 CPUs"}
    recipe = {"seconds": 2100, "steps": RUN["lora_steps"], "rank": 32, "alpha": [16.0], "targets": "attention+ff",
              "lr": 0.003, "cosine": True, "ema": 0.999, "batch": 8, "prior_share": 0.25}
    files = {
        "base_config.json": {"world": "v2", "text_encoder": {"vocab_size": 610}, "tokenizer": {"words": ["a", "sks"]}},
        "gates.json": {"gates": kept, "all_pass": True, "wall_s": 300.0, "machine": "kept-gates machine"},
        "gates_v2.json": {"spec": SPEC, "gates": gates, "all_pass": True, "wall_s": 2500.0,
                          "machine": "gates-v2 machine"},
        "calibration_seen.json": calibration, "calibration_held.json": {**calibration, "images": 400},
        "lora_norms.json": {"summary": {"layers": {"subject": 1, "style": 1, "both": 1},
                                        "total_norm": {"subject": 3.5, "style": 4.25},
                                        "shared_ratio_subject_over_style": {"median": 0.82, "min": 0.82, "max": 0.82,
                                                                            "layers_subject_larger": 0}},
                            "per_layer": {"mid_block.attn1.to_q": {"subject": 3.5, "style": 4.25}}},
        "times_base.json": {"vae_s": 150, "unet_s": 7000, "steps": RUN["base_unet_steps"], "vae_steps": 400},
        "times_judges.json": {"clip_s": 108, "dino_s": 105, "steps": 600},
        "times_subject.json": recipe, "times_style.json": {**recipe, "seconds": 2150},
    }
    for name, value in files.items():
        (folder / name).write_text(json.dumps(value))
    (folder / "checkpoint-400").mkdir()  # what must not ship
    (folder / "checkpoint-400" / "resume_state.pt").write_bytes(b"state")
    (folder / "logs").mkdir()
    (folder / "logs" / "times.txt").write_text("2026-12-07T02:43:16Z base start\n")
    return folder


def old_dest(folder: Path) -> dict:
    folder.mkdir()
    for name in ("CARD.md", "unet.safetensors", "gates.json", "stray.txt"):
        (folder / name).write_text(f"old {name}")
    return snapshot(folder)


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_ships_exactly_the_shippable_files_and_a_card_written_from_them(tmp_path, capsys):
    out, dest = fake_out(tmp_path / "out"), tmp_path / "pkg" / "weights"
    (tmp_path / "pkg").mkdir()
    old_dest(dest)
    assert ship.main([str(out), "--dest", str(dest), "--run", str(RUN["run"])]) == 0
    assert sorted(p.name for p in dest.iterdir()) == sorted([*ship.SHIPPED, ship.CARD])  # stray.txt gone
    for name in ship.SHIPPED:
        assert (dest / name).read_bytes() == (out / name).read_bytes(), name
    assert leftovers(tmp_path / "pkg") == []
    card = (dest / ship.CARD).read_text()
    for text in ("passes every gate fixed before training", "| 8 | fusion_reachable |",
                 "best cell klora at sks-mushroom_zzt@1x1: 0.420 [0.300, 0.560]; on fresh seeds 0.380 [0.260, 0.500]",
                 "| 6 | base_composition |", "0.500 [0.400, 0.600]", "| joint | 0.330 [0.300, 0.360] |",
                 f"**Run {RUN['run']}** **(these files)**", "**Run 1**", SPEC["runs"][0]["result"],
                 "| subject | 32 | [16.0] | attention+ff |", "2150", "UNet + text encoder", "(7000 s",
                 "| `mid_block.attn1.to_q` | 3.5000 | 4.2500 | 0.82 |", "gates-v2 machine", "kept-gates machine",
                 "2026-12-07T02:43:16Z base start", "10 base shapes", "20 held-out", "star 0.61",
                 "| `unet.safetensors` | 0.00 M | F16/F32 |"):
        assert text in card, text
    assert "checkpoint" not in " ".join(p.name for p in dest.iterdir())
    mask = os.umask(0o022)
    os.umask(mask)
    assert dest.stat().st_mode & 0o777 == 0o777 & ~mask  # not the staging folder's 0700
    assert {p.stat().st_mode & 0o777 for p in dest.iterdir()} == {0o666 & ~mask}  # not a trainer's 0600
    assert "shipped" in capsys.readouterr().out


def test_dry_run_checks_and_writes_nothing(tmp_path, capsys):
    out, dest = fake_out(tmp_path / "out"), tmp_path / "weights"
    before = old_dest(dest)
    assert ship.main([str(out), "--dest", str(dest), "--run", str(RUN["run"]), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "nothing written" in printed and "dropping stray.txt" in printed and "gates_v2.json" in printed
    assert snapshot(dest) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("edit", ["all_pass_false", "gate_failed", "all_pass_missing", "need_changed",
                                  "gate_left_out", "kept_gates_disagree"])
def test_refused_unless_every_fixed_gate_passed(tmp_path, capsys, edit):
    out, dest = fake_out(tmp_path / "out"), tmp_path / "weights"
    before = old_dest(dest)
    result = json.loads((out / "gates_v2.json").read_text())
    if edit == "all_pass_false":
        result["all_pass"] = False
    elif edit == "gate_failed":  # all_pass edited to true by hand while a gate failed
        result["gates"]["subject_composition"]["pass"] = False
    elif edit == "all_pass_missing":
        del result["all_pass"]
    elif edit == "need_changed":  # measured against a spec that is not the one fixed before training
        result["spec"]["gates"][7]["need"] = ">= 0.20 in the best cell"
    elif edit == "gate_left_out":
        del result["gates"]["fusion_reachable"]
    else:
        kept = json.loads((out / "gates.json").read_text())
        kept["gates"]["style_only_carries_style"]["value"] = 0.85  # measured on other files than gates_v2.json's
        (out / "gates.json").write_text(json.dumps(kept))
    (out / "gates_v2.json").write_text(json.dumps(result))
    assert ship.main([str(out), "--dest", str(dest), "--run", str(RUN["run"])]) == 2
    error = capsys.readouterr().err
    at_fault = out / ("gates.json" if edit == "kept_gates_disagree" else "gates_v2.json")
    assert "refused" in error and str(at_fault) in error
    assert snapshot(dest) == before and leftovers(tmp_path) == []
    with pytest.raises(OptionError):
        ship.prepare(out, RUN["run"])


def test_the_real_failed_run_is_refused_by_its_verdicts(tmp_path):
    """Run 1's recorded gates (training/toy/runs/v2_run1/gates_v2.json) put into the fake folder: refused, the
    failed gates named."""
    out = fake_out(tmp_path / "out")
    run1 = ROOT / "training" / "toy" / "runs" / "v2_run1" / "gates_v2.json"
    (out / "gates_v2.json").write_text(run1.read_text())
    with pytest.raises(OptionError, match="all_pass.*false.*style_only_carries_style.*fusion_reachable"):
        ship.prepare(out, RUN["run"])


@pytest.mark.parametrize("name", ["unet.safetensors", "judge_dino.safetensors", "gates_v2.json",
                                  "calibration_held.json", "times_style.json"])
def test_refused_when_a_file_is_missing_naming_it(tmp_path, name):
    out = fake_out(tmp_path / "out")
    (out / name).unlink()
    with pytest.raises(InputFileNotFoundError, match=name):
        ship.prepare(out, RUN["run"])


def test_refused_for_another_world_a_broken_json_or_a_run_the_files_are_not(tmp_path):
    out = fake_out(tmp_path / "out")
    with pytest.raises(OptionError, match="run 1 trained"):
        ship.prepare(out, 1)
    (out / "times_base.json").write_text(json.dumps({"steps": 12345}))
    with pytest.raises(OptionError, match="0 runs have base/LoRA steps 12345"):
        ship.prepare(out)
    (out / "lora_norms.json").write_text("{not json")
    with pytest.raises(OptionError, match="lora_norms.json: not readable as JSON"):
        ship.prepare(out, RUN["run"])
    (out / "lora_norms.json").write_text("[]")
    with pytest.raises(OptionError, match="lora_norms.json: a JSON object expected"):
        ship.prepare(out, RUN["run"])
    (out / "lora_norms.json").write_text("{}")
    (out / "base_config.json").write_text(json.dumps({"vae": {}}))
    with pytest.raises(OptionError, match="base_config.json.*not \"v2\""):
        ship.prepare(out, RUN["run"])
    with pytest.raises(InputFileNotFoundError, match="no such folder"):
        ship.prepare(tmp_path / "nowhere")


def test_refused_when_what_ships_is_over_the_budget(tmp_path, capsys):
    out, dest = fake_out(tmp_path / "out"), tmp_path / "weights"
    before = old_dest(dest)
    with (out / "unet.safetensors").open("r+b") as file:  # sparse: 40 MiB on paper, nothing on disk
        file.truncate(ship.LIMIT_BYTES)
    assert ship.main([str(out), "--dest", str(dest), "--run", str(RUN["run"])]) == 2
    assert "MiB, the limit 40 MiB" in capsys.readouterr().err
    assert snapshot(dest) == before and leftovers(tmp_path) == []


def test_a_failure_mid_copy_leaves_the_old_destination_intact(tmp_path):
    out, dest = fake_out(tmp_path / "out"), tmp_path / "weights"
    before = old_dest(dest)
    card, _ = ship.prepare(out, RUN["run"])
    copied = []

    def failing_copy(source, target):
        if len(copied) == 3:
            raise OSError(28, "No space left on device")
        copied.append(target)
        return ship.shutil.copyfile(source, target)

    with pytest.raises(OSError, match="No space"):
        ship.install(out, dest, card, copy=failing_copy)
    assert snapshot(dest) == before and leftovers(tmp_path) == []


def test_a_failed_swap_puts_the_old_destination_back(tmp_path, monkeypatch):
    out, dest = fake_out(tmp_path / "out"), tmp_path / "weights"
    before = old_dest(dest)
    card, _ = ship.prepare(out, RUN["run"])
    rename = os.rename

    def failing_rename(source, target):
        if ".staging-" in str(source):
            raise OSError(5, "Input/output error")
        return rename(source, target)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="Input/output"):
        ship.install(out, dest, card)
    assert snapshot(dest) == before and leftovers(tmp_path) == []
    monkeypatch.setattr(os, "rename", rename)
    ship.install(out, dest, card)  # the first install, into a folder that does not exist yet, is a rename too
    ship.install(out, tmp_path / "fresh", card)
    assert snapshot(dest) == snapshot(tmp_path / "fresh") and leftovers(tmp_path) == []
