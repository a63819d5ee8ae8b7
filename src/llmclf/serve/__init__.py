"""Serving a trained classifier: a FastAPI app with micro-batching and a web page (`llmclf serve`)."""

from llmclf.serve.app import ClassifyRequest, ClassifyResponse, create_app
from llmclf.serve.batching import MicroBatcher

__all__ = ["ClassifyRequest", "ClassifyResponse", "MicroBatcher", "create_app"]
