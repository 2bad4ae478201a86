"""The client of the worker profile: N concurrent /v1/completions streams for D seconds.

python drive.py N D   (a server on 127.0.0.1:3199 serving the model named in MODEL)
"""

import asyncio
import json
import sys
import time

import httpx

MODEL = "/tmp/prof_models/llama-tiny-random-seed0-vocab49152"
URL = "http://127.0.0.1:3199/v1/completions"


async def one(client: httpx.AsyncClient, stop: float, counts: list[int]) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 256}
    body |= {"ignore_eos": True, "stream": True}
    while time.monotonic() < stop:
        async with client.stream("POST", URL, json=body, timeout=120) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    counts[0] += 1
                    json.loads(line[6:])


async def main(streams: int, seconds: float) -> None:
    counts = [0]
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=streams)) as client:
        start = time.monotonic()
        await asyncio.gather(*(one(client, start + seconds, counts) for _ in range(streams)))
        elapsed = time.monotonic() - start
    print(f"{streams} streams: {counts[0] / elapsed:.0f} chunks/s over {elapsed:.1f}s")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), float(sys.argv[2])))
