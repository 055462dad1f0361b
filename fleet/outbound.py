"""Where the server may send requests it makes on a user's behalf (webhooks).

A webhook URL is chosen by an operator, so without a check the server would post to
anything it can reach: its own loopback ports, the cloud metadata address, the database
or Redis by their compose service names. Only public addresses are allowed by default;
``WEBHOOK_ALLOWED_HOSTS`` lists trusted internal receivers (host names, addresses or
networks in CIDR form).

The check runs twice: when the URL is saved (a clear error for the operator) and when a
delivery connects. At connect time the name is resolved once, every address it resolves
to must pass, and the request goes to that checked address (with the original ``Host``
and TLS server name), so a name that resolves elsewhere a moment later changes nothing.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from django.conf import settings

__all__ = ["AddressRefused", "Target", "resolve_target", "url_refusal"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AddressRefused(Exception):
    """The URL points somewhere the server does not send requests to."""


@dataclass(frozen=True)
class Target:
    """A checked destination: connect to ``address``, but speak to ``host``."""

    scheme: str
    host: str
    port: int
    address: str
    path: str

    @property
    def url(self) -> str:
        """The URL with the checked address in place of the name."""
        shown = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.scheme}://{shown}:{self.port}{self.path}"

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


def _allowed_entries() -> list[str]:
    value = getattr(settings, "WEBHOOK_ALLOWED_HOSTS", [])
    if isinstance(value, str):
        value = [v for v in value.split(",")]
    return [str(v).strip().lower() for v in value if str(v).strip()]


def _allow_listed(host: str, address: IPAddress | None) -> bool:
    for entry in _allowed_entries():
        if entry == host:
            return True
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
    return False


def _public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def _parts(url: str) -> tuple[str, str, int, str]:
    try:
        split = urlsplit(url)
        port = split.port
    except ValueError as exc:
        raise AddressRefused(f"not a valid URL: {exc}") from None
    scheme = split.scheme.lower()
    if scheme not in ("http", "https"):
        raise AddressRefused("only http:// and https:// URLs are allowed")
    host = (split.hostname or "").lower().rstrip(".")
    if not host:
        raise AddressRefused("the URL has no host")
    if split.username or split.password:
        raise AddressRefused("credentials in the URL are not allowed; sign with the secret instead")
    path = split.path or "/"
    if split.query:
        path += "?" + split.query
    return scheme, host, port or (443 if scheme == "https" else 80), path


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    # The resolver also reads the old numeric forms (127.1, 0x7f.1, 2130706433) as addresses.
    if all(c in "0123456789abcdefx." for c in host) and any(c.isdigit() for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def url_refusal(url: str) -> str | None:
    """Why ``url`` may not receive webhooks, judged without waiting on DNS; None when it may.

    Literal addresses are judged here; names that do not look public (``localhost``, a
    single label such as a compose service, ``.local``/``.internal``) are refused; other
    names are resolved when a delivery connects.
    """
    try:
        _, host, _, _ = _parts(url)
    except AddressRefused as exc:
        return str(exc)
    address = _literal(host)
    if _allow_listed(host, address):
        return None
    if address is not None:
        return None if _public(address) else f"{host} is not a public address"
    if host == "localhost" or host.endswith((".localhost", ".local", ".internal", ".lan", ".home.arpa")):
        return f"{host} names an internal host"
    if "." not in host:
        return f"{host} is a single-label name (an internal service); use a public name or allow-list it"
    return None


def resolve_target(url: str) -> Target:
    """Resolve ``url``'s host once and return a destination whose every address is allowed."""
    reason = url_refusal(url)
    if reason is not None:
        raise AddressRefused(reason)
    scheme, host, port, path = _parts(url)
    literal = _literal(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise AddressRefused(f"cannot resolve {host}: {exc}") from None
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not addresses:
        raise AddressRefused(f"{host} resolves to no address")
    for address in addresses:
        if not _public(address) and not _allow_listed(host, address):
            raise AddressRefused(f"{host} resolves to {address}, which is not a public address")
    return Target(scheme=scheme, host=host, port=port, address=str(addresses[0]), path=path)
