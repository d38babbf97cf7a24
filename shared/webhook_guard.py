"""Which webhook URLs the service POSTs to: the defence against server-side request forgery (SSRF).

A URL is accepted when it is https and every address its host resolves to is public, unless the operator
allow-lists the target (``Settings.webhook_allow_hosts``: host names, or networks that must hold every
address; plain http is then allowed too). ``check_url`` returns the addresses it checked and
``shared.webhook_http`` connects to those only, so DNS rebinding gains nothing.

Public: ``is_global``, not multicast, in no ``_DENY_V4`` / ``_DENY_V6`` range and, for IPv6, in 2000::/3.
The deny-lists repeat ranges ``is_global`` excludes (its tables change between Python versions) and add
what it misses; on 3.11.7 ``is_global`` is True for multicast (224/4, ff00::/8), site-local fec0::/10,
192.0.0.9-10, 192.88.99.0/24, 3fff::/20 (documentation), IPv4-compatible ::127.0.0.1, mapped ::ffff:
public addresses, SIIT ::ffff:0:a.b.c.d, 6to4 2002::/16 and NAT64 64:ff9b::/96 whatever IPv4 they embed,
64:ff9b:1::/48 and unassigned 5f00::/16. (100.64.0.0/10 is not global, though not ``is_private``.)
IPv4-mapped and NAT64 addresses are judged by their IPv4 address, 6to4 ones by both; Teredo and the other
forms are refused outright. A host whose last label is a number is an IPv4 address as inet_aton reads it
(``2130706433``, ``0177.1``, ``0x7f.0.0.1``), never a DNS name; names are IDNA-encoded, lower-cased and
lose a trailing dot before any check; local names (``localhost``, single labels, .localhost, .local,
.internal, .localdomain, .home.arpa) need the allow-list.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, replace
from urllib.parse import quote

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]  # host, port -> addresses (strings)

MAX_URL_LENGTH = 2048
RESOLVE_TIMEOUT_S = 5.0  # system_resolver gives up on a lookup after this
MAX_PENDING_LOOKUPS = 32  # lookups still running (past their timeout too) before more are refused

_DEFAULT_PORTS = {"https": 443, "http": 80}
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_PORT = re.compile(r"[0-9]{1,5}")
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_NUMBER = re.compile(r"[0-9]+|0x[0-9a-f]*")
_ATON_PART = re.compile(r"0x([0-9a-f]*)|0([0-7]+)|([1-9][0-9]*|0)")  # hex, octal, decimal
_HTTPS_ONLY = "The webhook URL must use https."
# The same words whether a name does not resolve or resolves to a private address: a tenant must not
# learn which internal names the service's resolver knows.
_NOT_PUBLIC = (
    "The webhook host {} must resolve to public addresses only "
    "(it does not resolve, or resolves to a private or reserved address)."
)
_SPECIAL_SUFFIXES = (".localhost", ".local", ".internal", ".localdomain", ".home.arpa")

# 0/8 unspecified, RFC 1918, 100.64/10 CGNAT (Alibaba metadata 100.100.100.200), loopback, 169.254/16
# link-local (cloud metadata 169.254.169.254), 192.0.0/24 IETF, documentation, 192.88.99/24 6to4 relay
# anycast, 198.18/15 benchmarking, 224/4 multicast, 240/4 reserved with broadcast 255.255.255.255
# fmt: off
_DENY_V4 = tuple(ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
))
# fmt: on
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")  # all other IPv6 space is special or unassigned
# 2001::/23 IETF (Teredo 2001::/32, benchmarking 2001:2::/48, ORCHID), documentation 2001:db8::/32, 3fff::/20
_DENY_V6 = tuple(ipaddress.IPv6Network(n) for n in ("2001::/23", "2001:db8::/32", "3fff::/20"))
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class WebhookForbidden(ValueError):
    """A webhook target the service refuses; .message is a sentence for the tenant (no internals)."""

    code = "webhook_forbidden"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class AllowList:
    """Targets allowed although private or plain http: exact host names, or networks."""

    hosts: frozenset[str]  # lower-case host names, exact match
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def parse(cls, setting: str) -> AllowList:
        """``"localhost, 127.0.0.0/8, ::1, hooks.internal"``; raises ValueError on a bad entry."""
        hosts: set[str] = set()
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for raw in setting.split(","):
            entry = raw.strip()
            if not entry:
                continue
            if "/" in entry or ":" in entry or _looks_numeric(entry.lower().rstrip(".")):
                try:
                    networks.append(ipaddress.ip_network(entry))
                except ValueError as exc:
                    raise ValueError(f"webhook allow-list entry {entry!r} is not a network: {exc}") from exc
                continue
            try:
                hosts.add(_normalise_name(entry))
            except WebhookForbidden as exc:
                raise ValueError(f"webhook allow-list entry {entry!r} is not a host name") from exc
        return cls(frozenset(hosts), tuple(networks))

    def allows_host(self, host: str) -> bool:
        return host.lower().removesuffix(".") in self.hosts

    def allows_address(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        candidates = [address]
        inner = _translated_v4(address) if isinstance(address, ipaddress.IPv6Address) else None
        if inner is not None:
            candidates.append(inner)
        return any(a.version == n.version and a in n for a in candidates for n in self.networks)


@dataclass(frozen=True)
class Target:
    """A checked webhook target: connect to ``addresses`` only."""

    url: str  # the normalised URL
    scheme: str  # "https" or "http"
    host: str  # as in the URL (IDNA-encoded, lower case, no brackets)
    port: int
    path: str  # path + "?query", never empty ("/" at least)
    addresses: tuple[str, ...]  # every address the host resolved to, all checked; connect to these only


class ResolverBusy(OSError):
    """Too many lookups pending (slow name servers): try again later. Not the target's fault."""


def system_resolver(host: str, port: int) -> list[str]:
    """getaddrinfo for TCP, deduplicated, order kept; OSError (TimeoutError) after RESOLVE_TIMEOUT_S;
    ResolverBusy when MAX_PENDING_LOOKUPS are still running."""
    slots = _lookup_slots
    if not slots.acquire(blocking=False):
        raise ResolverBusy(f"more than {MAX_PENDING_LOOKUPS} host name lookups pending")
    done = threading.Event()
    found: list[str] = []
    failed: list[OSError] = []

    def lookup() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
            found.extend(str(info[4][0]) for info in infos)
        except OSError as exc:
            failed.append(exc)
        finally:
            slots.release()
            done.set()

    threading.Thread(target=lookup, name=f"webhook-resolve-{host[:40]}", daemon=True).start()
    if not done.wait(RESOLVE_TIMEOUT_S):
        raise TimeoutError(f"resolving {host} took longer than {RESOLVE_TIMEOUT_S}s")
    if failed:
        raise failed[0]
    return list(dict.fromkeys(found))


_lookup_slots = threading.BoundedSemaphore(MAX_PENDING_LOOKUPS)


def check_syntax(url: str, allow: AllowList) -> None:
    """Cheap checks with no DNS (length, scheme, no userinfo, a host, a port in range, no fragment;
    https only unless the host is allow-listed); raises WebhookForbidden. A host name that is not
    allow-listed passes with http, or when it is a local name, if ``allow.networks`` may still admit
    every address it resolves to: only ``check_url`` can tell."""
    _check_policy(*_parse(url), allow)


def check_url(url: str, allow: AllowList, resolve: Resolver = system_resolver) -> Target:
    """check_syntax, then resolve and check EVERY address; raises WebhookForbidden, or ResolverBusy
    (the lookup could not even start: nothing is known about the target)."""
    parsed, literal = _parse(url)
    if len(parsed.url) > MAX_URL_LENGTH:  # normalising may lengthen it (%-encoding)
        raise WebhookForbidden(f"The webhook URL is longer than {MAX_URL_LENGTH} characters once encoded.")
    _check_policy(parsed, literal, allow)
    if literal is not None:
        return replace(parsed, addresses=(parsed.host,))
    return replace(parsed, addresses=_resolve_checked(parsed, allow, resolve))


def _check_policy(parsed: Target, literal: IPAddress | None, allow: AllowList) -> None:
    if literal is not None:
        if allow.allows_address(literal):
            return
        if not _is_public(literal):
            raise WebhookForbidden("The webhook URL points at a private or reserved address.")
        if parsed.scheme != "https":
            raise WebhookForbidden(_HTTPS_ONLY)
        return
    if allow.allows_host(parsed.host) or allow.networks:
        return  # allow-listed, or the addresses may all be (check_url)
    if _is_local_name(parsed.host):
        raise WebhookForbidden(f"The webhook host {parsed.host} is not a public host name.")
    if parsed.scheme != "https":
        raise WebhookForbidden(_HTTPS_ONLY)


def _resolve_checked(parsed: Target, allow: AllowList, resolve: Resolver) -> tuple[str, ...]:
    try:
        addresses = [ipaddress.ip_address(a) for a in dict.fromkeys(resolve(parsed.host, parsed.port))]
    except ResolverBusy:
        raise
    except (OSError, ValueError) as exc:  # ValueError: the resolver answered something not an address
        logger.info("webhook host %s: lookup failed: %r", parsed.host, exc)
        raise WebhookForbidden(_NOT_PUBLIC.format(parsed.host)) from exc
    if not addresses:
        raise WebhookForbidden(_NOT_PUBLIC.format(parsed.host))
    if allow.allows_host(parsed.host) or all(allow.allows_address(a) for a in addresses):
        return tuple(str(a) for a in addresses)
    if _is_local_name(parsed.host):
        raise WebhookForbidden(f"The webhook host {parsed.host} is not a public host name.")
    if parsed.scheme != "https":
        raise WebhookForbidden(_HTTPS_ONLY)
    refused = [a for a in addresses if not allow.allows_address(a) and not _is_public(a)]
    if refused:
        logger.warning("webhook host %s refused: resolves to %s", parsed.host, ", ".join(map(str, refused)))
        raise WebhookForbidden(_NOT_PUBLIC.format(parsed.host))
    return tuple(str(a) for a in addresses)


def _is_public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return False
        inner = _translated_v4(address)
        if inner is not None:
            return _is_public(inner)  # only a way of writing the IPv4 address it carries
        if address not in _GLOBAL_UNICAST_V6 or any(address in n for n in _DENY_V6):
            return False
        if address.sixtofour is not None and not _is_public(address.sixtofour):
            return False
    elif any(address in n for n in _DENY_V4):
        return False
    return address.is_global and not address.is_multicast


def _translated_v4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address of an IPv4-mapped (::ffff:a.b.c.d) or NAT64 (64:ff9b::a.b.c.d) one."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _is_local_name(host: str) -> bool:
    return "." not in host or host == "localhost" or host.endswith(_SPECIAL_SUFFIXES)


def _parse(url: str) -> tuple[Target, IPAddress | None]:
    """The target with no addresses yet, and its host as an IP address (None for a name)."""
    if not isinstance(url, str) or not url:
        raise WebhookForbidden("The webhook URL is empty.")
    if len(url) > MAX_URL_LENGTH:
        raise WebhookForbidden(f"The webhook URL is longer than {MAX_URL_LENGTH} characters.")
    if any(_is_bad_char(c) for c in url):
        raise WebhookForbidden("The webhook URL must not contain spaces, backslashes or control characters.")
    scheme_match = _SCHEME.match(url)
    scheme = scheme_match.group(1).lower() if scheme_match else ""
    if scheme_match is None or scheme not in _DEFAULT_PORTS:
        raise WebhookForbidden("The webhook URL must be an https:// URL.")
    if "#" in url:
        raise WebhookForbidden("The webhook URL must not have a fragment (#).")
    rest = url[scheme_match.end() :]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if "@" in authority:
        raise WebhookForbidden("The webhook URL must not contain a user name or password.")
    host, literal, port = _split_authority(authority, _DEFAULT_PORTS[scheme])
    if not path.startswith("/"):
        path = "/" + path
    path = re.sub(r"[^\x21-\x7e]", lambda m: quote(m.group()), path)
    shown = f"[{host}]" if ":" in host else host
    shown += "" if port == _DEFAULT_PORTS[scheme] else f":{port}"
    return Target(f"{scheme}://{shown}{path}", scheme, host, port, path, ()), literal


def _is_bad_char(c: str) -> bool:
    return c == "\\" or c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zs", "Zl", "Zp")


def _split_authority(authority: str, default_port: int) -> tuple[str, IPAddress | None, int]:
    """(host, the host as an IP address or None, port) of ``host[:port]``."""
    literal: IPAddress | None
    if authority.startswith("["):
        end = authority.find("]")
        inside, after = authority[1:end], authority[end + 1 :]
        if end < 0 or (after and not after.startswith(":")):
            raise WebhookForbidden("The webhook URL has a malformed IPv6 address.")
        if "%" in inside:
            raise WebhookForbidden("The webhook URL must not have an IPv6 zone id.")
        try:
            literal = ipaddress.IPv6Address(inside)
        except ValueError as exc:
            raise WebhookForbidden("The webhook URL has a malformed IPv6 address.") from exc
        host, port_text = str(literal), after[1:] if after else None
    else:
        name, colon, port_text = authority.partition(":")
        if not colon:
            port_text = None
        host = _normalise_name(name)
        literal = None
        if _looks_numeric(host):
            literal = _inet_aton(host)
            if literal is None:
                raise WebhookForbidden("The webhook URL's host is neither a host name nor an IP address.")
            host = str(literal)
    if port_text is None:
        return host, literal, default_port
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise WebhookForbidden("The webhook URL's port must be a number from 1 to 65535.")
    return host, literal, int(port_text)


def _normalise_name(name: str) -> str:
    """IDNA-encoded, lower case, without a trailing dot; WebhookForbidden when not a valid host name."""
    if not name:
        raise WebhookForbidden("The webhook URL must name a host.")
    try:
        host = name.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise WebhookForbidden("The webhook URL's host is not a valid host name.") from exc
    host = host.removesuffix(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in host.split(".")):
        raise WebhookForbidden("The webhook URL's host is not a valid host name.")
    return host


def _looks_numeric(host: str) -> bool:
    """Whether the last label is a number (decimal or 0x hex): libc then reads the host as IPv4."""
    return bool(_NUMBER.fullmatch(host.rsplit(".", 1)[-1]))


def _inet_aton(host: str) -> ipaddress.IPv4Address | None:
    """The address inet_aton makes of 1 to 4 decimal, 0-octal or 0x-hex parts; None when invalid."""
    matches = [_ATON_PART.fullmatch(part) for part in host.split(".")]
    if len(matches) > 4 or None in matches:
        return None
    values = [
        int(m[1] or "0", 16) if m[1] is not None else int(m[2] or m[3], 8 if m[2] else 10)
        for m in matches
        if m
    ]
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    return ipaddress.IPv4Address(sum(v << (8 * (3 - i)) for i, v in enumerate(head)) + last)
