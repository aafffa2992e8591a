"""Arcee state-chained Zigzag-Mamba image generators for diffusers, timm and Accelerate."""

from . import timm_models  # noqa: F401  (registers the arcee_zigma_* timm models)
from .models import ArceeZigmaTransformer
from .pipelines import ArceeZigmaPipeline, ArceeZigmaPipelineOutput
from .schedulers import FlowMatchGVPScheduler

__all__ = ["ArceeZigmaTransformer", "ArceeZigmaPipeline", "ArceeZigmaPipelineOutput", "FlowMatchGVPScheduler"]

__version__ = "0.1.0"
