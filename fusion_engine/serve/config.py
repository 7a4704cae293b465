"""The service's settings and what a replica loads (no Ray import here: tests and the client side use it too)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from .schema import Limits

API_KEY_ENV = "FUSION_ENGINE_API_KEY"


@dataclass
class ServeConfig:
    """Everything a replica needs; plain values so Ray can ship it to any node."""

    model: str | None = None  # a local diffusers folder; None: the embedded toy world
    loras: str | None = None  # the catalogue folder; None with the toy world: its LoRAs, written per replica
    device: str | None = None  # None: cuda when num_gpus > 0, else cpu
    dtype: str | None = None  # None: float16 on cuda, float32 on cpu
    replicas: int = 1  # a fixed count; or autoscaling between min_replicas and max_replicas (not both)
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None  # per replica, what the autoscaler aims at; None: max_batch_size
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.05
    max_queue: int = 64  # requests waiting in one replica; past it: 503 with Retry-After
    budget_bytes: int = 256 << 20  # the pool's byte budget (LRU eviction past it)
    threads: int = 1  # torch threads per replica
    api_key: str | None = None
    limits: dict = field(default_factory=dict)  # Limits fields to override

    def check(self) -> ServeConfig:
        from ..errors import OptionError

        for name in ("replicas", "max_batch_size", "max_queue", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"serve: {name} must be a whole number >= 1, got {value!r}")
        if not (isinstance(self.batch_wait_timeout_s, (int, float)) and 0 <= self.batch_wait_timeout_s <= 10):
            raise OptionError(f"serve: batch_wait_timeout_s must be in [0, 10] s, got {self.batch_wait_timeout_s!r}")
        if not (self.num_gpus >= 0 and self.num_cpus >= 0):
            raise OptionError("serve: num_cpus and num_gpus must be >= 0")
        if isinstance(self.budget_bytes, bool) or not isinstance(self.budget_bytes, int) or self.budget_bytes < 1:
            raise OptionError(f"serve: budget_bytes must be a whole number >= 1, got {self.budget_bytes!r}")
        Limits(**self.limits)  # unknown limit names fail here
        self._check_autoscaling()
        return self

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def _check_autoscaling(self) -> None:
        from ..errors import OptionError

        if not self.autoscaling:
            if self.target_ongoing_requests is not None:
                raise OptionError("serve: target_ongoing_requests needs min_replicas and max_replicas (autoscaling)")
            return
        if self.replicas != 1:
            raise OptionError(f"serve: replicas={self.replicas} and min_replicas/max_replicas exclude each other: "
                              "give a fixed count or autoscaling bounds")
        for name, least in (("min_replicas", 0), ("max_replicas", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise OptionError(f"serve: {name} must be a whole number >= {least}, got {value!r}")
        if self.min_replicas > self.max_replicas:
            raise OptionError(f"serve: min_replicas={self.min_replicas} is above max_replicas={self.max_replicas}")
        target = self.target_ongoing_requests
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))
                                   or not 0 < target <= self.max_batch_size + self.max_queue):
            raise OptionError(f"serve: target_ongoing_requests must be in (0, max_batch_size + max_queue = "
                              f"{self.max_batch_size + self.max_queue}], got {target!r}")

    def deployment_options(self) -> dict:
        """The Ray Serve deployment options these settings make (``Deployment.options(**...)``): a fixed
        ``num_replicas`` or an ``autoscaling_config``, the request caps and each replica's resources."""
        self.check()
        # above max_batch_size (batches can fill) and above max_queue (the replica itself answers 503 + Retry-After)
        options = {"max_ongoing_requests": self.max_queue + self.max_batch_size,
                   "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}}  # threads: in __init__
        if self.autoscaling:
            # the autoscaler adds a replica when each holds more than the target: by default one full batch each
            target = self.target_ongoing_requests or self.max_batch_size
            options["autoscaling_config"] = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                             "initial_replicas": max(1, self.min_replicas),
                                             "target_ongoing_requests": float(target)}
            most = self.max_replicas
        else:
            options["num_replicas"] = most = self.replicas
        options["max_queued_requests"] = 4 * self.max_queue * most  # a backstop: each replica refuses first
        return options


def toy_catalogue(folder) -> str:
    """The toy world's catalogue: its subject and style LoRAs, and each at half strength (4 LoRAs, so requests can
    mix several pairs). The same bytes on every call, so every replica and every test sees the same LoRAs."""
    import shutil
    from pathlib import Path

    import fusion_engine as fe
    from fusion_engine.worlds.toy.world import STYLE_FILE, SUBJECT_FILE, WEIGHTS

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, file in (("subject", SUBJECT_FILE), ("style", STYLE_FILE)):
        for suffix, scale in (("", None), ("_half", 0.5)):
            target = folder / f"{name}{suffix}.safetensors"
            if target.exists():
                continue
            if scale is None:  # copied to a hidden name first: a reader never sees half a file
                shutil.copyfile(WEIGHTS / file, folder / f".{name}.partial")
                os.replace(folder / f".{name}.partial", target)
            else:  # B factors scaled (save_lora stores factors and alphas, not a LoRA's scale); written atomically
                lora = fe.load_lora(WEIGHTS / file)
                lora.layers = {key: replace(layer, lora_b=layer.lora_b * scale) for key, layer in lora.layers.items()}
                fe.save_lora(lora, target)
    return str(folder)


def load_pipeline(config: ServeConfig):
    """(the diffusers pipeline, the device, the dtype) a replica serves."""
    import torch

    import fusion_engine as fe
    from fusion_engine.utils.dtypes import DTYPES

    device = config.device or ("cuda" if config.num_gpus > 0 and torch.cuda.is_available() else "cpu")
    dtype = DTYPES[config.dtype] if config.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    if config.model is None:
        from fusion_engine.worlds import load_world

        pipe = load_world("toy").pipe
    else:
        pipe = fe.FusionPipeline.from_pretrained(config.model, pool=fe.LoRAPool(device=device, dtype=dtype),
                                                 torch_dtype=dtype, device=device).pipe
    pipe.set_progress_bar_config(disable=True)
    if pipe.dtype != dtype:
        pipe = pipe.to(dtype=dtype)
    return pipe.to(device), device, dtype


__all__ = ["API_KEY_ENV", "ServeConfig", "load_pipeline", "toy_catalogue"]
