"""The errors AsyncLLM raises to its callers (``vllm_runner.async_llm`` exports them)."""

import os
import traceback


class RequestError(RuntimeError):
    """The engine failed this request (other requests are unaffected). From `generate`,
    `results` holds every prompt's RequestOutput or RequestError, in prompt order."""

    def __init__(self, message: str, results: list | None = None) -> None:
        super().__init__(message)
        self.results = results


def raise_if_failed(results: list) -> list:
    """``results`` (a batch's outputs or exceptions, in prompt order) if none failed; else
    the first exception that is not a RequestError, or a RequestError holding every result.
    NOTE: raised once every request has ended, with all the results, so that a caller
    serving many clients in one call can fail only the failed ones."""
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, RequestError):
            raise r
    failed = [r for r in results if isinstance(r, RequestError)]
    if failed:
        raise RequestError(str(failed[0]), results)
    return results


class ContextLengthError(ValueError):
    """A request past the model's context (``max_model_len`` tokens): its prompt, or its
    prompt and max_tokens. Servers answer it as OpenAI does (code "context_length_exceeded")."""

    def __init__(self, message: str, max_model_len: int) -> None:
        super().__init__(message)
        self.max_model_len = max_model_len

    def __reduce__(self) -> tuple:
        return type(self), (str(self), self.max_model_len)


class EngineDeadError(RuntimeError):
    """The engine's loop stopped on its own (its process died, or a bug): every open and new
    request fails with this, naming why (``AsyncLLM.error``)."""


class OutputFailed(RequestError):
    """Building a request's outputs in the front end failed (the engine did not end it)."""


def failure_cause(exc: BaseException) -> str:
    """``exc`` as the front ends name it (a loop's failure, in its thread or in an engine
    process): its type, message and where it was raised."""
    cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        where = frames[-1]
        cause += f" (raised in {where.name}, {os.path.basename(where.filename)}:{where.lineno})"
    return cause
