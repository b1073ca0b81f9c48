"""The Blocks app: four tabs around one ``Studio`` and one training runner.

Errors: every handler goes through :func:`user_errors`, so a ``StudioError`` reaches the browser
as its one-line message (a ``gr.Error`` toast) and anything unexpected as a one-line summary;
the traceback goes to the server log only, never to the page.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path

import gradio as gr

from studio.adapters.registry import METHODS
from studio.errors import StudioError
from studio.ui import generate_tab, tabs, train_tab
from studio.ui.service import Studio
from studio.ui.train_runner import TrainRun

METHOD_LABELS = [m.TRAITS.label for m in METHODS.values()]  # 'LoRA', 'DoRA', '(IA)³' ... for the heading

log = logging.getLogger("studio.ui")
CSS = """
#library .caption-label { position: static !important; transform: none !important; max-width: 100% !important;
  white-space: normal !important; overflow: visible !important; font-size: 0.72em; line-height: 1.25;
  background: none !important; border: none !important; padding: 2px 0 0 0 !important; text-align: left; }
#library .thumbnail-item { display: flex; flex-direction: column; height: auto !important;
  aspect-ratio: auto !important; padding: 4px; }
#library .thumbnail-item img { aspect-ratio: 1; height: 96px; object-fit: cover; }
#library .grid-wrap { height: auto !important; min-height: 0 !important; max-height: 420px; }
#output_gallery img, #grid_image img, #train_sample img { image-rendering: pixelated; }
#train_saved { min-height: 0 !important; }
footer { display: none !important; }
"""


def user_errors(fn):
    """Wrap a handler: StudioError -> its message; other exceptions -> one line (traceback logged)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except StudioError as err:
            raise gr.Error(str(err), print_exception=False) from None
        except Exception as err:  # noqa: BLE001 -- the page gets one line, the log the traceback
            log.exception("handler %s failed", fn.__name__)
            raise gr.Error(f"internal error ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                           f"details are in the server log", print_exception=False) from None
    return wrapper


def build_app(studio: Studio, datasets: dict[str, Path], runner: TrainRun | None = None,
              lm_bases: dict[str, str] | None = None) -> gr.Blocks:
    runner = runner or TrainRun(studio.library.root)
    with gr.Blocks(title="adapter studio") as demo:
        gr.Markdown(f"## adapter studio — mix {' / '.join(METHOD_LABELS)} adapters")
        with gr.Tabs():
            with gr.Tab("Generate", elem_id="tab_generate"):
                generate = generate_tab.build(studio, user_errors)
            with gr.Tab("Bake", elem_id="tab_bake"):
                tabs.bake_tab(studio, user_errors, generate)
            with gr.Tab("Train", elem_id="tab_train"):
                train_tab.build(studio, runner, datasets, user_errors, generate)
            with gr.Tab("Inspect", elem_id="tab_inspect"):
                tabs.inspect_tab(studio, user_errors, generate)
            if importlib.util.find_spec("studio.text") is not None:  # the language-model path is installed
                from studio.ui import text_tab
                from studio.ui.text_service import TextStudio

                with gr.Tab("Text", elem_id="tab_text"):
                    text_tab.build(TextStudio(studio.library, lm_bases, lock=studio.lock), user_errors)
        demo.load(user_errors(generate["refresh"]), None, generate["refresh_outputs"], api_visibility="private")
    demo.queue(default_concurrency_limit=1, max_size=64)
    demo.studio_service, demo.studio_runner = studio, runner  # for tests and shutdown
    return demo
