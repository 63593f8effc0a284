"""Tiered image-rendering orchestrator: ideation on a local Lite model, bridge and polish on
high-fidelity engines, every paid call held and charged exactly once."""

__version__ = "0.1.0"
