"""A deterministic stand-in for a real model: plausible text at a configured pace.

Load tests, demos and the contract suite need an upstream that is free, fast to
start and reproducible, yet looks like a real one on the wire: word-piece
deltas with Unicode and emoji, pacing, `stop`, `max_tokens`, usage, failures,
and, like the models agents run on, thinking before the answer and tool calls
(`simulated_agent.py`).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
from collections.abc import AsyncGenerator, Iterable, Iterator
from itertools import chain, islice

import orjson

from gateway.chat import Message, Tool
from gateway.config import SimulatedModel
from gateway.errors import UpstreamError
from gateway.providers.base import (
    Deliver,
    Delta,
    Finish,
    FinishReason,
    Item,
    Reasoning,
    ToolCallDelta,
    Usage,
)
from gateway.providers.simulated_agent import (
    arguments_for,
    call_id,
    chosen_tools,
    thoughts,
    tool_result,
)
from gateway.schema import GenerationRequest

_INTROS = (
    "{Topic} is easier to reason about once you separate what is stored from how it is read.",
    "Good question — {topic} comes up a lot, and the honest answer is: it depends on the workload.",
    "At its core, {topic} trades a little work up front for much cheaper work later.",
    "Here is how I would think about {topic}, step by step.",
)
_BODY = (
    "Most systems built around {topic} keep a compact index in memory and push the bulk to disk.",
    "A naïve implementation of {term} works in a demo, but it rarely survives real traffic.",
    "Latency adds up quickly: a request from 東京 to Frankfurt spends about 250 ms on the wire.",
    "Think of a busy café: orders queue up, the barista batches them, and nobody waits long.",
    "German docs call this the Größe of a batch — how many items are processed together.",
    "Once {term} grows past a few million rows, the query planner matters more than hardware.",
    "In networking terms, {topic} behaves like TCP: reliable, ordered, and slower under loss.",
    "The scientific approach is simple: measure, change one variable, and measure again.",
    "Caching helps, but every cache is also a second source of truth that can drift…",
    "Under the hood, {term} is mostly bookkeeping: offsets, timestamps and a few checksums.",
    "If you remember one thing, remember that {topic} is a trade-off, not a free lunch.",
    "Benchmarks are noisy, so run each one at least 5 times and report the median.",
    "Search systems, for example, rank results by similarity scores instead of exact matches.",
    "Physics has the same lesson: a good approximation beats an exact answer you cannot compute.",
    "Start small, add metrics early, and let real traffic show you where {term} hurts.",
    "It sounds complicated at first, but it clicks quickly. ✨",
    "Ship it behind a flag, watch the dashboards, and iterate. 🚀",
    "Retries need backoff and jitter, otherwise every client hammers {term} at the same moment.",
    "Consistency is the hard part: two replicas of {term} can disagree for a few milliseconds.",
    "Compression usually pays for itself, because CPUs are faster than networks and disks.",
)
_BULLETS = (
    "{Topic} needs one clear owner for its data.",
    "Measure p99 latency, not just the average.",
    "Keep {term} configurable — defaults age badly.",
    "Write the failure modes down before you need them.",
    "Prefer boring, well-understood tools; they fail in known ways.",
    "Test with realistic data, including names like Zoë and Łukasz.",
)
_CODE = (
    "SELECT id, title FROM documents ORDER BY score DESC LIMIT 10;",
    "curl -N http://localhost:8080/v1/chat/completions -d @request.json",
    "for attempt in range(3): send_with_backoff(request, attempt)",
)
_CLOSINGS = (
    "Hope that helps — happy to go deeper on any part of {topic}. 👍🏽",
    "In short: start simple, measure honestly, and only add complexity when the data asks for it.",
    "That is the gist of it; the details depend on your constraints, but the shape stays the same.",
)
_FALLBACK_TOPICS = ("distributed systems", "caching", "database indexing", "network latency")
_FALLBACK_TERMS = ("the storage layer", "the index", "the scheduler", "the network path")
#: Words never taken as the topic; a word list reads better as prose, hence the noqa.
_STOPWORDS = frozenset(
    """a about an and are as at be can could do does explain for from give how i in is it its
    me my of on or please should show so tell than that the their them then there these this
    those to vs was we what when where which who why will with would you your between difference
    describe work works use using need want know make write they he she our us has have
    """.split()  # noqa: SIM905
)

#: GPT-2 style pre-tokenizer: contractions, newlines, words, numbers, symbols, spaces.
_PRETOKEN = re.compile(
    r"'(?:s|t|re|ve|ll|d|m)\b|\n+| ?[^\W\d_]+| ?\d{1,3}| ?(?:[^\w\s]|_)+|\s+(?!\S)|\s+"
)
_WORD = re.compile(r"[^\W\d_][\w'-]*")
_SUFFIXES = ("ing", "tion", "ment", "ed", "ly", "er", "s")
_NATURAL_MIN, _NATURAL_MAX = 100, 400
_PROMPT_SCAN_CHARS = 2000
#: Behind schedule, still yield to the loop this often so a fast model cannot starve it.
_YIELD_EVERY = 64


def _split_word(piece: str) -> list[str]:
    """Split a long word into stem and suffix pieces, as BPE does (" data", "base", "s")."""
    space = " " if piece.startswith(" ") else ""
    word = piece[len(space) :]
    if len(word) <= 5 or not word.isalpha():
        return [piece]
    parts: list[str] = []
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            word, parts = word[: -len(suffix)], [suffix]
            break
    if len(word) > 7:
        cut = len(word) // 2
        word, parts = word[:cut], [word[cut:], *parts]
    return [space + word, *parts]


def _tokenize(text: str) -> list[str]:
    """Cut text into word-piece deltas that concatenate back to exactly `text`."""
    return [part for piece in _PRETOKEN.findall(text) for part in _split_word(piece)]


def _keywords(text: str) -> tuple[str | None, list[str]]:
    """The prompt's topic (longest run of up to two content words) and its other content words."""
    runs: list[list[str]] = []
    last_end = -1
    for match in _WORD.finditer(text):
        word = match.group().strip("'-")
        if len(word) < 3 or word.lower() in _STOPWORDS:
            last_end = -1
            continue
        if not (word[1:] != word[1:].lower() or (word[0].isupper() and match.start() > 0)):
            word = word.lower()
        adjacent = last_end >= 0 and not text[last_end : match.start()].strip()
        if adjacent and len(runs[-1]) < 2:
            runs[-1].append(word)
        else:
            runs.append([word])
        last_end = match.end()
    if not runs:
        return None, []
    best = max(runs, key=len)
    topic = " ".join(best)
    terms = [w for run in runs if run is not best for w in run if w not in best]
    return topic, list(dict.fromkeys(terms))


class _Composer:
    """Writes an endless answer about the prompt, one sentence-sized unit of deltas at a time."""

    def __init__(self, rng: random.Random, prompt: str) -> None:
        self._rng = rng
        topic, terms = _keywords(prompt)
        self._topic = topic or rng.choice(_FALLBACK_TOPICS)
        self._terms = [*terms, *_FALLBACK_TERMS]

    @property
    def topic(self) -> str:
        return self._topic

    def closing(self, shape: random.Random) -> list[str]:
        return _tokenize("\n\n" + self._fill(shape.choice(_CLOSINGS), shape))

    def _fill(self, template: str, rng: random.Random | None = None) -> str:
        term = (rng or self._rng).choice(self._terms)
        topic = self._topic
        return template.format(topic=topic, Topic=topic[:1].upper() + topic[1:], term=term)

    def units(self) -> Iterator[list[str]]:
        """Intro, then paragraphs, with now and then a bullet list or a code line."""
        rng = self._rng
        deck: list[str] = []
        yield _tokenize(self._fill(rng.choice(_INTROS)))
        while True:
            roll = rng.random()
            if roll < 0.12:
                items = rng.sample(_BULLETS, rng.randint(2, 4))
                lines = "".join(f"\n- {self._fill(item)}" for item in items)
                yield _tokenize(f"\n\nA few things to keep in mind:{lines}")
            elif roll < 0.2:
                code = rng.choice(_CODE)
                yield _tokenize(f"\n\nA minimal example:\n\n    {code}\n\nAdapt it to your setup.")
            else:
                for i in range(rng.randint(2, 4)):
                    if not deck:
                        deck = list(_BODY)
                        rng.shuffle(deck)
                    yield _tokenize(("\n\n" if i == 0 else " ") + self._fill(deck.pop()))

    def natural(self, shape: random.Random) -> list[str]:
        """A complete answer of 100..400 deltas that ends with a closing sentence."""
        target = shape.randint(_NATURAL_MIN, _NATURAL_MAX)
        closing = self.closing(shape)
        tokens: list[str] = []
        for unit in self.units():
            enough = len(tokens) + len(closing) >= _NATURAL_MIN
            if enough and len(tokens) + len(unit) + len(closing) > target:
                break
            tokens += unit
        return tokens + closing


class _StopFilter:
    """Holds back only text that could still become a stop sequence, so none of it leaks out."""

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = tuple(stops)
        self._longest = max(map(len, self._stops), default=0)
        self.stopped = False

    def apply(self, tokens: Iterable[str]) -> Iterator[str]:
        """Pass whole tokens through; cut the text right before the first stop sequence."""
        if not self._stops:
            yield from tokens
            return
        held: list[str] = []
        for token in tokens:
            held.append(token)
            text = "".join(held)
            hits = [i for i in (text.find(stop) for stop in self._stops) if i >= 0]
            if hits:
                self.stopped = True
                yield from _truncate(held, min(hits))
                return
            size, keep = len(text), self._risky_tail(text)
            while held and size - len(held[0]) >= keep:
                size -= len(held[0])
                yield held.pop(0)
        yield from held

    def _risky_tail(self, text: str) -> int:
        """Length of the longest suffix of `text` that starts some stop sequence."""
        for k in range(min(len(text), self._longest - 1), 0, -1):
            if any(stop.startswith(text[-k:]) for stop in self._stops):
                return k
        return 0


def _truncate(tokens: list[str], length: int) -> Iterator[str]:
    """The first `length` characters of `tokens`, keeping token boundaries."""
    for token in tokens:
        if length <= 0:
            return
        yield token[:length]
        length -= len(token)


class _Pacer:
    """Absolute deadlines (start + first token + i / rate), so sleeps never accumulate drift."""

    def __init__(self, model: SimulatedModel) -> None:
        self._first = model.first_token_ms / 1000
        self._interval = 1 / model.tokens_per_second
        self._start: float | None = None
        self._count = 0

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        deadline = self._start + self._first + self._count * self._interval
        self._count += 1
        delay = deadline - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        elif self._count % _YIELD_EVERY == 0:
            await asyncio.sleep(0)


def _rngs(request: GenerationRequest) -> tuple[random.Random, random.Random]:
    """Text and shape generators seeded from (seed, messages, tools), stably and unsalted."""
    digest = hashlib.blake2b(digest_size=32)
    seed = os.urandom(16) if request.seed is None else f"seed:{request.seed}".encode()
    digest.update(seed)
    for message in request.chat:
        content = message.text.encode("utf-8", "surrogatepass")
        digest.update(f"\0{message.role}:{len(content)}:".encode() + content)
        if message.tool_calls or message.tool_call_id:
            digest.update(orjson.dumps(message.for_upstream()))
    if request.tools:
        digest.update(orjson.dumps(request.forwarded_fields()))
    raw = digest.digest()
    return random.Random(int.from_bytes(raw[:16])), random.Random(int.from_bytes(raw[16:]))


def _prompt_text(chat: tuple[Message, ...]) -> str:
    """The start of the last user message: what the answer talks about (bounded CPU)."""
    text = next((m.text for m in reversed(chat) if m.role == "user"), chat[-1].text)
    return text[:_PROMPT_SCAN_CHARS]


class SimulatedProvider:
    """A fake upstream; `fail_after_tokens` lets tests exercise mid-stream failures."""

    kind = "simulated"

    def __init__(self, model: SimulatedModel) -> None:
        self._model = model

    async def aclose(self) -> None:
        """Nothing to release: no connections are held."""

    async def stream(
        self, request: GenerationRequest, deliver: Deliver | None = None
    ) -> AsyncGenerator[Item, None]:
        """Think (`reasoning_tokens`), then call tools or answer, at the model's pace
        (each delta yielded: `deliver` is for upstreams that read sockets).

        `max_tokens` bounds the whole completion, thinking included, as it
        does for OpenAI's reasoning models.
        """
        text_rng, shape_rng = _rngs(request)
        prompt = _prompt_text(request.chat)
        composer = _Composer(text_rng, prompt)
        budget = request.max_tokens
        pacer, emitted = _Pacer(self._model), 0
        for delta in self._thinking(request, composer.topic, text_rng):
            if budget is not None and emitted >= budget:
                break
            await pacer.wait()
            self._check_failure(emitted)
            emitted += 1
            yield Reasoning(delta)
        tools = chosen_tools(request)
        stops = _StopFilter(request.stop)
        ended: FinishReason = "stop"
        if tools:
            deltas: Iterable[Delta] = self._tool_calls(tools, prompt, composer.topic, text_rng)
            ended = "tool_calls"
        else:
            deltas = stops.apply(self._answer(request, composer, shape_rng))
        for piece in deltas:
            if budget is not None and emitted >= budget:
                ended = "length"
                break
            await pacer.wait()
            self._check_failure(emitted)
            emitted += 1
            yield piece
        self._check_failure(emitted)
        yield Finish(ended, Usage(request.prompt_tokens_estimate, emitted))

    def _thinking(self, request: GenerationRequest, topic: str, rng: random.Random) -> list[str]:
        count = self._model.reasoning_tokens
        if not count or request.reasoning_effort in ("none", "minimal"):
            return []
        return list(islice(chain.from_iterable(map(_tokenize, thoughts(rng, topic))), count))

    def _tool_calls(
        self, tools: list[Tool], prompt: str, topic: str, rng: random.Random
    ) -> Iterator[ToolCallDelta]:
        """Each call's first fragment (id, name, no arguments), then its argument fragments."""
        for index, tool in enumerate(tools):
            yield ToolCallDelta(index, "", id=call_id(rng), name=tool.function.name)
            for piece in _tokenize(arguments_for(tool, prompt, topic)):
                yield ToolCallDelta(index, piece)

    def _answer(
        self, request: GenerationRequest, composer: _Composer, shape: random.Random
    ) -> Iterable[str]:
        result = tool_result(request.chat)
        if result is not None:
            name, value = result
            return _tokenize(f"The {name} tool returned {value}.") + composer.closing(shape)
        if request.max_tokens is None:
            return composer.natural(shape)
        return chain.from_iterable(composer.units())

    def _check_failure(self, emitted: int) -> None:
        """Fail where the (N+1)th item would go, so exactly N deltas reach the client."""
        limit = self._model.fail_after_tokens
        if limit is not None and emitted >= limit:
            raise UpstreamError(f"simulated upstream failure after {limit} tokens")
