"""HTTP-facing helpers for service.py: settings, request models, OpenAI routes, streams.

Nothing here imports bentoml; service.py is the only BentoML adapter.
"""
