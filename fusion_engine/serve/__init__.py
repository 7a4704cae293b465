"""The HTTP service on Ray Serve (``pip install -e ".[serve]"``; docs/SERVING.md): a front end beside the CLI.

``fusion-engine serve`` starts it; ``Client`` (``fe.serve.Client``) talks to it (no Ray needed on the client side).
The Ray parts (``app``, ``runner``) are imported only when used, so neither ``import fusion_engine`` nor
``import fusion_engine.serve`` needs Ray.

Before issue 25 this name was the BatchFusion module (now ``fusion_engine/integration/batching.py``): its names
``fusion_engine.serve.BatchFusion``, ``Request`` and ``Result`` still work for one release and warn once each
(``FutureWarning``); use ``fusion_engine.BatchFusion``, ``fusion_engine.Request`` and ``fusion_engine.Result``.
"""
from ..utils.deprecation import warn_renamed
from .client import Client, Generated, ServiceError

__all__ = ["Client", "Generated", "ServiceError"]

_MOVED = ("BatchFusion", "Request", "Result")  # the old fusion_engine.serve module's public names


def __getattr__(name: str):
    if name in _MOVED:
        from ..integration import batching

        warn_renamed(f"fusion_engine.serve.{name}", f"fusion_engine.{name}")
        return getattr(batching, name)
    raise AttributeError(f"module 'fusion_engine.serve' has no attribute {name!r}")
