"""The demo's Gradio page: photos -> identity -> images, identity and LoRA downloads, sliders.

Every handler catches errors and shows them as a readable line in the page's status box (`#status`), so a bad
photo never breaks the app. Each visitor's identity lives in their own session (`gr.State`); the shared pipeline
is only touched through `DemoEngine`, which serializes it with a lock.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from the page's server

import gradio as gr  # noqa: E402

from ..errors import HyperLoRAError  # noqa: E402
from .engine import LORA_FORMATS, MAX_STEPS, SIZE_STEP, DemoEngine, GenerationSettings  # noqa: E402

logger = logging.getLogger(__name__)

NO_SLIDER = "(none)"
# Offline-friendly look: system fonts, no web fonts to fetch.
THEME = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def error_message(error: Exception) -> str:
    """The status line for a failed step: the library's own message for user errors, a short note otherwise."""
    if isinstance(error, (HyperLoRAError, ValueError, OSError)):
        return f"**Error:** {error}"
    logger.exception("Unexpected error in the demo")
    return f"**Error:** something went wrong ({type(error).__name__}: {error}). The app keeps running; try again."


def _files(value: Any) -> list[str]:
    """Paths of a `gr.File(file_count="multiple")` value (None, one path or a list)."""
    if not value:
        return []
    return [os.fspath(v) for v in (value if isinstance(value, list) else [value])]


def _describe(identity: Any) -> str:
    names = ", ".join(os.path.basename(s) for s in identity.sources) if identity.sources else "saved identity"
    return f"identity of {identity.num_images} photo(s): {names}"


class DemoHandlers:
    """The page's event handlers, one method per button; each returns the new values of its outputs."""

    def __init__(self, engine: DemoEngine) -> None:
        self.engine = engine

    def _identity(self, photos: Any, cached: Any) -> tuple[Any, Any]:
        """`(identity, new cache)`: the cached identity while the photos are the same ones, else a new one."""
        files = tuple(_files(photos))
        if cached is not None and cached[0] == files:
            return cached[1], cached
        identity = self.engine.identity_from_inputs(list(files))
        return identity, (files, identity)

    def photos_changed(self, photos: Any) -> str:
        count = len(_files(photos))
        return f"{count} file(s) ready: generate, or preview the crops." if count else ""

    def preview(self, photos: Any) -> tuple[Any, str]:
        try:
            gallery = self.engine.preview(_files(photos))
        except Exception as error:  # noqa: BLE001 - shown in the page
            return None, error_message(error)
        return gallery, f"Preview: {len(gallery)} crop(s) and mask(s)."

    def create_identity(self, photos: Any, cached: Any) -> tuple[Any, str]:
        try:
            identity, cached = self._identity(photos, cached)
        except Exception as error:  # noqa: BLE001
            return None, error_message(error)
        return cached, f"Ready: {_describe(identity)}."

    def generate(
        self,
        photos: Any,
        cached: Any,
        prompt: str,
        add_trigger_words: bool,
        negative_prompt: str,
        id_weight: float,
        base_weight: float,
        slider: str,
        slider_weight: float,
        steps: int,
        seed: int,
        width: int,
        height: int,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's way to report progress
    ) -> tuple[Any, Any, str]:
        settings = GenerationSettings(
            prompt=prompt or "",
            negative_prompt=negative_prompt or "",
            add_trigger_words=bool(add_trigger_words),
            steps=int(steps),
            seed=int(seed),
            width=int(width),
            height=int(height),
            id_weight=float(id_weight),
            base_weight=float(base_weight),
            slider=None if slider in (None, "", NO_SLIDER) else slider,
            slider_weight=float(slider_weight),
        )
        identity = None
        try:
            if _files(photos):
                progress(0.0, desc="Reading the photos")
                identity, cached = self._identity(photos, cached)
            image, used = self.engine.generate(
                identity, settings, on_step=lambda i, n: progress((i, n), desc="Denoising", unit="steps")
            )
        except Exception as error:  # noqa: BLE001
            return None, cached, error_message(error)
        who = _describe(identity) if identity is not None else "no photos: HyperLoRA off"
        if settings.slider:
            who += f", slider {settings.slider!r} at {settings.slider_weight:g}"
        return image, cached, f"Generated with {who}. Prompt: `{used}`"

    def save_identity(self, photos: Any, cached: Any) -> tuple[Any, Any, str]:
        try:
            identity, cached = self._identity(photos, cached)
            path = self.engine.save_identity(identity)
        except Exception as error:  # noqa: BLE001
            return None, cached, error_message(error)
        return str(path), cached, f"Saved the {_describe(identity)}. Add the file to the photos to reuse it."

    def export_lora(self, photos: Any, cached: Any, format: str) -> tuple[Any, Any, str]:
        try:
            identity, cached = self._identity(photos, cached)
            path = self.engine.export_lora(identity, format=format, name="identity_lora")
        except Exception as error:  # noqa: BLE001
            return None, cached, error_message(error)
        return str(path), cached, f"Exported the ID LoRA ({format} format); load it like any LoRA, weight ~0.8."

    def add_slider(self, neutral: Any, edited: Any, name: str) -> tuple[Any, str]:
        try:
            name = self.engine.add_slider(_files(neutral), _files(edited), name or "")
        except Exception as error:  # noqa: BLE001
            return gr.update(), error_message(error)
        choices = [NO_SLIDER, *self.engine.sliders]
        return gr.update(choices=choices, value=name), f"Slider {name!r} ready: chosen below; set its weight."

    def slider_choices(self) -> Any:
        return gr.update(choices=[NO_SLIDER, *self.engine.sliders], value=NO_SLIDER)

    def export_slider(self, slider: str, format: str) -> tuple[Any, str]:
        try:
            if slider in (None, "", NO_SLIDER) or slider not in self.engine.sliders:
                raise ValueError("Build a slider first, then pick it in the Slider menu.")
            path = self.engine.export_lora(self.engine.sliders[slider], format=format, name=f"slider_{slider}")
        except Exception as error:  # noqa: BLE001
            return None, error_message(error)
        return str(path), f"Exported slider {slider!r} ({format} format); use it at weight +-0.7."


def build_demo(engine: DemoEngine) -> gr.Blocks:
    """The Gradio page for `engine` (launch it with `.launch(...)` or `launch_demo`)."""
    handlers = DemoHandlers(engine)
    defaults = engine.defaults
    with gr.Blocks(title="HyperLoRA demo") as demo:
        gr.Markdown(f"# HyperLoRA demo\n{engine.description}")
        identity = gr.State(None)  # this visitor's (photo files, identity), reused while the photos stay the same
        with gr.Row():
            with gr.Column(scale=1):
                photos = gr.File(
                    label="Photos of one person (or saved identity .safetensors files)",
                    file_count="multiple",
                    type="filepath",
                    elem_id="photos",
                )
                if engine.example_photos:
                    gr.Examples([[[str(p)]] for p in engine.example_photos], inputs=[photos], label="Example photo")
                with gr.Row():
                    preview_button = gr.Button("Preview crops", elem_id="preview-button")
                    identity_button = gr.Button("Create identity", elem_id="identity-button")
                preview = gr.Gallery(label="What the encoders see", columns=5, height=200, elem_id="preview")
                with gr.Accordion("Identity and LoRA files", open=False):
                    save_button = gr.Button("Save identity", elem_id="save-identity-button")
                    identity_file = gr.File(label="Identity file", interactive=False, elem_id="identity-file")
                    lora_format = gr.Radio(list(LORA_FORMATS), value="kohya", label="LoRA format")
                    lora_button = gr.Button("Export LoRA", elem_id="export-lora-button")
                    lora_file = gr.File(label="LoRA file", interactive=False, elem_id="lora-file")
                with gr.Accordion("Build a slider from two photo sets", open=False):
                    neutral = gr.File(
                        label="Neutral photos", file_count="multiple", type="filepath", elem_id="slider-neutral"
                    )
                    edited = gr.File(
                        label="Edited photos (same person, e.g. aged)",
                        file_count="multiple",
                        type="filepath",
                        elem_id="slider-edited",
                    )
                    slider_name = gr.Textbox(value="slider", label="Slider name", elem_id="slider-name")
                    slider_button = gr.Button("Build slider", elem_id="slider-button")
                    slider_export = gr.Button("Export the chosen slider as a LoRA")
                    slider_file = gr.File(label="Slider LoRA file", interactive=False)
            with gr.Column(scale=1):
                prompt = gr.Textbox(
                    value="a photo of a person as an astronaut, portrait", label="Prompt", lines=2, elem_id="prompt"
                )
                trigger = gr.Checkbox(value=True, label=f"Add the trigger words ({engine.trigger_words!r})")
                negative = gr.Textbox(value="blurry, low quality", label="Negative prompt")
                with gr.Row():
                    id_weight = gr.Slider(0.0, 1.5, value=0.8, step=0.05, label="ID weight")
                    base_weight = gr.Slider(
                        0.0, 1.5, value=0.0, step=0.05, label="Base weight", interactive=engine.has_base
                    )
                with gr.Row():
                    slider = gr.Dropdown([NO_SLIDER], value=NO_SLIDER, label="Slider", elem_id="slider-choice")
                    slider_weight = gr.Slider(-2.0, 2.0, value=0.7, step=0.05, label="Slider weight")
                with gr.Row():
                    steps = gr.Slider(1, MAX_STEPS, value=defaults.steps, step=1, label="Steps")
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                with gr.Row():
                    low, high = defaults.min_size, defaults.max_size
                    width = gr.Slider(low, high, defaults.size, step=SIZE_STEP, label="Width")
                    height = gr.Slider(low, high, defaults.size, step=SIZE_STEP, label="Height")
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                result = gr.Image(label="Result", type="pil", format="png", interactive=False, elem_id="result")
                status = gr.Markdown("", elem_id="status")

        _on(photos.change, handlers.photos_changed, [photos], [status])
        _on(preview_button.click, handlers.preview, [photos], [preview, status])
        _on(identity_button.click, handlers.create_identity, [photos, identity], [identity, status])
        generation_inputs = [photos, identity, prompt, trigger, negative, id_weight, base_weight, slider]
        generation_inputs += [slider_weight, steps, seed, width, height]
        _on(generate_button.click, handlers.generate, generation_inputs, [result, identity, status])
        _on(save_button.click, handlers.save_identity, [photos, identity], [identity_file, identity, status])
        _on(lora_button.click, handlers.export_lora, [photos, identity, lora_format], [lora_file, identity, status])
        _on(slider_button.click, handlers.add_slider, [neutral, edited, slider_name], [slider, status])
        _on(slider_export.click, handlers.export_slider, [slider, lora_format], [slider_file, status])
        _on(demo.load, handlers.slider_choices, [], [slider])  # sliders built by other visitors
    return demo


def _on(event: Callable, handler: Callable, inputs: list, outputs: list) -> None:
    event(handler, inputs=inputs, outputs=outputs)


def launch_demo(engine: DemoEngine, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> gr.Blocks:
    """Serve the page for `engine` on `host:port` (blocks until interrupted unless `block=False`)."""
    demo = build_demo(engine)
    demo.queue(default_concurrency_limit=4)
    demo.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        allowed_paths=[str(engine.workdir)],
        theme=THEME,
        footer_links=[],
        quiet=True,
    )
    return demo
