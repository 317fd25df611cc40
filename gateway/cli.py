"""`gateway serve | check-config | hash-key`."""

from __future__ import annotations

import argparse
import hashlib
import secrets
import sys
from pathlib import Path

from gateway.config import ConfigError, Settings, load_settings

DEFAULT_CONFIG = "config.yaml"


def _load(path: str | None, host: str | None = None, port: int | None = None) -> Settings:
    if path is None and Path(DEFAULT_CONFIG).exists():
        path = DEFAULT_CONFIG
    flags = {"server.host": host, "server.port": port}
    return load_settings(path, overrides={k: v for k, v in flags.items() if v is not None})


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.logs import configure_logging
    from gateway.server import serve

    settings = _load(args.config, args.host, args.port)
    configure_logging(settings.logging)
    serve(settings)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args.path)
    names = ", ".join(m.name for m in settings.models)
    print(f"ok: {args.path}: {settings.server.host}:{settings.server.port}, models: {names}")
    return 0


def cmd_hash_key(args: argparse.Namespace) -> int:
    if args.new:
        key = "gw_" + secrets.token_urlsafe(32)
        print(f"key:    {key}")
        print(f"sha256: {hashlib.sha256(key.encode()).hexdigest()}")
        return 0
    key = sys.stdin.readline().strip()
    if not key:
        print("error: give the key on stdin (or use --new)", file=sys.stderr)
        return 2
    print(hashlib.sha256(key.encode()).hexdigest())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description="Streaming gateway for AI model APIs"
    )
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="config file (default: ./config.yaml if present)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(func=cmd_serve)
    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("path")
    check.set_defaults(func=cmd_check_config)
    hash_key = commands.add_parser("hash-key", help="print the SHA-256 of a key read on stdin")
    hash_key.add_argument("--new", action="store_true", help="make a random key and print both")
    hash_key.set_defaults(func=cmd_hash_key)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        args = build_parser().parse_args(["serve"])
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
