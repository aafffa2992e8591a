"""Loads ArceeZigmaPipeline from the arcee-diffusers package; no other code here runs."""

from arcee_diffusers import ArceeZigmaPipeline  # noqa: F401
