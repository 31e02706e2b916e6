"""The HTTP face of the engine: OpenAI-compatible completions and chat completions, models, health and
Prometheus metrics. `schemas` holds the request bodies, `responses` the bodies and stream chunks answered
with, `routes` the app itself (`create_app(engine)`)."""

from aifab.serve.api.routes import create_app

__all__ = ["create_app"]
