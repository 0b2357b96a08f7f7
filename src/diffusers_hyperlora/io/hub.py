"""Where files come from: one resolver (`Location` + `HubOptions`) for checkpoints, the CLIP encoder, face models.

Hub access goes through huggingface_hub's public API only, so its cache layout, `HF_HUB_OFFLINE` and
`HF_HUB_CACHE` work as everywhere else. The rules are documented once, in docs/loading.md.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, constants, scan_cache_dir, snapshot_download
from huggingface_hub.errors import (
    CacheNotFound,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ..errors import CheckpointFormatError, CheckpointNotFoundError, InvalidArgumentTypeError

UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


_OPTION_TYPES = (  # (field, accepted types, what the message asks for)
    ("subfolder", (str, type(None)), "a folder name (str) or None"),
    ("revision", (str, type(None)), "a branch, tag or commit (str) or None"),
    ("token", (str, bool, type(None)), "a token (str), True / False, or None"),
    ("cache_dir", (str, os.PathLike, type(None)), "a folder (str or Path) or None"),
    ("local_files_only", bool, "True or False"),
    ("force_download", bool, "True or False"),
)


@dataclass(frozen=True)
class HubOptions:
    """How to fetch files: the Hub keyword arguments of diffusers' `from_pretrained`, as one object.

    Fields: `subfolder`, `revision`, `token`, `cache_dir`, `local_files_only`, `force_download` (docs/loading.md).

    Example:
        >>> options = HubOptions.of({"revision": "v2"}, token=False)
        >>> options.revision, options.token, options.local_files_only
        ('v2', False, False)
    """

    subfolder: str | None = None
    revision: str | None = None
    token: str | bool | None = None
    cache_dir: str | os.PathLike | None = None
    local_files_only: bool = False
    force_download: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.subfolder, os.PathLike):  # a relative Path names a folder of the repo too
            object.__setattr__(self, "subfolder", Path(self.subfolder).as_posix())
        for name, types, expected in _OPTION_TYPES:
            value = getattr(self, name)
            if not isinstance(value, types):
                raise InvalidArgumentTypeError(f"Hub option `{name}` must be {expected}, got {value!r}.", argument=name)

    @classmethod
    def of(cls, options: HubOptions | Mapping[str, Any] | None = None, **overrides: Any) -> HubOptions:
        """`HubOptions` from an instance, a mapping of its fields, or keyword arguments (the keywords win)."""
        if not isinstance(options, (HubOptions, Mapping, type(None))):
            raise InvalidArgumentTypeError(
                f"Hub options must be a HubOptions or a dict of its fields, got {type(options).__name__} {options!r}.",
                argument="hub_options",
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        given = dataclasses.asdict(options) if isinstance(options, HubOptions) else dict(options or {})
        unknown = sorted((set(given) | set(overrides)) - fields)
        if unknown:
            raise InvalidArgumentTypeError(
                f"Unknown Hub option(s) {unknown}; valid: {', '.join(sorted(fields))}.", argument="hub_options"
            )
        return cls(**{**given, **overrides})

    @property
    def offline(self) -> bool:
        """Downloads are off: `local_files_only=True`, or huggingface_hub's offline mode (`HF_HUB_OFFLINE=1`)."""
        return bool(self.local_files_only or constants.HF_HUB_OFFLINE)

    def download_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `hf_hub_download` / `snapshot_download` (all but `subfolder`)."""
        return {
            "revision": self.revision,
            "token": self.token,
            "cache_dir": self.cache_dir,
            "local_files_only": self.local_files_only,
            "force_download": self.force_download and not self.offline,
        }

    def for_other_repo(self) -> HubOptions:
        """The options that carry over to another repo: token, cache and download switches (no revision)."""
        return dataclasses.replace(self, subfolder=None, revision=None)


def _join(*parts: str | None) -> str | None:
    kept = [p.strip("/") for p in parts if p and p.strip("/")]
    return "/".join(kept) or None


@dataclass(frozen=True)
class Location:
    """A local folder or a Hub repo (with its `HubOptions`) from which files are read.

    Example:
        >>> location = Location("bytedance-research/HyperLoRA", HubOptions(subfolder="sdxl_hyper_id_lora_v1_fidelity"))
        >>> location.description
        "Hub repo 'bytedance-research/HyperLoRA' (subfolder 'sdxl_hyper_id_lora_v1_fidelity')"
    """

    path: str
    options: HubOptions = HubOptions()

    @classmethod
    def of(cls, path: str | os.PathLike, options: HubOptions) -> Location:
        """The location a user named: a Hub repo id or a local folder, as a string or a path."""
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidArgumentTypeError(
                f"A checkpoint is named by a Hub repo id ('org/name') or a local folder (str or Path), got "
                f"{type(path).__name__} {path!r}."
            )
        return cls(os.fspath(path), options)

    @property
    def is_local(self) -> bool:
        return Path(self.path).expanduser().is_dir()

    @property
    def local_dir(self) -> Path:
        return Path(self.path, self.options.subfolder or "").expanduser()

    @property
    def name(self) -> str:
        """`'path'` or `'path' (subfolder 'sub')`, for messages."""
        sub = self.options.subfolder
        return repr(self.path) + (f" (subfolder {sub!r})" if sub else "")

    @property
    def description(self) -> str:
        if self.is_local:
            return f"local folder {str(self.local_dir)!r}"
        revision = self.options.revision
        return f"Hub repo {self.name}" + (f" at revision {revision!r}" if revision else "")

    @property
    def _prefix(self) -> str:
        return f"{self.options.subfolder.strip('/')}/" if self.options.subfolder else ""

    # ------------------------------------------------------------------ files and folders
    def folder(self, patterns: Sequence[str], what: str = "the files") -> Path:
        """A local folder holding this location's files that match `patterns` (fetched with `snapshot_download`).

        Offline, it is the cached snapshot, whatever it holds. Location-level problems (no such folder, repo or
        revision, nothing cached while offline, network errors) raise `CheckpointNotFoundError`.
        """
        if self.is_local:
            self._check_local_dir()
            return self.local_dir
        self._check_not_a_file()
        try:
            root = snapshot_download(
                self.path, allow_patterns=[self._prefix + p for p in patterns], **self.options.download_kwargs()
            )
        except (LocalEntryNotFoundError, HFValidationError, HfHubHTTPError, ValueError) as error:
            raise self._error(what, error) from error
        return Path(root, self._prefix)

    def require(self, folder: Path, *filenames: str) -> None:
        """Raise `CheckpointFormatError` naming the first of `filenames` missing from `folder` and what is here."""
        for filename in filenames:
            if (folder / filename).is_file():
                continue
            where = " in the cached snapshot (downloads are off)" if self.options.offline and not self.is_local else ""
            raise CheckpointFormatError(
                f"{self.description} has no {filename!r}{where}. Files found: {self.listing_text()}."
                + self.unsafe_hint()
            )

    def listing(self) -> list[str] | None:
        """File names directly in this folder (local, cached snapshot, or the Hub when online), if they can be known."""
        try:
            if self.is_local or self.options.offline:
                return sorted(p.name for p in self.folder([]).iterdir() if p.is_file())
            files = HfApi().list_repo_files(self.path, revision=self.options.revision, token=self.options.token)
            inside = [f.removeprefix(self._prefix) for f in files if f.startswith(self._prefix)]
            return sorted(name for name in inside if "/" not in name)
        except Exception:  # a listing only improves an error message; never fail because of it
            return None

    def listing_text(self) -> str:
        names = self.listing()
        if names is None:
            return "(could not list)"
        return ", ".join(names[:12]) + (" ..." if len(names) > 12 else "") if names else "none"

    def unsafe_hint(self) -> str:
        """A sentence about pickle files found here (never loaded), or `""`."""
        unsafe = [name for name in self.listing() or [] if name.lower().endswith(UNSAFE_SUFFIXES)]
        if not unsafe:
            return ""
        return (
            f" It holds {', '.join(unsafe)}: pickle-based weights (.bin/.pt/.pth/.ckpt/.pkl) are never loaded "
            "because unpickling can run arbitrary code. Convert them to .safetensors first (with the tool that made "
            "them), then point to the folder again."
        )

    # ------------------------------------------------------------------ errors
    def _check_local_dir(self) -> None:
        if not self.local_dir.is_dir():
            sub = self.options.subfolder
            raise CheckpointNotFoundError(
                f"Local folder {str(self.local_dir)!r} does not exist"
                + (f" (subfolder {sub!r} of {self.path!r}). Check the subfolder name." if sub else ". Check the path.")
            )

    def _check_not_a_file(self) -> None:
        """A path to a local file (e.g. `model.safetensors`) names a file, not the folder or repo that is wanted."""
        path = Path(self.path).expanduser()
        if path.is_file():
            raise CheckpointNotFoundError(
                f"{self.path!r} is a file; a folder or a Hub repo id ('org/name') is expected here. Pass the folder "
                f"that holds it ({str(path.parent)!r}), with its other files."
            )

    def _error(self, what: str, error: Exception) -> CheckpointNotFoundError:
        if isinstance(error, HFValidationError):
            return CheckpointNotFoundError(
                f"{self.path!r} is neither an existing local folder nor a valid Hub repo id ('org/name'). Pass the "
                "path of a folder or a repo id."
            )
        if isinstance(error, (RepositoryNotFoundError, RevisionNotFoundError)):
            return CheckpointNotFoundError(
                f"{self.description} was not found on the Hub ({error.__class__.__name__}): check the repo id, the "
                "revision and your token (private or gated repos need `token=`), or pass a local folder."
            )
        if isinstance(error, LocalEntryNotFoundError) and self.options.offline:
            return CheckpointNotFoundError(
                f"Could not load {what} from {self.description}: downloads are off (HF_HUB_OFFLINE=1 or "
                f"local_files_only=True) and it is not in the local cache: {self._cache_problem()}. Download it once "
                "online, or pass a local folder."
            )
        return CheckpointNotFoundError(
            f"Could not download {what} from {self.description}, and it is not in the local cache. Check your "
            f"connection, or pass a local folder. ({error})"
        )

    def _cache_problem(self) -> str:
        cache = self.options.cache_dir or constants.HF_HUB_CACHE
        try:
            repos = scan_cache_dir(cache).repos
        except CacheNotFound:
            repos = frozenset()
        if not any(repo.repo_id == self.path and repo.repo_type == "model" for repo in repos):
            return f"the repo is not in the cache folder {str(cache)!r}"
        return f"revision {self.options.revision or 'main'!r} is not in the cache"


def resolve_location(
    value: str | os.PathLike | Location,
    options: HubOptions | None = None,
    *,
    subfolder: str | None = None,
    relative_to: Location | None = None,
) -> Location:
    """Where a model named by a string lives: the one rule for checkpoints, CLIP encoders and face models.

    An existing local folder; with `relative_to` (a name from a checkpoint's config), `"./name"` or a name
    without a slash is a folder of that checkpoint, read with its options; `"org/name[/folder]"` is a Hub repo read
    with `options`; another path is a local folder. `subfolder` is appended. The rules: docs/loading.md.

    Example:
        >>> checkpoint = Location("org/my-hyperlora", HubOptions(subfolder="v1", revision="v2"))
        >>> resolve_location("image_encoder", relative_to=checkpoint).options.subfolder
        'v1/image_encoder'
        >>> other = resolve_location("h94/IP-Adapter/models/image_encoder", checkpoint.options.for_other_repo())
        >>> other.path, other.options.subfolder, other.options.revision
        ('h94/IP-Adapter', 'models/image_encoder', None)
    """
    if isinstance(value, Location):
        return value
    options = options or HubOptions()
    text = os.fspath(value).strip()
    exists = bool(text) and Path(text).expanduser().is_dir()
    explicit = text in (".", "./") or text.startswith("./")
    if relative_to is not None and text and (explicit or ("/" not in text and not exists)):
        inner = _join(relative_to.options.subfolder, text.removeprefix("."), subfolder)
        return Location(relative_to.path, dataclasses.replace(relative_to.options, subfolder=inner))
    if exists or text.startswith((".", "/", "~")):
        return Location(text, dataclasses.replace(options, subfolder=_join(subfolder)))
    parts = text.strip("/").split("/")
    if len(parts) >= 2 and _REPO_ID.match("/".join(parts[:2])):
        return Location("/".join(parts[:2]), dataclasses.replace(options, subfolder=_join(*parts[2:], subfolder)))
    raise CheckpointNotFoundError(
        f"{text!r} is neither a local folder, a Hub repo id ('org/name', or 'org/name/folder' for a folder of it) "
        "nor, for names in a checkpoint's config, a folder of the checkpoint ('./name'). Fix the name."
    )
