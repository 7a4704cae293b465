"""Fusion policies, one small class each; ``make_policy`` builds one from a name and options."""
from __future__ import annotations

from fusion_engine.errors import OptionError, OptionTypeError

from .base import Policy
from .blora import SDXL_BLOCKS, BLoRAPolicy
from .composite import CompositePolicy
from .direct import DirectPolicy
from .fls import FLSPolicy
from .klora import KLoRAPolicy
from .switch import SwitchPolicy

POLICIES = {
    "fls": FLSPolicy,
    "direct": DirectPolicy,
    "klora": KLoRAPolicy,
    "blora": BLoRAPolicy,
    "switch": SwitchPolicy,
    "composite": CompositePolicy,
}


def make_policy(policy, **options) -> Policy:
    """A Policy from a name (``"fls"``, ``"direct"``, ...) and its options, or a ready instance."""
    if isinstance(policy, Policy):
        if options:
            raise OptionTypeError(f"options {sorted(options)} given with a ready policy instance {policy!r}")
        return policy
    if policy not in POLICIES:
        raise OptionError(f"unknown policy {policy!r}; expected one of {sorted(POLICIES)}")
    try:
        return POLICIES[policy](**options)
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
    "POLICIES", "SDXL_BLOCKS", "BLoRAPolicy", "CompositePolicy", "DirectPolicy", "FLSPolicy", "KLoRAPolicy",
    "Policy", "SwitchPolicy", "divergence_option", "make_policy",
]
