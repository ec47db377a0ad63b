"""Which endpoints may be registered: http(s) URLs whose host the operator allowed, by
name or by network (the fleet's CIDRs), and never an any-address."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from schemas.config import is_unspecified
from services.common.errors import ValidationFailed


def host_allowed(host: str, allowlist: list[str]) -> bool:
    """Exact names, ``*.suffix`` wildcards, IPs and CIDR networks; never a DNS lookup."""
    host = host.lower().rstrip(".")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in allowlist:
        if address is not None and ("/" in entry or _is_ip(entry)):
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        elif entry.startswith("*."):
            if host.endswith(entry[1:]):
                return True
        elif host == entry:
            return True
    return False


def check_endpoint(endpoint: str, allowlist: list[str]) -> None:
    """An endpoint routers on other hosts can call: never the any-address a wrapper binds
    (whatever the allowlist says), and a host the operator allowed."""
    host = urlsplit(endpoint).hostname or ""
    if is_unspecified(host):
        raise ValidationFailed(
            f"endpoint host {host!r} is the any-address, which no router can call: the "
            "wrapper must advertise the address it is reached at (wrappers.<name>.advertise)",
            param="endpoint",
            code="endpoint_unspecified",
        )
    if not host_allowed(host, allowlist):
        raise ValidationFailed(
            f"endpoint host {host!r} is not in the registry's endpoint allowlist",
            param="endpoint",
            code="endpoint_not_allowed",
        )


def _is_ip(entry: str) -> bool:
    try:
        ipaddress.ip_address(entry)
    except ValueError:
        return False
    return True
