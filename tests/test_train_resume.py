"""The toy trainers resume across processes (issue 24: a training run outlasts a session): a run stopped after a
checkpoint and resumed ends with the same weights, bit for bit, as one never stopped; other arguments are refused,
naming the field. Smoke size: the second world's UNet on a handful of latents, a LoRA on the shipped base."""
import importlib
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # training/ lives beside the package
resuming = importlib.import_module("training.toy.resume")
train_base = importlib.import_module("training.toy.train_base")
train_loras = importlib.import_module("training.toy.train_loras")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Bitwise equality needs one thread count throughout: never adapted to the machine's load."""
    monkeypatch.setenv("TOY_TRAIN_FIXED_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scramble_rngs():
    """What a new process would have: none of the stopped run's random states."""
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)


def same(a: dict, b: dict) -> list[str]:
    """Names of the tensors that differ (empty: bitwise equal)."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def unet_run(out: Path, resume=None, stop_after=None):
    from diffusers import AutoencoderKL

    from fusion_engine.worlds.toy import configs

    recipe = train_base.world_recipe("v2")
    captions = ["a circle in stripes style", "a tee in waves style", "a square in dots style", "an image"]
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    vae = AutoencoderKL(**configs.VAE)
    record = {"settings": {"steps": 4, "batch": 2}, "vae_sha256": "-"}
    models = train_base.train_unet(vae, latents, captions, 4, 0, out, batch=2, checkpoint_every=2,
                                   stop_after=stop_after, recipe=recipe, record=record, resume=resume)
    names = ("unet", "text_encoder", "ema_unet", "ema_text_encoder")
    return {f"{name}.{k}": v.clone() for name, model in zip(names, models[:4]) for k, v in model.state_dict().items()}


def test_unet_phase_resumed_after_a_checkpoint_or_a_stop_gives_the_same_weights_bitwise(tmp_path):
    straight = unet_run(tmp_path / "straight")
    states = resuming.states(tmp_path / "straight", train_base.PREFIX)
    assert [step for step, _ in states] == [2, 4]  # the checkpoint's (every 2 steps) and the last step's
    first = torch.load(states[0][1], weights_only=True)
    assert first["step"] == 2 and set(first["optimizer"]["state"]) and first["rng"]["generator"].numel()
    # killed after the checkpoint at step 2: its state is the newest complete one
    states[1][1].unlink()
    (states[1][1].parent / (resuming.STATE_FILE + ".partial")).write_bytes(b"half a file")
    path, state = resuming.load_latest(tmp_path / "straight", train_base.PREFIX, {"steps": 4, "batch": 2})
    assert state["step"] == 2
    scramble_rngs()
    after_kill = unet_run(tmp_path / "straight", resume=state)
    assert same(straight, after_kill) == []
    # stopped by --stop-after 2 in one process, resumed to 4 in another
    stopped = unet_run(tmp_path / "stopped", stop_after=2)
    assert same(straight, stopped)  # two steps are not four: the comparison can fail
    _, state = resuming.load_latest(tmp_path / "stopped", train_base.PREFIX, {"steps": 4, "batch": 2})
    scramble_rngs()
    assert same(straight, unet_run(tmp_path / "stopped", resume=state)) == []


def lora_run(world, out: Path, resume=None, stop_after=None):
    context = torch.randn(6, 77, world.pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
    latents = torch.randn(6, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    data, prior = (latents[:3], context[:3]), (latents[3:], context[3:])
    checkpoint = {"out": out, "prefix": train_loras.prefix("subject"), "every": 2, "record": {"settings": {}}}
    lora, _ = train_loras.train_lora(world, data, prior, rank=2, alpha=2.0, steps=4, seed=10, lr=3e-3,
                                     targets="attention", batch=2, prior_share=0.5, cosine=True, ema_decay=0.999,
                                     stop_after=stop_after, checkpoint=checkpoint, resume=resume)
    return {f"{name}.{part}": getattr(layer, part).clone() for name, layer in lora.layers.items()
            for part in ("lora_a", "lora_b")}


def test_lora_resumed_after_a_stop_gives_the_same_factors_and_ema_bitwise(tmp_path):
    from fusion_engine.worlds.toy.world import load_toy_world

    world = load_toy_world(require_loras=False)
    straight = lora_run(world, tmp_path / "straight")
    stopped = lora_run(world, tmp_path / "stopped", stop_after=3)
    assert same(straight, stopped)
    _, state = resuming.load_latest(tmp_path / "stopped", train_loras.prefix("subject"), {})
    assert state["step"] == 3 and len(state["shadows"]) == len(state["params"])
    scramble_rngs()
    assert same(straight, lora_run(world, tmp_path / "stopped", resume=state)) == []


def test_only_the_newest_two_states_are_kept_and_a_partial_write_is_not_one(tmp_path):
    for step in (400, 800, 1200):
        resuming.save_state(tmp_path, "checkpoint-", step, {"step": step, "settings": {}})
    (tmp_path / "checkpoint-1600").mkdir()
    (tmp_path / "checkpoint-1600" / (resuming.STATE_FILE + ".partial")).write_bytes(b"killed mid-write")
    (tmp_path / "checkpoint-400-raw").mkdir()
    assert [step for step, _ in resuming.states(tmp_path, "checkpoint-")] == [800, 1200]
    assert not (tmp_path / "checkpoint-400" / resuming.STATE_FILE).exists()
    assert resuming.load_latest(tmp_path, "checkpoint-", {})[1]["step"] == 1200


BASE_ARGS = ["--world", "v2", "--steps", "8", "--vae-steps", "1", "--batch", "2", "--threads", "1"]
LORA_ARGS = ["--world", "v2", "--steps", "8", "--batch", "2", "--lr", "0.003", "--rank", "4",
             "--targets", "attention+ff", "--threads", "1", "--only", "subject"]


def written_state(monkeypatch, trainer, out: Path, prefix: str, argv: list[str], **extra) -> None:
    """A resume state at step 4 as ``trainer`` would write it for the command line ``argv``."""
    captured = {}
    monkeypatch.setattr(trainer, "train", lambda args, _out: captured.setdefault("args", args) and 0)
    trainer.main([*argv, "--out", str(out)])
    monkeypatch.undo()
    resuming.save_state(out, prefix, 4, {"step": 4, "settings": resuming.run_settings(captured["args"], **extra)})


@pytest.mark.parametrize("field, value", [("--steps", "16"), ("--batch", "4"), ("--world", "v1"),
                                          ("--threads", "2")])
def test_base_resume_refuses_other_arguments_naming_the_file_and_the_field(tmp_path, capsys, monkeypatch, field,
                                                                          value):
    written_state(monkeypatch, train_base, tmp_path, train_base.PREFIX, BASE_ARGS, lr=train_base.UNET_LR,
                  ema_decay=train_base.UNET_EMA)
    argv = [*BASE_ARGS, "--out", str(tmp_path), "--resume"]
    argv[argv.index(field) + 1] = value
    with pytest.raises(SystemExit) as exit_:
        train_base.main(argv)
    assert exit_.value.code == 2
    message = capsys.readouterr().err
    assert str(tmp_path / "checkpoint-4" / resuming.STATE_FILE) in message
    shown = repr(int(value)) if value.isdigit() else repr(value)
    assert f"{field[2:]}: " in message and f"{shown} now" in message


@pytest.mark.parametrize("field, value", [("--rank", "8"), ("--targets", "attention"), ("--lr", "0.01")])
def test_lora_resume_refuses_other_arguments_naming_the_field(tmp_path, capsys, monkeypatch, field, value):
    written_state(monkeypatch, train_loras, tmp_path, train_loras.prefix("subject"), LORA_ARGS, role="subject")
    argv = [*LORA_ARGS, "--out", str(tmp_path), "--resume"]
    argv[argv.index(field) + 1] = value
    with pytest.raises(SystemExit):
        train_loras.main(argv)
    message = capsys.readouterr().err
    assert "checkpoint-subject-4" in message and f"{field[2:]}: " in message


def test_resume_without_a_state_is_refused_naming_what_it_looked_for(tmp_path, capsys):
    for trainer, argv, expected in ((train_base, BASE_ARGS, "checkpoint-<step>/resume_state.pt"),
                                    (train_loras, LORA_ARGS, "checkpoint-subject-<step>/resume_state.pt")):
        with pytest.raises(SystemExit):
            trainer.main([*argv, "--out", str(tmp_path), "--resume"])
        message = capsys.readouterr().err
        assert str(tmp_path) in message and expected in message
