"""`redis.url: rediss://…`: the rate limiter and the shared event log through a
real redis-server that speaks TLS only.

A throwaway CA and server certificate are made at test time; the server runs
with `--port 0 --tls-port` (no plaintext listener) and the gateway's URL is
`rediss://127.0.0.1:<port>/0?ssl_ca_certs=<the CA>` (redis-py's `from_url`
passes the query parameter to its SSL connection, which verifies the chain and
the host name). Debian's redis-server is built with TLS; one without it skips
here, and fails under CI=true.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from tests.conftest import TEST_API_KEY, TEST_KEY_CONFIG, UNLIMITED, StartGateway, require_binary
from tests.helpers import bearer, read_ndjson, stream, text_of
from tests.redis_server import RedisProcess, TlsUnsupportedError, make_tls_files

PACED = {"name": "sim-1", "provider": "simulated", "tokens_per_second": 100, "first_token_ms": 0}
BODY = {"prompt": "Explain vector databases.", "max_tokens": 60, "seed": 11}
AUTH = bearer(TEST_API_KEY)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(require_binary("redis-server"), tls=make_tls_files(tmp_path))
    try:
        server.start()
    except TlsUnsupportedError as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"a redis-server with TLS is required under CI: {error}")
        pytest.skip(str(error))
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def tls_client(tls_redis: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(tls_redis.url)
    try:
        yield client
    finally:
        await client.aclose()


def both_backends_on(redis: RedisProcess, **sections: Any) -> dict[str, Any]:
    """Rate limits and event logs in Redis; fail closed, so a broken TLS setup
    is a refusal here rather than a silently local limit."""
    return {
        "models": [PACED],
        "rate_limit": {"backend": "redis", "fail_open": False, "default": UNLIMITED},
        "streams": {"backend": "redis", "resume_grace_s": 10},
        "redis": {"url": redis.url},
        **sections,
    }


async def test_the_server_speaks_tls_only_and_the_url_trusts_its_ca(
    tls_redis: RedisProcess, tls_client: aioredis.Redis
) -> None:
    assert tls_redis.url.startswith("rediss://") and "ssl_ca_certs=" in tls_redis.url
    assert await tls_client.ping() is True
    # No plaintext listener on the port...
    plain = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{tls_redis.port}/0", socket_timeout=1, socket_connect_timeout=1
    )
    with pytest.raises((redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        await plain.ping()
    await plain.aclose()
    # ...and the certificate verifies against the test CA only, not the system's.
    unverified = aioredis.Redis.from_url(
        f"rediss://127.0.0.1:{tls_redis.port}/0", socket_timeout=1, socket_connect_timeout=1
    )
    with pytest.raises(redis.exceptions.ConnectionError, match=r"(?i)certificate"):
        await unverified.ping()
    await unverified.aclose()


async def test_limits_are_shared_by_two_replicas_through_tls_redis(
    start_gateway: StartGateway, tls_redis: RedisProcess, tls_client: aioredis.Redis
) -> None:
    key = {**TEST_KEY_CONFIG, "limits": {**UNLIMITED, "requests_per_minute": 2}}
    auth = {"anonymous": False, "api_keys": [key]}
    a, b = [await start_gateway(**both_backends_on(tls_redis, auth=auth)) for _ in range(2)]
    statuses = []
    async with aiohttp.ClientSession(headers=AUTH) as session:
        for server in (a, b, a):
            body = {**BODY, "max_tokens": 3}
            async with session.post(server.make_url("/v1/stream/chunked"), json=body) as response:
                statuses.append(response.status)
                if response.status == 200:
                    assert (await read_ndjson(response))[-1]["type"] == "done"
    # Per-replica (memory) limits would admit the third request on A: only the
    # shared budget in the TLS Redis refuses it. A TLS failure is a 503 (fail closed).
    assert statuses == [200, 200, 429], f"{statuses}: is Redis reachable over TLS?"
    assert await tls_client.dbsize() > 0, "nothing was written to the TLS Redis"


async def test_a_generation_resumes_on_another_replica_through_tls_redis(
    start_gateway: StartGateway, tls_redis: RedisProcess
) -> None:
    a, b = [await start_gateway(**both_backends_on(tls_redis)) for _ in range(2)]
    expected = text_of((await stream(a, "chunked", BODY)).events)
    async with aiohttp.ClientSession() as session:
        # Start on A, read a few tokens, hang up.
        async with session.post(a.make_url("/v1/stream/chunked"), json=BODY) as response:
            assert response.status == 200
            seen: list[dict[str, Any]] = []
            while len(seen) < 6:
                seen.append(orjson.loads(await response.content.readline()))
        generation_id = seen[0]["generation_id"]
        # Resume on B, which only knows of it through Redis.
        url = b.make_url(f"/v1/generations/{generation_id}/events")
        after = url.with_query(after=str(seen[-1]["seq"]))
        async with session.get(after, headers={"Accept": "application/x-ndjson"}) as response:
            assert response.status == 200, "B does not see A's generation: shared log over TLS?"
            rest = await read_ndjson(response)
    assert rest[0]["seq"] == seen[-1]["seq"] + 1 and rest[-1]["type"] == "done"
    assert text_of(seen) + text_of(rest) == expected


def test_the_tls_servers_certificate_is_for_the_loopback_address(tmp_path: Path) -> None:
    from cryptography import x509

    files = make_tls_files(tmp_path)
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert files.key.stat().st_mode & 0o077 == 0
