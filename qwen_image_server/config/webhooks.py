"""What the webhook settings accept: the signing secret's form, URLs without credentials, and
which hosts a webhook may call (`QWEN_IMAGE_WEBHOOK_ALLOWED_HOSTS`): public addresses, plus the
names, addresses and networks the operator lists.

A client names the URL a webhook goes to; without this, it could make the server call anything
the server can reach (its own loopback ports, the cloud's metadata service at 169.254.169.254,
hosts on the private network) and learn from the answers. So every address that is not public
is refused unless the operator listed the host's name, or the address (or a network holding it).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from dataclasses import dataclass

from pydantic import HttpUrl

# Standard Webhooks: a secret is "whsec_" and the key in base64, 24 to 64 bytes of it.
SECRET_PREFIX = "whsec_"
SECRET_BYTES = (24, 64)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def check_webhook_secret(secret: str) -> bytes:
    """The key of a secret written as Standard Webhooks writes it; ValueError (no part of the
    secret in it) otherwise."""
    encoded = secret.strip()
    if not encoded.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret starts with {SECRET_PREFIX!r}, then the key in base64")
    try:
        key = base64.b64decode(encoded.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"a webhook secret is {SECRET_PREFIX!r} and the key in base64; this is not base64") from None
    low, high = SECRET_BYTES
    if not low <= len(key) <= high:
        raise ValueError(f"a webhook secret's key is {low} to {high} bytes; this one is {len(key)}")
    return key


def without_credentials(url: HttpUrl | None) -> HttpUrl | None:
    """Validator: a webhook URL names no user or password (they would sit in logs and in the
    outbox; receivers check the signature instead)."""
    if url is not None and (url.username or url.password):
        raise ValueError("a webhook URL carries no user name or password (receivers check the signature instead)")
    return url


def parse_ip(text: str) -> IPAddress | None:
    """An IP address as a URL or a listing writes it ('10.0.0.1', '::1', '[::1]'); None for a name."""
    try:
        return ipaddress.ip_address(text.strip().removeprefix("[").removesuffix("]"))
    except ValueError:
        return None


def check_allowed_host(entry: str) -> str:
    """One entry of the list, canonical: a host name (lowercased), an IP address, or a network in
    CIDR notation ('10.1.0.0/16'); ValueError for anything else (a URL, a port, a wildcard)."""
    text = entry.strip().lower()
    address = parse_ip(text)
    if address is not None:
        return str(address)
    if "/" in text:
        try:
            return str(ipaddress.ip_network(text, strict=False))
        except ValueError:
            pass
    elif text and all(part and all(c.isalnum() or c in "-_" for c in part) for part in text.rstrip(".").split(".")):
        return text.rstrip(".")
    raise ValueError(f"{entry.strip()!r} is not a host name, an IP address or a network like 10.0.0.0/8 "
                     "(no scheme, port, path or wildcard)")


def public(address: IPAddress) -> bool:
    """True for an address anyone on the internet could have: not loopback, private, link-local,
    multicast, reserved or unspecified (nor shared or documentation space: `is_global`)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return address.is_global and not (
        address.is_loopback or address.is_private or address.is_link_local or address.is_multicast
        or address.is_reserved or address.is_unspecified)


@dataclass(frozen=True)
class AllowedHosts:
    """The operator's list, parsed: names, and addresses as one-address networks."""

    names: frozenset[str]
    networks: tuple[IPNetwork, ...]

    @classmethod
    def of(cls, entries: list[str]) -> AllowedHosts:
        """From entries already checked by `check_allowed_host`."""
        canonical = [check_allowed_host(entry) for entry in entries]
        networks = []
        names = set()
        for entry in canonical:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                names.add(entry)
        return cls(frozenset(names), tuple(networks))

    def allows(self, host: str, address: IPAddress) -> bool:
        """May a webhook to `host` (as the URL names it) connect to `address` (what it resolved to)?"""
        if host.lower().rstrip(".") in self.names or public(address):
            return True
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        return any(a in network for network in self.networks for a in (address, mapped)
                   if a is not None and a.version == network.version)
