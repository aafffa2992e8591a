"""Arcee state-chained Zigzag-Mamba image generators for diffusers, timm and Accelerate."""

__version__ = "0.1.0"
