"""Scalebox: sandbox VMs for AI agents and CI jobs."""

__version__ = "0.2.0.dev0"
