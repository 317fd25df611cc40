"""`gateway serve | check-config | hash-key`; bare options (`gateway --port 8081`) mean `serve`."""

from __future__ import annotations

import argparse
import hashlib
import secrets
import sys
from pathlib import Path

from gateway.config import ConfigError, Settings, load_settings

DEFAULT_CONFIG = "config.yaml"
HELP_FLAGS = frozenset({"-h", "--help"})
BARE_MEANS_SERVE = (
    "Without a command, gateway means gateway serve: `gateway --port 8081` and "
    "`gateway --config x.yaml` serve too."
)
USAGE = """gateway [--config PATH] [--host HOST] [--port PORT]   (= gateway serve …)
       gateway {serve,check-config,hash-key} [-h] …"""


def _load(path: str | None, host: str | None = None, port: int | None = None) -> Settings:
    if path is None and Path(DEFAULT_CONFIG).exists():
        path = DEFAULT_CONFIG
    flags = {"server.host": host, "server.port": port}
    return load_settings(path, overrides={k: v for k, v in flags.items() if v is not None})


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.logs import configure_logging
    from gateway.server import ServeError, serve

    settings = _load(args.config, args.host, args.port)
    configure_logging(settings.logging)
    try:
        serve(settings)
    except ServeError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
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
        prog="gateway",
        usage=USAGE,
        description="Streaming gateway for AI model APIs.",
        epilog=BARE_MEANS_SERVE,
    )
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser(
        "serve",
        prog="gateway serve",
        help="run the gateway (the default command)",
        epilog=BARE_MEANS_SERVE,
    )
    serve.add_argument(
        "--config", metavar="PATH", help="config file (default: ./config.yaml if present)"
    )
    serve.add_argument(
        "--host", help="address to listen on (default: server.host of the config, 127.0.0.1)"
    )
    serve.add_argument(
        "--port",
        type=int,
        help="port to listen on (default: server.port of the config, 8080; 0: any free port)",
    )
    serve.set_defaults(func=cmd_serve)
    check = commands.add_parser(
        "check-config", prog="gateway check-config", help="validate a config file"
    )
    check.add_argument("path")
    check.set_defaults(func=cmd_check_config)
    hash_key = commands.add_parser(
        "hash-key", prog="gateway hash-key", help="print the SHA-256 of a key read on stdin"
    )
    hash_key.add_argument("--new", action="store_true", help="make a random key and print both")
    hash_key.set_defaults(func=cmd_hash_key)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0].startswith("-") and argv[0] not in HELP_FLAGS):
        argv = ["serve", *argv]
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for problem in str(exc).splitlines():
            print(f"config error: {problem}", file=sys.stderr)
        return 2
