"""The web demo: `diffusers-hyperlora demo [CHECKPOINT]`.

Needs the extra: `pip install 'diffusers-hyperlora[demo]'` (from a clone: `pip install -e '.[demo]'`).

`DemoEngine` (engine.py) owns the shared pipeline and its lock and has no UI; `build_demo` / `launch_demo`
(app.py, Gradio) build and serve the page on top of it.

    from diffusers_hyperlora.demo import DemoEngine, launch_demo
    launch_demo(DemoEngine.tiny_default(), port=7860)
"""

from __future__ import annotations

from typing import Any

from .engine import DemoEngine, GenerationSettings, prompt_with_trigger_words

__all__ = ["DemoEngine", "GenerationSettings", "build_demo", "launch_demo", "prompt_with_trigger_words"]


def __getattr__(name: str) -> Any:
    if name in ("build_demo", "launch_demo"):  # Gradio is imported only when the page is built
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
