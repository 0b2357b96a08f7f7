"""Every deliberate error is ours: `errors.py` promises that each error raised on purpose is a `HyperLoRAError`
subclass (with the matching builtin base), so callers can catch the library's errors and front ends can read
`error.argument`. This scans the source and fails, naming file:line, if a `raise <builtin exception>(...)` returns.

Allowed: a bare re-raise (`raise`), re-raising a caught name (`raise error`), our own classes, `NotImplementedError`
in an abstract method, `AttributeError` in a module's `__getattr__`, and `KeyboardInterrupt` / `SystemExit`.
"""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "diffusers_hyperlora"

BUILTIN_EXCEPTIONS = {
    name for name, value in vars(builtins).items() if isinstance(value, type) and issubclass(value, BaseException)
}
ALWAYS_ALLOWED = {"KeyboardInterrupt", "SystemExit"}


def _raised_name(node: ast.Raise) -> str | None:
    """The builtin exception a `raise` statement creates, or None when it raises something else."""
    exc = node.exc
    if exc is None:
        return None  # bare re-raise
    if isinstance(exc, ast.Call):
        exc = exc.func
    if isinstance(exc, ast.Name) and exc.id in BUILTIN_EXCEPTIONS and exc.id not in ALWAYS_ALLOWED:
        return exc.id
    return None  # our classes, or a caught exception re-raised by its name


def _allowed(name: str, function: ast.AST | None) -> bool:
    if function is None:
        return False
    if name == "AttributeError" and function.name == "__getattr__":
        return True
    if name == "NotImplementedError":
        return _is_abstract(function)
    return False


def _is_abstract(function: ast.AST) -> bool:
    """Decorated `@abstractmethod`, or a body that is only (a docstring and) the raise."""
    decorators = {getattr(d, "id", getattr(d, "attr", None)) for d in function.decorator_list}
    body = [s for s in function.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    return "abstractmethod" in decorators or (len(body) == 1 and isinstance(body[0], ast.Raise))


def builtin_raises(path: Path, root: Path = PACKAGE) -> list[str]:
    """`file:line: raise Name` for each builtin exception raised in `path` that the policy does not allow."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []

    def visit(node: ast.AST, function: ast.AST | None) -> None:
        for child in ast.iter_child_nodes(node):
            scope = child if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            if isinstance(child, ast.Raise):
                name = _raised_name(child)
                if name is not None and not _allowed(name, function):
                    found.append(f"{path.relative_to(root).as_posix()}:{child.lineno}: raise {name}")
            visit(child, scope)

    visit(tree, None)
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))
RELATIVE = [path.relative_to(PACKAGE).as_posix() for path in SOURCES]


@pytest.mark.parametrize("relative", RELATIVE)
def test_no_bare_builtin_raise(relative):
    found = builtin_raises(PACKAGE / relative)
    assert not found, "raise a HyperLoRAError subclass from errors.py (with argument=...) instead of:\n" + "\n".join(
        found
    )


def test_the_scan_finds_what_it_should(tmp_path):
    """The scanner itself: it must flag bare builtins and allow what the policy allows."""
    source = tmp_path / "sample.py"
    source.write_text(
        "def f(x):\n"
        "    if x:\n"
        "        raise ValueError('bad')\n"  # line 3: flagged
        "    raise TypeError\n"  # line 4: flagged (class, not a call)
        "def g():\n"
        "    try:\n"
        "        pass\n"
        "    except OSError as error:\n"
        "        raise InvalidArgumentError('x') from error\n"
        "    except KeyError:\n"
        "        raise\n"
        "    raise NotImplementedError\n"  # line 12: flagged (g is not abstract)
        "def __getattr__(name):\n"
        "    raise AttributeError(name)\n"
        "def h():\n"
        "    raise AttributeError('not a module __getattr__')\n"  # line 16: flagged
        "    raise SystemExit(2)\n"
        "def abstract(self):\n"
        "    'Subclasses implement it.'\n"
        "    raise NotImplementedError\n"
    )
    found = builtin_raises(source, root=tmp_path)
    assert found == [
        "sample.py:3: raise ValueError",
        "sample.py:4: raise TypeError",
        "sample.py:12: raise NotImplementedError",
        "sample.py:16: raise AttributeError",
    ]


def test_every_error_class_is_ours_and_a_builtin():
    from diffusers_hyperlora import errors

    classes = [value for value in vars(errors).values() if isinstance(value, type) and issubclass(value, Exception)]
    for cls in classes:
        assert issubclass(cls, errors.HyperLoRAError), cls
        if cls is not errors.HyperLoRAError:
            assert any(base.__module__ == "builtins" and base is not Exception for base in cls.__mro__), cls


def _argument_cases():
    import torch

    from diffusers_hyperlora.face.analyzer import select_providers, to_detected_face
    from diffusers_hyperlora.face.crops import SquareCrop, base_crop_box
    from diffusers_hyperlora.identities.cache import check_budget
    from diffusers_hyperlora.identities.inputs import resolve_identity
    from diffusers_hyperlora.io.lora_files import lora_rank
    from diffusers_hyperlora.model.config import HyperLoRAConfig
    from diffusers_hyperlora.utils.checks import parse_dtype

    return [
        (lambda: HyperLoRAConfig(num_basis=0), "num_basis"),
        (lambda: HyperLoRAConfig(base_rank=-1), "base_rank"),
        (lambda: HyperLoRAConfig(targets="x"), "targets"),
        (lambda: HyperLoRAConfig(use_id_embeds=False, use_image_embeds=False), "use_id_embeds"),
        (lambda: HyperLoRAConfig().rank("face"), "branch"),
        (lambda: base_crop_box(SquareCrop(5.0, 5.0, 2.0), (10, 10), (1.0, 0.0, 1.0, 1.0)), "base_crop_scale"),
        (lambda: select_providers(["CPUExecutionProvider"], False, ["CUDAExecutionProvider"]), "providers"),
        (lambda: to_detected_face({"kps": None}), "face_analyzer"),
        (lambda: check_budget(-1), "max_bytes"),
        (lambda: resolve_identity([], lambda photos: None), "inputs"),
        (lambda: lora_rank({"x": torch.zeros(1)}), "state_dict"),
        (lambda: parse_dtype("int8"), "dtype"),
    ]


def test_parameter_errors_name_their_argument():
    """Front ends (CLI, demo) map `error.argument` to their own spelling of the input."""
    from diffusers_hyperlora.errors import HyperLoRAError

    for call, argument in _argument_cases():
        with pytest.raises(HyperLoRAError) as caught:
            call()
        assert caught.value.argument == argument, (argument, str(caught.value))
