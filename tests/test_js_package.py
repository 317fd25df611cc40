"""The browser client as an npm package (`gateway/static`, name `gateway-client`).

Its type declarations (`gateway-client.d.ts`) check against a frontend's use of
the API (`tests/js/types/usage.ts`, whose `@ts-expect-error` lines make the
check fail if the types were loose or missing), the package installs from the
repo path into a fresh project, and its `exports` resolve there, for Node and
for TypeScript, to a JS module and declarations that name the same exports.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import StartGateway, require_binary

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gateway" / "static"
TESTS_JS = ROOT / "tests" / "js"
TYPES = TESTS_JS / "types"
TYPESCRIPT = TESTS_JS / "node_modules" / "typescript"
#: What the package ships (package.json `files`, plus package.json itself).
SHIPPED = ["gateway-client.d.ts", "gateway-client.js", "package.json"]


def _tsc() -> Path:
    """The TypeScript compiler pinned by tests/js/package-lock.json."""
    tsc = TYPESCRIPT / "bin" / "tsc"
    if not tsc.is_file():
        pytest.fail(
            "TypeScript is not installed in tests/js/node_modules: "
            "run `npm ci --prefix tests/js` (make test does)"
        )
    return tsc


def _run(args: list[str], cwd: Path, timeout: float = 90) -> str:
    """Run a command; fail the test with its output unless it exits 0."""
    result = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{output}"
    return result.stdout


@pytest.fixture(scope="module")
def consumer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh ESM project with the package installed from the repo path.

    `--install-links` installs a copy packed by the package's `files` (as a
    registry install would), not a symlink to the repo, so a file missing from
    `files` is missing here too. Offline: a local folder needs no registry.
    """
    npm = require_binary("npm")
    require_binary("node")
    project = tmp_path_factory.mktemp("consumer")
    (project / "package.json").write_text(
        json.dumps({"name": "consumer", "private": True, "type": "module"})
    )
    env = {
        **os.environ,
        "npm_config_cache": str(project.parent / "npm-cache"),
        "npm_config_update_notifier": "false",
    }
    result = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--offline", "--install-links", str(PACKAGE)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return project


def test_declarations_type_check() -> None:
    """`tsc -p tests/js/types`: usage.ts compiles and every `@ts-expect-error` is an error."""
    node = require_binary("node")
    _run([node, str(_tsc()), "-p", str(TYPES)], cwd=ROOT)


def test_package_installs_from_the_repo_path(consumer: Path) -> None:
    installed = consumer / "node_modules" / "gateway-client"
    assert not installed.is_symlink()
    assert sorted(p.name for p in installed.iterdir()) == SHIPPED
    for name in SHIPPED:
        assert (installed / name).read_bytes() == (PACKAGE / name).read_bytes(), name
    manifest = json.loads((consumer / "package.json").read_text())
    assert manifest["dependencies"]["gateway-client"].startswith("file:")


def test_declarations_name_every_runtime_export(consumer: Path) -> None:
    """Node's import and TypeScript's resolution (nodenext and bundler) from the
    installed project: the .d.ts declares exactly the module's runtime exports,
    each as what it is (class or function), and compiles without errors."""
    node = require_binary("node")
    _tsc()
    shutil.copy(TYPES / "check_exports.mjs", consumer)
    out = _run([node, "check_exports.mjs", str(TYPESCRIPT)], cwd=consumer)
    report: dict[str, Any] = json.loads(out)
    declarations = (consumer / "node_modules" / "gateway-client" / "gateway-client.d.ts").resolve()
    for mode, found in report["resolved"].items():
        assert found is not None, f"{mode}: `gateway-client` does not resolve to its types"
        assert Path(found).resolve() == declarations, f"{mode}: resolved to {found}"
    assert sorted(report["resolved"]) == ["bundler", "nodenext"]
    assert report["diagnostics"] == []
    runtime: dict[str, str] = report["runtime"]
    assert {"stream", "runAgent", "stopChat", "GatewayError", "ToolRegistry"} <= set(runtime)
    missing = sorted(set(runtime) - set(report["declared"]))
    extra = sorted(set(report["declared"]) - set(runtime))
    assert not missing, f"exported by gateway-client.js but not declared: {missing}"
    assert not extra, f"declared but not exported by gateway-client.js: {extra}"
    assert report["declared"] == runtime


def test_usage_type_checks_in_the_installed_project(consumer: Path) -> None:
    """usage.ts again, its `gateway-client` import resolved through node_modules and the
    package's `exports` (`types` condition) under `nodenext`, with no path mapping."""
    node = require_binary("node")
    tsc = _tsc()
    shutil.copy(TYPES / "usage.ts", consumer)
    config = {
        "extends": str(TYPES / "tsconfig.json"),
        "compilerOptions": {"module": "nodenext", "moduleResolution": "nodenext", "paths": {}},
        "files": ["usage.ts"],
    }
    (consumer / "tsconfig.json").write_text(json.dumps(config))
    out = _run([node, str(tsc), "-p", str(consumer), "--listFiles"], cwd=consumer)
    checked = {Path(line).resolve() for line in out.splitlines() if line.strip()}
    assert (consumer / "node_modules" / "gateway-client" / "gateway-client.d.ts") in checked, out
    assert not any(PACKAGE in path.parents for path in checked), out


async def test_package_files_are_served_with_the_demo(start_gateway: StartGateway) -> None:
    """The demo page imports /static/gateway-client.js; the package's other files sit
    beside it under /static/ (harmless: the same public code)."""
    server = await start_gateway()
    async with aiohttp.ClientSession() as session:
        for name in SHIPPED:
            async with session.get(server.make_url(f"/static/{name}")) as response:
                assert response.status == 200, name
                assert await response.read() == (PACKAGE / name).read_bytes(), name
                if name.endswith(".js"):
                    assert "javascript" in response.headers["Content-Type"]
