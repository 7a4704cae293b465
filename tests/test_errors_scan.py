"""Every error the library raises on purpose is a ``FusionEngineError``: a scan of the package source.

The scan reads every module of ``fusion_engine`` with ``ast`` and fails on any ``raise`` of a built-in exception
class (``raise ValueError(...)``, ``raise KeyError``, ``raise builtins.RuntimeError(...)``). A bare ``raise`` and
``raise error`` (re-raising a caught object) are not flagged: the scan sees only class names.
"""
from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest

import fusion_engine as fe
from fusion_engine import errors

PACKAGE = Path(fe.__file__).parent
BUILTIN_EXCEPTIONS = frozenset(
    name for name, value in vars(builtins).items() if isinstance(value, type) and issubclass(value, BaseException)
)

# The only built-in raises allowed, each with the reason. Keyed by (file relative to the package, function, class).
ALLOWED = {
    # Policy.weights and Policy.image_weights (a pair's and a pool image's static weights), the methods each
    # static policy overrides: Python's own protocol for "a subclass must define this"; it never reaches a user
    # of a shipped policy.
    ("policies/base.py", "weights", "NotImplementedError"),
    ("policies/base.py", "image_weights", "NotImplementedError"),
    # the package's module __getattr__ (its deprecated names): Python's protocol for "no such attribute" is an
    # AttributeError, which hasattr() and getattr(..., default) rely on.
    ("__init__.py", "__getattr__", "AttributeError"),
    ("serve/__init__.py", "__getattr__", "AttributeError"),
    # PipelineAttachment.__getattr__, which forwards the denoiser Fusion's attributes: the same protocol.
    ("integration/attach.py", "__getattr__", "AttributeError"),
    # a Ray Serve replica's check_health: Ray's protocol is "any exception marks the replica unhealthy"; Ray
    # catches it, no user sees it.
    ("serve/app.py", "check_health", "RuntimeError"),
    # the kernels' source-checkout stand-in (fusion_engine/kernels/__init__.py) when csrc_triton/ is missing: an
    # import that cannot be satisfied is an ImportError, which the import system and optional-import code expect.
    ("kernels/__init__.py", "<module>", "ImportError"),
}
# `raise SystemExit(main())` under `if __name__ == "__main__":` is a script's exit status, not an error.
SCRIPT_EXIT = "SystemExit"


def _raised_class(node: ast.Raise) -> str | None:
    target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
    if isinstance(target, ast.Name):
        return target.id
    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "builtins":
        return target.attr
    return None


def builtin_raises(source: str, filename: str) -> list[str]:
    """``file:line: Class in function`` for every raise of a built-in exception class not in ``ALLOWED``."""
    found = []
    tree = ast.parse(source, filename)

    def visit(node, function, in_main):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            in_main = True
        if isinstance(node, ast.Raise) and node.exc is not None:
            name = _raised_class(node)
            allowed = (filename, function, name) in ALLOWED or (name == SCRIPT_EXIT and in_main)
            if name in BUILTIN_EXCEPTIONS and not allowed:
                found.append(f"{filename}:{node.lineno}: {name} in {function}")
        for child in ast.iter_child_nodes(node):
            visit(child, function, in_main)

    visit(tree, "<module>", False)
    return found


def test_the_package_raises_no_builtin_exception_class():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30, f"scanned only {len(files)} files under {PACKAGE}"
    found = [hit for file in files
             for hit in builtin_raises(file.read_text(), file.relative_to(PACKAGE).as_posix())]
    assert not found, ("raise a fusion_engine.errors class (OptionError for a bad argument) instead of a "
                       "built-in:\n" + "\n".join(found))


def test_the_allow_list_names_raises_that_exist():
    """A stale allow-list entry would silently allow a future raise in the same place."""
    for file, function, name in ALLOWED:
        tree = ast.parse((PACKAGE / file).read_text())
        scopes = [tree] if function == "<module>" else [  # "<module>": the module's own statements
            fn for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef) and fn.name == function]
        in_functions = {id(node) for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef) and function == "<module>"
                        for node in ast.walk(fn)}
        raises = [node for scope in scopes for node in ast.walk(scope)
                  if isinstance(node, ast.Raise) and node.exc is not None and id(node) not in in_functions]
        assert any(_raised_class(node) == name for node in raises), (file, function, name)


@pytest.mark.parametrize("source, expected", [
    ("def f():\n    raise ValueError('x')\n", ["m.py:2: ValueError in f"]),
    ("def f():\n    raise KeyError\n", ["m.py:2: KeyError in f"]),
    ("import builtins\ndef g():\n    raise builtins.TypeError('x')\n", ["m.py:3: TypeError in g"]),
    ("raise SystemExit(1)\n", ["m.py:1: SystemExit in <module>"]),
    ("def f():\n    raise NotImplementedError\n", ["m.py:2: NotImplementedError in f"]),
    ("if __name__ == '__main__':\n    raise SystemExit(main())\n", []),
    ("def f():\n    try:\n        pass\n    except ValueError as error:\n        raise error\n", []),
    ("def f():\n    try:\n        pass\n    except ValueError:\n        raise\n", []),
    ("from fusion_engine.errors import OptionError\ndef f():\n    raise OptionError('x')\n", []),
])
def test_the_scan_flags_builtin_raises_and_only_those(source, expected):
    assert builtin_raises(source, "m.py") == expected


def test_every_error_class_is_exported_and_is_a_builtin_too():
    classes = {name: value for name, value in vars(errors).items()
               if isinstance(value, type) and issubclass(value, errors.FusionEngineError)}
    assert len(classes) >= 17
    for name, cls in classes.items():
        assert getattr(fe, name) is cls and name in fe.__all__, name
        if cls is not errors.FusionEngineError:
            # AttributeError: LayerAttributeError, raised by attribute access, where hasattr() must still work
            assert issubclass(cls, (ValueError, RuntimeError, FileNotFoundError, AttributeError)), name


def test_bad_options_raise_option_errors_that_old_except_clauses_still_catch():
    with pytest.raises(fe.OptionError, match="unknown policy 'nope'") as info:
        fe.make_policy("nope")
    assert isinstance(info.value, ValueError)
    with pytest.raises(TypeError, match="does not take options"):  # what was a TypeError stays one
        fe.make_policy("fls", tau=3)
    with pytest.raises(fe.OptionTypeError, match="ready policy instance"):
        fe.make_policy(fe.make_policy("fls"), divergence="kl")
    with pytest.raises(fe.OptionError, match="tau must be a whole number of steps >= 1"):
        fe.make_policy("switch", tau=0)
    with pytest.raises(fe.OptionError, match="unknown backend 'cuda'"):
        from fusion_engine.ops import resolve_backend
        resolve_backend("cuda", None)
