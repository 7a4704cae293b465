"""Fusion policies, one small class each; ``make_policy`` builds one from a name and options."""
from __future__ import annotations

from ..errors import OptionError, OptionTypeError
from .base import Policy
from .blora import SDXL_BLOCKS, BLoRAPolicy
from .composite import CompositePolicy
from .direct import DirectPolicy, PositionDirect
from .fls import FLSPolicy
from .klora import KLoRAPolicy, PoolKLoRA
from .switch import SwitchPolicy

POLICIES = {
    "fls": FLSPolicy,
    "direct": DirectPolicy,
    "klora": KLoRAPolicy,
    "blora": BLoRAPolicy,
    "switch": SwitchPolicy,
    "composite": CompositePolicy,
}


POOL_POLICIES = {**POLICIES, "direct": PositionDirect, "klora": PoolKLoRA}  # a pool's: by position in each image


def make_policy(policy, pool: bool = False, **options) -> Policy:
    """A Policy from a name (``"fls"``, ``"direct"``, ...) and its options, or a ready instance; ``pool``: the policy
    of a LoRA pool (every name, over the LoRAs each image names by position; ``None`` is ``"fls"``)."""
    classes = POOL_POLICIES if pool else POLICIES
    if pool and policy is None:
        policy = "fls"
    if isinstance(policy, Policy):
        if options:
            raise OptionTypeError(f"options {sorted(options)} given with a ready policy instance {policy!r}")
        return policy
    if policy not in classes:
        raise OptionError(f"unknown policy {policy!r}; expected one of {sorted(classes)}")
    try:
        return classes[policy](**options)
    except TypeError as error:
        raise OptionTypeError(f"policy {policy!r} does not take options {sorted(options)}: {error}") from None


def divergence_option(policy, divergence: str | None) -> dict:
    """The policy options ``divergence=`` makes: ``{"divergence": ...}`` for FLS (``"kl"`` when not given, as for
    ``policy=None``, FLS by default); an ``OptionError`` for any other policy, which would ignore it."""
    if policy is None or policy == "fls":
        return {"divergence": "kl" if divergence is None else divergence}
    if divergence is not None:
        raise OptionError(f"divergence={divergence!r} is an option of policy 'fls' (it picks a LoRA by divergence), "
                          f"not of policy {policy!r}, which would ignore it: drop it")
    return {}


__all__ = [
    "POLICIES", "POOL_POLICIES", "SDXL_BLOCKS", "BLoRAPolicy", "CompositePolicy", "DirectPolicy", "FLSPolicy",
    "KLoRAPolicy", "Policy", "PoolKLoRA", "PositionDirect", "SwitchPolicy", "divergence_option", "make_policy",
]
