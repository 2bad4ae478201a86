import asyncio, json, sys, time
import httpx
N = int(sys.argv[1]); DUR = float(sys.argv[2])
async def one(client, stop, counts):
    body = {"model": "/tmp/prof_models/llama-tiny-random-seed0-vocab49152", "prompt": "Once upon a time", "max_tokens": 256, "ignore_eos": True, "stream": True}
    while time.monotonic() < stop:
        async with client.stream("POST", "http://127.0.0.1:3199/v1/completions", json=body, timeout=120) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    counts[0] += 1
                    d = json.loads(line[6:])
                    counts[1] += len(d["choices"][0]["text"]) if d["choices"] else 0
async def main():
    counts = [0, 0]
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=N)) as client:
        t = time.monotonic(); stop = t + DUR
        await asyncio.gather(*(one(client, stop, counts) for _ in range(N)))
        el = time.monotonic() - t
    print(f"{N} streams: {counts[0]/el:.0f} chunks/s over {el:.1f}s")
asyncio.run(main())
