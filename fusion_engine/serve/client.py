"""A Python client for the service: ``Client(url, api_key=...)``, ``generate`` and ``generate_many``.

Standard library HTTP only (no Ray on the client side). Loopback or any URL you give it; every call has a timeout.
"""
from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from ..errors import OptionError


class ServiceError(Exception):
    """The service answered with an error: ``status``, ``field`` (the request field at fault, or None),
    ``retry_after`` (seconds, with 503)."""

    def __init__(self, status: int, message: str, field: str | None = None, retry_after: float | None = None):
        super().__init__(f"{status}: {message}")
        self.status, self.field, self.retry_after = status, field, retry_after


@dataclass
class Generated:
    """One image as served: ``image`` (PIL), ``png`` (bytes), and the service's answer (seed, trace, timing...)."""

    png: bytes
    info: dict

    @property
    def image(self):
        from PIL import Image

        return Image.open(io.BytesIO(self.png)).convert("RGB")

    @property
    def seed(self) -> int:
        return self.info["seed"]

    @property
    def trace(self):
        return self.info.get("trace")

    @property
    def timing(self) -> dict:
        return self.info["timing"]


class Client:
    """Talk to a running ``fusion-engine serve``.

    Example:
        >>> client = Client("http://127.0.0.1:8000", api_key=None)
        >>> out = client.generate("a sks mushroom in zzt style", subject="subject", style="style", seed=3)
        >>> out.image.save("out.png"); out.trace
        >>> many = client.generate_many([dict(prompt="...", loras=["subject_half", "style"], seed=s)
        ...                              for s in range(8)], concurrency=4)
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout_s: float = 600.0):
        self.url, self.api_key, self.timeout_s = url.rstrip("/"), api_key, timeout_s

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                detail = json.loads(raw).get("error", {})
            except (ValueError, AttributeError):
                detail = {"message": raw[:300].decode(errors="replace")}
            retry = error.headers.get("Retry-After")
            raise ServiceError(error.code, detail.get("message", ""), detail.get("field"),
                               float(retry) if retry and retry.replace(".", "", 1).isdigit() else None) from None

    def health(self) -> dict:
        return self._request("GET", "/healthz")

    def loras(self) -> list[dict]:
        return self._request("GET", "/v1/loras")["loras"]

    def generate(self, prompt: str, subject: str | None = None, style: str | None = None, *, loras=None,
                 **fields) -> Generated:
        """One image: ``subject``/``style`` or ``loras=[...]``, and ``seed``, ``steps``, ``guidance``, ``width``,
        ``height``, ``policy``, ``options`` as the HTTP API takes them. ``ServiceError`` on an error answer."""
        body = {"prompt": prompt, **fields}
        if loras is not None:
            body["loras"] = list(loras)
        for key, value in (("subject", subject), ("style", style)):
            if value is not None:
                body[key] = value
        answer = self._request("POST", "/v1/images", body)
        return Generated(base64.b64decode(answer["image"]), answer)

    def generate_many(self, requests: list[dict], concurrency: int = 4, progress: bool = True) -> list:
        """Each dict as ``generate``'s keywords (``prompt`` included), ``concurrency`` in flight at once; results in
        order: a ``Generated`` or the ``ServiceError`` (or connection error) of that request."""
        from tqdm.auto import tqdm

        if not isinstance(concurrency, int) or concurrency < 1:
            raise OptionError(f"concurrency must be a whole number >= 1, got {concurrency!r}")

        def one(fields: dict):
            try:
                return self.generate(**fields)
            except (ServiceError, OSError) as error:
                return error

        results: list = [None] * len(requests)
        with ThreadPoolExecutor(max_workers=concurrency) as pool, \
                tqdm(total=len(requests), desc="images", disable=not progress) as bar:
            futures = {pool.submit(one, dict(fields)): index for index, fields in enumerate(requests)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
        return results


__all__ = ["Client", "Generated", "ServiceError"]
