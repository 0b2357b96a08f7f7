"""Checks of the command line's arguments that need no model and no heavy import: they answer at once.

Every problem is an `InvalidArgumentError` (or another `HyperLoRAError`) whose `argument` is the argparse
destination of the flag at fault, so the error line names the flag.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from ..errors import IdentityNotFoundError, InvalidArgumentError
from ..utils.devices import check_device_name
from ..utils.devices import check_port as check_port_number
from .parser import HUB_OPTIONS, PROG, TINY

DEVICE_FLAG = "--device"


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    """`1 identity`, `2 identities`, `3 images`."""
    return f"{count} {singular if count == 1 else (plural_form or singular + 's')}"


def given_flags(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    """The flags among `names` (argparse destinations) that the command line set."""
    return ["--" + name.replace("_", "-") for name in names if getattr(args, name, None)]


def check_device(name: str | None) -> None:
    """`--device` by name only, without torch (`utils.devices`; whether the machine has it is checked on load)."""
    check_device_name(name, DEVICE_FLAG)


def check_inputs(paths: Sequence[str], flag: str) -> None:
    """Every input exists and is a file: a folder or a missing path is named as such."""
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        raise IdentityNotFoundError(
            f"{flag}: no such file: {', '.join(missing)}. Pass existing photos or identity files.", argument=flag
        )
    folders = [path for path in paths if os.path.isdir(path)]
    if folders:
        raise InvalidArgumentError(
            f"{flag}: {', '.join(folders)} {'is a folder' if len(folders) == 1 else 'are folders'}, not a photo or an "
            f"identity file. Pass the files in it (e.g. {os.path.join(folders[0], '*.jpg')}).",
            argument=flag,
        )


def check_identity_files_only(paths: Sequence[str], command: str) -> None:
    """`export` and `mix` read saved identities, not photos: say which command turns photos into one."""
    from ..identities.inputs import IDENTITY_FILE_SUFFIX, split_identity_inputs

    photos, _ = split_identity_inputs(paths)
    if photos:
        raise InvalidArgumentError(
            f"{command} takes identity files ({IDENTITY_FILE_SUFFIX}, written by `identity`), not photos: "
            f"{', '.join(photos)}. Make an identity first: `{PROG} identity PHOTO... -o person{IDENTITY_FILE_SUFFIX} "
            "--model CHECKPOINT`.",
            argument="identities",
        )


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.abspath(a) == os.path.abspath(b)


def check_output_file(path: str, inputs: Sequence[str], overwrite: bool, lora: bool = False) -> None:
    """`-o`: a `.safetensors` file, not one of the inputs, in an existing folder, new unless `--overwrite`."""
    from ..identities.inputs import IDENTITY_FILE_SUFFIX

    if not path.lower().endswith(IDENTITY_FILE_SUFFIX):
        reason = (
            "LoRA files must end in {suffix} (the format diffusers, ComfyUI and A1111 read)"
            if lora
            else "identity files must end in {suffix} (inputs are read as identities by that suffix, anything "
            "else as a photo)"
        ).format(suffix=IDENTITY_FILE_SUFFIX)
        raise InvalidArgumentError(
            f"-o {path}: {reason}. Pass e.g. -o {os.path.splitext(path)[0]}{IDENTITY_FILE_SUFFIX}.",
            argument="output",
        )
    clash = next((source for source in inputs if _same_file(source, path)), None)
    if clash is not None:
        raise InvalidArgumentError(
            f"-o {path} is also an input of this command ({clash}); it is never overwritten. Pass another -o.",
            argument="output",
        )
    if os.path.isdir(path):
        raise InvalidArgumentError(f"-o {path} is a folder; pass a file name in it.", argument="output")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InvalidArgumentError(
            f"-o {path}: the folder {folder} does not exist. Create it first, or pass another -o.", argument="output"
        )
    if os.path.exists(path) and not overwrite:
        raise InvalidArgumentError(
            f"-o {path} exists already; pass --overwrite to replace it, or another -o.", argument="output"
        )


def check_output_folder(
    path: str, overwrite: bool, flag: str, argument: str, source: str | None = None, what: str = "the source checkpoint"
) -> None:
    """An output folder: not a file, not the source (`what`), new or empty unless `--overwrite`."""
    if os.path.isfile(path):
        raise InvalidArgumentError(f"{flag} {path} is a file, not a folder; pass a new folder.", argument=argument)
    if source is not None and os.path.isdir(source) and os.path.isdir(path) and os.path.samefile(source, path):
        raise InvalidArgumentError(
            f"{flag} {path} is {what} itself; it is never overwritten. Pass another folder.",
            argument=argument,
        )
    if os.path.isdir(path) and any(os.scandir(path)) and not overwrite:
        raise InvalidArgumentError(
            f"{flag} {path} exists and is not empty (its files would be replaced); pass --overwrite to write into "
            "it anyway, or a new folder.",
            argument=argument,
        )


def check_tiny_options(args: argparse.Namespace, value: str | None, flag: str, names: Sequence[str]) -> None:
    """The built-in tiny default is made in code: flags that say where to fetch a checkpoint do not apply."""
    if value != TINY:
        return
    given = given_flags(args, names)
    if given:
        raise InvalidArgumentError(
            f"{', '.join(given)} say where to fetch {flag}, but {flag} {TINY} is built in code (nothing is fetched). "
            f"Drop them, or pass a checkpoint (a local folder named {TINY}: ./{TINY}).",
            argument=names[0],
        )


NEW_CHECKPOINT_FLAGS = {
    "num_basis": "num_basis",
    "rank": "id_rank",
    "base_rank": "base_rank",
    "image_embed_dim": "image_embed_dim",
}
"""`train`'s flags for the sizes of a new checkpoint -> their `HyperLoRAConfig` fields."""


def new_checkpoint_sizes(args: argparse.Namespace) -> dict[str, int]:
    """The `HyperLoRAConfig` fields `train`'s flags set for a new checkpoint (those given)."""
    return {
        field: getattr(args, name) for name, field in NEW_CHECKPOINT_FLAGS.items() if getattr(args, name) is not None
    }


def check_train_arguments(args: argparse.Namespace) -> None:
    """`train`'s folders, Hub flags and new-checkpoint sizes, before anything heavy is imported.

    The stage numbers (`--steps`, `--lr`, ...) and `--resolution` are checked by the library itself
    (`TrainingConfig.validate`, `training.check_resolution`), before any model is loaded; the sizes by
    `HyperLoRAConfig` (a light import), here.
    """
    given = given_flags(args, HUB_OPTIONS)
    if given and not args.init:
        raise InvalidArgumentError(
            f"train: {', '.join(given)} apply to --init, the checkpoint to start from, but no --init was given. "
            "Pass --init CHECKPOINT (Hub repo id or local folder), or drop them to train a new checkpoint.",
            argument=HUB_OPTIONS[0],
        )
    _check_new_checkpoint_sizes(args)
    if not os.path.isdir(args.data):
        kind = "a file" if os.path.isfile(args.data) else "not found"
        raise InvalidArgumentError(
            f"--data {args.data}: {kind}; pass the dataset folder that holds metadata.jsonl.", argument="data"
        )
    check_output_folder(
        args.output_dir,
        args.overwrite,
        "--output-dir",
        "output_dir",
        source=args.data,
        what="the dataset folder (--data)",
    )


def _check_new_checkpoint_sizes(args: argparse.Namespace) -> None:
    """Sizes apply to a new checkpoint only; their values are checked as `HyperLoRAConfig` checks them."""
    sizes = new_checkpoint_sizes(args)
    if sizes and args.init:
        flags = [f"--{name.replace('_', '-')}" for name in NEW_CHECKPOINT_FLAGS if getattr(args, name) is not None]
        raise InvalidArgumentError(
            f"train: {', '.join(flags)} set the sizes of a new checkpoint, but --init {args.init} has its own. "
            "Drop them, or drop --init to train a new checkpoint.",
            argument=next(name for name in NEW_CHECKPOINT_FLAGS if getattr(args, name) is not None),
        )
    from ..model.config import HyperLoRAConfig  # no torch: the config's own checks, at once

    HyperLoRAConfig(**sizes)


def check_port(port: int) -> None:
    """`--port`: a port number (`utils.devices.check_port`, as `launch_demo` checks it)."""
    check_port_number(port, "--port")
