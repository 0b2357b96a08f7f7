"""Finding checkpoint files in a local folder or a Hub repo, and telling the two formats apart.

A checkpoint is either the library's own format (`config.json` + `model.safetensors`, written by
`HyperLoRAPredictor.save_pretrained`) or the public release's folder layout (`hyper_lora_modules.json` and
three `.safetensors` files). Only the files a format needs are downloaded.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.utils import logging
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name

from ..errors import CheckpointFormatError, CheckpointNotFoundError

logger = logging.get_logger(__name__)

OWN_CONFIG = "config.json"
OWN_WEIGHTS = "model.safetensors"
RELEASE_MODULES_JSON = "hyper_lora_modules.json"
RELEASE_WEIGHTS = ("hyper_lora_modules.safetensors", "resampler.safetensors", "id_projector.safetensors")
RELEASE_BASE_RESAMPLER = "base_resampler.safetensors"  # our extension: only for release-layout Base branches
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def hub_offline() -> bool:
    """Whether Hub downloads are off: `HF_HUB_OFFLINE` (read now, not only at import) or huggingface_hub's flag."""
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.upper() in ("1", "ON", "YES", "TRUE") or bool(hf_constants.HF_HUB_OFFLINE)


@dataclass(frozen=True)
class CheckpointLocation:
    """Where a checkpoint lives: a local folder or a Hub repo, plus the usual Hub options.

    Files are resolved one by one (`try_file` / `require_file`), so only what a format needs is downloaded.

    Example:
        >>> location = CheckpointLocation("bytedance-research/HyperLoRA", subfolder="sdxl_hyper_id_lora_v1_fidelity")
        >>> location.description
        "Hub repo 'bytedance-research/HyperLoRA' (subfolder 'sdxl_hyper_id_lora_v1_fidelity')"
    """

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
    def offline(self) -> bool:
        return self.local_files_only or hub_offline()

    @property
    def description(self) -> str:
        if self.is_local:
            return f"local folder {str(self.local_dir())!r}"
        text = f"Hub repo {self.path!r}"
        if self.subfolder:
            text += f" (subfolder {self.subfolder!r})"
        if self.revision:
            text += f" at revision {self.revision!r}"
        return text

    def local_dir(self) -> Path:
        return Path(self.path, self.subfolder) if self.subfolder else Path(self.path)

    def hub_options(self) -> dict:
        """The keyword arguments to pass on to other `from_pretrained` calls for the same repo."""
        return {
            "revision": self.revision,
            "token": self.token,
            "cache_dir": self.cache_dir,
            "local_files_only": self.local_files_only,
            "force_download": self.force_download,
        }

    # ------------------------------------------------------------------ resolving files
    def try_file(self, filename: str) -> str | None:
        """Local path of `filename` (downloading it if needed), or `None` when the checkpoint has no such file.

        Offline, a file missing from the cached snapshot counts as absent. Repo-level problems (no such repo or
        revision, nothing cached while offline, network errors) raise `CheckpointNotFoundError`.
        """
        if self.is_local:
            if not self.local_dir().is_dir():
                raise CheckpointNotFoundError(
                    f"Local folder {str(self.local_dir())!r} does not exist (subfolder {self.subfolder!r} of "
                    f"{self.path!r}). Check the subfolder name."
                )
            candidate = self.local_dir() / filename
            return str(candidate) if candidate.is_file() else None
        try:
            return hf_hub_download(
                self.path,
                filename,
                subfolder=self.subfolder or None,
                revision=self.revision,
                token=self.token,
                cache_dir=self.cache_dir,
                local_files_only=self.offline,
                force_download=self.force_download and not self.offline,
            )
        except LocalEntryNotFoundError as error:
            snapshot, problem = self.cached_snapshot()
            if self.offline and snapshot is not None:
                return None  # the cached snapshot is all there is offline: the file is not part of it
            if self.offline:
                raise CheckpointNotFoundError(
                    f"Could not load {filename!r} from {self.description}: downloads are off (HF_HUB_OFFLINE=1 or "
                    f"local_files_only=True) and {problem}. Download it once online, or pass a local folder."
                ) from error
            raise CheckpointNotFoundError(
                f"Could not download {filename!r} from {self.description} and it is not in the local cache "
                f"({problem}). Check your connection, or pass a local folder. ({error})"
            ) from error
        except EntryNotFoundError:  # after LocalEntryNotFoundError, which subclasses it
            return None
        except HFValidationError as error:
            raise CheckpointNotFoundError(
                f"{self.path!r} is neither an existing local folder nor a valid Hub repo id ('org/name'). Pass the "
                "path of a checkpoint folder or a repo id."
            ) from error
        except (RepositoryNotFoundError, RevisionNotFoundError) as error:
            raise CheckpointNotFoundError(
                f"{self.description} was not found on the Hub ({error.__class__.__name__}): check the repo id, the "
                "revision and your token (private or gated repos need `token=`), or pass a local folder."
            ) from error
        except HfHubHTTPError as error:
            raise CheckpointNotFoundError(
                f"Could not download {filename!r} from {self.description}: {error}"
            ) from error

    def require_file(self, filename: str) -> str:
        """Like `try_file`, but a missing file is a `CheckpointFormatError` naming the file and the location."""
        path = self.try_file(filename)
        if path is None:
            where = "in the cached snapshot (downloads are off)" if self.offline and not self.is_local else ""
            raise CheckpointFormatError(
                f"{self.description} has no {filename!r}{' ' + where if where else ''}. Files found: "
                f"{self._listing_text()}.{self._unsafe_hint()}"
            )
        return path

    # ------------------------------------------------------------------ the local cache
    def cache_root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir is not None else Path(hf_constants.HF_HUB_CACHE)

    def cached_snapshot(self) -> tuple[Path | None, str]:
        """`(snapshot folder, "")` when this repo/revision is in the local cache, else `(None, why not)`."""
        repo_dir = self.cache_root() / repo_folder_name(repo_id=self.path, repo_type="model")
        if not repo_dir.is_dir():
            return None, f"the repo is not in the cache folder {str(self.cache_root())!r}"
        revision = self.revision or "main"
        commit = revision
        ref = repo_dir / "refs" / revision
        if ref.is_file():
            commit = ref.read_text().strip()
        snapshot = repo_dir / "snapshots" / commit
        if not snapshot.is_dir():
            return None, f"revision {revision!r} is not in the cache ({str(repo_dir)!r} has no snapshot for it)"
        return snapshot, ""

    def listing(self) -> list[str] | None:
        """File names directly in the checkpoint folder (local, cached snapshot, or the Hub when online), if known."""
        try:
            if self.is_local:
                folder = self.local_dir()
                return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else None
            prefix = f"{self.subfolder.strip('/')}/" if self.subfolder else ""
            if self.offline:
                snapshot, _ = self.cached_snapshot()
                folder = snapshot / prefix if snapshot is not None else None
                return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder and folder.is_dir() else None
            files = HfApi().list_repo_files(self.path, revision=self.revision, token=self.token)
            return sorted(f[len(prefix) :] for f in files if f.startswith(prefix) and "/" not in f[len(prefix) :])
        except Exception:  # a listing only improves an error message; never fail because of it
            return None

    def _listing_text(self) -> str:
        names = self.listing()
        if names is None:
            return "(could not list)"
        if not names:
            return "none"
        return ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")

    def _unsafe_hint(self) -> str:
        unsafe = [name for name in self.listing() or [] if name.lower().endswith(UNSAFE_SUFFIXES)]
        if not unsafe:
            return ""
        return (
            f" It holds {', '.join(unsafe)}: pickle-based weights (.bin/.pt/.pth/.ckpt/.pkl) are never loaded "
            "because unpickling can run arbitrary code. Convert them to .safetensors first (with the tool that made "
            "them), then point load_hyperlora at the folder."
        )

    # ------------------------------------------------------------------ formats
    def detect_format(self) -> str:
        """`"own"` or `"release"`; raises `CheckpointFormatError` when the location is neither."""
        config = self.try_file(OWN_CONFIG)
        if config is not None:
            if is_own_config_file(config):
                return "own"
            if self.try_file(RELEASE_MODULES_JSON) is not None:
                return "release"
            raise CheckpointFormatError(
                f"{self.description} has a {OWN_CONFIG!r}, but it is not a HyperLoRA config (no 'targets' / "
                f"'num_basis'; it may belong to another model), and no {RELEASE_MODULES_JSON!r}. Point to the "
                "folder of a HyperLoRA checkpoint (use `subfolder=` for a folder inside a repo)."
            )
        if self.try_file(RELEASE_MODULES_JSON) is not None:
            return "release"
        raise CheckpointFormatError(
            f"{self.description} is not a HyperLoRA checkpoint: looked for {OWN_CONFIG!r} (library format, with "
            f"{OWN_WEIGHTS!r}) and {RELEASE_MODULES_JSON!r} (release layout, with {', '.join(RELEASE_WEIGHTS)}). "
            f"Files found: {self._listing_text()}. If the checkpoint is in a folder of the repo, pass `subfolder=`."
            + self._unsafe_hint()
        )


def is_own_config_file(path: str | os.PathLike) -> bool:
    """Whether a `config.json` is a `HyperLoRAConfig` (the library format), not some other model's config."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    if not isinstance(raw, dict):
        return False
    raw = raw.get("config", raw) if isinstance(raw.get("config"), dict) else raw
    return isinstance(raw.get("targets"), list) and "num_basis" in raw


# ---------------------------------------------------------------------------------------------------- components
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_component(
    value: str | None, subfolder: str | None, location: CheckpointLocation | None
) -> tuple[str, str | None] | None:
    """Where a companion model named in the config lives: `(repo id or local folder, subfolder)`.

    Rules (used for `HyperLoRAConfig.image_encoder` / `image_encoder_subfolder` and `face_models`):

    - `None` or `""`: not set, returns `None` (the caller uses its default).
    - `"."`, `"./name"` or a bare name without a slash (`"image_encoder"`): a folder of the checkpoint itself, in
      the same repo, revision and subfolder.
    - an existing local folder: that folder.
    - `"org/name"`: another Hub repo.

    Example:
        >>> location = CheckpointLocation("org/my-hyperlora", subfolder="v1")
        >>> resolve_component("image_encoder", None, location)
        ('org/my-hyperlora', 'v1/image_encoder')
        >>> resolve_component("openai/clip-vit-large-patch14", None, location)
        ('openai/clip-vit-large-patch14', None)
    """
    if not value:
        return None
    sub = subfolder.strip("/") if subfolder else None
    relative = value in (".", "./") or value.startswith("./") or ("/" not in value and not os.path.isdir(value))
    if relative:
        if location is None:
            raise ValueError(f"{value!r} names a folder of the checkpoint, but the checkpoint's location is unknown.")
        inner = "/".join(p for p in (value.removeprefix(".").strip("/"), sub) if p) or None
        if location.is_local:
            return str(location.local_dir() / inner) if inner else str(location.local_dir()), None
        return location.path, "/".join(p for p in (location.subfolder, inner) if p) or None
    if os.path.isdir(value):
        return value, sub
    if _REPO_ID.match(value):
        return value, sub
    raise CheckpointNotFoundError(
        f"{value!r} is neither a local folder, a Hub repo id ('org/name') nor a folder of the checkpoint "
        "('./name'). Fix HyperLoRAConfig.image_encoder / face_models."
    )


def resolve_face_models_dir(value: str | None, location: CheckpointLocation | None) -> str | None:
    """A local folder for `HyperLoRAConfig.face_models`, downloading a Hub folder's `.onnx` files if needed.

    A local folder is returned as given (an insightface root or a folder of AntelopeV2 `.onnx` files); a folder
    of a Hub repo (the checkpoint's, or `org/name`) is fetched with only its `*.onnx` files. `None` when unset.

    Example:
        >>> resolve_face_models_dir("/opt/insightface", None)  # doctest: +SKIP
        '/opt/insightface'
    """
    resolved = resolve_component(value, None, location)
    if resolved is None:
        return None
    path, sub = resolved
    if os.path.isdir(path):
        return str(Path(path, sub)) if sub else path
    hub = location.hub_options() if location is not None else {}
    if hub_offline():
        hub["local_files_only"] = True
        hub["force_download"] = False
    pattern = f"{sub}/*.onnx" if sub else "*.onnx"
    try:
        root = snapshot_download(path, allow_patterns=[pattern], **hub)
    except (HfHubHTTPError, LocalEntryNotFoundError, HFValidationError) as error:
        raise CheckpointNotFoundError(
            f"Could not get the face models ({pattern}) from Hub repo {path!r}: {error}. Pass a local insightface "
            "root with `face_analyzer=` instead."
        ) from error
    folder = Path(root, sub) if sub else Path(root)
    if not any(folder.glob("*.onnx")):
        raise CheckpointNotFoundError(f"No AntelopeV2 .onnx files in {pattern!r} of Hub repo {path!r}.")
    return str(folder)


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

    The format is detected from the files: `config.json` + `model.safetensors` (the library's format) or
    `hyper_lora_modules.json` + three `.safetensors` files (the public release's layout, read unchanged). Only the
    files of that format are downloaded. Pickle files (`.bin`, `.pt`, ...) are never loaded.

    Args:
        pretrained_model_name_or_path: a Hub repo id (`"org/hyperlora"`) or a local folder.
        subfolder: a folder inside the repo / folder (e.g. `"sdxl_hyper_id_lora_v1_fidelity"`).
        revision, token, cache_dir, local_files_only, force_download: as in diffusers' loaders. `HF_HUB_OFFLINE=1`
            implies `local_files_only=True`.
        torch_dtype: dtype of the parameters (default: as stored, e.g. float16 for the release).
        device: where to put the parameters.
        heads, dim_head: resampler attention layout for release-layout checkpoints (default 12 x 64); they
            cannot be read off tensor shapes. The library format stores them.

    Raises:
        CheckpointNotFoundError: no such folder, repo, revision, or nothing cached while offline.
        CheckpointFormatError: the location is neither format, misses a file, or its tensors do not fit.

    Example:
        >>> predictor = load_predictor("path/to/sdxl_hyper_id_lora_v1_fidelity")  # doctest: +SKIP
        >>> predictor = load_predictor(
        ...     "bytedance-research/HyperLoRA", subfolder="sdxl_hyper_id_lora_v1_fidelity", torch_dtype=torch.float16
        ... )  # doctest: +SKIP
    """
    if hub_offline():
        local_files_only = True
    if local_files_only and force_download:
        logger.warning("force_download=True is ignored: downloads are off (HF_HUB_OFFLINE or local_files_only).")
        force_download = False
    location = CheckpointLocation(
        os.fspath(pretrained_model_name_or_path),
        subfolder=subfolder or None,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        force_download=force_download,
    )
    if location.detect_format() == "release":
        from .release import load_release

        return load_release(location, torch_dtype=torch_dtype, device=device, heads=heads, dim_head=dim_head)
    if heads is not None or dim_head is not None:
        raise ValueError(
            f"`heads`/`dim_head` only apply to release-layout checkpoints; {location.description} is in the library "
            "format, whose config.json already stores them. Drop the two arguments."
        )
    from .own_format import load_own_format

    return load_own_format(location, torch_dtype=torch_dtype, device=device)
