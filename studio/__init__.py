"""Adapter studio: train, mix and export Stable Diffusion and language-model adapters (studio.adapters.registry lists the methods).

The package is layered (see tests/test_layering.py): ``studio.adapters`` is pure torch and
imports nothing of ours except ``studio.errors``; formats, models, pipeline, the CLI and the
UI build on it in that order.
"""

__version__ = "0.1.0"
