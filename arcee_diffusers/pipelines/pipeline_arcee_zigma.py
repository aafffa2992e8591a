"""ArceeZigmaPipeline: unconditional and class-conditional sampling from an ArceeZigmaTransformer."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.models import AutoencoderKL
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import CommitInfo

from ..models import ArceeZigmaTransformer
from ..schedulers.flow_paths import PATHS, get_flow_path
from ..schedulers.sampling import check_scheduler, is_native_scheduler, sample_flow
from .folder_layout import to_native_layout, write_reexport_layout
from .model_card import model_card

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
PIXEL_CHANNELS = (1, 3)
HUB_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")


def download_pipeline(name: str, download_kwargs: dict[str, Any]) -> str:
    """The local folder of Hub repo ``name`` (``snapshot_download``), or one clear error when ``name`` is
    neither a folder nor a reachable repo."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    where = f"pretrained_model_name_or_path {name!r}"
    if os.path.exists(name):
        raise NotADirectoryError(f"{where} is a file; expected a pipeline folder (with model_index.json)")
    try:
        return snapshot_download(name, **download_kwargs)
    except HFValidationError:
        raise FileNotFoundError(
            f"{where}: no such folder, and not a Hub repo id ('namespace/name')"
        ) from None
    except Exception as err:  # offline, unknown repo, no access: many unrelated types
        reason = " ".join(str(err).split())[:300]
        raise FileNotFoundError(
            f"{where}: no such folder, and the Hub could not provide it ({type(err).__name__}: {reason})"
        ) from None


@dataclass
class ArceeZigmaPipelineOutput(ImagePipelineOutput):
    """Output of [`ArceeZigmaPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`): the samples, as `output_type` asks.
        nfe (`int`): the true number of transformer calls the sampler made (one call runs the conditional
            and unconditional halves of classifier-free guidance as one batch).
    """

    nfe: int = 0


class ArceeZigmaPipeline(DiffusionPipeline):
    r"""
    Image generation with an [`ArceeZigmaTransformer`] velocity model (arXiv 2511.11243).

    The transformer predicts the flow-matching velocity ``dx_t/dt`` in SiT's convention (t = 0 noise,
    t = 1 data) on the probability path `flow_path`. The sampler is any flow-matching scheduler:

    - [`FlowMatchGVPScheduler`]: native convention; its `path` must equal `flow_path`. With
      `solver="dopri5"` (or `num_inference_steps=None` with any scheduler) the ODE is solved adaptively, as in
      the paper's evaluation.
    - diffusers' `FlowMatchEulerDiscreteScheduler`, `FlowMatchHeunDiscreteScheduler`, and DPM-Solver++/UniPC
      built with `use_flow_sigmas=True, prediction_type="flow_prediction"`: unchanged; the pipeline maps
      their noise level `sigmas[i]` to the model's time and the velocity to their `noise - data` target,
      exactly for either path (see `arcee_diffusers.schedulers.sampling`).

    Pixel-space models (`in_channels` 1 or 3, no `vae`) return their output directly; any other model needs
    `vae`, whose `scaling_factor` (and `shift_factor`, if set) undoes the latent scaling before decoding.

    Args:
        transformer ([`ArceeZigmaTransformer`]): the velocity model.
        scheduler: a [`FlowMatchGVPScheduler`] or a diffusers flow-match scheduler.
        vae ([`AutoencoderKL`], *optional*): decodes latents to images.
        flow_path (`str`, *optional*): `"gvp"` or `"linear"`, the path the transformer was trained on.
            Defaults to the path of a [`FlowMatchGVPScheduler`], else `"linear"`. Saved in `model_index.json`.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer: ArceeZigmaTransformer,
        scheduler,
        vae: AutoencoderKL | None = None,
        flow_path: str | None = None,
    ):
        super().__init__()
        check_scheduler(scheduler)
        if flow_path is None:
            flow_path = scheduler.flow_path.name if is_native_scheduler(scheduler) else "linear"
        if flow_path not in PATHS:
            raise ValueError(f"flow_path must be one of {sorted(PATHS)}, got {flow_path!r}")
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        self.register_to_config(flow_path=flow_path)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> ArceeZigmaPipeline:
        """Load from a local folder or a Hub repo id (downloaded with `snapshot_download`, then loaded).

        Takes diffusers' `from_pretrained` arguments (`variant="ema"`, `dtype=`/`torch_dtype=`,
        `revision`, `token`, `cache_dir`, `local_files_only`, ...).
        """
        if not os.path.isdir(pretrained_model_name_or_path):
            download_kwargs = {key: kwargs.pop(key) for key in HUB_DOWNLOAD_KWARGS if key in kwargs}
            pretrained_model_name_or_path = download_pipeline(
                str(pretrained_model_name_or_path), download_kwargs
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def load_config(cls, *args: Any, **kwargs: Any):
        """`model_index.json` in either layout; the re-export files are never executed here."""
        outputs = super().load_config(*args, **kwargs)
        to_native_layout(outputs[0] if isinstance(outputs, tuple) else outputs)
        return outputs

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        use_flashpack: bool = False,
        **kwargs: Any,
    ) -> None:
        """diffusers' `save_pretrained`, plus the re-export files that let plain diffusers load the folder
        (`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`; see `folder_layout`).

        With `push_to_hub=True` the folder is then uploaded with a model card, as [`push_to_hub`] does
        (`repo_id` defaults to the folder's name; its other arguments are passed on).
        """
        super().save_pretrained(
            save_directory,
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            use_flashpack=use_flashpack,
        )
        write_reexport_layout(save_directory)
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", Path(save_directory).name)
            self._upload(save_directory, repo_id, variant=variant, **kwargs)

    def push_to_hub(
        self, repo_id: str, *, variant: str | None = None, safe_serialization: bool = True, **kwargs: Any
    ) -> CommitInfo:
        """Upload as a Hub repo with a generated model card; returns the `CommitInfo`.

        Saves the pipeline (`variant` names the weight files, e.g. `"ema"`; safetensors only) with its
        re-export files, writes a README.md from [`model_card`] and uploads the folder in one commit; the
        repo loads with this class and with `DiffusionPipeline.from_pretrained(repo_id,
        trust_remote_code=True)`. `kwargs`: `private`, `token` (as in `huggingface_hub.create_repo`),
        `commit_message`, `create_pr`, and the card's `training_info`, `eval_results`, `license`,
        `datasets`, `tags`.
        """
        if not safe_serialization:
            raise ValueError(
                "safe_serialization must be True: arcee-diffusers saves and loads safetensors only"
            )
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, variant=variant)
            return self._upload(folder, repo_id, variant=variant, **kwargs)

    def _upload(
        self,
        folder: str | os.PathLike,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload ArceeZigmaPipeline",
        create_pr: bool = False,
        variant: str | None = None,
        **card_options: Any,
    ) -> CommitInfo:
        """Write the model card into the saved `folder`, create the repo if needed and upload the folder."""
        from huggingface_hub import HfApi

        if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
            raise ValueError(f"repo_id must be 'namespace/name' or 'name', got {repo_id!r}")
        api = HfApi(token=token)
        if "/" not in repo_id:
            repo_id = f"{api.whoami()['name']}/{repo_id}"
        # everything is written before the repo is created, so a failure leaves no empty repo behind
        model_card(self, repo_id, variant=variant, **card_options).save(os.path.join(folder, "README.md"))
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, create_pr=create_pr
        )

    def check_inputs(
        self,
        batch_size: int,
        class_labels: Any,
        guidance_scale: float,
        num_inference_steps: int | None,
        latents: torch.Tensor | None,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> None:
        config = self.transformer.config
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if num_inference_steps is not None and (
            not isinstance(num_inference_steps, int) or num_inference_steps < 1
        ):
            raise ValueError(
                f"num_inference_steps must be a positive int or None, got {num_inference_steps!r}"
            )
        if not config.num_classes:
            if class_labels is not None:
                raise ValueError(
                    f"class_labels must be None: the transformer is unconditional (num_classes="
                    f"{config.num_classes})"
                )
            if guidance_scale > 1:
                raise ValueError("guidance_scale > 1 needs a class-conditional transformer (num_classes set)")
        elif class_labels is None:
            raise ValueError(
                "class_labels is required: the transformer is class-conditional with "
                f"{config.num_classes} classes"
            )
        if self.vae is None and config.in_channels not in PIXEL_CHANNELS and output_type != "latent":
            raise ValueError(
                f"the transformer works on {config.in_channels}-channel latents: pass a `vae` to decode "
                "them, or output_type='latent' (without a vae, only 1- or 3-channel pixel-space models "
                "return images)"
            )
        if self.vae is not None and self.vae.config.latent_channels != config.in_channels:
            raise ValueError(
                f"vae.config.latent_channels ({self.vae.config.latent_channels}) differs from the "
                f"transformer's in_channels ({config.in_channels})"
            )
        shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs must be a subset of {self._callback_tensor_inputs}, "
                f"got {sorted(unknown)}"
            )

    def prepare_class_labels(
        self, class_labels: Any, batch_size: int, device: torch.device
    ) -> torch.Tensor | None:
        """Labels as a `(batch,)` long tensor checked against `num_classes`; None if unconditional."""
        if class_labels is None:
            return None
        labels = torch.as_tensor([class_labels] if isinstance(class_labels, int) else class_labels)
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be an int or a 1-D sequence of ints, got {class_labels!r}")
        num_classes = self.transformer.config.num_classes
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"class_labels must lie in [0, {num_classes}), got {labels.tolist()}")
        if batch_size not in (1, len(labels)):
            raise ValueError(f"batch_size ({batch_size}) must be 1 or len(class_labels) ({len(labels)})")
        return labels.to(device)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images in [-1, 1]; pixel-space samples pass through."""
        if self.vae is None:
            return latents
        latents = latents / self.vae.config.scaling_factor
        if getattr(self.vae.config, "shift_factor", None) is not None:
            latents = latents + self.vae.config.shift_factor
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: int | list[int] | torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        num_inference_steps: int | None = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, Any, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
    ) -> ArceeZigmaPipelineOutput | tuple:
        r"""
        Generate images.

        Args:
            batch_size (`int`, defaults to 1): number of images of an unconditional model; with `class_labels`
                it must be 1 or `len(class_labels)`.
            class_labels (`int`, `list[int]` or `torch.Tensor`, *optional*): one label in `[0, num_classes)`
                per image; required by a class-conditional transformer, refused by an unconditional one.
            guidance_scale (`float`, defaults to 1.0): classifier-free guidance on the velocity,
                `v_uncond + guidance_scale * (v_cond - v_uncond)` over all channels, the null label being
                `num_classes`. Off at 1 or less; above 1 needs a class-conditional transformer.
            num_inference_steps (`int`, *optional*, defaults to 50): steps of a fixed-step scheduler (Heun
                makes two calls per step). `None` solves adaptively with dopri5 (the scheduler's `atol` and
                `rtol` if it is a `FlowMatchGVPScheduler`, else 1e-6 and 1e-3); an adaptive scheduler ignores
                it.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): a list gives one generator
                per image, so a batch reproduces the same images made one at a time.
            latents (`torch.Tensor`, *optional*): initial noise,
                `(batch, in_channels, sample_size, sample_size)`.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (`(B, H, W, C)` in [0, 1]), `"pt"`
                (`(B, C, H, W)` in [0, 1]) or `"latent"` (the sampled latents, undecoded).
            return_dict (`bool`, defaults to `True`): return an [`ArceeZigmaPipelineOutput`] rather than the
                tuple `(images, nfe)`.
            callback_on_step_end (`Callable`, *optional*): `callback(pipe, i, t, callback_kwargs)` after every
                scheduler step, returning a dict that may replace `latents`. Not available with dopri5.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`): tensors passed in
                `callback_kwargs`.

        Returns:
            [`ArceeZigmaPipelineOutput`] with `images` and `nfe` (true transformer calls), or `(images, nfe)`.
        """
        self.check_inputs(
            batch_size,
            class_labels,
            guidance_scale,
            num_inference_steps,
            latents,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        device = self._execution_device
        config = self.transformer.config
        labels = self.prepare_class_labels(class_labels, batch_size, device)
        if labels is not None:
            batch_size = len(labels)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"generator: got a list of {len(generator)} generators for a batch of {batch_size} images"
            )
        do_guidance = guidance_scale > 1
        if do_guidance:
            null_labels = torch.full_like(labels, config.num_classes)
            labels = torch.cat([labels, null_labels])

        dtype = self.transformer.dtype
        shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = latents.to(device=device, dtype=dtype) * getattr(self.scheduler, "init_noise_sigma", 1.0)

        def velocity_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            model_input = torch.cat([x_t, x_t]) if do_guidance else x_t
            timestep = t.to(device=device, dtype=dtype).expand(model_input.shape[0])
            velocity = self.transformer(model_input.to(dtype), timestep, class_labels=labels).sample
            if do_guidance:
                conditional, unconditional = velocity.chunk(2)
                velocity = unconditional + guidance_scale * (conditional - unconditional)
            return velocity

        def step_callback(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
            callback_kwargs = {"latents": latents}
            callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
            return callback_outputs.pop("latents", latents)

        latents, nfe = sample_flow(
            velocity_fn,
            latents,
            self.scheduler,
            get_flow_path(self.config.flow_path),
            num_inference_steps,
            step_callback=step_callback if callback_on_step_end is not None else None,
            progress_bar=self.progress_bar,
        )

        if output_type == "latent":
            images = latents
        else:
            images = self.image_processor.postprocess(self.decode_latents(latents.to(dtype)), output_type)
        self.maybe_free_model_hooks()

        if not return_dict:
            return (images, nfe)
        return ArceeZigmaPipelineOutput(images=images, nfe=nfe)
