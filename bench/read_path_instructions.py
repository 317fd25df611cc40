"""Instructions per upstream chunk in the openai provider's read loop, and per request parse.

Run under callgrind, which counts instructions (repeatable on a shared,
noisy machine, where timings are not), once per (tokens, tokens per read,
parses), and take differences so that interpreter start-up cancels out:

    ir() { valgrind --tool=callgrind --callgrind-out-file=/dev/null \
             python bench/read_path_instructions.py "$@" 2>&1 | grep -o 'Collected : [0-9]*'; }
    ir . 2000 1 0; ir . 4000 1 0      # (second - first) / 2000 = per token, one chunk a read
    ir . 2000 32 0; ir . 4000 32 0    # the same, 32 chunks a read (a fast upstream)
    ir . 2000 1 1000                  # (this - first) / 1000 = per request parse

The first argument is the checkout whose `gateway` package is measured, so a
worktree of an older commit can be compared in the same session.
"""

import asyncio
import sys

import orjson

sys.path.insert(0, sys.argv[1])
from gateway.config import OpenAIModel  # after the checkout is on the path
from gateway.providers.openai import OpenAIProvider
from gateway.schema import parse_generation_request

BODY = {
    "model": "m",
    "messages": [{"role": "user", "content": "Explain vector databases in detail please."}],
    "max_tokens": 100,
}
FINISH = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'


def chunk(text: str) -> bytes:
    """A content chunk as OpenAI frames it."""
    choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
    frame = {
        "id": "chatcmpl-x",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "system_fingerprint": "fp",
        "choices": [choice],
    }
    return b"data: " + orjson.dumps(frame) + b"\n\n"


class Reader:
    """What `aiohttp.StreamReader.readany` returns, one prepared read at a time."""

    def __init__(self, reads: list[bytes]) -> None:
        self._reads = iter(reads)

    async def readany(self) -> bytes:
        return next(self._reads, b"")


async def main(tokens: int, per_read: int, parses: int) -> None:
    frames = [chunk(" tok") for _ in range(tokens)]
    reads = [b"".join(frames[i : i + per_read]) for i in range(0, tokens, per_read)]
    provider = OpenAIProvider(OpenAIModel(name="m", provider="openai", base_url="http://x"))
    request = parse_generation_request({"prompt": "hi"})
    async for _ in provider._read(Reader([*reads, FINISH]), request):  # type: ignore[arg-type]
        pass
    for _ in range(parses):
        parse_generation_request(BODY)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
