"""Where a request's outputs go in the front end (AsyncLLM): its stream's queue and event
loop, and what makes an engine process's outputs whole again there: the request id, prompt
ids and text so far that the pipe leaves out (``serving_loop.pack``), and the text itself
for a request the front end detokenizes."""

import asyncio
import dataclasses

from vllm_runner.engine.detokenizer import IncrementalDetokenizer
from vllm_runner.engine.outputs import RequestOutput
from vllm_runner.engine.serving_loop import unpack, with_text
from vllm_runner.sampling_params import SamplingParams


@dataclasses.dataclass
class StreamRoute:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    request_id: str
    prompt_ids: list[int]
    # per completion, when the text is built here (``text_builders``)
    detokenizers: list[IncrementalDetokenizer] | None = None
    texts: dict[int, str] = dataclasses.field(default_factory=dict)  # per completion

    def whole(self, item: object) -> object:
        """An item from an engine process as its stream yields it: a packed update made
        whole again, a final output with its text."""
        if isinstance(item, tuple):
            if self.detokenizers is not None:
                item = with_text(item, self.detokenizers)
            return unpack(item, self.request_id, self.prompt_ids, self.texts)
        if isinstance(item, RequestOutput) and self.detokenizers is not None:
            for completion in item.outputs:
                completion.text = self.detokenizers[completion.index].text
        return item


def text_builders(
    tokenizer, prompt_ids: list[int], params: SamplingParams
) -> list[IncrementalDetokenizer]:
    """A detokenizer per completion of a request without stop strings, as the engine would
    make it."""
    return [
        IncrementalDetokenizer(
            tokenizer,
            prompt_ids,
            [],
            params.include_stop_str_in_output,  # (a stop token's text, then)
            params.skip_special_tokens,
        )
        for _ in range(params.n)
    ]
