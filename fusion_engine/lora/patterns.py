"""PEFT ``alpha_pattern`` keys from a file's metadata, matched as PEFT does but without running the file's regex.

PEFT gives a module the value of the first pattern key ``p`` (in dict order) for which
``re.match(rf"(.*\\.)?({p})$", module)`` holds: the whole module name, or a suffix of it that starts right
after a dot, matches ``p``. Files written by diffusers and PEFT hold module names there
(``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``), whose dots are regex wildcards, and
hand-written configs add ``.*`` and a leading ``^``. A regex from a file is untrusted input, though:
``(.+)+!`` backtracks for hours in Python's ``re``. So only that subset is accepted (literal
characters ``[A-Za-z0-9_-]``, ``.``, ``.*``, ``\\.``, a leading ``^``, a trailing ``$``), translated to a
glob and matched through ``fnmatch``'s translation, whose stars become atomic groups (no backtracking
blow-up); any other regex syntax is refused with an error naming the pattern. The number of patterns and
the pattern x module work are bounded too.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping

from ..errors import LoRAFormatError

MAX_PATTERN_CHARS = 512
MAX_PATTERNS = 4096
MAX_MATCHES = 1 << 22  # patterns x modules: real files stay far below (SDXL: ~1100 x 1100 at most)
_LITERAL = re.compile(r"[A-Za-z0-9_\-]")
_ACCEPTED = r"literal module-name characters [A-Za-z0-9_-], '.', '.*', '\.', a leading '^' and a trailing '$'"


def _glob(pattern: str) -> str | None:
    """The glob equivalent of a regex from the accepted subset, or ``None`` if it uses anything else."""
    body = pattern.removeprefix("^").removesuffix("$")
    glob, i = [], 0
    while i < len(body):
        two = body[i:i + 2]
        if two == ".*":
            glob.append("*")
            i += 2
        elif two == "\\.":
            glob.append("[.]")
            i += 2
        elif body[i] == ".":
            glob.append("?")
            i += 1
        elif _LITERAL.fullmatch(body[i]):
            glob.append(body[i])
            i += 1
        else:
            return None
    return "".join(glob)


def compile_pattern(pattern, where: str, source: str) -> re.Pattern:
    """One metadata pattern key -> a compiled, backtracking-safe regex with PEFT's semantics.

    Args:
        pattern: the key as read from the file's metadata.
        where: what holds it, for messages (``"alpha_pattern"``).
        source: the file, for messages.
    """
    if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN_CHARS:
        what = f"a {type(pattern).__name__}" if not isinstance(pattern, str) else f"{len(pattern)} characters long"
        raise LoRAFormatError(f"{source}: adapter metadata {where} key {pattern!r:.80} is {what} "
                              f"(pattern keys are module names of at most {MAX_PATTERN_CHARS} characters)")
    glob = _glob(pattern)
    if glob is None:
        raise LoRAFormatError(
            f"{source}: adapter metadata {where} key {pattern!r:.80} uses regex syntax that is not evaluated from a "
            f"file (it could run for hours); accepted: {_ACCEPTED}"
        )
    options = [fnmatch.translate(glob)]
    if not pattern.startswith("^"):  # PEFT's (.*\.)? prefix: the match may also start right after any dot
        options.append(fnmatch.translate("*[.]" + glob))
    return re.compile("|".join(options))


def compile_patterns(patterns: Mapping, modules: int, where: str, source: str) -> list[tuple[str, re.Pattern]]:
    """Every key of ``patterns`` compiled (dict order kept: PEFT's first match wins), with the work bounded."""
    if len(patterns) > MAX_PATTERNS or len(patterns) * modules > MAX_MATCHES:
        raise LoRAFormatError(
            f"{source}: adapter metadata {where} holds {len(patterns)} patterns for {modules} modules "
            f"(limits: {MAX_PATTERNS} patterns, {MAX_MATCHES} pattern x module tests)"
        )
    return [(key, compile_pattern(key, where, source)) for key in patterns]


def first_match(compiled: list[tuple[str, re.Pattern]], module: str) -> str | None:
    """The first pattern key that matches ``module``, as ``peft.utils.other.get_pattern_key`` picks it."""
    for key, regex in compiled:
        if regex.match(module):
            return key
    return None
