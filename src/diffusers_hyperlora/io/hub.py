"""Finding checkpoint files in a local folder or a Hub repo, and telling the two formats apart.

A checkpoint is either the library's own format (`config.json` + `model.safetensors`, written by
`HyperLoRAPredictor.save_pretrained`) or the public release's folder layout (`hyper_lora_modules.json` and
three `.safetensors` files). Only the files a format needs are downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ..errors import CheckpointFormatError, CheckpointNotFoundError

OWN_CONFIG = "config.json"
OWN_WEIGHTS = "model.safetensors"
RELEASE_MODULES_JSON = "hyper_lora_modules.json"
RELEASE_WEIGHTS = ("hyper_lora_modules.safetensors", "resampler.safetensors", "id_projector.safetensors")
RELEASE_BASE_RESAMPLER = "base_resampler.safetensors"  # our extension: only for release-layout Base branches
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True)
class CheckpointLocation:
    """Where a checkpoint lives: a local folder or a Hub repo, plus the usual Hub options."""

    path: str
    subfolder: str | None = None
    revision: str | None = None
    token: str | bool | None = None
    cache_dir: str | os.PathLike | None = None
    local_files_only: bool = False
    force_download: bool = False

    @property
    def is_local(self) -> bool:
        return os.path.isdir(self.path)

    @property
    def description(self) -> str:
        where = f"{self.path}/{self.subfolder}" if self.subfolder else self.path
        return f"local folder {where!r}" if self.is_local else f"Hub repo {self.path!r}" + (
            f" (subfolder {self.subfolder!r})" if self.subfolder else ""
        )

    def local_dir(self) -> Path:
        return Path(self.path, self.subfolder) if self.subfolder else Path(self.path)

    def try_file(self, filename: str) -> str | None:
        """Local path of `filename` (downloading it if needed), or `None` when the checkpoint has no such file."""
        if self.is_local:
            candidate = self.local_dir() / filename
            return str(candidate) if candidate.is_file() else None
        try:
            return hf_hub_download(
                self.path,
                filename,
                subfolder=self.subfolder,
                revision=self.revision,
                token=self.token,
                cache_dir=self.cache_dir,
                local_files_only=self.local_files_only,
                force_download=self.force_download,
            )
        except EntryNotFoundError:
            return None
        except HFValidationError as error:
            raise CheckpointNotFoundError(
                f"{self.path!r} is neither an existing local folder nor a valid Hub repo id ('org/name')."
            ) from error
        except LocalEntryNotFoundError as error:
            if isinstance(error, EntryNotFoundError):
                return None
            raise CheckpointNotFoundError(
                f"Could not find {filename!r} of {self.description} in the local Hugging Face cache and downloads "
                "are off (HF_HUB_OFFLINE=1 or local_files_only=True). Download it once online, or pass a local folder."
            ) from error
        except (RepositoryNotFoundError, RevisionNotFoundError) as error:
            raise CheckpointNotFoundError(
                f"{self.description} (revision {self.revision or 'main'!r}) was not found on the Hub: check the repo "
                f"id, revision and token, or pass a local folder. ({error.__class__.__name__})"
            ) from error
        except HfHubHTTPError as error:
            raise CheckpointNotFoundError(f"Could not download {filename!r} from {self.description}: {error}") from error

    def require_file(self, filename: str) -> str:
        path = self.try_file(filename)
        if path is None:
            raise CheckpointFormatError(f"{self.description} has no {filename!r}.{self._unsafe_hint()}")
        return path

    def _unsafe_hint(self) -> str:
        if not self.is_local or not self.local_dir().is_dir():
            return ""
        unsafe = sorted(p.name for p in self.local_dir().iterdir() if p.suffix in UNSAFE_SUFFIXES)
        if not unsafe:
            return ""
        return (
            f" It holds {', '.join(unsafe)}: pickle-based weights are never loaded (they can run code). Convert them "
            "to .safetensors first."
        )

    def detect_format(self) -> str:
        """`"own"` or `"release"`; raises `CheckpointFormatError` when the location is neither."""
        if self.try_file(OWN_CONFIG) is not None:
            return "own"
        if self.try_file(RELEASE_MODULES_JSON) is not None:
            return "release"
        raise CheckpointFormatError(
            f"{self.description} is not a HyperLoRA checkpoint: looked for {OWN_CONFIG!r} (library format, with "
            f"{OWN_WEIGHTS!r}) and {RELEASE_MODULES_JSON!r} (release layout, with {', '.join(RELEASE_WEIGHTS)})."
            + self._unsafe_hint()
        )


def load_predictor(
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    heads: int | None = None,
    dim_head: int | None = None,
):
    """Load a `HyperLoRAPredictor` from a local folder or Hub repo, in either checkpoint format.

    Args:
        pretrained_model_name_or_path: a Hub repo id (`"org/hyperlora"`) or a local folder.
        subfolder, revision, token, cache_dir, local_files_only, force_download: as in diffusers' loaders.
        torch_dtype: dtype of the parameters (default: as stored).
        device: where to put the parameters.
        heads, dim_head: resampler attention layout for release-layout checkpoints (default 12 x 64); they
            cannot be read off tensor shapes.

    Example:
        >>> predictor = load_predictor("path/to/sdxl_hyper_id_lora_v1_fidelity")  # doctest: +SKIP
    """
    if local_files_only is False and os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE"):
        local_files_only = True
    location = CheckpointLocation(
        os.fspath(pretrained_model_name_or_path),
        subfolder=subfolder,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        force_download=force_download,
    )
    if location.detect_format() == "release":
        from .release import load_release

        return load_release(location, torch_dtype=torch_dtype, device=device, heads=heads, dim_head=dim_head)
    from .own_format import load_own_format

    predictor = load_own_format(location, torch_dtype=torch_dtype, device=device)
    if heads is not None or dim_head is not None:
        raise ValueError("`heads`/`dim_head` apply to release-layout checkpoints; the library format stores them.")
    return predictor
