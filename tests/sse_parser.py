"""The spec-correct SSE parser lives in `tests.helpers`; this name stays for its importers
(bench/soak.py, tests/tool_helpers.py, tests/test_openai_provider.py)."""

from tests.helpers import SseEvent, SseParser

__all__ = ["SseEvent", "SseParser"]
