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


def unet_run(out: Path, resume=None, stop_after=None, noise_offset=0.0):
    from diffusers import AutoencoderKL

    from fusion_engine.worlds.toy import configs

    recipe = train_base.world_recipe("v2")
    captions = ["a circle in stripes style", "a tee in waves style", "a square in dots style", "an image"]
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    vae = AutoencoderKL(**configs.VAE)
    record = {"settings": {"steps": 4, "batch": 2}, "vae_sha256": "-"}
    models = train_base.train_unet(vae, latents, captions, 4, 0, out, batch=2, checkpoint_every=2,
                                   stop_after=stop_after, recipe=recipe, record=record, resume=resume,
                                   noise_offset=noise_offset)
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


def test_a_branched_run_starts_from_the_parent_state_with_its_own_settings_and_resumes_bitwise(tmp_path):
    """Run 3 of the second world branches from run 2's state with offset noise: the branch differs from the parent
    carried on, and a branch stopped and resumed from its own state ends as the branch run straight."""
    parent = unet_run(tmp_path / "parent")
    path = resuming.states(tmp_path / "parent", train_base.PREFIX)[0][1]

    def fork():  # loaded afresh for each run, as each process does (a run steps its optimizer state in place)
        return torch.load(path, weights_only=True)

    assert fork()["step"] == 2
    branch = unet_run(tmp_path / "branch", resume=fork(), noise_offset=0.1)
    assert same(parent, branch)  # offset noise from step 2 on: other weights
    assert same(parent, unet_run(tmp_path / "carried", resume=fork())) == []  # the fork itself is the parent's
    stopped = unet_run(tmp_path / "stopped", resume=fork(), stop_after=3, noise_offset=0.1)
    assert same(branch, stopped)
    _, own = resuming.load_latest(tmp_path / "stopped", train_base.PREFIX, {"steps": 4, "batch": 2})
    assert own["step"] == 3
    scramble_rngs()
    assert same(branch, unet_run(tmp_path / "stopped", resume=own, noise_offset=0.1)) == []


def test_offset_noise_adds_one_mean_per_image_and_channel_and_draws_nothing_when_off():
    from types import SimpleNamespace

    common = importlib.import_module("training.toy.common")
    seen = []

    class Echo(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states):
            seen.append(x)
            return SimpleNamespace(sample=torch.zeros_like(x))

    alphas, x0 = torch.zeros(1000), torch.zeros(256, 4, 16, 16)  # alpha-bar 0: the model sees the noise alone
    for offset in (0.0, 0.5):
        common.diffusion_loss(Echo(), x0, None, torch.Generator().manual_seed(0), alphas, min_snr=None,
                              noise_offset=offset)
    plain, offset = seen
    assert torch.equal(plain, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)))  # the old stream
    shift = offset - plain
    means = shift[..., :1, :1]
    assert torch.allclose(shift, means.expand_as(shift), atol=1e-6)  # one constant per image and channel
    assert 0.4 < float(means.std()) < 0.6


def test_branch_from_is_refused_without_its_state_or_the_parent_vae(tmp_path, capsys):
    missing = tmp_path / "nowhere" / resuming.STATE_FILE
    for argv, expected in (([*BASE_ARGS, "--branch-from", str(missing)], str(missing)),):
        with pytest.raises(SystemExit):
            train_base.main([*argv, "--out", str(tmp_path / "run")])
        assert expected in capsys.readouterr().err
    resuming.save_state(tmp_path / "parent", train_base.PREFIX, 4, {"step": 4, "settings": {}})
    state = tmp_path / "parent" / "checkpoint-4" / resuming.STATE_FILE
    with pytest.raises(SystemExit):
        train_base.main([*BASE_ARGS, "--branch-from", str(state), "--out", str(tmp_path / "run")])
    assert str(tmp_path / "run" / "vae_only") in capsys.readouterr().err


def test_a_setting_added_later_is_left_out_at_its_default_so_older_states_still_resume(monkeypatch, tmp_path):
    captured = {}
    monkeypatch.setattr(train_base, "train", lambda args, _out: captured.setdefault("args", args) and 0)
    train_base.main([*BASE_ARGS, "--out", str(tmp_path)])
    assert "noise_offset" not in resuming.run_settings(captured["args"])
    captured.clear()
    train_base.main([*BASE_ARGS, "--out", str(tmp_path), "--noise-offset", "0.1"])
    assert resuming.run_settings(captured["args"])["noise_offset"] == 0.1


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
