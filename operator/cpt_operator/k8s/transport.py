"""lightkube's requests over aiohttp: an httpx transport (httpx's public extension point, which
lightkube takes as `AsyncClient(transport=...)`).

Why: the client's own CPU per request. Measured against the local API server, 16 requests at
a time (docs/PERFORMANCE.md section 5): a GET cost the operator 1.1 ms of CPU and a 4 KB
create 1.6 ms through httpx's connection pool (httpcore scans every pooled connection, and
asks each socket for its attributes, on every request and every release), against 0.7 and
0.9 ms with this transport. Under a burst of new runs the operator is CPU-bound, so that is
latency. aiohttp is already in the image (kopf's client).

What stays lightkube's and httpx's: the kubeconfig or in-cluster config, authentication
(bearer token, token file re-read on 401, exec plugins: httpx's auth flow runs before the
transport), URLs, and decoding (the response's Content-Encoding is left to httpx, so aiohttp
does not decompress). TLS is lightkube's own context for the cluster (its CA, client
certificate).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import aiohttp
import httpx2 as httpx

# httpx's own defaults would be sent again by aiohttp: the request already carries them.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding")


def _error(err: BaseException, request: httpx.Request, *, reading: bool) -> httpx.TransportError:
    """aiohttp's failure as the httpx error lightkube and callers handle."""
    message = str(err) or type(err).__name__
    if isinstance(err, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message, request=request)
    if isinstance(err, aiohttp.SocketTimeoutError):  # no data within the read timeout
        return httpx.ReadTimeout(message, request=request)
    if isinstance(err, TimeoutError):
        if reading:
            return httpx.ReadTimeout(message, request=request)
        return httpx.PoolTimeout(message, request=request)  # waiting for a connection
    if isinstance(err, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message, request=request)
    if isinstance(err, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError(message, request=request)
    return httpx.ReadError(message, request=request)


class _Body(httpx.AsyncByteStream):
    """The response body as aiohttp reads it (watches: as events arrive)."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as err:
            raise _error(err, self._request, reading=True) from err

    async def aclose(self) -> None:
        self._response.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One aiohttp session (made in the running event loop on first use) with up to
    `limit` connections; concurrency is capped above it, in `Kube`."""

    def __init__(self, ssl_context: ssl.SSLContext | bool, *, limit: int = 100) -> None:
        self._ssl = ssl_context
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=self._limit),
                auto_decompress=False,
                skip_auto_headers=_SKIP_AUTO_HEADERS,
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        limits = request.extensions.get("timeout") or {}
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=limits.get("pool"),
            sock_connect=limits.get("connect"),
            sock_read=limits.get("read"),  # None for watches: they wait for events
        )
        body = await request.aread()
        try:
            response = await self._session_now().request(
                request.method,
                str(request.url),
                headers=request.headers.multi_items(),
                data=body or None,
                timeout=timeout,
                allow_redirects=False,
            )
        except (TimeoutError, aiohttp.ClientError) as err:
            raise _error(err, request, reading=False) from err
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=_Body(response, request),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
