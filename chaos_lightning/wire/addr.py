"""Addresses: the one ``HOST:PORT`` parser of the whole package.

Role in the whole: every address a node is given or learns (its bind, its
peers, a member's store and state-server endpoints, an etcd endpoint, a
torchrun endpoint) is split here and nowhere else, so an IPv6 address, a
missing port or a port of 99999 means the same thing, and reads the same
one-line error, at every layer.  It sits in ``wire`` (the bottom floor) so
that every layer above may import it.

Rules: ``HOST`` is an IPv4 address, a bracketed IPv6 address
(``[::1]:7000``, a zone ``[fe80::1%eth0]:7000`` too) or a syntactically valid
host name; an unbracketed IPv6 address is refused because its last group
cannot be told from a port.  ``PORT`` is 1-65535, or 0 where the caller binds
("any free port").  The host is returned without brackets, ready for
``socket``/``asyncio``; :func:`format_hostport` puts them back.
"""

from __future__ import annotations

import ipaddress
import re

#: RFC 1123 host names (labels of letters, digits, '-', and '_' which real
#: networks use in container names), at most 253 characters in all
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")


class AddressError(ValueError):
    """A malformed ``HOST:PORT``; the message is one line that quotes the input.

    ``reason`` alone ("port must be 1-65535") lets a caller name its own
    source: ``chaos: CHAOS_BIND port must be 1-65535, got '...'``.
    """

    def __init__(self, text: object, reason: str):
        self.text = text
        self.reason = reason
        super().__init__(f"invalid address {text!r}: {reason}")


def parse_hostport(text: str, *, allow_port0: bool = False) -> tuple[str, int]:
    """Split and validate ``HOST:PORT`` (``[v6]:PORT`` for IPv6) into ``(host, port)``.

    ``allow_port0``: port 0 is accepted (binding: "the OS picks").  Raises
    :class:`AddressError` (a ``ValueError``) naming what is wrong: no port, a
    port that is not a number, a port out of range, a host that is neither an
    address nor a name.
    """
    if not isinstance(text, str):
        raise AddressError(text, "must be a HOST:PORT string")
    raw = text.strip()
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port:
        raise AddressError(text, "must be HOST:PORT")
    if host.startswith("["):
        if not host.endswith("]"):
            raise AddressError(text, "has unbalanced brackets")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise AddressError(text, f"host {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise AddressError(text, "must bracket an IPv6 address: [ADDR]:PORT")
    else:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            # "1.2.3" or "999.1.1.1" look like a mistyped address, not a name
            if re.fullmatch(r"[0-9.]+", host) or not _HOSTNAME.match(host):
                raise AddressError(text, f"host {host!r} is neither an IP address nor a host name") from None
    if not port.isascii() or not port.isdigit():
        raise AddressError(text, f"port {port!r} is not a number")
    number = int(port)
    if number > 65535 or (number == 0 and not allow_port0):
        raise AddressError(text, "port must be " + ("0-65535" if allow_port0 else "1-65535"))
    return host, number


def format_hostport(host: str, port: int) -> str:
    """``HOST:PORT``, bracketing IPv6 addresses (the inverse of :func:`parse_hostport`)."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def normalize_hostport(text: str, *, allow_port0: bool = False) -> str:
    """``text`` validated and written canonically (stripped, IPv6 bracketed)."""
    return format_hostport(*parse_hostport(text, allow_port0=allow_port0))


def parse_hostport_list(text: str) -> tuple[str, ...]:
    """A comma-separated list of ``HOST:PORT`` (empty items ignored), each normalized."""
    return tuple(normalize_hostport(part) for part in text.split(",") if part.strip())
