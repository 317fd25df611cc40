"""Streaming gateway for AI model APIs."""

__version__ = "0.1.0"
