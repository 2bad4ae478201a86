"""vLLM's chat options beyond OpenAI's: ``echo`` (the reply starts with the last message's
content when it continues that message's role) and a request's own ``chat_template``.

A request's template runs in HF transformers' sandboxed Jinja environment (``apply_chat_template``
compiles every template with ``jinja2.sandbox.ImmutableSandboxedEnvironment``): it reads what
it is given but reaches no Python internals. The sandbox bounds no work, though, so as vLLM's
server (``--trust-request-chat-template``) such templates are refused unless the server
setting ``trust_request_chat_template`` is on.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from vllm_runner.serving.chat_protocol import ChatMessage

# NOTE: a template is compiled once per process and kept (transformers' cache: 128 of them)
MAX_CHAT_TEMPLATE_CHARS = 65_536
_SHOWN = 80  # characters of a refused template quoted back


def bounded_template(value: Any) -> Any:
    """A before-validator of ``chat_template``: at most MAX_CHAT_TEMPLATE_CHARS characters."""
    if isinstance(value, str) and len(value) > MAX_CHAT_TEMPLATE_CHARS:
        raise ValueError(f"at most {MAX_CHAT_TEMPLATE_CHARS} characters, got {len(value)}")
    return value


def check_trusted(chat_template: str | None, trusted: bool) -> None:
    """A request's own template only under the server setting ``trusted``."""
    if chat_template is None or trusted:
        return
    shown = repr(chat_template)
    shown = shown if len(shown) <= _SHOWN else shown[:_SHOWN] + "..."
    raise ValueError(
        "chat_template: a request's own chat template needs the server setting "
        "trust_request_chat_template (VLLM_RUNNER_TRUST_REQUEST_CHAT_TEMPLATE=true; vLLM's "
        f"--trust-request-chat-template), got {shown}"
    )


def render(engine: Any, messages: list[dict[str, Any]], options: dict[str, Any]) -> str:
    """The conversation as the prompt text (``options``: ``template_options()``'s). Whatever a
    request's own template raises while it renders is the client's to fix: a ValueError
    naming chat_template (a ZeroDivisionError is no server error); the checks of the other
    options raise ValueErrors of their own, as they are."""
    try:
        return engine.apply_chat_template(messages, **options)
    except ValueError:
        raise
    except Exception as exc:
        if options.get("chat_template") is None:
            raise
        kind = "" if type(exc) is TemplateError else f"{type(exc).__name__}: "
        raise ValueError(f"chat_template: the request's template failed: {kind}{exc}") from None


def echoed(messages: list[ChatMessage], add_generation_prompt: bool) -> str:
    """What ``echo`` starts each reply with, as vLLM's: the last message's content (its text
    parts as lines) if its role is the reply's (the assistant's with add_generation_prompt;
    without, the reply continues the last message, whatever its role), else nothing."""
    last = messages[-1]
    role = "assistant" if add_generation_prompt else last.role
    return last.as_dict()["content"] if last.role == role else ""
