"""The `diffusers-hyperlora` command: identities, LoRA files and sliders without writing Python.

    diffusers-hyperlora identity me1.jpg me2.jpg -o me.safetensors --model org/hyperlora
    diffusers-hyperlora export me.safetensors -o me_lora.safetensors --format kohya --model org/hyperlora
    diffusers-hyperlora slider --neutral me.jpg --edited me_old.jpg -o age.safetensors --model org/hyperlora
    diffusers-hyperlora mix alice.safetensors bob.safetensors --weights 0.5 0.5 -o blend.safetensors
    diffusers-hyperlora convert path/to/release_folder out_folder --dtype fp16
    diffusers-hyperlora cache-features data/ --model org/hyperlora
    diffusers-hyperlora train --data data/ --base-model stabilityai/stable-diffusion-xl-base-1.0 --output-dir runs/me
    diffusers-hyperlora demo                      # the web demo, offline on the built-in tiny default

`--model tiny` (and `--init tiny`, `--base-model tiny`, `convert tiny DST`) is the built-in tiny default: every
command runs offline, in seconds. `org/hyperlora` above is a placeholder: the public release is `--model
bytedance-research/HyperLoRA --subfolder sdxl_hyper_id_lora_v1_fidelity`.

The command is a thin layer over the public API: `parser.py` (the flags), `checks.py` (argument checks that need no
heavy import, so a wrong flag answers at once), `commands.py` (one function per subcommand) and this module (the
error line, quiet output, Ctrl-C). Every error it reports is a `HyperLoRAError`; its `argument` names the flag.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence

from ..errors import HyperLoRAError
from ..utils.quiet import no_transformers_progress_bar
from .parser import HUB_OPTIONS, PROG, TINY, build_parser

THIRD_PARTY_LOGGERS = ("transformers", "diffusers", "huggingface_hub", "accelerate", "peft", "insightface")
VERBOSITY_VARIABLES = ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")
INTERRUPTED = 130  # the shell's exit status for Ctrl-C (128 + SIGINT)
# `HyperLoRAError.argument` (the Python parameter, or the argparse destination) -> the flag that sets it here.
FLAGS = {
    "weights": "--weights",
    "spherical": "--spherical",
    "device": "--device",
    "dtype": "--dtype",
    "format": "--format",
    "branch": "--branch",
    "face_analyzer": "--face-models",
    "face_models": "--face-models",
    "image_encoder": "--image-encoder",
    "heads": "--heads",
    "dim_head": "--dim-head",
    **{name: "--" + name.replace("_", "-") for name in HUB_OPTIONS},
    "output": "-o",
    "path": "-o",
    "overwrite": "--overwrite",
    "output_dir": "--output-dir",
    "data": "--data",
    "root": "--data",
    "steps": "--steps",
    "batch_size": "--batch-size",
    "learning_rate": "--lr",
    "lr": "--lr",
    "caption_dropout": "--caption-dropout",
    "resolution": "--resolution",
    "mixed_precision": "--mixed-precision",
    "seed": "--seed",
    "num_basis": "--num-basis",
    "id_rank": "--rank",
    "rank": "--rank",
    "base_rank": "--base-rank",
    "image_embed_dim": "--image-embed-dim",
    "init": "--init",
    "base_model": "--base-model",
    "port": "--port",
    "host": "--host",
    "checkpoint": "CHECKPOINT",
    "identities": "IDENTITY",
    "inputs": "IMAGE",
    "src": "SRC",
    "dst": "DST",
}

__all__ = ["FLAGS", "HUB_OPTIONS", "PROG", "TINY", "build_parser", "flag_of", "main", "third_party_output"]


def flag_of(error: BaseException) -> str | None:
    """The command-line flag an error is about (from `HyperLoRAError.argument`), or `None`."""
    argument = getattr(error, "argument", None)
    if argument is None:
        return None
    return FLAGS.get(argument, argument if str(argument).startswith("-") else None)


def error_line(command: str, error: BaseException) -> str:
    """`diffusers-hyperlora COMMAND: error: [FLAG: ]MESSAGE` on one line."""
    message = " ".join(str(error).split()).removeprefix(f"{command}: ")  # the prefix names the command already
    flag = flag_of(error)
    if flag is not None and flag not in message:
        message = f"{flag}: {message}"
    return f"{PROG} {command}: error: {message}"


@contextlib.contextmanager
def third_party_output(verbose: bool, keep_stdout: bool = False) -> Iterator[None]:
    """Hide other libraries' warnings, log messages below errors and prints (e.g. insightface's model list).

    This library's own warnings (a photo without a face, ...) still show. `verbose=True` changes nothing.
    """
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in THIRD_PARTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:  # libraries imported already
        logger.setLevel(logging.ERROR)
    # libraries imported from now on set their own level from these when they first log
    environment = {name: os.environ.get(name) for name in VERBOSITY_VARIABLES}
    os.environ.update({name: "error" for name in VERBOSITY_VARIABLES})
    try:
        with warnings.catch_warnings(), no_transformers_progress_bar():
            warnings.simplefilter("ignore")
            with contextlib.nullcontext() if keep_stdout else contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 on success, 1 on a reported error, 130 on Ctrl-C).

    Example:
        >>> main(["export", "me.safetensors", "-o", "lora.safetensors", "--model", "org/hyperlora"])  # doctest: +SKIP
        0
    """
    from .commands import COMMANDS, print_format_note

    args = build_parser().parse_args(argv)
    print_format_note(args)
    try:
        # the demo prints its address and serves until stopped: its output stays
        with third_party_output(args.verbose, keep_stdout=args.command == "demo"):
            message = COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted; no output was left half-written.", file=sys.stderr)
        return INTERRUPTED
    except (HyperLoRAError, OSError, ImportError) as error:
        print(error_line(args.command, error), file=sys.stderr)
        return 1
    if message:
        print(message)
    return 0
