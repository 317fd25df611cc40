"""The CLI as a newcomer meets it, on real processes: a busy port, bare options, `--help`,
and `check-config` on files with the mistakes people make."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_first_hour_process import ROOT, serve

#: The console script `make install` puts next to the interpreter.
GATEWAY = Path(sys.executable).with_name("gateway")


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT)


def check_config(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return run(sys.executable, "-m", "gateway", "check-config", str(path))


@pytest.mark.parametrize("command", [[], ["serve"]], ids=["bare", "serve"])
def test_a_busy_port_is_one_clear_line_and_a_failure(command: list[str]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run(sys.executable, "-m", "gateway", *command, "--port", str(port))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"gateway: port {port} on 127.0.0.1 is in use (another gateway?): stop what holds it,"
        " or choose another port with --port"
    ]


async def test_bare_options_mean_serve(tmp_path: Path) -> None:
    """`gateway --port N --config F`, the console script itself (not `python -m`)."""
    assert GATEWAY.exists(), "pip install -e . makes the gateway script"
    argv = (str(GATEWAY), "--config", str(ROOT / "config.yaml"), "--port", "0")
    async with serve(*argv, log=tmp_path / "gateway.log") as served:
        assert served.url.startswith("http://127.0.0.1:")


def test_help_says_bare_gateway_serves_and_explains_host_and_port() -> None:
    top = run(str(GATEWAY), "--help")
    assert top.returncode == 0
    assert "Without a command, gateway means gateway serve" in " ".join(top.stdout.split())
    serve_help = " ".join(run(str(GATEWAY), "serve", "--help").stdout.split())
    assert "--host HOST address to listen on" in serve_help
    assert "--port PORT port to listen on" in serve_help


def test_check_config_refuses_numbers_and_booleans_written_as_strings(tmp_path: Path) -> None:
    result = check_config(tmp_path, 'server: {port: "8080"}\n')
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "config error: server.port: Input should be a valid integer, not the string '8080'"
        " (write it without quotes)"
    ]
    result = check_config(tmp_path, 'auth: {anonymous: "false"}\n')
    assert result.returncode == 2 and "auth.anonymous: Input should be a valid boolean" in (
        result.stderr
    )


@pytest.mark.parametrize("text", ["", "# only a comment\n"], ids=["empty", "comments"])
def test_check_config_refuses_an_empty_file(tmp_path: Path, text: str) -> None:
    result = check_config(tmp_path, text)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"config error: {tmp_path / 'config.yaml'}: the file is empty; copy the repository's"
        " config.yaml to start from"
    ]


def test_check_config_lists_every_problem_one_per_line(tmp_path: Path) -> None:
    text = "server: {port: x, shutdown_grace_s: -1}\nstreams: {heartbeat_s: 0, nope: 1}\n"
    result = check_config(tmp_path, text)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert [line.split(":")[1].strip() for line in lines] == [
        "server.port",
        "server.shutdown_grace_s",
        "streams.heartbeat_s",
        "streams.nope",
    ], lines
    assert all(line.startswith("config error: ") for line in lines)
    assert "more)" not in result.stderr
    assert check_config(tmp_path, (ROOT / "config.yaml").read_text()).returncode == 0
