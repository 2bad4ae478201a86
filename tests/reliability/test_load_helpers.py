"""The reliability suite's own client helpers (load_helpers.py), against canned streams."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from load_helpers import CHAT_PATH, first_token_then_close


class CountedStream(httpx.SyncByteStream):
    """A response body of `chunks` that counts how many of them the client pulled."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks, self.pulled = chunks, 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.pulled += 1
            yield chunk


@pytest.mark.parametrize(
    ("path", "chunks"),
    [
        # /generate streams bare text deltas: no newline to end a "line" until the stream ends
        ("/generate", [b"Once", b" upon", b" a", b" time", b" there"]),
        (CHAT_PATH, [b'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n',
                     b'data: {"choices": [{"delta": {"content": "Once"}}]}\n\n',
                     b'data: {"choices": [{"delta": {"content": " upon"}}]}\n\n',
                     b"data: [DONE]\n\n"]),
    ],
)  # fmt: skip
def test_a_leaving_client_leaves_at_its_first_token(path: str, chunks: list[bytes]) -> None:
    """It read the whole /generate stream (waiting for a newline), so the "disconnect" calls
    of the mixed load never left mid-stream there and each cost a full generation."""
    body = CountedStream(chunks)
    transport = httpx.MockTransport(lambda request: httpx.Response(200, stream=body))
    with httpx.Client(transport=transport, base_url="http://test") as http:
        outcome = first_token_then_close(http, path, {"prompt": "x"})
    assert outcome.status == 200 and outcome.problem is None
    first_text = 1 if path == "/generate" else 2
    assert body.pulled == first_text


def test_a_stream_that_ends_before_any_text_is_a_problem() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=b""))
    with httpx.Client(transport=transport, base_url="http://test") as http:
        outcome = first_token_then_close(http, "/generate", {"prompt": "x"})
    assert outcome.problem == "the stream ended before the client left"
