"""Requests of the HTTP service, validated field by field before anything is queued.

Two shapes come in: the service's own ``POST /v1/images`` JSON and AUTOMATIC1111's ``POST /sdapi/v1/txt2img``.
Both become one ``ImageRequest``. Every failure is a ``RequestError`` carrying the HTTP status and the field at
fault: 400 for a value of the wrong type or outside its domain (NaN, a negative size, a name that is not a plain
file name), 413 for a value over a size limit (prompt length, steps, width/height, number of LoRAs, body bytes).

Grouping rule: requests share a pipeline call when their ``batch_key()`` is equal. The key holds only plain
Python scalars and tuples of them (steps, guidance, size, policy and the policy options), which compare exactly;
prompt, LoRA names and seed go per image into the call. Nothing is ever grouped by ``repr``.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from ..errors import OptionError

# Limits (a deployment may lower or raise them through ``Limits``).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
POLICIES = ("fls", "direct", "switch", "klora")
DIVERGENCES = ("kl", "js", "cosine", "dot")
FIELDS = ("prompt", "subject", "style", "loras", "seed", "steps", "guidance", "width", "height", "policy", "options")
OPTIONS = {"fls": ("divergence",), "direct": ("weights",), "switch": ("tau",), "klora": ()}
# AUTOMATIC1111 txt2img: the fields this service honours (A1111 name -> ours) and the pair's extra fields.
A1111_HONOURED = {"prompt": "prompt", "seed": "seed", "steps": "steps", "cfg_scale": "guidance", "width": "width",
                  "height": "height"}
A1111_EXTRA = ("subject", "style", "loras", "policy", "options")
A1111_ONE = ("batch_size", "n_iter")  # accepted when 1 (one image per request)
A1111_EMPTY = ("negative_prompt",)  # accepted when empty
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Limits:
    """Upper bounds on a request; over one is a 413 naming the field."""

    max_prompt_chars: int = 1000
    max_steps: int = 100
    max_side: int = 1024
    max_loras: int = 4
    max_body_bytes: int = 64 * 1024
    size_multiple: int = 8


class RequestError(Exception):
    """A request the service refuses: ``status`` (400, 401, 404, 413, 503), ``field`` (or None), a message."""

    def __init__(self, status: int, message: str, field: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.field, self.retry_after = status, field, retry_after

    def body(self) -> dict:
        kind = {400: "bad_request", 401: "unauthorized", 404: "not_found", 413: "too_large",
                503: "busy"}.get(self.status, "error")
        return {"error": {"kind": kind, "message": str(self), "field": self.field}}


@dataclass(frozen=True)
class ImageRequest:
    """One image: its own prompt, LoRA names (priority order) and seed, and the options its batch must share."""

    prompt: str
    loras: tuple[str, ...]
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    policy: str = "fls"
    options: tuple = field(default=())  # sorted (name, value) pairs; values are str, int, float or tuples of float

    def batch_key(self) -> tuple:
        """Requests with equal keys share one pipeline call: exact comparisons of plain values only."""
        return (self.steps, self.guidance, self.width, self.height, self.policy, self.options)

    def call_options(self) -> dict:
        """The pipeline call's options (width/height 0: the pipeline's default size)."""
        sides = {name: value for name, value in (("width", self.width), ("height", self.height)) if value}
        return {"num_inference_steps": self.steps, "guidance_scale": self.guidance, **sides}

    def policy_options(self) -> dict:
        return {name: list(value) if isinstance(value, tuple) else value for name, value in self.options}


def _int(body: dict, name: str, low: int, high: int | None, default=None, over_status: int = 413) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"{name} must be an integer, got {_kind(value)}", name)
    if value < low:
        raise RequestError(400, f"{name} must be >= {low}, got {value}", name)
    if high is not None and value > high:
        raise RequestError(over_status, f"{name} must be <= {high}, got {value}", name)
    return value


def _float(body: dict, name: str, low: float, high: float, default) -> float:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(400, f"{name} must be a number, got {_kind(value)}", name)
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
        raise RequestError(400, f"{name} must be a finite number in [{low}, {high}], got {value}", name)
    return value


def _kind(value) -> str:
    return "nothing" if value is None else type(value).__name__


def check_name(name, where: str) -> str:
    """A LoRA name: a plain file stem (letters, digits, '_', '-', '.'; no '/', no '..', no leading dot)."""
    if not isinstance(name, str):
        raise RequestError(400, f"{where}: a LoRA name must be a string, got {_kind(name)}", where)
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise RequestError(400, f"{where}: {name[:80]!r} is not a LoRA name (letters, digits, '_', '-', '.', at "
                                "most 64, no path)", where)
    return name


def _loras(body: dict, limits: Limits) -> tuple[str, ...]:
    has_pair = "subject" in body or "style" in body
    if "loras" in body:
        if has_pair:
            raise RequestError(400, "give either subject/style or loras, not both", "loras")
        loras = body["loras"]
        if not isinstance(loras, list) or not loras:
            raise RequestError(400, f"loras must be a non-empty list of LoRA names, got {_kind(loras)}", "loras")
        if len(loras) > limits.max_loras:
            raise RequestError(413, f"loras: at most {limits.max_loras} LoRAs per image, got {len(loras)}", "loras")
        names = tuple(check_name(name, f"loras[{i}]") for i, name in enumerate(loras))
    elif has_pair:
        names = tuple(check_name(body[key], key) for key in ("subject", "style") if key in body)
    else:
        raise RequestError(400, "name the LoRAs: subject and/or style, or loras: [...]", "subject")
    if len(set(names)) != len(names):
        raise RequestError(400, f"a LoRA is named twice: {list(names)}", "loras")
    return names


def _options(body: dict, policy: str, count: int) -> tuple:
    options = body.get("options", {})
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise RequestError(400, f"options must be an object, got {_kind(options)}", "options")
    allowed = OPTIONS[policy]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise RequestError(400, f"options {unknown} are not taken by policy {policy!r} (it takes "
                                f"{list(allowed) or 'none'})", f"options.{unknown[0]}")
    out = []
    if "divergence" in options:
        value = options["divergence"]
        if value not in DIVERGENCES:
            raise RequestError(400, f"options.divergence must be one of {list(DIVERGENCES)}",
                               "options.divergence")
        out.append(("divergence", value))
    if "tau" in options:
        out.append(("tau", _int(options, "tau", 1, 1000, over_status=400)))
    if "weights" in options:
        weights = options["weights"]
        if not isinstance(weights, list) or len(weights) != count:
            raise RequestError(400, f"options.weights must be a list of {count} numbers (one per LoRA)",
                               "options.weights")
        out.append(("weights", tuple(_float({"w": w}, "w", -10.0, 10.0, None) for w in weights)))
    return tuple(sorted(out))


def parse_images(body, limits: Limits = Limits()) -> ImageRequest:
    """``POST /v1/images``: the JSON object -> ``ImageRequest``, or the ``RequestError`` naming the field."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object, got {_kind(body)}", None)
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})", unknown[0])
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(400, f"prompt must be a non-empty string, got {_kind(prompt)}", "prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(413, f"prompt has {len(prompt)} characters, over the limit of {limits.max_prompt_chars}",
                           "prompt")
    loras = _loras(body, limits)
    policy = body.get("policy", "fls")
    if policy not in POLICIES:
        raise RequestError(400, f"policy must be one of {list(POLICIES)}, got {str(policy)[:40]!r}", "policy")
    sides = {}
    for side in ("width", "height"):
        value = _int(body, side, limits.size_multiple, limits.max_side, default=None) \
            if body.get(side) is not None else None
        if value is not None and value % limits.size_multiple:
            raise RequestError(400, f"{side} must be a multiple of {limits.size_multiple}, got {value}", side)
        sides[side] = value
    return ImageRequest(
        prompt=prompt, loras=loras, seed=_int(body, "seed", 0, MAX_SEED, default=0, over_status=400),
        steps=_int(body, "steps", 1, limits.max_steps, default=20),
        guidance=_float(body, "guidance", 0.0, 50.0, 5.0),
        width=sides["width"] or 0, height=sides["height"] or 0, policy=policy,
        options=_options(body, policy, len(loras)))


def parse_txt2img(body, limits: Limits = Limits()) -> ImageRequest:
    """AUTOMATIC1111 ``POST /sdapi/v1/txt2img``: honoured fields (``A1111_HONOURED``), the pair in extra fields
    (``subject``, ``style`` or ``loras``, ``policy``, ``options``); ``batch_size``/``n_iter`` only 1,
    ``negative_prompt`` only empty, ``seed`` -1 means 0 here (seeds are explicit); any other field is refused by
    name."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object, got {_kind(body)}", None)
    ours = {}
    for name, value in body.items():
        if name in A1111_HONOURED:
            ours[A1111_HONOURED[name]] = value
        elif name in A1111_EXTRA:
            ours[name] = value
        elif name in A1111_ONE:
            if value != 1 or isinstance(value, bool):
                raise RequestError(400, f"{name}: this service makes one image per request; send {name}=1 or leave "
                                        "it out", name)
        elif name in A1111_EMPTY:
            if value not in ("", None):
                raise RequestError(400, f"{name} is not supported by this service", name)
        else:
            raise RequestError(400, f"field {name!r} is not supported by this service (honoured: "
                                    f"{', '.join([*A1111_HONOURED, *A1111_EXTRA, *A1111_ONE, *A1111_EMPTY])})", name)
    if ours.get("seed") == -1:
        ours["seed"] = 0
    return parse_images(ours, limits)


def load_json(raw: bytes, limits: Limits = Limits()):
    """The request body as JSON: 413 over ``max_body_bytes``, 400 when it does not parse (NaN/Infinity refused)."""
    if len(raw) > limits.max_body_bytes:
        raise RequestError(413, f"the body has {len(raw)} bytes, over the limit of {limits.max_body_bytes}", "body")

    def no_constant(name):
        raise OptionError(f"{name} is not JSON")  # a ValueError: caught below, a 400

    try:
        return json.loads(raw, parse_constant=no_constant)
    except (ValueError, RecursionError) as error:
        raise RequestError(400, f"the body is not valid JSON: {str(error)[:120]}", "body") from None


__all__ = ["ImageRequest", "Limits", "RequestError", "check_name", "load_json", "parse_images", "parse_txt2img"]
