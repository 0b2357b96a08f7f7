"""The demo's engine, without any UI: one shared pipeline, one lock, and the steps the page offers.

`DemoEngine` holds a diffusers pipeline with a HyperLoRA loaded and calls only the public API on it
(`pipe.predict_hyperlora_identity`, `pipe.set_hyperlora_identity`, `pipe.set_adapters`, ...). The page (app.py)
keeps each visitor's identity in its own session; the pipeline's adapters hold one identity at a time, so
writing an identity and generating with it happen together under `DemoEngine.lock` (and the controller's
`pipe.hyperlora.lock`).

    engine = DemoEngine.tiny_default()                  # offline, seconds
    identity = engine.identity_from_inputs(["me.jpg"])
    image, prompt = engine.generate(identity, GenerationSettings(prompt="a photo of a person as an astronaut"))
"""

from __future__ import annotations

import os
import tempfile
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..identities.identity import HyperLoRAIdentity
from ..io.hub import HubOptions

IDENTITY_SUFFIX = ".safetensors"
LORA_FORMATS = ("kohya", "diffusers")
SIZE_STEP = 64
MAX_STEPS = 150


@dataclass(frozen=True)
class DemoDefaults:
    """Starting values and ranges of the page's controls for one kind of model."""

    steps: int
    size: int
    min_size: int
    max_size: int


TINY_DEFAULTS = DemoDefaults(steps=4, size=128, min_size=64, max_size=512)
SDXL_DEFAULTS = DemoDefaults(steps=30, size=1024, min_size=512, max_size=1536)


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
        """Raise `ValueError` naming the first setting out of range (the page's controls keep them in range)."""
        if not 1 <= int(self.steps) <= MAX_STEPS:
            raise ValueError(f"Steps must be between 1 and {MAX_STEPS}, got {self.steps}.")
        for name, value in (("Width", self.width), ("Height", self.height)):
            if not defaults.min_size <= int(value) <= defaults.max_size or int(value) % SIZE_STEP:
                raise ValueError(
                    f"{name} must be a multiple of {SIZE_STEP} between {defaults.min_size} and {defaults.max_size} "
                    f"pixels, got {value}."
                )
        if int(self.seed) < 0:
            raise ValueError(f"Seed must be 0 or more, got {self.seed}.")


def prompt_with_trigger_words(prompt: str, trigger_words: str) -> str:
    """`"{trigger words}, {prompt}"` unless the prompt already contains the trigger words (or there are none)."""
    prompt, trigger_words = prompt.strip(), trigger_words.strip()
    if not trigger_words or trigger_words in prompt:
        return prompt
    return f"{trigger_words}, {prompt}" if prompt else trigger_words


def split_inputs(paths: Sequence[str | os.PathLike]) -> tuple[list[str], list[str]]:
    """`(photos, saved identity files)`: files ending in `.safetensors` are identities, everything else a photo."""
    paths = [os.fspath(path) for path in paths]
    identities = [path for path in paths if path.lower().endswith(IDENTITY_SUFFIX)]
    return [path for path in paths if path not in identities], identities


def tiny_example_photo(path: str | os.PathLike) -> Path:
    """Draw a cartoon face inside the tiny default's face marker (a magenta frame) and save it as a PNG."""
    from ..testing.tiny_face import draw_face_marker

    image = Image.new("RGB", (256, 256), (70, 110, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse((78, 58, 178, 188), fill=(236, 196, 160))  # face
    draw.ellipse((102, 100, 118, 112), fill=(40, 40, 40))  # eyes
    draw.ellipse((138, 100, 154, 112), fill=(40, 40, 40))
    draw.line((128, 112, 122, 140, 132, 140), fill=(170, 120, 100), width=3)  # nose
    draw.arc((104, 138, 152, 168), 20, 160, fill=(150, 60, 60), width=4)  # smile
    draw.chord((74, 40, 182, 110), 180, 360, fill=(90, 60, 40))  # hair
    framed = draw_face_marker(np.asarray(image), (66, 46, 190, 198))
    path = Path(path)
    Image.fromarray(framed).save(path)
    return path


class DemoEngine:
    """A pipeline with a HyperLoRA, shared by every visitor of the page; all pipeline access takes `lock`.

    Args:
        pipe: a diffusers pipeline on which `load_hyperlora` was called.
        defaults: the controls' starting values and ranges.
        description: one line about the models, shown at the top of the page.
        workdir: where downloads (identity and LoRA files) and example photos are written (default: a new
            temporary folder).
        example_photos: photos offered as examples in the page.
    """

    def __init__(
        self,
        pipe: Any,
        *,
        defaults: DemoDefaults = SDXL_DEFAULTS,
        description: str = "",
        workdir: str | os.PathLike | None = None,
        example_photos: Sequence[Path] = (),
    ) -> None:
        self.pipe = pipe
        self.defaults = defaults
        self.description = description
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="hyperlora-demo-"))
        self.example_photos = list(example_photos)
        self.lock = threading.Lock()
        self.sliders: dict[str, Any] = {}  # adapter name -> HyperLoRASlider, shared by all visitors

    # ------------------------------------------------------------------ construction
    @classmethod
    def tiny_default(cls, seed: int = 0, workdir: str | os.PathLike | None = None) -> DemoEngine:
        """The built-in tiny default, offline: tiny SDXL pipeline, HyperLoRA (with a Base branch) and face models.

        All weights are random (seeded), so images are noise-like; every step is the real one. The tiny face
        detector finds faces marked by a coloured frame (`diffusers_hyperlora.testing.tiny_face.draw_face_marker`), not
        real faces: the page offers an example photo with the frame drawn.
        """
        from ..face import FaceAnalyzer
        from ..testing.tiny_face import export_tiny_antelopev2, tiny_clip_encoder
        from ..testing.tiny_models import tiny_hyperlora_predictor, tiny_sdxl_pipeline

        workdir = Path(workdir or tempfile.mkdtemp(prefix="hyperlora-demo-"))
        pipe = tiny_sdxl_pipeline(seed=seed)
        pipe.set_progress_bar_config(disable=True)
        face_models = export_tiny_antelopev2(workdir / "tiny-face-models", seed=seed)
        pipe.load_hyperlora(
            tiny_hyperlora_predictor(pipe.unet, seed=seed, base_rank=4),
            image_encoder=tiny_clip_encoder(seed=seed),
            face_analyzer=FaceAnalyzer.from_pretrained(face_models, providers=["CPUExecutionProvider"]),
        )
        example = tiny_example_photo(workdir / "example-face.png")
        description = (
            "Built-in tiny default: a tiny SDXL pipeline and a tiny HyperLoRA with random weights, so images are "
            "noise-like; every step is the real one. Its stand-in face detector finds faces marked by a magenta "
            "frame (try the example photo). Start with a checkpoint for real images: "
            "`diffusers-hyperlora demo bytedance-research/HyperLoRA --subfolder sdxl_hyper_id_lora_v1_fidelity`."
        )
        return cls(pipe, defaults=TINY_DEFAULTS, description=description, workdir=workdir, example_photos=[example])

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | os.PathLike,
        hub_options: HubOptions | Mapping[str, Any] | None = None,
        *,
        base_model: str = "stabilityai/stable-diffusion-xl-base-1.0",
        device: str | None = None,
        image_encoder: str | None = None,
        face_models: str | None = None,
        **hub_kwargs: Any,
    ) -> DemoEngine:
        """An SDXL pipeline from `base_model` with the HyperLoRA `checkpoint`, on the GPU when there is one.

        `hub_options` (a `HubOptions` or a dict of its fields) and the keywords `subfolder`, `revision`, `token`,
        `cache_dir`, `local_files_only`, `force_download` (which override it) say where the checkpoint comes from;
        the token, cache folder and download switches also apply to `base_model` (docs/loading.md).
        """
        from diffusers import DiffusionPipeline

        options = HubOptions.of(hub_options, **hub_kwargs)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
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

    def new_file(self, name: str) -> Path:
        """A path named `name` in a new folder of its own (downloads of concurrent visitors never collide)."""
        folder = self.workdir / "downloads" / uuid.uuid4().hex
        folder.mkdir(parents=True)
        return folder / name

    # ------------------------------------------------------------------ steps
    def preview(self, photos: Sequence[str]) -> list[tuple[Image.Image, str]]:
        """The crops and masks the encoders will see, captioned, for every photo (identity files are skipped)."""
        images, _ = split_inputs(photos)
        if not images:
            raise ValueError("Add one or more photos to preview what the model sees (identity files have no crops).")
        with self.lock:
            inputs = self.pipe.preview_hyperlora_inputs(images)
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
                    gallery.append((picture, f"{name}: {label}"))
        return gallery

    def identity_from_inputs(self, inputs: Sequence[str]) -> HyperLoRAIdentity:
        """Photos and saved identity files of one person -> one identity (photos predicted, then pooled exactly)."""
        if not inputs:
            raise ValueError("Add one or more photos of the person (or saved identity files) first.")
        images, files = split_inputs(inputs)
        identities = [HyperLoRAIdentity.load(path, predictor=self.pipe.hyperlora.predictor) for path in files]
        if images:
            with self.lock:
                identities.append(self.pipe.predict_hyperlora_identity(images))
        return identities[0] if len(identities) == 1 else HyperLoRAIdentity.merge(identities)

    def generate(
        self,
        identity: HyperLoRAIdentity | None,
        settings: GenerationSettings,
        on_step: Callable[[int, int], None] | None = None,
    ) -> tuple[Image.Image, str]:
        """Write `identity` (none: adapters off) and generate; returns the image and the prompt used."""
        settings.validate(self.defaults)
        if settings.slider and settings.slider not in self.sliders:
            raise ValueError(f"There is no slider {settings.slider!r}; build it first (sliders: {list(self.sliders)}).")
        prompt = settings.prompt.strip()
        if identity is not None and settings.add_trigger_words:
            prompt = prompt_with_trigger_words(prompt, self.trigger_words)
        names = ["id", "base"]
        weights = [settings.id_weight, settings.base_weight] if identity is not None else [0.0, 0.0]
        if settings.slider:
            names.append(settings.slider)
            weights.append(settings.slider_weight)

        def step_end(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
            if on_step is not None:
                on_step(step + 1, int(settings.steps))
            return tensors

        # The demo's lock serializes its visitors; the controller's lock pairs the switch with this generation
        # for any other thread that uses the pipeline too.
        with self.lock, self.pipe.hyperlora.lock:
            if identity is not None:
                self.pipe.set_hyperlora_identity(identity)
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

    def save_identity(self, identity: HyperLoRAIdentity) -> Path:
        """Write the identity to a new downloadable `.safetensors` file."""
        path = self.new_file("identity.safetensors")
        identity.save(path)
        return path

    def export_lora(self, identity_or_slider: Any, format: str = "kohya", name: str = "lora") -> Path:
        """Write the identity's (or a slider's) LoRA as a standard LoRA file in `format`."""
        if format not in LORA_FORMATS:
            raise ValueError(f"LoRA format must be one of {LORA_FORMATS}, got {format!r}.")
        path = self.new_file(f"{name}_{format}.safetensors")
        with self.lock:
            self.pipe.hyperlora.export_lora(identity_or_slider, path, format=format)
        return path

    def add_slider(self, neutral: Sequence[str], edited: Sequence[str], name: str) -> str:
        """Build (or rebuild) the slider adapter `name` from neutral and edited photos / identity files."""
        name = name.strip()
        if not name.isidentifier():
            raise ValueError(f"Slider name {name!r}: use letters, digits and underscores, e.g. 'age' or 'smile'.")
        if name in ("id", "base"):
            raise ValueError(f"Slider name {name!r} is taken by HyperLoRA's own adapters; choose another, e.g. 'age'.")
        if not neutral or not edited:
            raise ValueError("A slider needs neutral photos and edited photos (e.g. the same person aged).")
        neutral_identity = self.identity_from_inputs(neutral)
        edited_identity = self.identity_from_inputs(edited)
        with self.lock:
            self.sliders[name] = self.pipe.add_hyperlora_slider(
                neutral_identity, edited_identity, adapter_name=name, weight=0.0
            )
        return name
