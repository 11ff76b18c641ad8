"""The bridges' kick of a revoked device through EMQX's REST API (gateway/bridge.py EmqxKick),
against a small HTTP server answering as EMQX does: the client id is the device id, unique only
within its tenant, so only a client whose `client_attrs.tenant` is the credential's is kicked."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from gateway.bridge import EmqxKick


class Emqx:
    """Connected clients (client id -> tenant attribute) and the DELETEs asked for."""

    def __init__(self) -> None:
        self.clients: dict[str, dict[str, str]] = {}  # client id -> its client_attrs
        self.deleted: list[str] = []
        emqx = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                client_id = self.path.rsplit("/", 1)[1]
                attrs = emqx.clients.get(client_id)
                if attrs is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                body = json.dumps({"clientid": client_id, "client_attrs": attrs}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_DELETE(self) -> None:
                client_id = self.path.rsplit("/", 1)[1]
                emqx.deleted.append(client_id)
                emqx.clients.pop(client_id, None)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def emqx() -> Iterator[Emqx]:
    server = Emqx()
    try:
        yield server
    finally:
        server.server.shutdown()


async def test_the_revocation_of_one_tenants_device_leaves_another_tenants_device_of_that_id(
    emqx: Emqx,
) -> None:
    emqx.clients["th-1"] = {"tenant": "globex", "jti": "j-1"}  # globex's th-1 is connected
    kicker = EmqxKick(emqx.url, "key", "secret")
    try:
        assert await kicker.kick("acme", "th-1")  # acme's th-1 is not connected: nothing to do
        assert emqx.deleted == []
        assert await kicker.kick("globex", "th-1")
        assert emqx.deleted == ["th-1"]
        assert await kicker.kick("globex", "th-1")  # gone (404): done, no second DELETE
        assert emqx.deleted == ["th-1"]
    finally:
        await kicker.close()


async def test_a_device_logged_in_with_another_credential_is_not_kicked(emqx: Emqx) -> None:
    emqx.clients["th-1"] = {"tenant": "acme", "jti": "j-new"}  # rotated: logged in again with j-new
    kicker = EmqxKick(emqx.url, "key", "secret")
    try:
        assert await kicker.kick("acme", "th-1", jti="j-old")
        assert emqx.deleted == []
        assert await kicker.kick("acme", "th-1", jti="j-new")
        assert emqx.deleted == ["th-1"]
    finally:
        await kicker.close()
