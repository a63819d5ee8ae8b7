"""Serving a trained classifier: a FastAPI app with micro-batching and a web page (`llmclf serve`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmclf.serve.app import ClassifyRequest, ClassifyResponse, create_app
    from llmclf.serve.batching import MicroBatcher

__all__ = ["ClassifyRequest", "ClassifyResponse", "MicroBatcher", "create_app"]


def __getattr__(name: str):
    # Imported on first use: `llmclf.serve.defaults` (read by the CLI) must not pull in FastAPI.
    if name == "MicroBatcher":
        from llmclf.serve.batching import MicroBatcher

        return MicroBatcher
    if name in __all__:
        from llmclf.serve import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
