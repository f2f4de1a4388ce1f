"""A TCP forwarder: ``forward.py LISTEN_HOST:PORT TARGET_HOST:PORT``.

The real node's pods live in their own network namespaces; the apiserver and the S3 server
listen on loopback only. This passes connections from an address pods can reach (the bridge's
gateway, the ``kubernetes`` Service's ClusterIP on the bridge) to the loopback server, the
job kube-proxy's rules do on a real cluster. Runs until SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.CancelledError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.close()


async def main(listen: str, target: str) -> None:
    lhost, lport = listen.rsplit(":", 1)
    thost, tport = target.rsplit(":", 1)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            treader, twriter = await asyncio.open_connection(thost, int(tport))
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, twriter), _pipe(treader, writer))

    server = await asyncio.start_server(handle, lhost, int(lport), reuse_address=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
