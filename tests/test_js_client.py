"""The JavaScript client's unit tests (`node --test tests/js/`), run as part of pytest."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parent.parent


def test_node_unit_tests_pass() -> None:
    node = require_binary("node")
    result = subprocess.run(
        [node, "--test", "tests/js/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # node --test prints a summary; make sure tests really ran (a wrong path runs none).
    assert "# fail 0" in output
    passed = int(output.split("# pass ", 1)[1].split()[0])
    assert passed >= 50, output
