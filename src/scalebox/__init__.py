"""Scalebox: sandbox VMs for AI agents and CI jobs."""

__version__ = "0.1.0"
