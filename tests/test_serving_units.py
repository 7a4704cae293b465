"""The service's parts that need no Ray: request validation, the LoRA catalogue (names confined to its folder,
LRU eviction under a byte budget, held LoRAs never evicted) and the replica engine (grouping, out-of-memory
splitting, a faulty request or LoRA file failing alone). The HTTP service itself: tests/test_serve_ray.py."""
from __future__ import annotations

import json
import os

import pytest
import torch

import fusion_engine as fe
from fusion_engine.errors import OptionError, PoolBudgetError
from fusion_engine.serve.catalogue import Catalogue
from fusion_engine.serve.config import ServeConfig, load_pipeline, toy_catalogue
from fusion_engine.serve.engine import Engine
from fusion_engine.serve.schema import (
    ImageRequest,
    Limits,
    RequestError,
    load_json,
    parse_images,
    parse_txt2img,
)

PROMPT = "a sks mushroom in zzt style"
OK = {"prompt": PROMPT, "subject": "subject", "style": "style"}

# (body, expected status, the field named)
BAD_BODIES = [
    ([1, 2], 400, None),
    ({**OK, "prompt": None}, 400, "prompt"),
    ({**OK, "prompt": 5}, 400, "prompt"),
    ({**OK, "prompt": "x" * 1001}, 413, "prompt"),
    ({"prompt": PROMPT}, 400, "subject"),
    ({**OK, "subject": 3}, 400, "subject"),
    ({**OK, "subject": "../style"}, 400, "subject"),
    ({**OK, "style": "/etc/passwd"}, 400, "style"),
    ({**OK, "style": "a/b"}, 400, "style"),
    ({**OK, "style": ".hidden"}, 400, "style"),
    ({**OK, "style": "x" * 65}, 400, "style"),
    ({"prompt": PROMPT, "loras": "subject"}, 400, "loras"),
    ({"prompt": PROMPT, "loras": []}, 400, "loras"),
    ({"prompt": PROMPT, "loras": ["a", "b", "c", "d", "e"]}, 413, "loras"),
    ({"prompt": PROMPT, "loras": ["subject", ".."]}, 400, "loras[1]"),
    ({"prompt": PROMPT, "loras": ["subject", "subject"]}, 400, "loras"),
    ({**OK, "loras": ["subject"]}, 400, "loras"),
    ({**OK, "seed": -1}, 400, "seed"),
    ({**OK, "seed": 2**64}, 400, "seed"),
    ({**OK, "seed": 1.5}, 400, "seed"),
    ({**OK, "seed": True}, 400, "seed"),
    ({**OK, "steps": 0}, 400, "steps"),
    ({**OK, "steps": 10**9}, 413, "steps"),
    ({**OK, "steps": "20"}, 400, "steps"),
    ({**OK, "guidance": 1e308 * 10}, 400, "guidance"),
    ({**OK, "guidance": -1}, 400, "guidance"),
    ({**OK, "width": 4096}, 413, "width"),
    ({**OK, "height": 33}, 400, "height"),
    ({**OK, "height": -8}, 400, "height"),
    ({**OK, "policy": "composite"}, 400, "policy"),
    ({**OK, "policy": ["fls"]}, 400, "policy"),
    ({**OK, "options": []}, 400, "options"),
    ({**OK, "options": {"tau": 3}}, 400, "options.tau"),
    ({**OK, "options": {"divergence": "l2"}}, 400, "options.divergence"),
    ({**OK, "policy": "direct", "options": {"weights": [1.0]}}, 400, "options.weights"),
    ({**OK, "policy": "switch", "options": {"tau": 0}}, 400, "tau"),
    ({**OK, "extra": 1}, 400, "extra"),
]


@pytest.mark.parametrize(("body", "status", "field"), BAD_BODIES)
def test_bad_requests_name_their_field(body, status, field):
    with pytest.raises(RequestError) as caught:
        parse_images(body)
    assert (caught.value.status, caught.value.field) == (status, field), str(caught.value)
    assert caught.value.body()["error"]["field"] == field


def test_a_good_request_and_its_batch_key():
    request = parse_images({**OK, "seed": 7, "steps": 4, "width": 32, "policy": "direct",
                            "options": {"weights": [1, 0.5]}})
    assert request == ImageRequest(PROMPT, ("subject", "style"), 7, 4, 5.0, 32, 0, "direct",
                                   (("weights", (1.0, 0.5)),))
    other = parse_images({**OK, "prompt": "another", "subject": "subject_half", "seed": 8, "steps": 4, "width": 32,
                          "policy": "direct", "options": {"weights": [1, 0.5]}})
    assert other.batch_key() == request.batch_key()  # prompt, LoRAs and seed go per image
    assert parse_images({**OK, "steps": 5}).batch_key() != parse_images({**OK, "steps": 4}).batch_key()
    assert request.policy_options() == {"weights": [1.0, 0.5]}
    assert request.call_options() == {"num_inference_steps": 4, "guidance_scale": 5.0, "width": 32}


def test_json_bodies():
    assert load_json(b'{"a": 1}') == {"a": 1}
    for raw, status in ((b'{"a": NaN}', 400), (b'{"a": Infinity}', 400), (b"{", 400), (b"x" * 70000, 413),
                        (b"[" * 60000, 400)):
        with pytest.raises(RequestError) as caught:
            load_json(raw, Limits())
        assert caught.value.status == status and caught.value.field == "body"


def test_txt2img_fields():
    request = parse_txt2img({"prompt": PROMPT, "seed": -1, "steps": 3, "cfg_scale": 4, "width": 32, "height": 32,
                             "batch_size": 1, "n_iter": 1, "negative_prompt": "", "subject": "subject",
                             "style": "style"})
    assert (request.seed, request.steps, request.guidance, request.loras) == (0, 3, 4.0, ("subject", "style"))
    for extra, field in (({"sampler_name": "Euler a"}, "sampler_name"), ({"batch_size": 2}, "batch_size"),
                         ({"negative_prompt": "blurry"}, "negative_prompt"), ({"enable_hr": True}, "enable_hr"),
                         ({"cfg_scale": "x"}, "guidance")):
        with pytest.raises(RequestError) as caught:
            parse_txt2img({"prompt": PROMPT, "subject": "subject", **extra})
        assert caught.value.status == 400 and caught.value.field == field


def test_serve_config_checks():
    for bad in ({"replicas": 0}, {"max_batch_size": 1.5}, {"batch_wait_timeout_s": -1}, {"budget_bytes": 0},
                {"threads": True}):
        with pytest.raises(OptionError):
            ServeConfig(**bad).check()
    with pytest.raises(TypeError):
        ServeConfig(limits={"max_nothing": 1}).check()


# -- catalogue and engine on the toy world ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = toy_catalogue(tmp_path_factory.mktemp("loras"))
    pipe, _, _ = load_pipeline(ServeConfig())
    return pipe, folder


def test_names_never_leave_the_folder(toy, tmp_path):
    _, folder = toy
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"x")
    link = os.path.join(folder, "link.safetensors")
    if not os.path.lexists(link):
        os.symlink(outside, link)
    catalogue = Catalogue(folder, fe.LoRAPool())
    assert catalogue.names() == ["style", "style_half", "subject", "subject_half"]
    for name, status in (("..", 400), ("../secret", 400), (str(outside), 400), ("link", 404), ("nope", 404)):
        with pytest.raises(RequestError) as caught:
            catalogue.path(name)
        assert caught.value.status == status, name
    assert catalogue.path("style").name == "style.safetensors"


def test_lru_eviction_under_the_budget_and_held_loras_stay(toy):
    _, folder = toy
    probe = Catalogue(folder, fe.LoRAPool())
    probe.acquire(("subject", "style"))
    budget = probe.pool.nbytes
    evicted = []
    catalogue = Catalogue(folder, fe.LoRAPool(budget_bytes=budget), on_evict=evicted.append)
    catalogue.acquire(("subject", "style"))
    catalogue.release(("subject", "style"))
    catalogue.acquire(("style",))  # now subject is the least recently used
    catalogue.release(("style",))
    catalogue.acquire(("subject_half",))
    assert evicted and evicted[0] == "subject" and "subject_half" in catalogue.pool
    assert catalogue.pool.nbytes <= budget and catalogue.evictions == len(evicted)
    catalogue.release(("subject_half",))

    held = Catalogue(folder, fe.LoRAPool(budget_bytes=budget))
    held.acquire(("subject", "style"))  # a running batch holds both
    with pytest.raises(PoolBudgetError):
        held.acquire(("style_half",))
    assert held.pool.names == ["subject", "style"] and held.held() == {"subject": 1, "style": 1}


def _requests(engine, specs):
    return [engine.normalize(parse_images({"prompt": prompt, "loras": list(loras), "seed": seed, "steps": 2}))
            for prompt, loras, seed in specs]


def test_out_of_memory_splits_the_batch_and_each_request_gets_its_answer(toy):
    pipe, folder = toy
    calls = []

    def call(pipeline, requests):
        calls.append(len(requests))
        if len(requests) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return [f"image {requests[0].seed}"], [{"kept": None}]

    engine = Engine(pipe, Catalogue(folder, fe.LoRAPool()), call=call)
    specs = [(PROMPT, ("subject", "style"), seed) for seed in range(4)]
    outcomes = engine.run(_requests(engine, specs))
    assert [o.image for o in outcomes] == [f"image {seed}" for seed in range(4)]
    assert calls == [4, 2, 1, 1, 2, 1, 1]
    assert engine.catalogue.held() == {}


def test_a_faulty_request_or_lora_file_fails_alone(toy, tmp_path):
    pipe, folder = toy
    for name in ("subject", "style"):
        os.link(os.path.join(folder, f"{name}.safetensors"), tmp_path / f"{name}.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")

    def call(pipeline, requests):
        if any(r.prompt == "bad" for r in requests):
            raise OptionError("the engine refused this prompt")
        return [r.seed for r in requests], [{"kept": None}] * len(requests)

    engine = Engine(pipe, Catalogue(tmp_path, fe.LoRAPool()), call=call)
    outcomes = engine.run(_requests(engine, [(PROMPT, ("subject", "style"), 0), ("bad", ("subject",), 1),
                                             (PROMPT, ("broken", "style"), 2), (PROMPT, ("style",), 3)]))
    assert [o.image for o in outcomes] == [0, None, None, 3]
    assert outcomes[1].error.status == 500 and "the engine refused" in str(outcomes[1].error)
    assert outcomes[2].error.status == 500 and "broken.safetensors" in str(outcomes[2].error)
    assert engine.catalogue.held() == {} and "broken" not in engine.catalogue.pool


def test_mixed_options_go_to_separate_calls(toy):
    pipe, folder = toy
    seen = []

    def call(pipeline, requests):
        seen.append(sorted({(r.steps, r.policy) for r in requests}))
        return [None] * len(requests), [{"kept": None}] * len(requests)

    engine = Engine(pipe, Catalogue(folder, fe.LoRAPool()), call=call)
    requests = [engine.normalize(parse_images({**OK, "steps": steps, "policy": policy}))
                for steps, policy in ((2, "fls"), (3, "fls"), (2, "direct"), (2, "fls"))]
    outcomes = engine.run(requests)
    assert all(o.ok for o in outcomes) and sorted(map(json.dumps, seen)) == sorted(
        map(json.dumps, [[[2, "fls"]], [[3, "fls"]], [[2, "direct"]]]))
    assert [o.batch_size for o in outcomes] == [2, 1, 1, 2]


# -- the CLI subcommand -------------------------------------------------------------------------------------------
def test_serve_subcommand_flags_and_a_clear_error_without_ray(monkeypatch, capsys):
    import sys

    from fusion_engine.cli.main import build_parser, main

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.replicas, args.max_batch_size, args.model) == ("127.0.0.1", 8000, None, 8, None)
    assert main(["serve", "--replicas", "0"]) == 2
    assert "--replicas" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "fusion_engine.serve.app", None)  # as if Ray were not installed
    assert main(["serve"]) == 2
    assert "pip install -e '.[serve]'" in capsys.readouterr().err


def test_client_refuses_a_bad_concurrency_before_sending_anything():
    client = fe.serve.Client("http://127.0.0.1:9")  # nothing listens there: a request would fail differently
    for concurrency in (0, -1, 1.5, "2"):
        with pytest.raises(OptionError, match="concurrency must be a whole number >= 1"):
            client.generate_many([{"prompt": "a"}], concurrency=concurrency, progress=False)


# -- autoscaling ----------------------------------------------------------------------------------------------------
def test_autoscale_flags_map_onto_ray_serve_autoscaling_config(monkeypatch, capsys):
    from fusion_engine.cli.main import main

    fixed = ServeConfig(replicas=3).deployment_options()
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["max_ongoing_requests"] == 64 + 8 and fixed["max_queued_requests"] == 4 * 64 * 3
    scaled = ServeConfig(min_replicas=0, max_replicas=4, max_batch_size=6).deployment_options()
    assert "num_replicas" not in scaled and scaled["max_queued_requests"] == 4 * 64 * 4
    assert scaled["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "initial_replicas": 1,
                                            "target_ongoing_requests": 6.0}
    for bad, message in [({"replicas": 2, "min_replicas": 1, "max_replicas": 2}, "exclude each other"),
                         ({"min_replicas": 3, "max_replicas": 2}, "above max_replicas"),
                         ({"min_replicas": 1}, "max_replicas must be"),
                         ({"min_replicas": -1, "max_replicas": 2}, "min_replicas must be"),
                         ({"target_ongoing_requests": 2.0}, "needs min_replicas"),
                         ({"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1000.0}, "in (0,")]:
        with pytest.raises(OptionError, match=message.replace("(", r"\(")):
            ServeConfig(**bad).check()

    seen = []
    monkeypatch.setattr("fusion_engine.serve.runner.serve_forever", lambda config, *rest: seen.append(config) or 0)
    assert main(["serve", "--autoscale", "1:5", "--target-ongoing-requests", "3"]) == 0
    assert seen[-1].deployment_options()["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 5, "initial_replicas": 1, "target_ongoing_requests": 3.0}
    assert main(["serve"]) == 0 and seen[-1].replicas == 1 and not seen[-1].autoscaling
    for argv, words in [(["--replicas", "2", "--autoscale", "1:3"], "not allowed with argument --replicas"),
                        (["--autoscale", "3:1"], "0 <= MIN <= MAX"), (["--autoscale", "2"], "is not MIN:MAX"),
                        (["--autoscale", "0:0"], "0 <= MIN <= MAX"), (["--autoscale", "a:2"], "not an integer"),
                        (["--target-ongoing-requests", "4"], "needs --autoscale"),
                        (["--autoscale", "1:2", "--target-ongoing-requests", "0"], "is not > 0")]:
        assert main(["serve", *argv]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
