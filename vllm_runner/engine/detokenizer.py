"""Incremental detokenization and stop strings."""

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21
    DecodeStream = None

# How many prompt tokens to decode ahead of the output, so that word-initial spaces and
# multi-token characters come out as they would in the full text.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text, one delta at a time. Holds back the last
    ``len(longest stop) - 1`` characters of streamed text, since they may start a stop string
    (none when the stop string stays in the output, as vLLM)."""

    def __init__(
        self,
        tokenizer,
        prompt_token_ids: list[int],
        stop: list[str],
        include_stop: bool,
        skip_special_tokens: bool,
        min_tokens: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self._backend = _backend(tokenizer)
        self.skip_special = skip_special_tokens
        self._stream = None
        self._prompt_tail = ""  # text of prompt tokens that end inside a character
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        if tokenizer is not None:  # (none: the engine works on ids, the text stays empty)
            self._read_prompt(prompt_token_ids)
        self.stop = stop
        self.include_stop = include_stop
        # as vLLM: nothing is held back when the stop string stays in the output
        self.holdback = max((len(s) for s in stop), default=1) - 1 if not include_stop else 0
        self.min_tokens = min_tokens
        self.num_tokens = 0  # output tokens seen
        self.stop_from = 0  # text of the first min_tokens tokens is not searched for stops
        self.text = ""
        self.sent = 0  # characters already streamed

    def _read_prompt(self, prompt_token_ids: list[int]) -> None:
        """Decode the prompt's last tokens (``_context``) ahead of the output's."""
        context = _context(self._decode, prompt_token_ids)
        may_be_inside = True  # whether the prompt may end inside a character
        if self._backend is not None and DecodeStream is not None:
            self._stream = DecodeStream(skip_special_tokens=self.skip_special)
            try:
                chunks = [self._stream.step(self._backend, token) for token in context]
            except Exception:  # (see _step_stream) the two decodes do without it
                self._stream = None
            else:
                may_be_inside = bool(chunks) and chunks[-1] is None
        # the window of the two decodes starts at the prompt tokens that end inside a
        # character, as the incremental decoder's does (it started past them: the output's
        # first text was cut where the replacement text of the unended character ended)
        start, self._prompt_tail = (
            _pending(self._decode, context) if may_be_inside else (len(context), "")
        )
        self.ids = list(context)
        self.read_offset = start

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self.skip_special)
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special, clean_up_tokenization_spaces=False
        )

    def add_tokens(self, token_ids: list[int], stop_terminated: bool = False) -> str | None:
        """Append tokens; returns the stop string if one now appears in the text.
        ``stop_terminated``: the last token is EOS or a stop_token_ids entry; as in vLLM its
        text is left out unless include_stop_str_in_output, and that token ends the request
        (the text is not searched for stop strings)."""
        if self.tokenizer is None:
            return None
        self.num_tokens += len(token_ids)
        if stop_terminated and not self.include_stop:
            token_ids = token_ids[:-1]
        before = len(self.text)
        if self._stream is not None:
            self._step_stream(token_ids)
        else:
            self.ids.extend(token_ids)
            self._decode_window()
        if len(self.text) == before or stop_terminated:
            return None  # (an incomplete character: wait for more tokens)
        if self.num_tokens <= self.min_tokens:
            self.stop_from = len(self.text)
            return None
        return self._find_stop(max(before, self.stop_from))

    def _step_stream(self, token_ids: list[int]) -> None:
        """The tokenizer's own incremental decoder: one call a token where ``_decode_window``
        makes two (256 streams on the 2-core VM, add_tokens + take_delta: 1.7 vs 2.2 us a
        token); the same deltas after a prompt of text."""
        for i, token in enumerate(token_ids):
            self.ids.append(token)
            try:
                chunk = self._stream.step(self._backend, token)
            except Exception:  # (its "invalid prefix": a longer window's text does not
                # extend the shorter one's) the two decodes go on from the last text given
                self._stream = None
                self.ids.extend(token_ids[i + 1 :])
                self._decode_window()
                return
            if chunk is not None:
                self._append(chunk)

    def _decode_window(self) -> None:
        """The text of the tokens after ``read_offset``: the decode of the window from
        ``prefix_offset`` less that of the window up to ``read_offset`` (so that spaces and
        characters across the boundary come out as in the whole text)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return
        self._append(full[len(prefix) :])

    def _append(self, chunk: str) -> None:
        """Add the text of the tokens after ``read_offset``."""
        if self._prompt_tail:
            # NOTE: a character the prompt began comes out with the output if the output
            # ends it; left unended, its replacement text stays the prompt's.
            if chunk.startswith(self._prompt_tail):
                chunk = chunk[len(self._prompt_tail) :]
            self._prompt_tail = ""
        self.text += chunk
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def _find_stop(self, new_from: int) -> str | None:
        """The stop string that occurs first in the new text (the first listed on a tie), the
        text cut there; so no other stop string remains in it."""
        found = None
        for stop in self.stop:
            at = self.text.find(stop, max(0, new_from - len(stop) + 1))
            if at >= 0 and (found is None or at < found[0]):
                found = (at, stop)
        if found is None:
            return None
        at, stop = found
        self.text = self.text[: at + len(stop)] if self.include_stop else self.text[:at]
        return stop

    def take_delta(self, finished: bool) -> str:
        if self.tokenizer is None:  # ids only: no text
            return ""
        end = len(self.text) if finished else max(self.sent, len(self.text) - self.holdback)
        delta = self.text[self.sent : end]
        self.sent = end
        return delta


def _context(decode, prompt_ids: list[int]) -> list[int]:
    """The last ``_CONTEXT_TOKENS`` prompt tokens, or up to 3 more (a character has at most 4
    UTF-8 bytes) so that they start a character: a byte-fallback decoder (Llama 2, Mistral)
    reads a run of byte pieces that is not UTF-8 as U+FFFD throughout, and the output's byte
    pieces continue the run (a CJK output after a prompt ending in "🙂日" came out as U+FFFD)."""
    start = max(0, len(prompt_ids) - _CONTEXT_TOKENS)
    for _ in range(3):
        if start == 0 or _starts_a_character(decode, prompt_ids[start : start + 4]):
            break
        start -= 1
    return prompt_ids[start:]


def _starts_a_character(decode, ids: list[int]) -> bool:
    """Whether ``ids`` start with a character's first byte: the text of some of them, from the
    first, does not start with U+FFFD (not of one length: with byte fallback, a character's
    bytes and a part of the next one's decode to U+FFFD throughout)."""
    return any(not decode(ids[:j]).startswith("\ufffd") for j in range(1, len(ids) + 1))


def _pending(decode, ids: list[int]) -> tuple[int, str]:
    """Where the last ``ids`` that end inside a character start, and their text (ending in
    U+FFFD): the decode of ``ids`` past that of the longest prefix that ends between
    characters. ``(len(ids), "")`` when ``ids`` end between characters."""
    full = decode(ids)
    if not full.endswith("\ufffd"):
        return len(ids), ""
    for k in range(len(ids) - 1, -1, -1):
        head = decode(ids[:k])
        if not head.endswith("\ufffd"):
            return k, full[len(head) :] if full.startswith(head) else ""
    return 0, full


def _backend(tokenizer):
    """The Rust tokenizer of a fast tokenizer, whose decode is transformers' without its
    clean-up of spaces: a third of the time per call (256 streams: ~1.9 -> ~0.9 ms a step on
    this 2-core VM), and its incremental decoder.

    NOTE: the text is never cleaned up (as vLLM's): the clean-up (" '" -> "'", " ," -> ",")
    crosses the boundary of the text already streamed, and the two decodes a token lost the
    characters it moved; transformers >= 5.7 skips it for BPE tokenizers too."""
    return getattr(tokenizer, "backend_tokenizer", None)
