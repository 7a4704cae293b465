"""The HTTP service on Ray Serve (``pip install -e ".[serve]"``; docs/SERVING.md).

``fusion-engine serve`` starts it; ``Client`` talks to it (no Ray needed on the client side). The Ray parts
(``app``, ``runner``) are imported only when used, so ``import fusion_engine`` never needs Ray.
"""
from .client import Client, Generated, ServiceError

__all__ = ["Client", "Generated", "ServiceError"]
