"""Incremental detokenization and stop strings."""

# How many prompt tokens to decode ahead of the output, so that word-initial spaces and
# multi-token characters come out as they would in the full text.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text, one delta at a time. Holds back the last
    ``len(longest stop) - 1`` characters of streamed text, since they may start a stop string."""

    def __init__(
        self,
        tokenizer,
        prompt_token_ids: list[int],
        stop: list[str],
        include_stop: bool,
        skip_special_tokens: bool,
    ) -> None:
        self.tokenizer = tokenizer
        context = prompt_token_ids[-_CONTEXT_TOKENS:]
        self.ids = list(context)
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.stop = stop
        self.include_stop = include_stop
        self.skip_special = skip_special_tokens
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.sent = 0  # characters already streamed

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add_tokens(self, token_ids: list[int]) -> str | None:
        """Append tokens; returns the stop string if one now appears in the text."""
        if self.tokenizer is None:
            return None
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None  # an incomplete character: wait for more tokens
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        before = len(self.text)
        self.text += delta
        return self._find_stop(before)

    def _find_stop(self, new_from: int) -> str | None:
        for stop in self.stop:
            start = max(0, new_from - len(stop) + 1)
            at = self.text.find(stop, start)
            if at >= 0:
                self.text = self.text[: at + len(stop)] if self.include_stop else self.text[:at]
                return stop
        return None

    def take_delta(self, finished: bool) -> str:
        end = len(self.text) if finished else max(self.sent, len(self.text) - self.holdback)
        delta = self.text[self.sent : end]
        self.sent = end
        return delta
