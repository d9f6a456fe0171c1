"""Multiaddr settings checked at the door, before any DHT or libp2p daemon starts.

Each address is parsed with py-multiaddr (the ``multiaddr`` package) and held to what hivemind 1.1 and its libp2p
daemon (p2pd) do with it, so that a bad one is a one-line error naming the setting and the value instead of a
daemon traceback seconds later. The parsers return the addresses in py-multiaddr's canonical text.

A dialable address is HOST/TRANSPORT, where HOST is /ip4/ADDR, /ip6/ADDR, /dns/NAME, /dns4/NAME or /dns6/NAME and
TRANSPORT is /tcp/PORT (optionally followed by /ws, /wss or /tls/ws) or /udp/PORT/quic-v1: the transports p2pd
speaks (plain /udp and the old /quic have none).

- initial peer (dialled by p2pd, pinged by hivemind's DHTNode, which reads the peer ID from its /p2p/ part):
  HOST/TRANSPORT/p2p/PEER_ID with a real host (not 0.0.0.0 or ::) and port (not 0), or /dnsaddr/NAME/p2p/PEER_ID,
  or a relayed address as peers list it, HOST/TRANSPORT/p2p/RELAY_ID/p2p-circuit/p2p/PEER_ID (accepted so that a
  peer's whole address list can be pasted; hivemind pings the first ID, the relay's, so give a direct one too).
- host maddr (where p2pd listens): /ip4, /ip6, /dns4 or /dns6 (p2pd cannot listen on /dns), then /tcp/PORT,
  /tcp/PORT/ws or /udp/PORT/quic-v1; port 0 is any free port; nothing after it (p2pd refuses /p2p/ there, and
  /wss needs a TLS certificate it does not have). At least one is needed.
- announce maddr (what others are told to dial): HOST/TRANSPORT with a real host and an explicit port (hivemind
  refuses port 0), and no /p2p/ part (hivemind appends its own).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from multiaddr import Multiaddr
from multiaddr.exceptions import Error as PyMultiaddrError

Part = tuple[str, str | None]  # (protocol name, value), e.g. ("tcp", "31337") or ("quic-v1", None)

DIAL_HOSTS = ("ip4", "ip6", "dns", "dns4", "dns6")
LISTEN_HOSTS = ("ip4", "ip6", "dns4", "dns6")
# What may follow /tcp/PORT or /udp/PORT; longest first, so that the longest match wins.
DIAL_TAILS: dict[str, list[tuple[str, ...]]] = {"tcp": [("tls", "ws"), ("ws",), ("wss",), ()], "udp": [("quic-v1",)]}
LISTEN_TAILS: dict[str, list[tuple[str, ...]]] = {"tcp": [("ws",), ()], "udp": [("quic-v1",)]}
_HINT = "copy a full address from the peer's log or its --ready-file"


class MaddrError(ValueError):
    """A multiaddr setting has a bad value; the message is one line naming the setting, the value and why."""

    def __init__(self, field: str, value: object, problem: str) -> None:
        self.field, self.value, self.problem = field, value, problem
        super().__init__(f"{field}: {value!r} {problem}")


def parse_maddr(value: Any, field: str) -> Multiaddr:
    """One multiaddr, parsed. Rule: a string that starts with '/' and that py-multiaddr parses into at least one
    protocol; a multiaddr object (py-multiaddr's or hivemind's copy) is read as its text."""
    if isinstance(value, str):
        text = value
    elif hasattr(value, "protocols") and hasattr(value, "to_bytes"):  # a Multiaddr object of either library
        text = str(value)
    else:
        raise MaddrError(field, value, "is not a multiaddr string")
    if not text.strip():
        raise MaddrError(field, value, "is not a valid multiaddr: it is empty")
    if not text.startswith("/"):  # py-multiaddr tolerates a missing '/', p2pd does not
        raise MaddrError(
            field, value, "is not a valid multiaddr: it must start with '/' (e.g. /ip4/203.0.113.5/tcp/31337)"
        )
    try:
        maddr = Multiaddr(text)
    except PyMultiaddrError as e:
        raise MaddrError(field, value, f"is not a valid multiaddr: {getattr(e, 'message', e)}") from None
    if not _parts(maddr):
        raise MaddrError(field, value, "is not a valid multiaddr: it names no protocol")
    return maddr


def parse_initial_peer(value: Any, field: str) -> str:
    """An address to join through: HOST/TRANSPORT/p2p/PEER_ID, its relayed form or /dnsaddr/NAME/p2p/PEER_ID."""
    maddr = parse_maddr(value, field)
    parts = _parts(maddr)
    names = [name for name, _ in parts]
    problem = "cannot be an initial peer:"
    if names[0] == "dnsaddr":
        if names != ["dnsaddr", "p2p"]:
            raise MaddrError(field, value, f"{problem} a /dnsaddr/ address must be /dnsaddr/NAME/p2p/<peer id>")
        return str(maddr)
    port, rest = _split_address(parts, DIAL_HOSTS, DIAL_TAILS, field, value, problem)
    _check_dialable(parts, port, field, value, problem)
    if not rest:
        raise MaddrError(field, value, f"{problem} it lacks the /p2p/<peer id> part that hivemind needs; {_HINT}")
    if [name for name, _ in rest] not in (["p2p"], ["p2p", "p2p-circuit", "p2p"]):
        raise MaddrError(
            field,
            value,
            f"{problem} only /p2p/<peer id> (or /p2p/<relay id>/p2p-circuit/p2p/<peer id>) may follow the transport, "
            f"not {_text(rest)}",
        )
    return str(maddr)


def parse_host_maddr(value: Any, field: str) -> str:
    """An address to listen on: /ip4|/ip6|/dns4|/dns6 ADDR, then /tcp/PORT[/ws] or /udp/PORT/quic-v1 (port 0: any)."""
    maddr = parse_maddr(value, field)
    problem = "cannot be listened on:"
    _, rest = _split_address(_parts(maddr), LISTEN_HOSTS, LISTEN_TAILS, field, value, problem)
    if rest:
        raise MaddrError(field, value, f"{problem} nothing may follow the transport here, not {_text(rest)}")
    return str(maddr)


def parse_announce_maddr(value: Any, field: str) -> str:
    """An address others should dial: HOST/TRANSPORT with a real host and port, without /p2p/ (hivemind adds it)."""
    maddr = parse_maddr(value, field)
    parts = _parts(maddr)
    problem = "cannot be announced:"
    port, rest = _split_address(parts, DIAL_HOSTS, DIAL_TAILS, field, value, problem)
    _check_dialable(parts, port, field, value, problem)
    if rest:
        raise MaddrError(
            field, value, f"{problem} nothing may follow the transport (hivemind adds /p2p/ itself), not {_text(rest)}"
        )
    return str(maddr)


def parse_initial_peers(values: Iterable[Any], field: str) -> list[str]:
    """Every value by parse_initial_peer. An empty list passes: whether one is required is the config's rule."""
    return [parse_initial_peer(value, field) for value in _listed(values, field)]


def parse_host_maddrs(values: Iterable[Any], field: str) -> list[str]:
    """Every value by parse_host_maddr; at least one (with none, p2pd would pick its own listen addresses)."""
    listed = _listed(values, field)
    if not listed:
        raise MaddrError(field, values, "is empty: give at least one address to listen on (e.g. /ip4/0.0.0.0/tcp/0)")
    return [parse_host_maddr(value, field) for value in listed]


def parse_announce_maddrs(values: Iterable[Any], field: str) -> list[str]:
    """Every value by parse_announce_maddr; an empty list passes (p2pd then announces what it listens on)."""
    return [parse_announce_maddr(value, field) for value in _listed(values, field)]


def _listed(values: Iterable[Any], field: str) -> list[Any]:
    # list("/ip4/...") would check each character: one string for a list is a mistake of its own
    if isinstance(values, str | bytes):
        raise MaddrError(field, values, "is one string: give a list of multiaddrs")
    return list(values)


def _parts(maddr: Multiaddr) -> list[Part]:
    return [(protocol.name, value) for protocol, value in maddr.items()]


def _text(parts: list[Part]) -> str:
    return "".join(f"/{name}" if value is None else f"/{name}/{value}" for name, value in parts)


def _split_address(
    parts: list[Part],
    hosts: tuple[str, ...],
    tails: dict[str, list[tuple[str, ...]]],
    field: str,
    value: Any,
    problem: str,
) -> tuple[int, list[Part]]:
    """Check that `parts` start with HOST/TRANSPORT; return the port and the parts after the transport."""
    if parts[0][0] not in hosts:
        allowed = ", ".join("/" + h for h in hosts)
        raise MaddrError(field, value, f"{problem} it must start with the host ({allowed}), not /{parts[0][0]}")
    if len(parts) < 2 or parts[1][0] not in tails:
        raise MaddrError(field, value, f"{problem} the host must be followed by /tcp/PORT or /udp/PORT/quic-v1")
    transport, port = parts[1][0], int(parts[1][1] or 0)
    rest = parts[2:]
    for tail in tails[transport]:
        if tuple(name for name, _ in rest[: len(tail)]) == tail:
            return port, rest[len(tail) :]
    shapes = " or ".join(_text([(transport, "PORT"), *((name, None) for name in tail)]) for tail in tails[transport])
    raise MaddrError(field, value, f"{problem} its transport must be {shapes} (p2pd speaks no other)")


def _check_dialable(parts: list[Part], port: int, field: str, value: Any, problem: str) -> None:
    """Others must be able to connect: a specific host (not 0.0.0.0 or ::) and port (not 0)."""
    name, host = parts[0]
    if name in ("ip4", "ip6") and ipaddress.ip_address(host or "").is_unspecified:
        raise MaddrError(field, value, f"{problem} {host} only means 'every local address' to a listener")
    if port == 0:
        raise MaddrError(field, value, f"{problem} port 0 only means 'any free port' to a listener")
