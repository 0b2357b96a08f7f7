"""The demo's Gradio page: photos -> identity -> images, identity and LoRA downloads, sliders.

Every handler catches errors and shows them as a readable line right under the button that was pressed (each
group of buttons has its own status line), in the page's words: file names, never the server's paths, and no
tracebacks. Each visitor's identity lives in their own session (`gr.State`), their downloads in a folder of their
own that is removed when they leave (`demo.unload`) and at exit. The shared pipeline is only touched through
`DemoEngine`.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from the page's server

import gradio as gr  # noqa: E402

from ..adapters.sliders import DEFAULT_SLIDER_NAME  # noqa: E402
from ..errors import HyperLoRAError, InvalidArgumentError  # noqa: E402
from ..utils.devices import check_port  # noqa: E402
from .engine import LORA_FORMATS, MAX_STEPS, SIZE_STEP, DemoEngine, GenerationSettings  # noqa: E402

logger = logging.getLogger(__name__)

NO_SLIDER = "(none)"
WORKING = "Working…"
# Offline-friendly look: system fonts, no web fonts to fetch.
THEME = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
# Captions of the preview wrap instead of being cut to "example-..."; status lines stand out a little.
CSS = """
#preview .caption-label { white-space: normal; max-width: 100%; }
.status p { margin: 0.25em 0; }
"""


def error_message(error: Exception, files: Sequence[str] = ()) -> str:
    """The status line for a failed step: the library's own message for user errors (with the visitor's
    uploaded files named by their names, not the server's temp paths), a short note otherwise."""
    if isinstance(error, HyperLoRAError):
        text = str(error)
        for path in sorted(files, key=len, reverse=True):
            text = text.replace(path, os.path.basename(path))
        return f"**Error:** {text}"
    logger.exception("Unexpected error in the demo")
    return (
        "**Error:** something went wrong on the server (the details are in its log). The page keeps working: try again."
    )


def _files(value: Any) -> list[str]:
    """Paths of a `gr.File(file_count="multiple")` value (None, one path or a list)."""
    if not value:
        return []
    return [os.fspath(v) for v in (value if isinstance(value, list) else [value])]


def _describe(identity: Any) -> str:
    names = ", ".join(os.path.basename(s) for s in identity.sources) if identity.sources else "saved identity"
    return f"identity of {identity.num_images} photo(s): {names}"


def _number(value: Any) -> Any:
    """A number box's value as Gradio gives it (int, float or None), for the engine's checks to judge."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


class DemoHandlers:
    """The page's event handlers, one method per button; each returns the new values of its outputs.

    Downloads go to a folder per visitor (Gradio session), made on first use and removed by `end_session`.
    """

    def __init__(self, engine: DemoEngine) -> None:
        self.engine = engine
        self._folders: dict[str, Path] = {}
        self._folders_lock = threading.Lock()

    # ------------------------------------------------------------------ per-visitor folders
    def folder(self, request: Any) -> Path:
        """This visitor's download folder (a new one per Gradio session; the folder name is the server's own)."""
        session = getattr(request, "session_hash", None)
        if not session:
            return self.engine.new_folder()
        with self._folders_lock:
            folder = self._folders.get(session)
            if folder is None or not folder.is_dir():
                folder = self._folders[session] = self.engine.new_folder()
            return folder

    def end_session(self, request: gr.Request) -> None:
        """The visitor closed or reloaded the page: remove their folder."""
        with self._folders_lock:
            folder = self._folders.pop(getattr(request, "session_hash", None) or "", None)
        if folder is not None:
            self.engine.remove_folder(folder)

    # ------------------------------------------------------------------ buttons
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
            return None, error_message(error, _files(photos))
        return gallery, f"Preview: {len(gallery)} crop(s) and mask(s)."

    def create_identity(self, photos: Any, cached: Any) -> tuple[Any, str]:
        try:
            identity, cached = self._identity(photos, cached)
        except Exception as error:  # noqa: BLE001
            return None, error_message(error, _files(photos))
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
        identity = None
        try:
            settings = GenerationSettings(
                prompt=prompt or "",
                negative_prompt=negative_prompt or "",
                add_trigger_words=bool(add_trigger_words),
                steps=_number(steps),
                seed=_number(seed),
                width=_number(width),
                height=_number(height),
                id_weight=id_weight,
                base_weight=base_weight,
                slider=None if slider in (None, "", NO_SLIDER) else slider,
                slider_weight=slider_weight,
            )
            settings.validate(self.engine.defaults)  # before the photos are read
            if _files(photos):
                progress(0.0, desc="Reading the photos")
                identity, cached = self._identity(photos, cached)
            image, used = self.engine.generate(
                identity, settings, on_step=lambda i, n: progress((i, n), desc="Denoising", unit="steps")
            )
        except Exception as error:  # noqa: BLE001
            return None, cached, error_message(error, _files(photos))
        who = _describe(identity) if identity is not None else "no photos: HyperLoRA off"
        if settings.slider:
            who += f", slider {settings.slider!r} at {settings.slider_weight:g}"
        return image, cached, f"Generated with {who}. Prompt: `{used}`"

    def save_identity(self, photos: Any, cached: Any, request: gr.Request) -> tuple[Any, Any, str]:
        try:
            identity, cached = self._identity(photos, cached)
            path = self.engine.save_identity(identity, self.folder(request))
        except Exception as error:  # noqa: BLE001
            return None, cached, error_message(error, _files(photos))
        return str(path), cached, f"Saved the {_describe(identity)}. Add the file to the photos to reuse it."

    def export_lora(self, photos: Any, cached: Any, format: str, request: gr.Request) -> tuple[Any, Any, str]:
        try:
            identity, cached = self._identity(photos, cached)
            path = self.engine.export_lora(identity, format=format, name="identity_lora", folder=self.folder(request))
        except Exception as error:  # noqa: BLE001
            return None, cached, error_message(error, _files(photos))
        return str(path), cached, f"Exported the ID LoRA ({format} format); load it like any LoRA, weight ~0.8."

    def add_slider(self, neutral: Any, edited: Any, name: str) -> tuple[Any, str]:
        try:
            name = self.engine.add_slider(_files(neutral), _files(edited), name or "")
        except Exception as error:  # noqa: BLE001
            return gr.update(), error_message(error, _files(neutral) + _files(edited))
        choices = [NO_SLIDER, *self.engine.sliders]
        return gr.update(choices=choices, value=name), f"Slider {name!r} ready: chosen under Generate; set its weight."

    def slider_choices(self) -> Any:
        return gr.update(choices=[NO_SLIDER, *self.engine.sliders], value=NO_SLIDER)

    def export_slider(self, slider: str, format: str, request: gr.Request) -> tuple[Any, str]:
        try:
            if slider in (None, "", NO_SLIDER) or slider not in self.engine.sliders:
                raise InvalidArgumentError(
                    "Build a slider first, then pick it in the Slider menu under Generate.", argument="slider"
                )
            slider_object = self.engine.sliders[slider]
            path = self.engine.export_lora(
                slider_object, format=format, name=f"slider_{slider}", folder=self.folder(request)
            )
        except Exception as error:  # noqa: BLE001
            return None, error_message(error)
        return str(path), f"Exported slider {slider!r} ({format} format); use it at weight +-0.7."


def build_demo(engine: DemoEngine) -> gr.Blocks:
    """The Gradio page for `engine` (launch it with `launch_demo`, or `.launch(css=CSS, ...)`)."""
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
                photo_status = gr.Markdown("", elem_id="photo-status", elem_classes="status")
                preview = gr.Gallery(label="What the encoders see", columns=3, height=240, elem_id="preview")
                with gr.Accordion("Identity and LoRA files", open=False):
                    lora_format = gr.Radio(list(LORA_FORMATS), value="kohya", label="LoRA format")
                    with gr.Row():
                        save_button = gr.Button("Save identity", elem_id="save-identity-button")
                        lora_button = gr.Button("Export LoRA", elem_id="export-lora-button")
                    files_status = gr.Markdown("", elem_id="files-status", elem_classes="status")
                    identity_file = gr.File(label="Identity file", interactive=False, elem_id="identity-file")
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
                    slider_name = gr.Textbox(value=DEFAULT_SLIDER_NAME, label="Slider name", elem_id="slider-name")
                    with gr.Row():
                        slider_button = gr.Button("Build slider", elem_id="slider-button")
                        slider_export = gr.Button("Export the chosen slider", elem_id="slider-export-button")
                    slider_status = gr.Markdown("", elem_id="slider-status", elem_classes="status")
                    slider_file = gr.File(label="Slider LoRA file", interactive=False, elem_id="slider-file")
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
                    # no minimum/maximum: Gradio would refuse in a corner pop-up; the engine says it under Generate
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                with gr.Row():
                    low, high = defaults.min_size, defaults.max_size
                    width = gr.Slider(low, high, defaults.size, step=SIZE_STEP, label="Width")
                    height = gr.Slider(low, high, defaults.size, step=SIZE_STEP, label="Height")
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                status = gr.Markdown("", elem_id="status", elem_classes="status")
                result = gr.Image(label="Result", type="pil", format="png", interactive=False, elem_id="result")

        photos.change(handlers.photos_changed, [photos], [photo_status], show_progress="hidden")
        _on(preview_button, handlers.preview, [photos], [preview, photo_status], photo_status, preview)
        _on(identity_button, handlers.create_identity, [photos, identity], [identity, photo_status], photo_status)
        generation_inputs = [photos, identity, prompt, trigger, negative, id_weight, base_weight, slider]
        generation_inputs += [slider_weight, steps, seed, width, height]
        _on(generate_button, handlers.generate, generation_inputs, [result, identity, status], status, result)
        outputs = [identity_file, identity, files_status]
        _on(save_button, handlers.save_identity, [photos, identity], outputs, files_status, identity_file)
        outputs = [lora_file, identity, files_status]
        _on(lora_button, handlers.export_lora, [photos, identity, lora_format], outputs, files_status, lora_file)
        inputs = [neutral, edited, slider_name]
        _on(slider_button, handlers.add_slider, inputs, [slider, slider_status], slider_status)
        outputs = [slider_file, slider_status]
        _on(slider_export, handlers.export_slider, [slider, lora_format], outputs, slider_status, slider_file)
        demo.load(handlers.slider_choices, [], [slider])  # sliders built by other visitors
        demo.unload(handlers.end_session)  # the visitor's downloads folder goes with them
    return demo


def _working() -> str:
    return WORKING


def _on(
    button: gr.Button,
    handler: Callable,
    inputs: list,
    outputs: list,
    status: gr.Markdown,
    progress_on: Any = None,
) -> None:
    """Run `handler` on a click: the button's status line says "Working…" at once (replacing the last message),
    and the progress bar, if any, shows on `progress_on` rather than over the status line."""
    event = button.click(_working, None, [status], queue=False, show_progress="hidden")
    if progress_on is None:
        event.then(handler, inputs=inputs, outputs=outputs, show_progress="hidden")
    else:
        event.then(handler, inputs=inputs, outputs=outputs, show_progress_on=[progress_on])


def _check_served_folder(engine: DemoEngine) -> None:
    """Gradio serves files made inside the temp folder or the current folder only (nothing else is exposed)."""
    roots = [Path(tempfile.gettempdir()).resolve(), Path.cwd().resolve()]
    if not any(engine.workdir.is_relative_to(root) for root in roots):
        raise InvalidArgumentError(
            f"The demo's work folder {engine.workdir} must be inside the temp folder or the current folder for the "
            "page to offer its downloads: build the engine with workdir=None (the default) or a folder there.",
            argument="workdir",
        )


def _stop_on_sigterm() -> None:
    """SIGTERM (`kill`, service managers) stops the server like Ctrl+C, so exit handlers remove the work folder."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:

        def interrupt(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, interrupt)


def launch_demo(engine: DemoEngine, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> gr.Blocks:
    """Serve the page for `engine` on `host:port` (blocks until interrupted unless `block=False`)."""
    port = check_port(port)
    _check_served_folder(engine)
    demo = build_demo(engine)
    demo.queue(default_concurrency_limit=4)
    _stop_on_sigterm()
    demo.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        theme=THEME,
        css=CSS,
        footer_links=[],
        quiet=True,
    )
    return demo
