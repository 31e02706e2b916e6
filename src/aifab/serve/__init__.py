"""Serving: load a registered model, generate tokens, and speak the OpenAI completions API over HTTP."""
