"""Loads ArceeZigmaTransformer from the arcee-diffusers package; no other code here runs."""

from arcee_diffusers import ArceeZigmaTransformer  # noqa: F401
