"""The demo's engine, without any UI: one shared pipeline and the steps the page offers.

`DemoEngine` holds a diffusers pipeline with a HyperLoRA loaded and calls only the public API on it
(`pipe.predict_hyperlora_identity`, `pipe.set_hyperlora_identity`, `pipe.set_adapters`, ...). The page (app.py)
keeps each visitor's identity in their own session; the pipeline's adapters hold one identity at a time, so
writing an identity and generating with it happen together under the controller's lock, `pipe.hyperlora.lock`
(the engine's `lock` is that same re-entrant lock: there is one lock and so one lock order).

Every refusal is a `HyperLoRAError` worded for the page (the control's label, what it takes, what to do), with
`argument=` naming the setting. Files the engine writes live in its own work folder, removed by `close()`, when
the engine is garbage collected, or at interpreter exit.

    engine = DemoEngine.tiny_default()                  # offline, seconds
    identity = engine.identity_from_inputs(["me.jpg"])
    image, prompt = engine.generate(identity, GenerationSettings(prompt="a photo of a person as an astronaut"))
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import (
    HyperLoRAWriteError,
    ImageInputError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    NoFaceDetectedError,
    NonFiniteValueError,
)
from ..face.images import check_pixel_count
from ..identities.identity import HyperLoRAIdentity
from ..identities.inputs import split_identity_inputs
from ..io.hub import HubOptions
from ..io.lora_files import LORA_FORMATS, check_format
from ..model.config import DEFAULT_BASE_MODEL
from ..utils.checks import is_finite
from ..utils.devices import device_and_dtype

SIZE_STEP = 64
MAX_STEPS = 150
MAX_SEED = 2**64 - 1  # the largest seed `torch.Generator.manual_seed` takes
MAX_PHOTO_PIXELS = 40_000_000  # a 40 MP photo decodes to 120 MB; larger ones are refused before they are decoded
WORK_FOLDER_PREFIX = "hyperlora-demo-"
TINY_NO_FACE_HINT = (
    "The built-in tiny default's stand-in face detector finds only faces inside a magenta frame, like the example "
    "photo's; it does not find faces in real photos. Try the example photo, or start the demo with a checkpoint "
    "(diffusers-hyperlora demo CHECKPOINT) for real photos."
)
NO_FACE_HINT = "Use photos where one face is clearly visible, frontal and at least ~100 px tall."

__all__ = [
    "LORA_FORMATS",
    "DemoDefaults",
    "DemoEngine",
    "GenerationSettings",
    "WorkFolder",
    "prompt_with_trigger_words",
]


@dataclass(frozen=True)
class DemoDefaults:
    """Starting values and ranges of the page's controls for one kind of model."""

    steps: int
    size: int
    min_size: int
    max_size: int


TINY_DEFAULTS = DemoDefaults(steps=4, size=128, min_size=64, max_size=512)
SDXL_DEFAULTS = DemoDefaults(steps=30, size=1024, min_size=512, max_size=1536)


def _whole_number(value: Any, label: str, argument: str, low: int, high: int, fix: str) -> int:
    """`value` as an int in `[low, high]`, else `InvalidArgumentError` in the page's words."""
    number = value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        number = int(value)
    if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
        raise InvalidArgumentError(
            f"{label} must be a whole number from {low} to {high}, got {value!r}. {fix}", argument=argument
        )
    return number


def _finite_number(value: Any, label: str, argument: str) -> float:
    """`value` as a finite float, else `InvalidArgumentError` (a NaN weight would give a black image)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgumentError(
            f"{label} must be a finite number, got {value!r}. Set it with its slider (0 turns it off).",
            argument=argument,
        )
    return float(value)


@dataclass
class GenerationSettings:
    """Everything one "Generate" click decides. Weights are PEFT adapter weights (`pipe.set_adapters`)."""

    prompt: str
    negative_prompt: str = ""
    add_trigger_words: bool = True
    steps: int = TINY_DEFAULTS.steps
    seed: int = 0
    width: int = TINY_DEFAULTS.size
    height: int = TINY_DEFAULTS.size
    id_weight: float = 0.8
    base_weight: float = 0.0
    slider: str | None = None
    slider_weight: float = 0.0

    def validate(self, defaults: DemoDefaults) -> None:
        """Raise `InvalidArgumentError` (with `argument=` the field) naming the first setting out of range."""
        for label, name in (("Prompt", "prompt"), ("Negative prompt", "negative_prompt")):
            if not isinstance(getattr(self, name), str):
                raise InvalidArgumentError(
                    f"{label} must be text, got {type(getattr(self, name)).__name__}. Type it in its box "
                    "(it may be empty).",
                    argument=name,
                )
        _whole_number(self.steps, "Steps", "steps", 1, MAX_STEPS, "Use the Steps slider.")
        low, high = defaults.min_size, defaults.max_size
        for label, name in (("Width", "width"), ("Height", "height")):
            value = _whole_number(getattr(self, name), label, name, low, high, "Use its slider.")
            if value % SIZE_STEP:
                raise InvalidArgumentError(
                    f"{label} must be a multiple of {SIZE_STEP} pixels, got {value}. Use its slider.", argument=name
                )
        _whole_number(self.seed, "Seed", "seed", 0, MAX_SEED, "Any whole number from 0 works; 0 is a fine start.")
        _finite_number(self.id_weight, "ID weight", "id_weight")
        _finite_number(self.base_weight, "Base weight", "base_weight")
        _finite_number(self.slider_weight, "Slider weight", "slider_weight")


def _require_type(value: Any, kind: type | tuple[type, ...], argument: str, expected: str) -> None:
    if not isinstance(value, kind):
        raise InvalidArgumentTypeError(f"{argument} must be {expected}, got {type(value).__name__}.", argument=argument)


def _blown_up(step: int, weights: Sequence[float]) -> NonFiniteValueError:
    """The image turned NaN or infinite (it would come out black): the strongest weight is the likely cause."""
    fields = [("ID weight", "id_weight"), ("Base weight", "base_weight"), ("Slider weight", "slider_weight")]
    used = ", ".join(f"{label} {weight:g}" for (label, _), weight in zip(fields, weights))
    strongest = max(range(len(weights)), key=lambda index: abs(weights[index]))
    return NonFiniteValueError(
        f"Step {step}: the image became NaN or infinite (it would be black) with {used}. Use weights from -2 to 2, "
        "as the page's sliders do.",
        argument=fields[strongest][1],
    )


def prompt_with_trigger_words(prompt: str, trigger_words: str) -> str:
    """`"{trigger words}, {prompt}"` unless the prompt already contains the trigger words (or there are none)."""
    prompt, trigger_words = prompt.strip(), trigger_words.strip()
    if not trigger_words or trigger_words in prompt:
        return prompt
    return f"{trigger_words}, {prompt}" if prompt else trigger_words


def safe_file_stem(name: str, default: str = "lora") -> str:
    """`name` reduced to letters, digits, `_` and `-` (at most 64), so it names a file inside its folder.

    Example:
        >>> safe_file_stem("../../etc/x"), safe_file_stem("slider age"), safe_file_stem("..")
        ('etc_x', 'slider_age', 'lora')
    """
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", str(name)).strip("_-")[:64]
    return stem or default


class WorkFolder:
    """A new temporary folder (`hyperlora-demo-*` in `parent`, default the system's temp folder), removed by
    `remove()`, when this object is garbage collected, or at interpreter exit (`weakref.finalize`)."""

    def __init__(self, parent: str | os.PathLike | None = None) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=WORK_FOLDER_PREFIX, dir=parent)).resolve()
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)

    def check_open(self) -> None:
        """Refuse to write once the folder was removed (`HyperLoRAWriteError`): nothing would remove it again."""
        if self.removed:
            raise HyperLoRAWriteError(
                f"The demo's work folder {self.path} was removed (the engine was closed); nothing more is written "
                "there. Make a new engine (DemoEngine.from_pretrained or DemoEngine.tiny_default).",
                argument="folder",
            )

    def new_folder(self, kind: str) -> Path:
        """A new empty folder `{kind}/{random}` inside the work folder."""
        self.check_open()
        folder = self.path / kind / uuid.uuid4().hex
        folder.mkdir(parents=True)
        return folder

    def contains(self, path: str | os.PathLike) -> bool:
        return Path(path).resolve().is_relative_to(self.path)

    def remove(self) -> None:
        self._finalizer()

    @property
    def removed(self) -> bool:
        return not self._finalizer.alive


class DemoEngine:
    """A pipeline with a HyperLoRA, shared by every visitor of the page.

    Args:
        pipe: a diffusers pipeline on which `load_hyperlora` was called.
        defaults: the controls' starting values and ranges.
        description: one line about the models, shown at the top of the page.
        workdir: the folder in which the engine makes its own work folder (`hyperlora-demo-*`, for downloads and
            example photos; default: the system's temp folder), or a `WorkFolder` to adopt. The work folder is
            removed by `close()`, when the engine is garbage collected, or at exit; `workdir` itself stays.
        example_photos: photos offered as examples in the page.
        no_face_hint: what to do when no face is found (the tiny default's detector only finds framed faces).
    """

    def __init__(
        self,
        pipe: Any,
        *,
        defaults: DemoDefaults = SDXL_DEFAULTS,
        description: str = "",
        workdir: str | os.PathLike | WorkFolder | None = None,
        example_photos: Sequence[Path] = (),
        no_face_hint: str = NO_FACE_HINT,
    ) -> None:
        self.pipe = pipe
        self.defaults = defaults
        self.description = description
        self.work_folder = workdir if isinstance(workdir, WorkFolder) else WorkFolder(workdir)
        self.example_photos = list(example_photos)
        self.no_face_hint = no_face_hint

    @property
    def workdir(self) -> Path:
        """The engine's own work folder (removed by `close()` and at exit)."""
        return self.work_folder.path

    @property
    def lock(self) -> Any:
        """`pipe.hyperlora.lock` (re-entrant): hold it to pair your own switch with your own generation. The engine
        takes no other lock, so code that holds it may call the engine from the same thread."""
        return self.pipe.hyperlora.lock

    def close(self) -> None:
        """Remove the work folder (downloads, example photos, the tiny default's face models)."""
        self.work_folder.remove()

    # ------------------------------------------------------------------ construction
    @classmethod
    def tiny_default(
        cls, seed: int = 0, workdir: str | os.PathLike | None = None, device: str | None = "cpu"
    ) -> DemoEngine:
        """The built-in tiny default, offline: tiny SDXL pipeline, HyperLoRA (with a Base branch) and face models.

        All weights are random (seeded), so images are noise-like; every step is the real one. The tiny face
        detector finds faces marked by a coloured frame (`diffusers_hyperlora.testing.tiny_face.draw_face_marker`), not
        real faces: the page offers an example photo with the frame drawn. `device` (checked first, as for
        `from_pretrained`; `None`: cuda when there is a GPU) is where the tiny pipeline runs, in float32.
        """
        from ..face import FaceAnalyzer
        from ..testing.tiny_checkpoint import FACE_MODELS_FOLDER, save_tiny_checkpoint, tiny_example_photo
        from ..testing.tiny_models import tiny_sdxl_pipeline

        device, _ = device_and_dtype(device, torch.float32)  # checked first, before any file is written
        folder = WorkFolder(workdir)
        pipe = tiny_sdxl_pipeline(seed=seed).to(device)  # built in float32
        pipe.set_progress_bar_config(disable=True)
        checkpoint = save_tiny_checkpoint(folder.path / "tiny-checkpoint", pipe.unet, seed=seed)
        face_models = checkpoint / FACE_MODELS_FOLDER
        pipe.load_hyperlora(
            os.fspath(checkpoint),
            face_analyzer=FaceAnalyzer.from_pretrained(face_models, providers=["CPUExecutionProvider"]),
        )
        example = tiny_example_photo(folder.path / "example-face.png")
        description = (
            "Built-in tiny default: a tiny SDXL pipeline and a tiny HyperLoRA with random weights, so images are "
            "noise-like; every step is the real one. Its stand-in face detector finds only faces marked by a "
            "magenta frame: try the example photo. For real photos, start the demo with a checkpoint: "
            "`diffusers-hyperlora demo bytedance-research/HyperLoRA --subfolder sdxl_hyper_id_lora_v1_fidelity`."
        )
        return cls(
            pipe,
            defaults=TINY_DEFAULTS,
            description=description,
            workdir=folder,
            example_photos=[example],
            no_face_hint=TINY_NO_FACE_HINT,
        )

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | os.PathLike,
        hub_options: HubOptions | Mapping[str, Any] | None = None,
        *,
        base_model: str | None = None,
        device: str | None = None,
        image_encoder: str | None = None,
        face_models: str | None = None,
        **hub_kwargs: Any,
    ) -> DemoEngine:
        """An SDXL pipeline from `base_model` (default `DEFAULT_BASE_MODEL`) with the HyperLoRA `checkpoint`, on
        the GPU when there is one.

        `hub_options` (a `HubOptions` or a dict of its fields) and the keywords `subfolder`, `revision`, `token`,
        `cache_dir`, `local_files_only`, `force_download` (which override it) say where the checkpoint comes from;
        the token, cache folder and download switches also apply to `base_model` (docs/loading.md).
        """
        from diffusers import DiffusionPipeline

        options = HubOptions.of(hub_options, **hub_kwargs)
        base_model = base_model or DEFAULT_BASE_MODEL
        device, dtype = device_and_dtype(device)  # checked before anything is downloaded
        base_kwargs = options.for_other_repo().download_kwargs()
        pipe = DiffusionPipeline.from_pretrained(base_model, torch_dtype=dtype, **base_kwargs).to(device)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_hyperlora(
            os.fspath(checkpoint),
            **asdict(options),
            image_encoder=image_encoder,
            face_analyzer=face_models,
        )
        where = f"{checkpoint}" + (f" ({options.subfolder})" if options.subfolder else "")
        description = f"HyperLoRA {where} on {base_model}, {device}, {str(dtype).removeprefix('torch.')}."
        return cls(pipe, defaults=SDXL_DEFAULTS, description=description)

    # ------------------------------------------------------------------ what the page shows
    @property
    def trigger_words(self) -> str:
        return self.pipe.hyperlora.config.trigger_words

    @property
    def has_base(self) -> bool:
        return self.pipe.hyperlora.config.has_base

    @property
    def adapter_names(self) -> tuple[str, str]:
        """The names of HyperLoRA's ID and Base adapters on this pipeline (as `load_hyperlora` named them)."""
        names = self.pipe.hyperlora.adapters.names
        return names["id"], names["base"]

    @property
    def sliders(self) -> dict[str, Any]:
        """The pipeline's sliders by adapter name, shared by all visitors (`pipe.hyperlora.sliders`)."""
        return self.pipe.hyperlora.sliders

    def new_folder(self) -> Path:
        """A new empty folder in the work folder: one per visitor of the page (`remove_folder` removes it)."""
        return self.work_folder.new_folder("visitors")

    def remove_folder(self, folder: str | os.PathLike) -> None:
        """Remove a folder made by `new_folder` (nothing outside the work folder is ever removed)."""
        _require_type(folder, (str, os.PathLike), "folder", "a folder made by `new_folder`")
        folder = Path(folder)
        if folder.resolve() != self.workdir and self.work_folder.contains(folder):
            shutil.rmtree(folder, ignore_errors=True)

    def new_file(self, name: str, folder: str | os.PathLike | None = None) -> Path:
        """A path for the download `name` in `folder` (default: a new folder of its own); `name` is reduced to a
        plain file name, so it never points outside the folder."""
        self.work_folder.check_open()
        folder = Path(folder) if folder is not None else self.work_folder.new_folder("downloads")
        if not self.work_folder.contains(folder):
            raise InvalidArgumentError(
                f"Downloads go inside the demo's work folder {self.workdir}, not {folder}.", argument="folder"
            )
        stem, suffix = os.path.splitext(os.path.basename(str(name)))
        suffix = suffix if re.fullmatch(r"\.\w+", suffix) else ""
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{safe_file_stem(stem, 'download')}{suffix}"

    # ------------------------------------------------------------------ steps
    def _photos(self, inputs: Sequence[str | os.PathLike]) -> list[str]:
        """The photos among `inputs` (identity files apart), each refused early if it is not an image file or is
        larger than `MAX_PHOTO_PIXELS` (only its header is read)."""
        if isinstance(inputs, (str, os.PathLike)) or not isinstance(inputs, Sequence):
            raise InvalidArgumentTypeError(
                f"photos must be a list of photo or identity file paths, got {type(inputs).__name__}.",
                argument="photos",
            )
        photos, _ = split_identity_inputs([os.fspath(value) for value in inputs])
        for photo in photos:
            name = Path(photo).name
            if not os.path.isfile(photo):
                raise ImageInputError(f"{name} is not a file. Upload a JPEG, PNG or WebP photo.", argument="photos")
            if check_pixel_count(photo, MAX_PHOTO_PIXELS) is None:
                raise ImageInputError(
                    f"{name} could not be read as an image. Upload a JPEG, PNG or WebP photo, or a saved identity "
                    "file (.safetensors).",
                    argument="photos",
                )
        return photos

    def _no_face(self, photos: Sequence[str]) -> NoFaceDetectedError:
        names = ", ".join(Path(photo).name for photo in photos)
        return NoFaceDetectedError(f"No face was found in {names}. {self.no_face_hint}", argument="photos")

    def preview(self, photos: Sequence[str | os.PathLike]) -> list[tuple[Image.Image, str]]:
        """The crops and masks the encoders will see, captioned, for every photo (identity files are skipped)."""
        images = self._photos(photos)
        if not images:
            raise InvalidArgumentError(
                "Add one or more photos to preview what the model sees (identity files have no crops).",
                argument="photos",
            )
        try:
            inputs = self.pipe.preview_hyperlora_inputs(images)
        except NoFaceDetectedError as error:
            raise self._no_face(images) from error
        gallery = []
        for item in inputs:
            name = Path(item.source).name
            for label, picture in (
                ("CLIP crop", item.clip_image),
                ("ArcFace crop", item.arcface_image),
                ("face mask", item.face_mask),
                ("background removed", item.background_removed),
                ("Base input (face blurred)", item.base_image),
            ):
                if picture is not None:
                    gallery.append((picture, f"{label} ({name})" if len(inputs) > 1 else label))
        return gallery

    def identity_from_inputs(self, inputs: Sequence[str | os.PathLike]) -> HyperLoRAIdentity:
        """Photos and saved identity files of one person -> one identity (`pipe.predict_hyperlora_identity`)."""
        if not inputs:
            raise InvalidArgumentError(
                "Add one or more photos of the person (or saved identity files) first.", argument="photos"
            )
        photos = self._photos(inputs)
        try:
            return self.pipe.predict_hyperlora_identity([os.fspath(value) for value in inputs])
        except NoFaceDetectedError as error:
            raise self._no_face(photos) from error

    def generate(
        self,
        identity: HyperLoRAIdentity | None,
        settings: GenerationSettings,
        on_step: Callable[[int, int], None] | None = None,
    ) -> tuple[Image.Image, str]:
        """Write `identity` (none: adapters off) and generate; returns the image and the prompt used."""
        _require_type(settings, GenerationSettings, "settings", "a GenerationSettings")
        settings.validate(self.defaults)
        if settings.slider and settings.slider not in self.sliders:
            raise InvalidArgumentError(
                f"There is no slider {settings.slider!r}: build it first "
                f"(sliders: {', '.join(self.sliders) or 'none'}).",
                argument="slider",
            )
        prompt = settings.prompt.strip()
        if identity is not None and settings.add_trigger_words:
            prompt = prompt_with_trigger_words(prompt, self.trigger_words)
        names = list(self.adapter_names)
        weights = [settings.id_weight, settings.base_weight] if identity is not None else [0.0, 0.0]
        if settings.slider:
            names.append(settings.slider)
            weights.append(settings.slider_weight)

        def step_end(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
            latents = tensors.get("latents")
            if latents is not None and not is_finite(latents):
                raise _blown_up(step + 1, weights)
            if on_step is not None:
                on_step(step + 1, int(settings.steps))
            return tensors

        # One lock, the controller's: `using` pairs this switch with this generation for every thread using the pipe.
        held = self.pipe.hyperlora.using(identity) if identity is not None else self.lock
        with held:
            self.pipe.set_adapters(names, weights)
            output = self.pipe(
                prompt,
                negative_prompt=settings.negative_prompt or None,
                num_inference_steps=int(settings.steps),
                width=int(settings.width),
                height=int(settings.height),
                generator=torch.Generator("cpu").manual_seed(int(settings.seed)),
                callback_on_step_end=step_end,
            )
        return output.images[0], prompt

    def save_identity(self, identity: HyperLoRAIdentity, folder: str | os.PathLike | None = None) -> Path:
        """Write the identity to a downloadable `identity.safetensors` in `folder` (default: a new folder)."""
        _require_type(identity, HyperLoRAIdentity, "identity", "an identity (`identity_from_inputs`)")
        path = self.new_file("identity.safetensors", folder)
        identity.save(path)
        return path

    def export_lora(
        self,
        identity_or_slider: Any,
        format: str = "kohya",
        name: str = "lora",
        folder: str | os.PathLike | None = None,
    ) -> Path:
        """Write the identity's (or a slider's) LoRA as a standard LoRA file in `format`, named after `name`
        (reduced to a plain file name), in `folder` (default: a new folder)."""
        check_format(format)
        path = self.new_file(f"{safe_file_stem(name)}_{format}.safetensors", folder)
        self.pipe.hyperlora.export_lora(identity_or_slider, path, format=format)
        return path

    def add_slider(self, neutral: Sequence[str], edited: Sequence[str], name: str) -> str:
        """Build (or rebuild) the slider adapter `name` from neutral and edited photos / identity files."""
        name = name.strip() if isinstance(name, str) else name
        if not isinstance(name, str) or not name.isidentifier():
            raise InvalidArgumentError(
                f"Slider name {name!r}: use letters, digits and underscores, e.g. 'age' or 'smile'.", argument="name"
            )
        if name in self.adapter_names:
            raise InvalidArgumentError(
                f"Slider name {name!r} is taken by HyperLoRA's own adapters; choose another, e.g. 'age'.",
                argument="name",
            )
        if not neutral or not edited:
            raise InvalidArgumentError(
                "A slider needs neutral photos and edited photos (e.g. the same person aged).",
                argument="neutral" if not neutral else "edited",
            )
        neutral_identity = self.identity_from_inputs(neutral)
        edited_identity = self.identity_from_inputs(edited)
        self.pipe.add_hyperlora_slider(neutral_identity, edited_identity, adapter_name=name, weight=0.0)
        return name
