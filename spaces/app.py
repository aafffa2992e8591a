"""The arcee-diffusers demo page as a Hugging Face Space: copy this folder into a Space repo (sdk: gradio).

The page serves the pipeline named by the Space variable ``ARCEE_PIPELINE``: a Hub repo id (e.g. one made
with ``pipe.push_to_hub``) or a folder in the Space; by default the ``pipeline`` folder beside this file.
``ARCEE_CONCURRENCY`` sizes the request queue (default 1: one sampling job at a time on a CPU Space).
"""

import os

from arcee_diffusers.demo import LAUNCH_OPTIONS, DemoModel, build_demo, load_pipeline

PIPELINE = os.environ.get("ARCEE_PIPELINE", "pipeline")
demo = build_demo(DemoModel(load_pipeline(PIPELINE), PIPELINE), int(os.environ.get("ARCEE_CONCURRENCY", "1")))

if __name__ == "__main__":
    demo.launch(**LAUNCH_OPTIONS)  # a Space sets GRADIO_SERVER_NAME=0.0.0.0 itself
