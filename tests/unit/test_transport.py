"""lightkube's requests over aiohttp (cpt_operator/k8s/transport.py), against a real HTTP
server on loopback: what httpx's callers rely on (headers, bodies, encodings, streaming,
errors) is unchanged."""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import Awaitable, Callable

import httpx2 as httpx
import pytest
from aiohttp import web

from cpt_operator.k8s.transport import AiohttpTransport

pytestmark = pytest.mark.unit

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _serve(routes: dict[str, Handler]) -> tuple[web.AppRunner, str]:
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_route("*", path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def _client(base: str, **kw: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base,
        transport=AiohttpTransport(False),
        auth=httpx.BasicAuth("u", "p") if kw.pop("auth", False) else None,
        **kw,  # type: ignore[arg-type]
    )


def test_headers_and_bodies_pass_unchanged_once() -> None:
    headers: list[tuple[str, str]] = []
    body: list[bytes] = []

    async def echo(request: web.Request) -> web.Response:
        headers.extend((k.lower(), v) for k, v in request.headers.items())
        body.append(await request.read())
        return web.json_response({"ok": True}, status=201, headers={"X-Answer": "42"})

    async def main() -> httpx.Response:
        runner, base = await _serve({"/things": echo})
        try:
            async with _client(base, auth=True) as client:
                return await client.post("/things?dryRun=All", json={"a": "é" * 3})
        finally:
            await runner.cleanup()

    resp = asyncio.run(main())
    assert resp.status_code == 201 and resp.json() == {"ok": True}
    assert resp.headers["x-answer"] == "42"
    assert body == ['{"a":"ééé"}'.encode()]
    names = [k for k, _ in headers]
    for once in ("accept", "accept-encoding", "user-agent", "authorization", "content-type"):
        assert names.count(once) == 1, (once, headers)
    assert dict(headers)["authorization"].startswith("Basic ")


def test_a_compressed_answer_is_decoded_once_by_httpx() -> None:
    async def zipped(request: web.Request) -> web.Response:
        return web.Response(
            body=gzip.compress(b'{"items": []}'),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    async def main() -> object:
        runner, base = await _serve({"/list": zipped})
        try:
            async with _client(base) as client:
                return (await client.get("/list")).json()
        finally:
            await runner.cleanup()

    assert asyncio.run(main()) == {"items": []}


def test_a_streamed_answer_arrives_line_by_line_as_it_is_sent() -> None:
    """A watch: the first event is read before the server sends the second."""
    first_read = asyncio.Event

    async def main() -> list[str]:
        got_first = first_read()

        async def watch(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse()
            await resp.prepare(request)
            await resp.write(b'{"type":"ADDED"}\n')
            await asyncio.wait_for(got_first.wait(), 5)
            await resp.write(b'{"type":"DELETED"}\n')
            await resp.write_eof()
            return resp

        runner, base = await _serve({"/watch": watch})
        lines: list[str] = []
        try:
            async with _client(base) as client:
                req = client.build_request("GET", "/watch", timeout=httpx.Timeout(5, read=None))
                resp = await client.send(req, stream=True)
                try:
                    async for line in resp.aiter_lines():
                        lines.append(line)
                        got_first.set()
                finally:
                    await resp.aclose()
        finally:
            await runner.cleanup()
        return lines

    assert asyncio.run(main()) == ['{"type":"ADDED"}', '{"type":"DELETED"}']


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_failures_come_back_as_httpx_errors() -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(text="late")

    async def main() -> tuple[BaseException, BaseException, int]:
        errors = []
        async with _client(f"http://127.0.0.1:{_free_port()}") as client:
            try:
                await client.get("/")
            except httpx.HTTPError as err:
                errors.append(err)
        runner, base = await _serve({"/slow": slow, "/ok": slow})
        try:
            async with _client(base, timeout=httpx.Timeout(5, read=0.2)) as client:
                try:
                    await client.get("/slow")
                except httpx.HTTPError as err:
                    errors.append(err)
                # the client still works after a timeout
                ok = await client.get("/ok", timeout=httpx.Timeout(5))
        finally:
            await runner.cleanup()
        return errors[0], errors[1], ok.status_code

    refused, timed_out, status = asyncio.run(main())
    assert isinstance(refused, httpx.ConnectError)
    assert isinstance(timed_out, httpx.ReadTimeout)
    assert status == 200


def test_closing_the_client_closes_the_session() -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def main() -> None:
        runner, base = await _serve({"/": ok})
        transport = AiohttpTransport(False)
        try:
            async with httpx.AsyncClient(base_url=base, transport=transport) as client:
                assert (await client.get("/")).text == "ok"
                session = transport._session
                assert session is not None and not session.closed
            assert session.closed and transport._session is None
        finally:
            await runner.cleanup()

    asyncio.run(main())
