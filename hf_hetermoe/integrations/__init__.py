"""Integrations with Hugging Face tooling: the Trainer callback."""

from .trainer import HeterMoECallback

__all__ = ["HeterMoECallback"]
