"""Fixtures for the service tests: `service_module`, `client` (the BentoML app in-process,
built once per session) and `engine` live in tests/conftest.py, shared with the reliability
suite: one app per test session, since BentoML registers its metrics once per process.
"""
