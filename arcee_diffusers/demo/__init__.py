"""The demo page (Gradio; ``pip install "arcee-diffusers[demo]"``): ``python -m arcee_diffusers.demo``.

``build_demo(DemoModel(load_pipeline(source), source))`` gives the ``gr.Blocks`` page; ``DemoModel`` holds
what it computes, usable without a page.
"""

from .app import LAUNCH_OPTIONS, build_demo, load_pipeline
from .model import DemoModel

__all__ = ["LAUNCH_OPTIONS", "DemoModel", "build_demo", "load_pipeline"]
