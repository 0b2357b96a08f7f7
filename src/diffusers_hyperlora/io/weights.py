"""Tensors in and out of `.safetensors` files, for both checkpoint formats.

Reading: `read_tensors` follows a map from each predictor state-dict key to the stored tensor(s) it comes from (the
release stacks several per key) and reads only the keys asked for, so a caller holds one shard at a time.
Writing: huggingface_hub's `split_torch_state_dict_into_shards` plans the files (transformers' and diffusers'
layout: `model.safetensors`, or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`) and
`safetensors.torch.save_file` writes each one; `atomic_write_files` makes the set all-or-nothing.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointFormatError, InvalidArgumentError
from ..model.config import HyperLoRAConfig
from ..model.predictor import HyperLoRAPredictor

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_PATTERN = "model{suffix}.safetensors"
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")
MAP_WINDOW = 256 * 2**20
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors names of the dtypes a checkpoint may store
MAX_SHARD_SIZE = "1GB"  # keeps converting the 3 GB release within ~1 GB of memory (docs/performance.md)

_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]B)\s*", re.IGNORECASE)  # huggingface_hub's size strings


def check_max_shard_size(max_shard_size: int | str | None) -> int | str:
    """`max_shard_size` (`None`: the default, `MAX_SHARD_SIZE`) if it is a size: a whole number of bytes above 0, or a
    string like `"500MB"` or `"1.5GB"` (units KB, MB, GB, TB, as huggingface_hub reads them); else
    `InvalidArgumentError(argument="max_shard_size")`, checked before anything is written.

    >>> check_max_shard_size(None), check_max_shard_size("500mb"), check_max_shard_size(2**20)
    ('1GB', '500mb', 1048576)
    """
    if max_shard_size is None:
        return MAX_SHARD_SIZE
    if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool):
        if max_shard_size > 0:
            return max_shard_size
    elif isinstance(max_shard_size, str):
        match = _SIZE.fullmatch(max_shard_size)
        if match and float(match.group(1)) > 0:
            return max_shard_size
    raise InvalidArgumentError(
        f"max_shard_size must be a number of bytes above 0 or a size like '500MB' or '1.5GB' (units KB, MB, GB, TB), "
        f"got {max_shard_size!r}. Leave it out for the default ({MAX_SHARD_SIZE}).",
        argument="max_shard_size",
    )


# predictor key -> (file path, stored name), or (file path, [stored names]) for a stack of them along a new dim 0
Sources = Mapping[str, tuple[str, str | Sequence[str]]]


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint found and checked but not read yet: its config, where each tensor is, and the stored dtype."""

    config: HyperLoRAConfig
    sources: Sources
    dtype: torch.dtype


def read_safetensors_shapes(path: str | os.PathLike) -> dict[str, list[int]]:
    """`{key: shape}` of a safetensors file, read from its header only; every tensor must be floating point."""
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            slices = {key: handle.get_slice(key) for key in handle.keys()}
            dtypes = {key: part.get_dtype() for key, part in slices.items()}
            shapes = {key: list(part.get_shape()) for key, part in slices.items()}
    except Exception as error:  # safetensors raises its own SafetensorError, or OSError
        raise CheckpointFormatError(
            f"{path} is not a readable .safetensors file: {error}. The file is damaged or incomplete: download or "
            "save the checkpoint again."
        ) from error
    other = next((key for key, dtype in dtypes.items() if dtype not in FLOAT_DTYPES), None)
    if other is not None:
        raise CheckpointFormatError(
            f"{path} stores {other!r} as {dtypes[other]}; checkpoint weights are floating point "
            f"({', '.join(FLOAT_DTYPES)}). The file is damaged or not a HyperLoRA checkpoint: download or save it "
            "again."
        )
    return shapes


def stored_dtype(path: str | os.PathLike) -> torch.dtype:
    """The dtype of the first tensor of a safetensors file."""
    with safe_open(os.fspath(path), framework="pt") as handle:
        return handle.get_slice(next(iter(handle.keys())))[:1].dtype  # one row is enough


class _MappedFiles:
    """Open safetensors files, each reopened after `MAP_WINDOW` bytes: the pages of a memory map that were read
    count as the process's resident memory until it is closed, which would double a large bank group's footprint."""

    def __init__(self) -> None:
        self._open: dict[str, list] = {}  # path -> [open handle, bytes read through it]

    def tensor(self, path: str, name: str) -> torch.Tensor:
        entry = self._open.get(path)
        if entry is None or entry[1] > MAP_WINDOW:
            if entry is not None:
                entry[0].__exit__(None, None, None)
            entry = self._open[path] = [safe_open(path, framework="pt").__enter__(), 0]
        tensor = entry[0].get_tensor(name)
        entry[1] += tensor.numel() * tensor.element_size()
        return tensor

    def close(self) -> None:
        for handle, _ in self._open.values():
            handle.__exit__(None, None, None)


def read_tensors(sources: Sources, keys: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of `keys`, cast to `dtype`; a key stored as a list of names is their stack along a new dim 0.

    Example:
        >>> read_tensors({"w": ("a.safetensors", "w")}, ["w"], torch.float16)  # doctest: +SKIP
    """
    files = _MappedFiles()

    def stored(path: str, name: str) -> torch.Tensor:
        tensor = files.tensor(path, name)
        return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)

    try:
        tensors = {}
        for key in keys:
            path, names = sources[key]
            if isinstance(names, str):
                tensors[key] = _owned(files.tensor(path, names), dtype)
                continue
            first = stored(path, names[0])
            tensors[key] = torch.empty((len(names), *first.shape), dtype=first.dtype)
            for position, name in enumerate(names):
                tensors[key][position] = first if position == 0 else stored(path, name)
        return tensors
    finally:
        files.close()


def _owned(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A copy of a tensor read from a file, in `dtype`, that owns its memory.

    `safe_open(...).get_tensor` may return a view of the file's memory map (safetensors does, up to at least 0.8;
    the format promises neither a copy nor a view). A loaded model holding such views would change when the file is
    rewritten in place (`cp`, a re-download), or crash with SIGBUS when the file gets shorter. Stacked bank keys are
    copied into their stack anyway; this covers the rest.
    """
    return tensor.clone() if dtype is None or tensor.dtype == dtype else tensor.to(dtype)


def check_shapes(
    expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]], where: str, against: str = "its config"
) -> None:
    """Raise `CheckpointFormatError` unless `found` has exactly the keys and shapes of `expected`."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [k for k in expected if k in found and list(found[k]) != list(expected[k])]
    if not (missing or unexpected or wrong):
        return
    details = []
    if missing:
        details.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
        details.append(f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
    if wrong:
        key = wrong[0]
        details.append(f"{key} has shape {list(found[key])}, {against} implies {list(expected[key])}")
    raise CheckpointFormatError(
        f"The tensors of {where} do not match {against}: {'; '.join(details)}. The files of a checkpoint must "
        "belong together: download or save them again as one set."
    )


def meta_shapes(config: HyperLoRAConfig) -> dict[str, list[int]]:
    """`{state-dict key: shape}` of a predictor of `config`, computed without allocating anything."""
    return {key: list(t.shape) for key, t in HyperLoRAPredictor(config, device="meta").state_dict().items()}


def build_predictor(
    config: HyperLoRAConfig, sources: Sources, torch_dtype: torch.dtype | None, device: torch.device | str
) -> HyperLoRAPredictor:
    """A predictor built without allocating random weights, holding the tensors of `sources` (strict keys)."""
    predictor = HyperLoRAPredictor(config, device="meta")
    keys = list(predictor.state_dict())
    state_dict = {key: tensor.to(device) for key, tensor in read_tensors(sources, keys, torch_dtype).items()}
    predictor.load_state_dict(state_dict, strict=True, assign=True)
    return predictor.eval()


def weight_writers(
    tensors: Mapping[str, torch.Tensor],
    read: Callable[[list[str]], Mapping[str, torch.Tensor]],
    metadata: Mapping[str, str],
    max_shard_size: int | str = MAX_SHARD_SIZE,
) -> dict[str, Callable[[Path], None]]:
    """File name -> writer (for `atomic_write_files`) of the weight files of `tensors` (meta tensors are fine).

    Each shard's writer asks `read(keys)` for its tensors only when it runs, so one shard is in memory at a time.
    """
    split = split_torch_state_dict_into_shards(
        dict(tensors), filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_size
    )
    writers: dict[str, Callable[[Path], None]] = {
        name: partial(_write_shard, read, keys, dict(metadata)) for name, keys in split.filename_to_tensors.items()
    }
    if split.is_sharded:
        index = {"metadata": {**split.metadata, **metadata}, "weight_map": split.tensor_to_filename}
        writers[WEIGHTS_INDEX_NAME] = lambda path: path.write_text(json.dumps(index, indent=2), encoding="utf-8")
    return writers


def _write_shard(read, keys: list[str], metadata: dict[str, str], path: Path) -> None:
    tensors = {key: tensor.detach().to("cpu").contiguous() for key, tensor in read(keys).items()}
    save_file(tensors, path, metadata=metadata)


def remove_stale_weights(folder: str | os.PathLike, written: Iterable[str]) -> None:
    """Delete weight files of an earlier save that the new set of files does not include (other sharding)."""
    keep = set(written)
    for path in Path(folder).glob("model*.safetensors*"):
        if path.name not in keep and _WEIGHT_FILE.fullmatch(path.name):
            path.unlink(missing_ok=True)
