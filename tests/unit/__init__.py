"""Unit tests: no server, socket or external process; seconds in all (`pytest tests/unit`)."""
