"""The client's side of direct connections (peers.direct): attach an inference session to the TLS listener its
peer offered, pinning the offer's certificate hash and presenting its ticket.

Only hosts that the libp2p daemon already knows as the peer's addresses are dialled: an offer cannot send the
client to connect anywhere else. Any failure leaves the session on its libp2p stream (the caller falls back).
"""

from __future__ import annotations

import asyncio
import ssl

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from peers.direct import MAX_ATTACH_BYTES, Connection, certificate_sha256, ip_of
from peers.wire import Attach, Attached, DirectOffer, ProtocolError, receive_message, send_message


class DirectConnectError(ConnectionError):
    """No direct connection to the peer for this session (the session stays on its libp2p stream)."""


def client_context() -> ssl.SSLContext:
    """TLS 1.3 with no certificate authority: the peer's self-signed certificate is pinned by hash instead."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # checked below against the hash the authenticated stream gave
    return context


_CONTEXT = client_context()


async def known_hosts(p2p: P2P, peer_id: PeerID) -> set[str]:
    """IP addresses the libp2p daemon holds for `peer_id` (of the connection it has to it)."""
    return {ip for info in await p2p.list_peers() if info.peer_id == peer_id for ip in map(ip_of, info.addrs) if ip}


async def connect_direct(p2p: P2P, peer_id: PeerID, offer: DirectOffer, session_id: int, timeout: float) -> Connection:
    """A direct connection attached to session `session_id`, or DirectConnectError saying why not."""
    allowed = await known_hosts(p2p, peer_id)
    hosts = [host for host in offer.hosts if host in allowed]
    if not hosts:
        raise DirectConnectError(f"none of the offered hosts {list(offer.hosts)} is a known address of the peer")
    errors = []
    for host in hosts:
        writer = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, offer.port, ssl=_CONTEXT, server_hostname="")
                der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
                if der is None or certificate_sha256(der) != offer.cert_sha256:
                    raise ProtocolError("the listener's certificate is not the one the peer offered")
                await send_message(Attach(offer.ticket).encode(), writer)
                reply = await receive_message(reader, runtime_pb2.ExpertResponse, max_bytes=MAX_ATTACH_BYTES)
                if reply is None:
                    raise ConnectionError("the peer closed the connection (ticket refused)")
                Attached.decode(reply, session_id)
            return reader, writer
        except Exception as e:  # noqa: BLE001 - each host's failure is reported together below
            if writer is not None:
                writer.close()
            errors.append(f"{host}:{offer.port}: {type(e).__name__}: {e}")
    raise DirectConnectError("; ".join(errors))
