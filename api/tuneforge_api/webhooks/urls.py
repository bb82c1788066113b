"""Outbound address checks (SSRF): a webhook may not point into the operator's own network
(loopback, private ranges, link-local such as cloud metadata) unless the operator allows it.
Checked when the webhook is created and again before each delivery, since DNS can change."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


class UnsafeUrl(ValueError):
    pass


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_url(url: str, *, allow_private: bool) -> str:
    """The URL if it may be called; UnsafeUrl with the reason otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeUrl("the URL must be http(s)://host/...")
    if parts.username or parts.password:
        raise UnsafeUrl("the URL must not carry credentials")
    if allow_private:
        return url
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except socket.gaierror as exc:
        raise UnsafeUrl(f"cannot resolve {parts.hostname}") from exc
    for info in infos:
        if not _is_public(str(info[4][0])):
            raise UnsafeUrl(f"{parts.hostname} resolves to a private or loopback address")
    return url
