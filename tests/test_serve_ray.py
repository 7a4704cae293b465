"""The Ray Serve service end to end, on a local loopback-only Ray with 2 CPUs and the toy world (issue 25).

The app starts once for the module (Ray's first start is the slow part: the time is printed). Everything talks to
127.0.0.1 only; every request has a timeout and every loop a bound.
"""
from __future__ import annotations

import base64
import contextlib
import http.client
import io
import ipaddress
import json
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from timeouts import time_limit  # noqa: F401  (autouse: every test here fails instead of hanging)

pytest.importorskip("ray.serve", reason="Ray Serve is an optional extra: pip install -e '.[serve]' to run these tests")
psutil = pytest.importorskip("psutil", reason="pip install -e '.[serve]' (psutil lists the app's listeners)")

TIME_LIMIT_S = 300  # per test (tests/timeouts.py)
KEY = "test-key-7f3a"
PROMPT = "a sks mushroom in zzt style"
PAIRS = [("subject", "style"), ("subject_half", "style"), ("subject", "style_half")]
CONFIG = dict(max_batch_size=4, batch_wait_timeout_s=0.3, max_queue=6, threads=1, api_key=KEY)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from fusion_engine.serve import runner
    from fusion_engine.serve.config import ServeConfig, toy_catalogue

    folder = Path(toy_catalogue(tmp_path_factory.mktemp("catalogue")))
    shutil.copyfile(folder / "style.safetensors", folder / "fragile.safetensors")
    start = time.perf_counter()
    url = runner.start(ServeConfig(loras=str(folder), **CONFIG), port=_free_port())
    started = time.perf_counter() - start
    print(f"\n[serve] Ray + Serve + one toy replica started in {started:.1f} s")
    yield {"url": url, "folder": folder, "start_s": started}
    runner.stop()


def call(url: str, path: str, body=None, key: str | None = KEY, raw: bytes | None = None, method: str | None = None,
         timeout: float = 120.0):
    """(status, headers, decoded JSON or raw bytes) of one request; never raises on an HTTP error status."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        connection.request(method or ("POST" if data is not None else "GET"), path, body=data, headers=headers)
        response = connection.getresponse()
        payload = response.read()
    finally:
        connection.close()
    with contextlib.suppress(ValueError):  # an error page that is not JSON stays bytes
        payload = json.loads(payload)
    return response.status, dict(response.getheaders()), payload


def image_of(answer: dict) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["image"]))).convert("RGB")).astype(int)


def test_health_and_catalogue(service):
    status, _, body = call(service["url"], "/healthz", key=None)
    assert status == 200 and body["status"] == "ok" and body["replica"].startswith("SERVE_REPLICA::")
    status, _, body = call(service["url"], "/v1/loras")
    assert status == 200
    assert [entry["name"] for entry in body["loras"]] == ["fragile", "style", "style_half", "subject", "subject_half"]


def test_mixed_pairs_equal_their_fusion_pipeline_images(service):
    """Three pairs interleaved (two seeds each), sent at once so batches mix pairs; each image equals the one
    ``FusionPipeline(pipe, pool=...)`` makes for it alone with the same seed and options."""
    import torch

    import fusion_engine as fe
    from fusion_engine.serve.config import ServeConfig, load_pipeline

    requests = [{"prompt": PROMPT, "loras": list(pair), "seed": seed, "steps": 3, "guidance": 5.0}
                for seed in (11, 12) for pair in PAIRS]
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        answers = list(pool.map(lambda body: call(service["url"], "/v1/images", body), requests))
    assert [status for status, _, _ in answers] == [200] * len(requests), answers
    assert max(body["timing"]["batch_size"] for _, _, body in answers) >= 2  # pairs shared a pipeline call

    pipe, _, _ = load_pipeline(ServeConfig())
    lora_pool = fe.LoRAPool()
    for name in {name for pair in PAIRS for name in pair}:
        lora_pool.add(name, fe.load_lora(service["folder"] / f"{name}.safetensors"))
    pipeline = fe.FusionPipeline(pipe, pool=lora_pool, policy="fls")
    served = {}
    for request, (_, _, body) in zip(requests, answers):
        expected = pipeline([PROMPT], loras=[tuple(request["loras"])],
                            generator=[torch.Generator().manual_seed(request["seed"])], num_inference_steps=3,
                            guidance_scale=5.0, width=32, height=32)
        got, want = image_of(body), np.asarray(expected.images[0]).astype(int)
        # fp32 rounding of a batched GEMM against a one-image one: at most one level of 255, on very few values
        assert np.abs(got - want).max() <= 1 and (got != want).mean() < 0.01, request
        assert body["trace"] == expected.trace.image_summary(0, expected.loras[0])
        assert (body["seed"], body["loras"]) == (request["seed"], request["loras"])
        served[(tuple(request["loras"]), request["seed"])] = got
    assert np.abs(served[(PAIRS[0], 11)] - served[(PAIRS[1], 11)]).max() > 8  # the pair matters
    assert np.abs(served[(PAIRS[0], 11)] - served[(PAIRS[0], 12)]).max() > 8  # the seed matters


GOOD = {"prompt": PROMPT, "subject": "subject", "style": "style", "steps": 2}
ERROR_TABLE = [  # (path, body or raw bytes, key, status, field)
    ("/v1/images", b"{not json", KEY, 400, "body"),
    ("/v1/images", b'{"prompt": "x", "subject": "subject", "seed": NaN}', KEY, 400, "body"),
    ("/v1/images", {**GOOD, "steps": "many"}, KEY, 400, "steps"),
    ("/v1/images", {**GOOD, "seed": 10**30}, KEY, 400, "seed"),
    ("/v1/images", {**GOOD, "guidance": 1e308}, KEY, 400, "guidance"),
    ("/v1/images", {**GOOD, "width": 36}, KEY, 400, "width"),
    ("/v1/images", {**GOOD, "prompt": None}, KEY, 400, "prompt"),
    ("/v1/images", {"subject": "subject"}, KEY, 400, "prompt"),
    ("/v1/images", {**GOOD, "loras": ["subject"]}, KEY, 400, "loras"),
    ("/v1/images", {**GOOD, "colour": "red"}, KEY, 400, "colour"),
    ("/v1/images", {**GOOD, "subject": "../../etc/passwd"}, KEY, 400, "subject"),
    ("/v1/images", {**GOOD, "style": "%2e%2e/secret"}, KEY, 400, "style"),
    ("/v1/images", {**GOOD, "policy": "direct", "options": {"divergence": "kl"}}, KEY, 400, "options.divergence"),
    ("/v1/images", {**GOOD, "subject": "no_such_lora"}, KEY, 404, "loras[0]"),
    ("/v1/images", {**GOOD, "prompt": "p" * 5000}, KEY, 413, "prompt"),
    ("/v1/images", {**GOOD, "steps": 10**6}, KEY, 413, "steps"),
    ("/v1/images", {**GOOD, "width": 1 << 20}, KEY, 413, "width"),
    ("/v1/images", b'{"prompt": "' + b"x" * 100_000 + b'"}', KEY, 413, "body"),
    ("/v1/images", GOOD, None, 401, "authorization"),
    ("/v1/images", GOOD, "wrong-key", 401, "authorization"),
    ("/v1/loras", None, "wrong-key", 401, "authorization"),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "subject": "subject", "sampler_name": "Euler a"}, KEY, 400,
     "sampler_name"),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "subject": "subject", "batch_size": 4}, KEY, 400, "batch_size"),
    ("/v1/nothing", None, KEY, 404, None),
]


def test_error_table_and_the_service_keeps_serving(service):
    url = service["url"]
    for path, body, key, status, field in ERROR_TABLE:
        raw = body if isinstance(body, bytes) else None
        got, headers, answer = call(url, path, None if raw else body, key=key, raw=raw)
        assert (got, answer["error"]["field"]) == (status, field), (path, body if raw is None else raw[:60], answer)
        if status == 401:
            assert headers.get("www-authenticate") == "Bearer"
    assert call(url, "/v1/images", method="GET")[0] == 405
    status, _, answer = call(url, "/sdapi/v1/txt2img", {"prompt": PROMPT, "subject": "subject", "style": "style",
                                                        "steps": 2, "cfg_scale": 5, "seed": 4, "batch_size": 1,
                                                        "negative_prompt": ""})
    assert status == 200 and len(answer["images"]) == 1 and json.loads(answer["info"])["seed"] == 4
    assert call(url, "/v1/images", GOOD)[0] == 200


def test_a_lora_file_that_turns_bad_fails_only_its_requests(service):
    url, fragile = service["url"], service["folder"] / "fragile.safetensors"
    assert call(url, "/v1/images", {**GOOD, "style": "fragile"})[0] == 200  # listed, loaded, served
    fragile.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    try:
        # still in the pool: the replica keeps serving what it loaded; force a reload by a fresh name
        shutil.copyfile(fragile, service["folder"] / "fragile2.safetensors")
        bodies = [{**GOOD, "style": "fragile2", "seed": 1}, {**GOOD, "seed": 2}]
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda body: call(url, "/v1/images", body), bodies))
        (bad, _, bad_body), (good, _, _) = answers
        assert bad == 500 and "fragile2.safetensors" in bad_body["error"]["message"], bad_body
        assert good == 200
        status, _, alone = call(url, "/v1/images", {**GOOD, "style": "fragile2"})  # a batch with no image at all
        assert status == 500 and "fragile2.safetensors" in alone["error"]["message"], alone
    finally:
        (service["folder"] / "fragile2.safetensors").unlink()


def _logs_dir() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_logs_dir_path())


def test_api_key_required_and_no_prompt_logged(service):
    url = service["url"]
    secret_refused, secret_served = "zebra-quokka-refused-8812", "zebra-quokka-served-8813"
    assert call(url, "/v1/images", {**GOOD, "prompt": secret_refused}, key=None)[0] == 401
    assert call(url, "/v1/images", {**GOOD, "prompt": secret_refused}, key="nope")[0] == 401
    assert call(url, "/v1/images", {**GOOD, "prompt": secret_served})[0] == 200
    assert call(url, "/healthz", key=None)[0] == 200  # health checks need no key
    time.sleep(1.0)  # log lines are flushed
    found = []
    for path in _logs_dir().rglob("*"):
        if path.is_file() and path.stat().st_size < 50 << 20:
            text = path.read_bytes()
            found += [f"{path.name}: {s}" for s in (secret_refused, secret_served) if s.encode() in text]
    assert not found, f"a prompt reached Ray's logs: {found}"


def test_a_client_that_disconnects_mid_request_leaves_the_service_serving(service):
    url = service["url"]
    host, port = url.removeprefix("http://").split(":")
    replica = call(url, "/healthz", key=None)[2]["replica"]
    for _ in range(3):
        body = json.dumps({**GOOD, "steps": 30}).encode()
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            time.sleep(0.5)  # queued or sampling: then the client leaves
    status, _, answer = call(url, "/v1/images", {**GOOD, "seed": 99}, timeout=120)
    assert status == 200 and answer["seed"] == 99
    assert call(url, "/healthz", key=None)[2]["replica"] == replica  # the same replica: nothing died


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def test_every_listener_of_the_app_is_loopback(service):
    """Every socket listening in this Ray instance's processes (GCS, raylet, agents, Serve's controller, proxy and
    replicas) is bound to a loopback address."""
    me = psutil.Process()
    processes = [me, *me.children(recursive=True)]
    listeners, wrong = [], []
    for process in processes:
        try:
            connections = process.net_connections(kind="inet")
            name = process.name()
        except psutil.Error:
            continue
        for connection in connections:
            if connection.status == psutil.CONN_LISTEN:
                listeners.append((name, connection.laddr))
                if not _loopback(connection.laddr.ip):
                    wrong.append(f"{name} (pid {process.pid}) listens on {connection.laddr.ip}:{connection.laddr.port}")
    assert any("Replica" in name for name, _ in listeners) and len(listeners) >= 5, listeners
    assert not wrong, "\n".join(wrong)


def test_a_full_queue_answers_503_with_retry_after(service):
    url = service["url"]
    bodies = [{**GOOD, "steps": 8, "seed": seed} for seed in range(16)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: call(url, "/v1/images", body, timeout=180), bodies))
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
    for status, headers, _ in answers:
        if status == 503:
            assert float(headers.get("retry-after", headers.get("Retry-After", "0"))) >= 1
    assert call(url, "/v1/images", GOOD)[0] == 200


def test_serve_load_smoke(service):
    """bench/serve_load.py --smoke against this app and a one-pair-per-call app beside it."""
    import importlib.util

    from fusion_engine.serve import runner
    from fusion_engine.serve.config import ServeConfig

    spec = importlib.util.spec_from_file_location("serve_load", Path(__file__).parents[1] / "bench/serve_load.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    runner.deploy(ServeConfig(**{**CONFIG, "max_batch_size": 1, "max_queue": 64}), bench.SINGLE_APP,
                  bench.SINGLE_PREFIX)
    try:
        code = bench.main(["--smoke", "--url", service["url"], "--single-url", service["url"] + bench.SINGLE_PREFIX,
                           "--api-key", KEY, "--batch-wait-timeout-s", str(CONFIG["batch_wait_timeout_s"]),
                           "--out", os.devnull])
    finally:
        from ray import serve

        serve.delete(bench.SINGLE_APP)
    assert code == 0


def test_a_killed_replica_loses_no_request(service):
    """ray.kill on the replica's actor mid-load: every request gets an answer (an image or an error status), none
    hangs past its timeout, and Ray's restarted replica serves the next ones."""
    import ray

    url = service["url"]
    replica = call(url, "/healthz", key=None)[2]["replica"]
    bodies = [{**GOOD, "steps": 6, "seed": seed} for seed in range(6)]
    results: list = [None] * len(bodies)

    def send(index: int) -> None:
        try:
            results[index] = call(url, "/v1/images", bodies[index], timeout=150)[0]
        except OSError as error:  # a reset connection is an answer too, but not a hang
            results[index] = type(error).__name__

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)
    for thread in threads:
        thread.join(timeout=170)
    assert not any(thread.is_alive() for thread in threads), "a request hung"
    print(f"\n[serve] answers around the kill: {results}")
    assert all(result is not None for result in results), results
    assert all(result == 200 or (isinstance(result, int) and result >= 500) for result in results), results
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            status, _, body = call(url, "/healthz", key=None, timeout=10)
            if status == 200 and body["replica"] != replica:
                break
        except OSError:
            pass
        time.sleep(1.0)
    else:
        pytest.fail("no new replica within 180 s")
    assert call(url, "/v1/images", GOOD, timeout=120)[0] == 200


def test_shutdown_drains_in_flight_requests(service):
    """Last in this module: stopping the service answers the requests it holds before Ray goes away."""
    from fusion_engine.serve import runner

    url, results = service["url"], []
    threads = [threading.Thread(target=lambda seed=seed: results.append(
        call(url, "/v1/images", {**GOOD, "steps": 12, "seed": seed}, timeout=150)[0])) for seed in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)  # the requests are in the replica
    runner.stop()
    for thread in threads:
        thread.join(timeout=160)
    assert results == [200, 200, 200]
