"""Start the service: a Ray instance (local and loopback-only by default, or an existing cluster), Serve's HTTP
proxy on ``host:port``, and the application. Used by ``fusion-engine serve``, the tests and the load bench."""
from __future__ import annotations

import os
import time

from ..errors import ServiceStartError

APP_NAME = "fusion_engine"
LOOPBACK = "127.0.0.1"
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def start_ray(address: str | None = None, num_cpus: int = 2) -> None:
    """Connect to ``address`` (a running cluster: ``"auto"``, ``"ray://..."``), or start a local Ray whose every
    listener is on 127.0.0.1, without the dashboard and without usage statistics."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not address:
        # Ray turns a node address of 127.0.0.1 into the machine's own address (and then binds its gRPC servers and
        # agents there) unless multi-node clusters are off: this single-node instance switches them off, so every
        # Ray process of it listens on loopback only (tests/test_serve_ray.py checks each listening socket).
        os.environ[LOCAL_ONLY_ENV] = "0"
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # the same switch, where ray was imported before the variable was set
    ray.init(_node_ip_address=LOOPBACK, include_dashboard=False, num_cpus=num_cpus, log_to_driver=False)
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:
        ray.shutdown()
        raise ServiceStartError(f"the local Ray instance took the address {node_ip}, not {LOOPBACK}: refusing to serve "
                           "beyond loopback (pass address= to use a cluster on purpose)")


def start(config, host: str = LOOPBACK, port: int = 8000, address: str | None = None, num_cpus: int = 2,
          timeout_s: float = 600.0) -> str:
    """Ray, Serve's proxy and the app (``config``: a ``ServeConfig``); returns the base URL once replicas are up."""
    from ray import serve

    start_ray(address, num_cpus)
    serve.start(http_options={"host": host, "port": port}, detached=False)
    deploy(config, APP_NAME, "/", timeout_s)
    return f"http://{LOOPBACK if host in ('0.0.0.0', '::') else host}:{port}"


def deploy(config, name: str = APP_NAME, route_prefix: str = "/", timeout_s: float = 600.0) -> None:
    """Deploy (or redeploy) ``config`` as application ``name`` under ``route_prefix``; returns once it runs."""
    from ray import serve

    from .app import build_app

    serve.run(build_app(config), name=name, route_prefix=route_prefix, blocking=False)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(name)
        if status is not None and str(status.status).endswith("RUNNING"):
            return
        if status is not None and str(status.status).endswith(("DEPLOY_FAILED", "UNHEALTHY")):
            raise ServiceStartError(f"the serve application {name!r} failed to start: {status.message}")
        time.sleep(0.5)
    raise ServiceStartError(f"the serve application {name!r} was not running after {timeout_s} s")


def stop() -> None:
    """Drain and stop: each application is deleted first (its replicas finish their in-flight requests, within
    graceful_shutdown_timeout_s, while the proxy still carries the answers back), then Serve and Ray shut down."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        names = list(serve.status().applications)
    except Exception:  # noqa: BLE001 - Serve not running: nothing to drain
        names = []
    for name in names:  # each replica answers what it holds (graceful_shutdown_timeout_s); the proxy stays up
        serve.delete(name, _blocking=True)
    serve.shutdown()
    ray.shutdown()


def serve_forever(config, host: str = LOOPBACK, port: int = 8000, address: str | None = None,
                  num_cpus: int = 2) -> int:
    url = start(config, host, port, address, num_cpus)
    print(f"fusion-engine serve: listening on {url} (POST /v1/images, GET /v1/loras, GET /healthz); Ctrl-C stops",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("fusion-engine serve: draining in-flight requests and stopping", flush=True)
    finally:
        stop()
    return 0


__all__ = ["APP_NAME", "deploy", "serve_forever", "start", "start_ray", "stop"]
