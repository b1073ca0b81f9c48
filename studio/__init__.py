"""Adapter studio: train, mix and export LoRA / PiSSA / MiLoRA / SVF adapters.

The package is layered (see tests/test_layering.py): ``studio.adapters`` is pure torch and
imports nothing of ours except ``studio.errors``; formats, models, pipeline, the CLI and the
UI build on it in that order.
"""

__version__ = "0.1.0"
