"""Renamed public names keep working for one release: each old name warns once per process (``FutureWarning``)."""
from __future__ import annotations

import warnings

from ..errors import OptionError

_WARNED: set[str] = set()  # the old names already warned about


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn, the first time only, that ``old`` is deprecated in favour of ``new``."""
    if old in _WARNED:
        return
    _WARNED.add(old)
    warnings.warn(f"{old} is deprecated and goes in the next release: use {new}", FutureWarning,
                  stacklevel=stacklevel)


def renamed_option(value, old_value, old: str, new: str):
    """The value of option ``new``; the deprecated ``old`` (warned once) when only that is given."""
    if old_value is None:
        return value
    warn_renamed(f"{old}=", f"{new}=", stacklevel=4)
    if value is not None:
        raise OptionError(f"{old}= is the deprecated name of {new}=: pass only {new}=")
    return old_value


__all__ = ["renamed_option", "warn_renamed"]
