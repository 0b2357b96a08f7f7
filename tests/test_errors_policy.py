"""Every deliberate error is ours: `errors.py` promises that each error raised on purpose is a `HyperLoRAError`
subclass (with the matching builtin base), so callers can catch the library's errors and front ends can read
`error.argument`. This scans every module under `src/diffusers_hyperlora/` and fails, naming file:line, where a
builtin exception (or another library's) is raised or built.

Flagged: `raise ValueError(...)` / `raise KeyError` / `raise OSError(...) from error`, `builtins.ValueError(...)`,
building a builtin exception anywhere (a helper that returns `ValueError(...)`, `error = TypeError(...)` raised
later), naming one as a value (`kind = RuntimeError`), a class outside `errors.py` deriving from one, and raising
an exception class imported from another library (`raise HfHubHTTPError(...)`).

Allowed: a bare re-raise (`raise`), re-raising a caught name (`raise error`), our own classes, builtin exceptions
in `except` clauses, `isinstance` / `issubclass`, `contextlib.suppress` and annotations, the error classes of
`errors.py`, `NotImplementedError` in an abstract method, `AttributeError` in a module's `__getattr__`, and
`KeyboardInterrupt` / `SystemExit`.
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
CHECKS = {"isinstance", "issubclass", "suppress"}  # calls whose arguments name exception classes, build none


def _builtin_named(node: ast.AST) -> str | None:
    """`ValueError` for `ValueError` or `builtins.ValueError`, None for anything else."""
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
        name = node.id
    elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "builtins":
        name = node.attr
    else:
        return None
    return name if name in BUILTIN_EXCEPTIONS and name not in ALWAYS_ALLOWED else None


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


def _harmless_places(tree: ast.AST, may_derive: bool) -> set[int]:
    """The ids of nodes under which naming a builtin exception builds or raises nothing."""
    places = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and node.type is not None:
            places.append(node.type)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in CHECKS:
            checks_type = getattr(node.func, "id", None) in ("isinstance", "issubclass")
            places.extend(node.args[1:] if checks_type else node.args)
        elif isinstance(node, ast.arg | ast.AnnAssign) and node.annotation is not None:
            places.append(node.annotation)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns is not None:
            places.append(node.returns)
        elif isinstance(node, ast.ClassDef) and may_derive:
            places.extend(node.bases)
    return {id(inner) for place in places for inner in ast.walk(place)}


def _foreign_names(tree: ast.AST) -> set[str]:
    """Names bound by imports from other libraries (`from huggingface_hub.errors import HfHubHTTPError`, `torch`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
            names.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names - {"builtins"}  # `builtins.ValueError` is flagged as a builtin


def _foreign_raise(node: ast.Raise, foreign: set[str]) -> str | None:
    """`HfHubHTTPError` for `raise HfHubHTTPError(...)`, `torch.OutOfMemoryError` for `raise torch.OutOfMemoryError`:
    classes of other libraries."""
    exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
    root = exc
    while isinstance(root, ast.Attribute):
        root = root.value
    if isinstance(root, ast.Name) and root.id in foreign:
        return ast.unparse(exc)
    return None


def builtin_raises(path: Path, root: Path = PACKAGE) -> list[str]:
    """`file:line: raise Name` (or `file:line: builds Name`) for each builtin or foreign exception that `path` raises
    or builds and the policy does not allow."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    harmless = _harmless_places(tree, may_derive=path.name == "errors.py" and path.parent == PACKAGE)
    foreign = _foreign_names(tree)
    where = path.relative_to(root).as_posix()
    found = []

    def visit(node: ast.AST, function: ast.AST | None, raising: bool) -> None:
        for child in ast.iter_child_nodes(node):
            scope = child if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            if isinstance(child, ast.Raise) and child.exc is not None:
                name = _foreign_raise(child, foreign)
                if name is not None:
                    found.append(f"{where}:{child.lineno}: raise {name}")
            name = _builtin_named(child)
            if name is not None and id(child) not in harmless and not _allowed(name, function):
                found.append(f"{where}:{child.lineno}: {'raise' if raising else 'builds'} {name}")
            visit(child, scope, isinstance(child, ast.Raise) or (raising and not isinstance(child, ast.stmt)))

    visit(tree, None, False)
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


def test_the_scan_finds_builtins_raised_indirectly_or_from_other_libraries(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text(
        "import builtins\n"
        "import contextlib\n"
        "import torch\n"
        "from huggingface_hub.errors import HfHubHTTPError\n"
        "from ..errors import InvalidArgumentError\n"
        "def f(path, error: OSError) -> KeyError:\n"
        "    raise RuntimeError('x') from error\n"  # line 7
        "    raise KeyError(path)\n"  # line 8
        "    raise FileNotFoundError(path)\n"  # line 9
        "    raise OSError(5, 'x')\n"  # line 10
        "    raise builtins.ValueError('x')\n"  # line 11
        "    failure = ValueError('later')\n"  # line 12: built, raised by name below
        "    raise failure\n"
        "    kind = TypeError\n"  # line 14: an alias raised below
        "    raise kind('x')\n"
        "    raise InvalidArgumentError('x') from ValueError('cause')\n"  # line 16
        "    raise HfHubHTTPError('x')\n"  # line 17: another library's class
        "    raise torch.OutOfMemoryError('x')\n"  # line 18
        "def _error(name):\n"
        "    return ValueError(name)\n"  # line 20: a helper that builds the error
        "class Mine(ValueError):\n"  # line 21: an error class outside errors.py
        "    pass\n"
        "def allowed(x):\n"
        "    if isinstance(x, (ValueError, KeyError)) or issubclass(type(x), OSError):\n"
        "        with contextlib.suppress(FileNotFoundError):\n"
        "            pass\n"
        "    try:\n"
        "        pass\n"
        "    except (RuntimeError, builtins.TypeError) as error:\n"
        "        raise error\n"
        "    raise InvalidArgumentError('x', argument='x')\n"
    )
    found = builtin_raises(source, root=tmp_path)
    assert found == [
        "sample.py:7: raise RuntimeError",
        "sample.py:8: raise KeyError",
        "sample.py:9: raise FileNotFoundError",
        "sample.py:10: raise OSError",
        "sample.py:11: raise ValueError",
        "sample.py:12: builds ValueError",
        "sample.py:14: builds TypeError",
        "sample.py:16: raise ValueError",
        "sample.py:17: raise HfHubHTTPError",
        "sample.py:18: raise torch.OutOfMemoryError",
        "sample.py:20: builds ValueError",
        "sample.py:21: builds ValueError",
    ]


def test_every_module_is_scanned():
    """All of src/diffusers_hyperlora/, every subpackage, with no module left out."""
    parts = {Path(relative).parts[0] for relative in RELATIVE if "/" in relative}
    expected = {"adapters", "cli", "demo", "face", "identities", "io", "model", "pipeline", "testing", "training"}
    expected.add("utils")
    assert expected <= parts and "errors.py" in RELATIVE and len(RELATIVE) > 50


def test_every_error_class_is_ours_and_a_builtin():
    from diffusers_hyperlora import errors

    classes = [value for value in vars(errors).values() if isinstance(value, type) and issubclass(value, Exception)]
    for cls in classes:
        assert issubclass(cls, errors.HyperLoRAError), cls
        if cls is not errors.HyperLoRAError:
            assert any(base.__module__ == "builtins" and base is not Exception for base in cls.__mro__), cls


def _argument_cases(tmp_path):
    from types import SimpleNamespace

    import torch

    from diffusers_hyperlora.adapters.sliders import HyperLoRASlider, check_slider_weight
    from diffusers_hyperlora.face.analyzer import resolve_face_models_dir, select_providers, to_detected_face
    from diffusers_hyperlora.face.crops import SquareCrop, base_crop_box
    from diffusers_hyperlora.identities.cache import check_budget
    from diffusers_hyperlora.identities.identity import HyperLoRAIdentity
    from diffusers_hyperlora.identities.inputs import resolve_identity
    from diffusers_hyperlora.io.hub import HubOptions
    from diffusers_hyperlora.io.lora_files import lora_rank
    from diffusers_hyperlora.io.release import save_release_checkpoint
    from diffusers_hyperlora.model.config import HyperLoRAConfig
    from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor
    from diffusers_hyperlora.training.families import diffusion_target
    from diffusers_hyperlora.training.stages import check_stage
    from diffusers_hyperlora.utils.checks import parse_dtype

    predictor = tiny_hyperlora_predictor()  # reads ArcFace (512) and CLIP (48 wide) features, no Base branch
    arcface, clip = torch.randn(1, 512), torch.randn(1, 3, 48)
    library_folder = tmp_path / "library"
    predictor.save_pretrained(library_folder)
    no_clip = SimpleNamespace(config=SimpleNamespace(has_base=True, use_image_embeds=False, use_id_embeds=False))
    scheduler = SimpleNamespace(config=SimpleNamespace(prediction_type="flow"))
    return [
        (lambda: HyperLoRAConfig(num_basis=0), "num_basis"),
        (lambda: HyperLoRAConfig(base_rank=-1), "base_rank"),
        (lambda: HyperLoRAConfig(targets="x"), "targets"),
        (lambda: HyperLoRAConfig(use_id_embeds=False, use_image_embeds=False), "use_id_embeds"),
        (lambda: HyperLoRAConfig().rank("face"), "branch"),
        (lambda: base_crop_box(SquareCrop(5.0, 5.0, 2.0), (10, 10), (1.0, 0.0, 1.0, 1.0)), "base_crop_scale"),
        (lambda: select_providers(["CPUExecutionProvider"], False, ["CUDAExecutionProvider"]), "providers"),
        (lambda: to_detected_face({"kps": None}), "face_analyzer"),
        (lambda: resolve_face_models_dir(tmp_path / "no-face-models"), "face_analyzer"),
        (lambda: check_budget(-1), "max_bytes"),
        (lambda: resolve_identity([], lambda photos: None), "inputs"),
        (lambda: HyperLoRAIdentity.merge(["person.safetensors"]), "identities"),
        (lambda: lora_rank({"x": torch.zeros(1)}), "state_dict"),
        (lambda: parse_dtype("int8"), "dtype"),
        (lambda: HubOptions.of(["main"]), "hub_options"),
        (lambda: HubOptions.of({"revison": "main"}), "hub_options"),
        (lambda: HyperLoRASlider(neutral="neutral.png", edited=None), "neutral"),
        (lambda: check_slider_weight("strong"), "weight"),
        (lambda: check_slider_weight(float("inf")), "weight"),
        (lambda: predictor.predict(None, clip), "id_embeds"),
        (lambda: predictor.predict(torch.randn(1, 7), clip), "id_embeds"),
        (lambda: predictor.predict(torch.full((1, 512), float("nan")), clip), "id_embeds"),
        (lambda: predictor.predict(arcface, None), "clip_hidden_states"),
        (lambda: predictor.predict(arcface, torch.randn(1, 3, 7)), "clip_hidden_states"),
        (lambda: save_release_checkpoint(predictor, library_folder), "folder"),
        (lambda: check_stage(predictor, "warmup"), "stage"),
        (lambda: check_stage(predictor, "base"), "stage"),
        (lambda: check_stage(no_clip, "id_clip"), "stage"),
        (lambda: check_stage(no_clip, "id_full"), "stage"),
        (lambda: diffusion_target(scheduler, clip, clip, torch.zeros(1)), "noise_scheduler"),
    ]


def test_parameter_errors_name_their_argument(tmp_path):
    """Front ends (CLI, demo) map `error.argument` to their own spelling of the input."""
    from diffusers_hyperlora.errors import HyperLoRAError

    for call, argument in _argument_cases(tmp_path):
        with pytest.raises(HyperLoRAError) as caught:
            call()
        assert caught.value.argument == argument, (argument, str(caught.value))
