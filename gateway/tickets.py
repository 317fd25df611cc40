"""POST /v1/tickets: a backend holding an API key mints a browser's stream credential."""

from __future__ import annotations

from aiohttp import web

from gateway.errors import InvalidRequest
from gateway.keys import authenticator_key, principal
from gateway.middleware import json_response
from gateway.schema import parse_json_object
from gateway.transports.body import read_body


async def create_ticket(request: web.Request) -> web.Response:
    """Body (optional): `{"ttl_s": seconds}`, capped by `auth.ticket_ttl_s` and by the
    expiry of the JWT that asks (a ticket never outlives its credential). A ticket
    cannot mint another: the access middleware refuses it as a bearer here."""
    ttl_s: float | None = None
    raw = await read_body(request)
    if raw.strip():
        body = parse_json_object(raw)
        unknown = set(body) - {"ttl_s"}
        if unknown:
            raise InvalidRequest(f"{sorted(unknown)[0]}: unknown field")
        value = body.get("ttl_s")
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise InvalidRequest("ttl_s: must be a positive number of seconds")
            ttl_s = float(value)
    ticket, expires_at = request.app[authenticator_key].mint_ticket(principal(request), ttl_s)
    return json_response({"ticket": ticket, "expires_at": expires_at}, status=201)
