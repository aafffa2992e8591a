"""What the demo page computes, without the page: sampling with any solver, the same samples with the state
chain cut, and influence maps of one token with the chain and without.

Every request builds its own pipeline around the shared weights with a fresh scheduler (schedulers keep
per-call state), and the chain is cut in a twin module that shares every weight tensor, so requests can
run side by side. Bad input raises ``ValueError`` with one line naming the input and its bounds.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..evaluation import spatial
from ..models import ArceeZigmaTransformer
from ..models.variants import display_name
from ..pipelines import ArceeZigmaPipeline
from ..schedulers import FlowMatchGVPScheduler
from ..schedulers.flow_paths import get_flow_path
from ..schedulers.scheduling_gvp_flow import SOLVERS
from . import maps

MAX_IMAGES = 16
MAX_STEPS = 200
MAX_SEED = 2**32 - 1
MAX_GUIDANCE = 20.0
DEFAULT_STEPS = 16
ALL_CLASSES = "all classes"
UNCONDITIONAL = "unconditional"
INFLUENCE_NOISE_SEED = 0  # the noise mixed into the image at time t, fixed so a map is reproducible


@dataclass
class Samples:
    grid: Image.Image
    images: np.ndarray  # (B, H, W, C) in [0, 1]
    model_calls: int
    seconds: float


def whole_number(value: object, name: str, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]``; a float with no fractional part passes (page widgets send
    floats)."""
    valid = isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer()
    if not valid or not low <= value <= high:
        raise ValueError(f"{name} must be a whole number in [{low}, {high}], got {value!r}")
    return int(value)


def real_number(value: object, name: str, low: float, high: float) -> float:
    valid = isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)
    if not valid or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def one_of(value: object, name: str, choices: list[str] | tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def chain_cut_twin(model: ArceeZigmaTransformer) -> ArceeZigmaTransformer:
    """The same model with its state chain cut at test time: a second module with ``state_chain=False``
    sharing every weight tensor of ``model`` (no copy), so both can run at once."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # parameters on "meta": nothing allocated, nothing drawn
        twin = ArceeZigmaTransformer.from_config({**model.config, "state_chain": False})
    twin.load_state_dict(model.state_dict(), assign=True)
    return twin.to(model.device).eval()  # the scan-order buffers are built on the CPU


class DemoModel:
    """A loaded [`ArceeZigmaPipeline`] and what the page does with it."""

    def __init__(self, pipe: ArceeZigmaPipeline, source: str = ""):
        self.pipe = pipe
        self.source = source
        self.model = pipe.transformer.eval()
        self.config = self.model.config
        self.has_chain = bool(self.config.state_chain)
        self.chain_cut = chain_cut_twin(self.model) if self.has_chain else None
        self.grid = self.config.sample_size // self.config.patch_size
        self.path = maps.first_block_path(self.config)
        self.classes = [str(k) for k in range(self.config.num_classes or 0)]
        try:
            self.name = display_name(self.config)  # the paper's name: "Arcee-1", "Zigma-4", ...
        except ValueError:  # a scan layout no variant has
            self.name = f"ArceeZigmaTransformer (state chain {'on' if self.has_chain else 'off'})"

    @property
    def conditional(self) -> bool:
        return bool(self.classes)

    def class_choices(self, with_all: bool) -> list[str]:
        """Generate and the chain tab offer "all classes" (image i gets class i mod num_classes)."""
        if not self.conditional:
            return [UNCONDITIONAL]
        return ([ALL_CLASSES] if with_all else []) + self.classes

    def labels(self, choice: str, count: int, with_all: bool = True) -> list[int] | None:
        one_of(choice, "class", self.class_choices(with_all))
        if not self.conditional:
            return None
        if choice == ALL_CLASSES:
            return [k % len(self.classes) for k in range(count)]
        return [int(choice)] * count

    def sample(
        self,
        class_choice: str,
        guidance: float,
        steps: float,
        solver: str,
        seed: float,
        count: float,
        chain: bool = True,
    ) -> Samples:
        """``count`` samples (image ``i`` from seed ``seed + i``, so a sample does not depend on ``count``),
        with the state chain as configured or (``chain=False``) cut."""
        count = whole_number(count, "number of images", 1, MAX_IMAGES)
        steps = whole_number(steps, "steps", 1, MAX_STEPS)
        seed = whole_number(seed, "seed", 0, MAX_SEED - MAX_IMAGES)
        solver = one_of(solver, "solver", SOLVERS)
        labels = self.labels(class_choice, count)
        high = MAX_GUIDANCE if self.conditional else 1.0  # guidance needs labels
        guidance = real_number(guidance, "guidance", 1.0, high)
        if not chain and not self.has_chain:
            raise ValueError("this model has no state chain to cut (state_chain=False)")
        transformer = self.model if chain else self.chain_cut
        flow_path = self.pipe.config.flow_path
        scheduler = FlowMatchGVPScheduler(path=flow_path, solver=solver)
        pipe = ArceeZigmaPipeline(transformer, scheduler, vae=self.pipe.vae, flow_path=flow_path)
        pipe.set_progress_bar_config(disable=True)
        generators = [torch.Generator().manual_seed(seed + k) for k in range(count)]
        start = time.perf_counter()
        output = pipe(
            batch_size=count,
            class_labels=labels,
            guidance_scale=guidance,
            num_inference_steps=steps,
            generator=generators,
            output_type="np",
        )
        seconds = time.perf_counter() - start
        return Samples(maps.sample_grid(output.images), output.images, output.nfe, seconds)

    def encode(self, image: Image.Image) -> torch.Tensor:
        """A picture as the model's input ``(1, C, S, S)``: pixels in [-1, 1], or the VAE's scaled latents."""
        vae = self.pipe.vae
        side = self.config.sample_size * self.pipe.vae_scale_factor
        x = maps.to_model_input(image, 3 if vae is not None else self.config.in_channels, side)
        x = x.to(self.model.device)
        if vae is None:
            return x
        with torch.no_grad():
            latents = vae.encode(x.to(vae.dtype)).latent_dist.mode()
        if getattr(vae.config, "shift_factor", None) is not None:
            latents = latents - vae.config.shift_factor
        return latents * vae.config.scaling_factor

    def influence(
        self, image: Image.Image | None, row: float, col: float, class_choice: str, t: float
    ) -> dict:
        """Influence maps of output token ``(row, col)`` over ``image`` noised to time ``t`` (the library's
        ``evaluation.spatial.influence_map``), with the chain and, for a chained model, cut; as the JSON-able
        record the page shows."""
        if image is None:
            raise ValueError("image: sample or upload an image first")
        row = whole_number(row, "row", 0, self.grid - 1)
        col = whole_number(col, "column", 0, self.grid - 1)
        t = real_number(t, "t", 0.0, 1.0)
        labels = self.labels(class_choice, 1, with_all=False)
        device = self.model.device
        x1 = self.encode(image).float()
        noise = torch.randn(x1.shape, generator=torch.Generator().manual_seed(INFLUENCE_NOISE_SEED))
        times = torch.full((1,), t, device=device)
        x_t = get_flow_path(self.pipe.config.flow_path).interpolate(x1, noise.to(device), times)
        class_labels = None if labels is None else torch.tensor(labels, device=device)
        token = row * self.grid + col
        record = {
            "token": {
                "row": row,
                "col": col,
                "index": token,
                "step": int(np.nonzero(self.path == token)[0][0]),
            },
            "t": t,
            "class": class_choice,
            "first_block_path": self.path.tolist(),
        }
        models = {"map": self.model, "map_chain_cut": self.chain_cut}
        for key, model in models.items():
            values = None if model is None else spatial.influence_map(model, x_t, times, token, class_labels)
            record[key] = None if values is None else values.tolist()
            record[f"exact_zeros_{key}"] = None if values is None else int((values == 0).sum())
        return record

    def influence_pictures(self, image: Image.Image, record: dict) -> list[Image.Image | None]:
        """The token grid over ``image``, the map and the chain-cut map (None without a chain)."""
        token = record["token"]["index"]
        grids = [np.array(record[key]) for key in ("map", "map_chain_cut") if record[key] is not None]
        color_range = maps.log_color_range(*grids)
        chained, *cut = [maps.heat_map_picture(values, color_range, self.path, token) for values in grids]
        return [maps.token_grid_picture(image, self.grid, self.path, token), chained, cut[0] if cut else None]

    def card(self) -> str:
        """The model's card in Markdown: name, parameters, scan, chain, token grid, sampler and config."""
        config = self.config
        scan = (
            f"zigzag, {config.num_scan_orders} path(s); block i scans path i mod {config.num_scan_orders}"
            if config.scan_pattern == "zigzag"
            else "bidirectional (Vision Mamba: row-major, forward and backward in every block)"
        )
        space = "pixels" if self.pipe.vae is None else f"VAE latents ({config.in_channels} channels)"
        rows = [
            ("pipeline", f"`{self.source}`" if self.source else "(in memory)"),
            ("model", self.name),
            ("parameters", f"{sum(p.numel() for p in self.model.parameters()):,}"),
            ("scan", scan),
            ("state chain", "on (Arcee)" if self.has_chain else "off (ZigMa / Vim baseline)"),
            (
                "classes",
                f"{len(self.classes)} (+ null label for guidance)" if self.classes else "unconditional",
            ),
            (
                "tokens",
                f"{self.grid} × {self.grid} (patch {config.patch_size} on {config.sample_size}², {space})",
            ),
            ("flow path", self.pipe.config.flow_path),
            ("sampler on this page", "FlowMatchGVPScheduler: Euler, Heun or dopri5 (true model-call counts)"),
        ]
        table = "\n".join(f"| {key} | {value} |" for key, value in rows)
        settings = {key: value for key, value in config.items() if not key.startswith("_")}
        return (
            f"### {self.name}\n\n| | |\n|---|---|\n{table}\n\n"
            f"Transformer config:\n\n```json\n{json.dumps(settings, indent=1)}\n```\n"
        )
