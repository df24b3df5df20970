"""The socket scaleboxd listens on when systemd passes none (run by hand, the tests).

asyncio turns Nagle's algorithm off (TCP_NODELAY) only on connections whose
socket object says IPPROTO_TCP. A socket made as socket(family, SOCK_STREAM)
says 0, and so do the connections accepted on it: uvicorn writes a response's
head and its body in two sends, the second waited for the client's delayed ACK,
and every answer on a kept-alive connection came ~40 ms late (median 45.6 ms
against 3.0 ms, a local daemon, 30 s of sequential GET /health). systemd's socket
says IPPROTO_TCP (the kernel's SO_PROTOCOL), so an installed server never had it.
Real sockets on loopback and asyncio's real loop, as uvicorn serves them.
"""

from __future__ import annotations

import asyncio
import socket

from scalebox.daemon import systemd


async def _nodelay_of_accepted(listening: socket.socket) -> int:
    """TCP_NODELAY of a connection accepted on ``listening`` by asyncio's server."""
    seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    server = await asyncio.get_running_loop().create_server(Probe, sock=listening)
    async with server:
        port = listening.getsockname()[1]
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()


def test_connections_on_the_socket_scaleboxd_binds_send_without_waiting_for_acks() -> None:
    listening = systemd.bind_socket("127.0.0.1", 0)
    assert listening.proto == socket.IPPROTO_TCP
    assert asyncio.run(_nodelay_of_accepted(listening)) != 0


def test_as_on_the_socket_systemd_passes() -> None:
    """The reference: a socket taken over by its descriptor, as from systemd."""
    made = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    made.bind(("127.0.0.1", 0))
    made.listen()
    made.setblocking(False)
    passed = socket.socket(fileno=made.detach())
    assert passed.proto == socket.IPPROTO_TCP
    assert asyncio.run(_nodelay_of_accepted(passed)) != 0
