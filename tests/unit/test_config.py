"""Configuration: YAML, ${VAR} interpolation, GATEWAY__ overrides, one-line errors, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_the_repository_default_is_loopback_simulated_anonymous() -> None:
    settings = load_settings(ROOT / "config.yaml", env={})
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8080)
    assert settings.models[0].provider == "simulated" and settings.auth.anonymous


def test_no_file_gives_the_defaults() -> None:
    settings = load_settings(None, env={})
    assert settings.models[0].name == "sim-1"
    assert settings.streams.resume_grace_s == 10


def test_env_interpolation_and_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "models:\n"
        "  - {name: m, provider: openai, api_key: '${KEY}', base_url: '${BASE:-http://x/v1}'}\n",
    )
    settings = load_settings(path, env={"KEY": "sk-123"})
    model = settings.models[0]
    assert model.api_key is not None and model.api_key.get_secret_value() == "sk-123"
    assert model.base_url == "http://x/v1"
    assert "sk-123" not in repr(settings)  # secrets never print


def test_missing_variable_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  - {name: m, provider: openai, api_key: '${NOPE}'}\n")
    with pytest.raises(ConfigError, match=r"models\.0\.api_key: environment variable NOPE"):
        load_settings(path, env={})


def test_env_overrides_win(tmp_path: Path) -> None:
    path = write(tmp_path, "server: {port: 9000}\nmodels: [{name: a, provider: simulated}]\n")
    env = {
        "GATEWAY__SERVER__PORT": "9100",
        "GATEWAY__STREAMS__RESUME_GRACE_S": "0",
        "GATEWAY__MODELS__0__TOKENS_PER_SECOND": "7.5",
        "GATEWAY__SERVER__ALLOWED_ORIGINS": "[https://a.example]",
    }
    settings = load_settings(path, env=env)
    assert settings.server.port == 9100
    assert settings.streams.resume_grace_s == 0
    assert settings.models[0].tokens_per_second == 7.5
    assert settings.server.allowed_origins == ("https://a.example",)


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("server: {port: 70000}\n", {}, r"^server\.port: Input should be less than"),
        ("server: {prot: 1}\n", {}, r"^server\.prot: Extra inputs are not permitted"),
        ("streams: {heartbeat_s: 0}\n", {}, r"^streams\.heartbeat_s: "),
        ("models: []\n", {}, r"^models: "),
        ("models: [{name: a, provider: magic}]\n", {}, r"^models\.0"),
        ("server: {host: 0.0.0.0}\n", {}, r"^auth\.anonymous: anonymous access is refused"),
        (
            "models: [{name: a, provider: simulated}, {name: a, provider: simulated}]\n",
            {},
            r"duplicate model name",
        ),
        ("server: [\n", {}, r"invalid YAML at line"),
        ("- 1\n", {}, r"top level must be a mapping"),
        ("{}\n", {"GATEWAY__SERVER__PORT": "x"}, r"^server\.port: "),
        ("{}\n", {"GATEWAY__SERVER__PORT__X": "1"}, r"^server\.port: "),
        ("{}\n", {"GATEWAY__MODELS__3__NAME": "x"}, r"^models: "),
    ],
)
def test_bad_config_is_one_line_naming_the_key(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        load_settings(write(tmp_path, text), env=env)
    assert "\n" not in str(error.value)


def test_public_host_is_fine_without_anonymous(tmp_path: Path) -> None:
    settings = load_settings(
        write(tmp_path, "server: {host: 0.0.0.0}\nauth: {anonymous: false}\n"), env={}
    )
    assert settings.server.host == "0.0.0.0"


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


def test_check_config_cli(tmp_path: Path) -> None:
    good = run_cli("check-config", str(ROOT / "config.yaml"))
    assert good.returncode == 0 and good.stdout.startswith("ok:")
    bad = run_cli("check-config", str(write(tmp_path, "server: {port: -1}\n")))
    assert bad.returncode != 0
    assert bad.stderr.strip().count("\n") == 0 and "server.port" in bad.stderr


def test_serve_refuses_anonymous_on_a_public_host() -> None:
    result = run_cli("serve", "--host", "0.0.0.0", "--port", "0")
    assert result.returncode != 0
    assert "auth.anonymous" in result.stderr and "Traceback" not in result.stderr


def test_hash_key_cli() -> None:
    result = run_cli("hash-key", stdin="secret-key\n")
    import hashlib

    assert result.stdout.strip() == hashlib.sha256(b"secret-key").hexdigest()
    new = run_cli("hash-key", "--new")
    key, digest = (line.split(":", 1)[1].strip() for line in new.stdout.splitlines())
    assert hashlib.sha256(key.encode()).hexdigest() == digest and len(key) > 40
