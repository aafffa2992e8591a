"""The Gradio page over a [`DemoModel`]: Generate, Influence, Chain on / cut and About.

The two public APIs are ``/generate`` and ``/influence`` (plus ``/chain`` for the chain tab); everything
else the page wires (sampling an image to inspect, clicking a token) is private. Bad input shows one line in
the page (``gr.Error``), never a traceback. No analytics: the environment switch is set before gradio is
imported, and the page's assets come from the gradio wheel, so a page on 127.0.0.1 asks nothing outside.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from ..pipelines import ArceeZigmaPipeline  # noqa: E402
from ..schedulers.scheduling_gvp_flow import SOLVERS  # noqa: E402
from . import maps  # noqa: E402
from .model import DEFAULT_STEPS, MAX_GUIDANCE, MAX_IMAGES, MAX_SEED, MAX_STEPS, DemoModel  # noqa: E402

QUEUE_SIZE = 64  # requests waiting beyond this are refused with a "queue full" message
# every launch of the page: no server-side rendering (it wants a newer Node than a CPU box has), and
# uploads small enough that a picture cannot exhaust memory (PIL's decompression-bomb check does the rest)
LAUNCH_OPTIONS = {"ssr_mode": False, "max_file_size": "10mb"}
MAX_PICTURE_SIDE = 4096  # an uploaded picture is decoded only up to this many pixels squared
INTRO = """# {name}: the state chain at work

Sample the model, then click a token in **Influence** to see which input patches its output depends on.
Arcee hands each Mamba block's final scan state to the next block (the *state chain*, arXiv
[2511.11243](https://arxiv.org/abs/2511.11243)); without it a one-path ZigMa token sees only the patches
scanned before it."""
ZERO_NOTE = (
    "Gradient norm of the outlined output token with respect to each input patch (log colour scale shared "
    "by both maps; **grey: exactly 0**). Cyan: the first block's scan path from the dot, thick up to the "
    "token."
)


def shown_in_page(function: Callable) -> Callable:
    """Bad input (``ValueError``) as one line in the page rather than a traceback.

    The handlers take the raw values (events with ``preprocess=False``), so the model's checks, which name
    the input, run rather than gradio's anonymous "Value 0 is less than minimum value 1".
    """

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from None

    return wrapper


def read_picture(path: str) -> Image.Image:
    """An uploaded file as an RGB picture; its size is read from the header before any pixel is decoded."""
    try:
        with Image.open(path) as picture:
            if picture.width * picture.height > MAX_PICTURE_SIDE**2:
                side = MAX_PICTURE_SIDE
                raise ValueError(
                    f"image: at most {side} x {side} pixels, got {picture.width} x {picture.height}"
                )
            return picture.convert("RGB")
    except (OSError, Image.DecompressionBombError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"image: not a picture PIL can read ({err})") from None


def build_demo(demo_model: DemoModel, concurrency: int = 1) -> gr.Blocks:
    """The page, with a request queue running ``concurrency`` jobs at a time (one by default: a CPU
    serves one sampling job best)."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be a positive int, got {concurrency!r}")
    m = demo_model

    @shown_in_page
    def generate(class_choice, guidance, steps, solver, seed, count):
        samples = m.sample(class_choice, guidance, steps, solver, seed, count)
        calls = f"{samples.model_calls} model calls" + (
            " (dopri5 ignores steps)" if solver == "dopri5" else ""
        )
        return samples.grid, f"{len(samples.images)} image(s) in {samples.seconds:.2f} s, {calls}."

    @shown_in_page
    def chain_on_and_cut(class_choice, steps, seed, count):
        chained = m.sample(class_choice, 1.0, steps, "euler", seed, count, chain=True)
        cut = m.sample(class_choice, 1.0, steps, "euler", seed, count, chain=False)
        info = (
            f"Same seeds, same weights, Euler, {chained.model_calls} model calls each: "
            f"{chained.seconds:.2f} s with the chain, {cut.seconds:.2f} s cut."
        )
        return chained.grid, cut.grid, info

    @shown_in_page
    def sample_to_inspect(class_choice, seed):
        return maps.sample_grid(m.sample(class_choice, 1.0, DEFAULT_STEPS, "euler", seed, 1).images, gutter=0)

    @shown_in_page
    def influence(image_file, row, col, class_choice, t):
        image = None if image_file is None else read_picture(image_file["path"])
        record = m.influence(image, row, col, class_choice, t)
        grid_picture, chained, cut = m.influence_pictures(image, record)
        zeros = f"exact zeros: {record['exact_zeros_map']} of {m.grid**2} patches"
        if record["map_chain_cut"] is not None:
            zeros += f" with the chain, {record['exact_zeros_map_chain_cut']} with it cut"
        token = record["token"]
        where = f"Token (row {token['row']}, column {token['col']})"
        info = f"{where}, step {token['step']} of the first block's path; {zeros}."
        return grid_picture, chained, cut, json.dumps(record), info

    def token_grid(image):
        return None if image is None else maps.token_grid_picture(image, m.grid, m.path)

    def clicked_token(event: gr.SelectData):
        return maps.click_to_token(*event.index, m.grid)

    with gr.Blocks(title=f"arcee-diffusers: {m.name}", analytics_enabled=False) as demo:
        gr.Markdown(INTRO.format(name=m.name))
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                with gr.Column():
                    gen_class = gr.Dropdown(
                        m.class_choices(True), value=m.class_choices(True)[0], label="class"
                    )
                    guidance = gr.Slider(
                        1.0, MAX_GUIDANCE, value=1.0, step=0.5, label="guidance",
                        interactive=m.conditional, info=None if m.conditional else "unconditional model: 1",
                    )  # fmt: skip
                    steps = gr.Slider(1, MAX_STEPS, value=DEFAULT_STEPS, step=1, label="steps (Euler, Heun)")
                    solver = gr.Radio(list(SOLVERS), value="euler", label="solver (Heun: 2 calls a step)")
                    seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="seed")
                    count = gr.Slider(1, MAX_IMAGES, value=8, step=1, label="number of images")
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                with gr.Column():
                    samples = gr.Image(label="samples", format="png", elem_id="samples", interactive=False)
                    generate_info = gr.Markdown(elem_id="generate-info")
            generate_button.click(
                generate, [gen_class, guidance, steps, solver, seed, count], [samples, generate_info],
                api_name="generate", preprocess=False,
            )  # fmt: skip

        with gr.Tab("Influence", id="influence"):
            gr.Markdown("Sample (or upload) an image, then **click a token** on the grid. " + ZERO_NOTE)
            with gr.Row():
                with gr.Column():
                    inf_class = gr.Dropdown(
                        m.class_choices(False), value=m.class_choices(False)[0], label="class"
                    )
                    inf_seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="seed")
                    sample_button = gr.Button("Sample an image", elem_id="sample-button")
                    image = gr.Image(type="pil", label="image", format="png", elem_id="influence-image")
                with gr.Column():
                    grid_picture = gr.Image(
                        label="token grid: click a token",
                        format="png",
                        interactive=False,
                        elem_id="token-grid",
                    )
                    with gr.Row():
                        row = gr.Number(0, precision=0, minimum=0, maximum=m.grid - 1, label="row")
                        col = gr.Number(0, precision=0, minimum=0, maximum=m.grid - 1, label="column")
                        t = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="t (0 noise, 1 data)")
                    influence_button = gr.Button(
                        "Show influence", variant="primary", elem_id="influence-button"
                    )
            with gr.Row():
                chained_map = gr.Image(
                    label="influence, chain on" if m.has_chain else "influence (no state chain)",
                    format="png", interactive=False, elem_id="influence-map",
                )  # fmt: skip
                cut_map = gr.Image(
                    label="influence, chain cut at test time", format="png", interactive=False,
                    visible=m.has_chain, elem_id="influence-map-cut",
                )  # fmt: skip
            influence_info = gr.Markdown(elem_id="influence-info")
            values = gr.Textbox(
                label="the maps' values (JSON: map[row][col], row-major token indices)", lines=4,
                max_lines=12, interactive=False, buttons=["copy"], elem_id="influence-values",
            )  # fmt: skip
            sample_button.click(sample_to_inspect, [inf_class, inf_seed], image, api_visibility="private")
            image.change(token_grid, image, grid_picture, api_visibility="private")
            inputs = [image, row, col, inf_class, t]
            outputs = [grid_picture, chained_map, cut_map, values, influence_info]
            influence_button.click(influence, inputs, outputs, api_name="influence", preprocess=False)
            grid_picture.select(clicked_token, None, [row, col], api_visibility="private").success(
                influence, inputs, outputs, api_visibility="private", preprocess=False
            )

        with gr.Tab("Chain on / cut", id="chain"):
            if m.has_chain:
                gr.Markdown("The same seeds sampled with the state chain and with it cut at test time.")
            else:
                gr.Markdown("This model has no state chain (`state_chain=False`): there is nothing to cut.")
            with gr.Row():
                chain_class = gr.Dropdown(
                    m.class_choices(True), value=m.class_choices(True)[0], label="class"
                )
                chain_steps = gr.Slider(1, MAX_STEPS, value=DEFAULT_STEPS, step=1, label="Euler steps")
                chain_seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="seed")
                chain_count = gr.Slider(1, MAX_IMAGES, value=8, step=1, label="number of images")
            chain_button = gr.Button(
                "Sample both", variant="primary", interactive=m.has_chain, elem_id="chain-button"
            )
            with gr.Row():
                chain_on = gr.Image(label="chain on", format="png", interactive=False, elem_id="chain-on")
                chain_cut = gr.Image(label="chain cut", format="png", interactive=False)
            chain_info = gr.Markdown(elem_id="chain-info")
            chain_button.click(
                chain_on_and_cut, [chain_class, chain_steps, chain_seed, chain_count],
                [chain_on, chain_cut, chain_info], api_name="chain", preprocess=False,
            )  # fmt: skip

        with gr.Tab("About", id="about"):
            gr.Markdown(m.card())

    demo.queue(default_concurrency_limit=concurrency, max_size=QUEUE_SIZE)
    return demo


def load_pipeline(source: str, device: str | None = None) -> ArceeZigmaPipeline:
    """Load ``source`` (a folder or a Hub id; safetensors only) onto ``device`` (default: CUDA if present),
    or raise one readable error."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        pipe = ArceeZigmaPipeline.from_pretrained(source, use_safetensors=True)
    except (FileNotFoundError, NotADirectoryError):
        raise
    except Exception as err:  # a broken folder fails in many ways: say which folder, and why, in one line
        reason = " ".join(str(err).split())[:300]
        raise ValueError(f"PIPELINE {source!r} did not load ({type(err).__name__}: {reason})") from None
    return pipe.to(device)
