"""The errors AsyncLLM raises to its callers (``vllm_runner.async_llm`` exports them)."""


class RequestError(RuntimeError):
    """The engine failed this request (other requests are unaffected). From `generate`,
    `results` holds every prompt's RequestOutput or RequestError, in prompt order."""

    def __init__(self, message: str, results: list | None = None) -> None:
        super().__init__(message)
        self.results = results


class EngineDeadError(RuntimeError):
    """The engine's loop stopped on its own (its process died, or a bug): every open and new
    request fails with this, naming why (``AsyncLLM.error``)."""


class OutputFailed(RequestError):
    """Building a request's outputs in the front end failed (the engine did not end it)."""
