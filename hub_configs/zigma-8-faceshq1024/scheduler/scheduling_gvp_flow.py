"""Loads FlowMatchGVPScheduler from the arcee-diffusers package; no other code here runs."""

from arcee_diffusers import FlowMatchGVPScheduler  # noqa: F401
