"""The simulated model's agent side: when it calls a tool, with what, and its thinking.

Deterministic like the rest of the simulated model, and shaped so a demo
reads naturally: with `tool_choice` "auto" it calls the tools the user's
last message mentions ("What time is it?" mentions `get_current_time`),
with "required" it calls one whatever was said, with a named function it
calls that one. Arguments fill the schema's required properties by type.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from typing import Any

import orjson

from gateway.chat import Message, NamedToolChoice, Tool
from gateway.schema import GenerationRequest

#: Name words too generic to count as a mention.
_GENERIC_WORDS = frozenset({"get", "set", "list", "make", "find", "fetch", "tool", "function"})
_NAME_WORDS = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
_EXPRESSION = re.compile(
    r"[-+]?\(*\s*\d+(?:\.\d+)?(?:\s*[-+*/%^]\s*\(*\s*[-+]?\d+(?:\.\d+)?\s*\)*)+"
)
_MAX_DEPTH = 8
_RESULT_CHARS = 200
_THOUGHTS = (
    "The user is asking about {topic}.",
    "Let me think about what matters most here.",
    "First, what does {topic} depend on?",
    "There are a few trade-offs to weigh before answering.",
    "I should keep the answer concrete and practical.",
    "An example would make this clearer.",
    "Let me check that reasoning once more.",
    "Okay, I think I have a clear picture now.",
)


def _name_words(name: str) -> list[str]:
    words = [w.lower() for w in _NAME_WORDS.findall(name)]
    return [w for w in words if len(w) >= 4 and w not in _GENERIC_WORDS]


def mentions(text: str, tool: Tool) -> bool:
    """The text names the tool, or one of the distinctive words of its name."""
    lowered = text.lower()
    name = tool.function.name
    if name.lower() in lowered:
        return True
    return any(re.search(rf"\b{re.escape(word)}", lowered) for word in _name_words(name))


def chosen_tools(request: GenerationRequest) -> list[Tool]:
    """The tools this answer calls, in the order of `tools`; [] to answer in text."""
    tools, choice = request.tools, request.tool_choice
    if not tools or choice == "none":
        return []
    if isinstance(choice, NamedToolChoice):
        return [t for t in tools if t.function.name == choice.function.name][:1]
    last = request.chat[-1]
    mentioned = [t for t in tools if mentions(last.text, t)] if last.role == "user" else []
    chosen = mentioned or ([tools[0]] if choice == "required" else [])
    return chosen[:1] if request.parallel_tool_calls is False else chosen


def arguments_for(tool: Tool, prompt: str, topic: str) -> str:
    """The call's JSON arguments: the schema's required properties, filled by type."""
    schema = tool.function.parameters or {"type": "object"}
    value = _value("arguments", schema, prompt, topic, 0)
    return orjson.dumps(value if isinstance(value, dict) else {}).decode()


def _value(name: str, schema: Any, prompt: str, topic: str, depth: int) -> Any:
    if not isinstance(schema, dict):
        return topic
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        if depth >= _MAX_DEPTH:
            return {}
        properties = schema.get("properties") or {}
        required = [r for r in schema.get("required") or () if isinstance(r, str)]
        return {r: _value(r, properties.get(r), prompt, topic, depth + 1) for r in required}
    if kind in ("integer", "number"):
        minimum = schema.get("minimum")
        value = minimum if isinstance(minimum, int | float) else 1
        return int(value) if kind == "integer" else value
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "null":
        return None
    if "expr" in name.lower() and (match := _EXPRESSION.search(prompt)):
        return match.group().strip()
    return topic


def call_id(rng: random.Random) -> str:
    return f"call_{rng.getrandbits(96):024x}"


def tool_result(chat: tuple[Message, ...]) -> tuple[str, str] | None:
    """(tool name, result) when the conversation ends with a tool's result."""
    last = chat[-1]
    if last.role != "tool":
        return None
    name = "the tool"
    for message in reversed(chat):
        for call in message.tool_calls or ():
            if call.id == last.tool_call_id:
                name = call.function.name
    return name, _readable(last.text)


def _readable(result: str) -> str:
    """A one-value JSON object reads as its value: `{"result": 391}` -> 391."""
    try:
        value = orjson.loads(result)
    except orjson.JSONDecodeError:
        return result[:_RESULT_CHARS]
    if isinstance(value, dict) and len(value) == 1:
        value = next(iter(value.values()))
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return text[:_RESULT_CHARS]


def thoughts(rng: random.Random, topic: str) -> Iterator[str]:
    """Endless plausible thinking, sentence by sentence."""
    deck: list[str] = []
    first = True
    while True:
        if not deck:
            deck = list(_THOUGHTS[1:])
            rng.shuffle(deck)
        template = _THOUGHTS[0] if first else deck.pop()
        yield ("" if first else " ") + template.format(topic=topic)
        first = False
