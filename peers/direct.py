"""Direct connections: a TLS listener through which a client may move an inference session's steps and replies off
the libp2p stream. Each message then crosses one socket each way instead of two daemons (client -> p2pd -> p2pd ->
peer), which is most of a token's network time on a fast link.

Why it is as safe as the stream (see peers.wire.messages.DirectOffer): the listener's certificate is self-signed,
made at start, and its SHA-256 reaches the client inside the libp2p stream, which is encrypted and authenticated by
peer ID; the client accepts no other certificate. The client proves it is the one that opened the session with the
offer's one-time ticket (Attach), sent inside TLS. Every limit on what an unauthenticated connection may cost is a
setting: the TLS handshake and the ticket must come within `handshake_timeout`; at most `max_pending` connections
may be waiting for a ticket; the ticket frame is at most MAX_ATTACH_BYTES. An attached connection is bounded by its
session (one per session; it ends with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import ipaddress
import logging
import secrets
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hivemind.proto import runtime_pb2

from peers.wire import Attach, DirectOffer, ProtocolError, receive_message
from peers.wire.messages import DIRECT_TICKET_LENGTH, MAX_DIRECT_HOSTS

logger = logging.getLogger(__name__)
MAX_ATTACH_BYTES = 4096
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass(frozen=True)
class DirectSettings:
    host: str  # to listen on
    port: int  # 0: any free port
    public_hosts: tuple[str, ...]  # IP addresses told to clients
    handshake_timeout: float = 10.0
    max_pending: int = 64


def ip_of(maddr: str) -> str | None:
    """The IP address of a multiaddr text that begins with one (/ip4/A/... or /ip6/A/...), else None."""
    parts = str(maddr).split("/")
    return parts[2] if len(parts) > 2 and parts[1] in ("ip4", "ip6") else None


def direct_hosts(
    direct_host: str | None,
    public_hosts: list[str],
    host_maddrs: list[str],
    announce_maddrs: list[str],
    visible_maddrs: list[str],
) -> tuple[str, tuple[str, ...]]:
    """(the address to listen on, the addresses to offer clients), by these rules in order:
    listen on `direct_host`, else the IP of the first libp2p listen address, else every interface (0.0.0.0);
    offer `public_hosts`, else the IPs of the announced addresses, else the listen address unless it is a wildcard,
    else the (non-wildcard) IPs of the addresses the libp2p daemon sees. At most MAX_DIRECT_HOSTS, no repeats."""
    listen = direct_host or next(filter(None, map(ip_of, host_maddrs)), None) or "0.0.0.0"
    offered = list(public_hosts) or [ip for ip in map(ip_of, announce_maddrs) if ip]
    if not offered:
        offered = [listen] if not is_wildcard(listen) else [ip for ip in map(ip_of, visible_maddrs) if ip]
    unique = [ip for ip in dict.fromkeys(offered) if not is_wildcard(ip)]
    return listen, tuple(unique[:MAX_DIRECT_HOSTS])


def self_signed_certificate() -> tuple[bytes, bytes]:
    """(certificate, private key), PEM: an ECDSA P-256 certificate for this process only (clients pin its hash)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "blockswarm peer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def certificate_sha256(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def is_wildcard(host: str) -> bool:
    return ipaddress.ip_address(host).is_unspecified


class DirectListener:
    """The peer's TLS listener: hands each connection that presents a live ticket to the session that offered it."""

    def __init__(self, settings: DirectSettings):
        self.settings = settings
        self._tickets: dict[str, asyncio.Future[Connection]] = {}
        self._pending = 0
        self._server: asyncio.Server | None = None
        self._context, self.cert_sha256 = self._server_context()

    @staticmethod
    def _server_context() -> tuple[ssl.SSLContext, str]:
        cert_pem, key_pem = self_signed_certificate()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        with tempfile.TemporaryDirectory() as folder:  # ssl loads keys from files only; kept just for the load
            cert_file, key_file = Path(folder, "cert.pem"), Path(folder, "key.pem")
            cert_file.write_bytes(cert_pem)
            key_file.touch(mode=0o600)
            key_file.write_bytes(key_pem)
            context.load_cert_chain(cert_file, key_file)
        return context, certificate_sha256(ssl.PEM_cert_to_DER_cert(cert_pem.decode()))

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle,
            self.settings.host,
            self.settings.port,
            ssl=self._context,
            ssl_handshake_timeout=self.settings.handshake_timeout,
        )
        logger.info(f"direct connections (TLS) on {self.settings.host}:{self.port}, offered as {self.hosts}")

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the direct listener is not started")
        return self._server.sockets[0].getsockname()[1]

    @property
    def hosts(self) -> tuple[str, ...]:
        return self.settings.public_hosts

    def offer(self) -> tuple[DirectOffer, asyncio.Future[Connection]]:
        """A one-time offer for one session, and the future its connection arrives in. `withdraw` it when the
        session ends."""
        ticket = secrets.token_hex(DIRECT_TICKET_LENGTH // 2)
        arrived: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()
        self._tickets[ticket] = arrived
        return DirectOffer(self.hosts, self.port, self.cert_sha256, ticket), arrived

    def withdraw(self, offer: DirectOffer) -> None:
        arrived = self._tickets.pop(offer.ticket, None)
        if arrived is not None:
            arrived.cancel()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._pending >= self.settings.max_pending:
            logger.debug("direct connection refused: too many connections without a ticket yet")
            writer.close()
            return
        self._pending += 1
        try:
            async with asyncio.timeout(self.settings.handshake_timeout):
                request = await receive_message(reader, runtime_pb2.ExpertRequest, max_bytes=MAX_ATTACH_BYTES)
            if request is None:
                raise ConnectionError("closed before its ticket")
            ticket = Attach.decode(request).ticket
            arrived = self._tickets.pop(ticket, None)
            if arrived is None or arrived.done():
                raise ProtocolError("a ticket this peer does not hold (unknown, used, or its session ended)")
        except Exception as e:  # noqa: BLE001 - whatever an unauthenticated connection did, it is just closed
            logger.debug(f"direct connection from {writer.get_extra_info('peername')} closed: {e!r}")
            writer.close()
            return
        finally:
            self._pending -= 1
        arrived.set_result((reader, writer))

    async def close(self) -> None:
        for arrived in self._tickets.values():
            arrived.cancel()
        self._tickets.clear()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None
