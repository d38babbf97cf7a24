"""shared.webhook_guard: what a hostile tenant may try as a webhook URL, and what must still work.

DNS is a fake resolver throughout (``Names``); only system_resolver's own tests call getaddrinfo, on
numeric hosts or a patched getaddrinfo.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable

import pytest

from shared import webhook_guard
from shared.webhook_guard import (
    MAX_URL_LENGTH,
    AllowList,
    Target,
    WebhookForbidden,
    check_syntax,
    check_url,
    system_resolver,
)

NOT_PUBLIC = (
    "The webhook host hooks.example.com must resolve to public addresses only "
    "(it does not resolve, or resolves to a private or reserved address)."
)

NONE = AllowList.parse("")
PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:2800:220:1:248:1893:25c8:1946"


class Names:
    """A fake resolver: a table of host -> addresses; records every lookup; unknown names fail."""

    def __init__(self, table: dict[str, list[str]] | None = None) -> None:
        self.table = table or {}
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.table[host]


def refused(url: str, allow: AllowList = NONE, names: Names | None = None) -> WebhookForbidden:
    with pytest.raises(WebhookForbidden) as info:
        check_url(url, allow, names if names is not None else Names())
    return info.value


# --- addresses: every refused range, as a literal in the URL (no DNS) ---

REFUSED_ADDRESSES = [
    # IPv4: loopback, RFC 1918, link-local and cloud metadata, CGNAT and Alibaba metadata, unspecified,
    # broadcast, reserved, multicast, benchmarking, documentation, IETF protocol assignments
    "127.0.0.1", "127.255.255.254", "10.0.0.1", "172.16.0.1", "172.31.255.255", "192.168.1.1",
    "169.254.169.254", "169.254.0.1", "100.64.0.1", "100.100.100.200", "100.127.255.255", "0.0.0.0",
    "0.1.2.3", "255.255.255.255", "240.0.0.1", "224.0.0.1", "239.255.255.250", "198.18.0.1", "198.19.255.1",
    "192.0.2.1", "198.51.100.1", "203.0.113.1", "192.0.0.9", "192.0.0.170", "192.88.99.1",
    # IPv6: loopback, unspecified, link-local, unique-local (AWS metadata fd00:ec2::254), site-local,
    # multicast, documentation, benchmarking, Teredo, discard, unassigned
    "::1", "::", "fe80::1", "fc00::1", "fd00:ec2::254", "fec0::1", "ff02::1", "ff0e::1", "2001:db8::1",
    "3fff::1", "2001:2::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2", "100::1", "5f00::1",
    # IPv4 inside IPv6: mapped, compatible, SIIT, 6to4, NAT64 (well-known and local-use)
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.0.0.1", "::127.0.0.1", "::8.8.8.8",
    "::ffff:0:7f00:1", "2002:7f00:1::1", "2002:a9fe:a9fe::1", "2002:c0a8:101::1", "64:ff9b::7f00:1",
    "64:ff9b::a9fe:a9fe", "64:ff9b::a00:1", "64:ff9b:1::808:808",
]  # fmt: skip


def literal_url(address: str) -> str:
    return f"https://[{address}]/hook" if ":" in address else f"https://{address}/hook"


@pytest.mark.parametrize("address", REFUSED_ADDRESSES)
def test_a_non_public_address_literal_is_refused_without_dns(address: str) -> None:
    names = Names()
    error = refused(literal_url(address), names=names)
    assert error.message == "The webhook URL points at a private or reserved address."
    assert names.calls == []


@pytest.mark.parametrize("address", REFUSED_ADDRESSES)
def test_a_name_resolving_to_a_non_public_address_is_refused(address: str) -> None:
    error = refused("https://hooks.example.com/x", names=Names({"hooks.example.com": [address]}))
    assert "private or reserved" in error.message
    assert address not in error.message and str(ipaddress.ip_address(address)) not in error.message


@pytest.mark.parametrize(
    "address", [PUBLIC_V4, "8.8.8.8", PUBLIC_V6, "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]
)
def test_a_public_address_literal_is_accepted(address: str) -> None:
    target = check_url(literal_url(address), NONE, Names())
    assert target.addresses == (str(ipaddress.ip_address(address)),)
    assert target.scheme == "https" and target.port == 443 and target.path == "/hook"


# --- host spellings libc reads as loopback or private ---


@pytest.mark.parametrize(
    "host",
    [
        "2130706433",  # decimal 127.0.0.1
        "0177.0.0.1",  # octal
        "0x7f.0.0.1",  # hex
        "0x7F000001",  # hex, upper case
        "017700000001",  # octal, one part
        "127.1",  # short form
        "127.0.1",
        "0x7f.1",  # mixed
        "0177.0x0.0.01",
        "0xa9.254.169.254",  # metadata, hex first part
        "2852039166",  # 169.254.169.254 decimal
        "0",  # 0.0.0.0
        "127.0.0.1.",  # trailing dot
        "\uff11\uff12\uff17.\uff10.\uff10.\uff11",  # full-width digits, mapped by IDNA
    ],
)
def test_numeric_host_spellings_are_read_as_ipv4(host: str) -> None:
    names = Names({host: [PUBLIC_V4]})
    assert "private or reserved" in refused(f"https://{host}/", names=names).message
    assert names.calls == []  # never a DNS name


@pytest.mark.parametrize(
    "host", ["1.2.3.4.5", "256.0.0.1", "1.16777216", "4294967296", "08.0.0.1", "example.123"]
)
def test_numeric_hosts_inet_aton_refuses_are_refused(host: str) -> None:
    names = Names({host: [PUBLIC_V4]})
    assert "neither a host name nor an IP address" in refused(f"https://{host}/", names=names).message
    assert names.calls == []


def test_a_public_address_in_decimal_becomes_its_dotted_form() -> None:
    target = check_url("https://134744072:8443/x", NONE, Names())  # 8.8.8.8
    assert (target.host, target.addresses, target.url) == ("8.8.8.8", ("8.8.8.8",), "https://8.8.8.8:8443/x")


@pytest.mark.parametrize(
    "url", ["https://[fe80::1%25eth0]/", "https://[fe80::1%eth0]/", "https://[2606:2800:220:1::1%251]/"]
)
def test_an_ipv6_zone_id_is_refused(url: str) -> None:
    assert "zone id" in refused(url).message


# --- local names: refused before any DNS unless allow-listed ---


@pytest.mark.parametrize(
    "host",
    [
        "localhost", "LOCALHOST", "localhost.", "LocalHost.", "api.localhost", "printer.local",
        "metadata.google.internal", "metadata.google.internal.", "db.localdomain", "nas.home.arpa",
        "redis", "metadata",
        "\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54",  # full-width "localhost"
    ],
)  # fmt: skip
def test_local_names_are_refused_before_dns(host: str) -> None:
    names = Names({host.lower().rstrip("."): [PUBLIC_V4]})
    assert "not a public host name" in refused(f"https://{host}/", names=names).message
    assert names.calls == []


# --- URL syntax ---


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("https://user:pass@hooks.example.com/", "user name or password"),
        ("https://user@hooks.example.com/", "user name or password"),
        ("https://hooks.example.com@127.0.0.1/", "user name or password"),
        ("https://hooks.example.com:443@evil.example.net/", "user name or password"),
        ("https://hooks.example.com\\@evil.example.net/", "backslashes"),
        ("https:\\\\hooks.example.com/", "backslashes"),
        ("https://hooks.example.com /", "spaces"),
        ("https://hooks.exa\tmple.com/", "spaces"),
        ("https://hooks.example.com/\r\nX-Injected: 1", "control characters"),
        ("https://hooks.example.com/\x00", "control characters"),
        ("https://hooks.example.com\u200b/", "control characters"),  # zero-width space
        ("https://hooks.example.com/#@127.0.0.1", "fragment"),
        ("https://hooks.example.com#x", "fragment"),
        ("ftp://hooks.example.com/", "https://"),
        ("file:///etc/passwd", "https://"),
        ("gopher://127.0.0.1:6379/_INFO", "https://"),
        ("https:/hooks.example.com/", "https://"),
        ("//hooks.example.com/", "https://"),
        ("hooks.example.com/", "https://"),
        ("", "empty"),
        ("https:///path", "name a host"),
        ("https://:443/", "name a host"),
        ("https://hooks.example.com:0/", "port"),
        ("https://hooks.example.com:65536/", "port"),
        ("https://hooks.example.com:/", "port"),
        ("https://hooks.example.com:+443/", "port"),
        ("https://hooks.example.com:4\u00b943/", "port"),  # a superscript digit
        ("https://hooks.example.com:443:443/", "port"),
        ("https://[::1/", "malformed IPv6"),
        ("https://[::1]x/", "malformed IPv6"),
        ("https://[127.0.0.1]/", "malformed IPv6"),
        ("https://::1/", "name a host"),
        ("https://hooks..example.com/", "not a valid host name"),
        ("https://hooks%2eexample.com/", "not a valid host name"),
        ("https://hooks_example!.com/", "not a valid host name"),
        ("https://" + "a" * 64 + ".example.com/", "not a valid host name"),
        ("https://hooks.example.com/" + "a" * MAX_URL_LENGTH, "longer than"),
    ],
)
def test_malformed_or_tricky_urls_are_refused_without_dns(url: str, words: str) -> None:
    names = Names({"hooks.example.com": [PUBLIC_V4], "evil.example.net": [PUBLIC_V4]})
    for check in (lambda: check_syntax(url, NONE), lambda: check_url(url, NONE, names)):
        with pytest.raises(WebhookForbidden) as info:
            check()
        assert words in info.value.message
    assert names.calls == []


def test_the_url_length_limit_is_exact() -> None:
    base = "https://hooks.example.com/"
    names = Names({"hooks.example.com": [PUBLIC_V4]})
    assert check_url(base + "a" * (MAX_URL_LENGTH - len(base)), NONE, names).path.startswith("/a")
    refused(base + "a" * (MAX_URL_LENGTH - len(base) + 1), names=names)


@pytest.mark.parametrize("url", ["http://hooks.example.com/", "http://8.8.8.8/", "HTTP://hooks.example.com/"])
def test_plain_http_is_refused_without_an_allow_list(url: str) -> None:
    names = Names({"hooks.example.com": [PUBLIC_V4]})
    assert refused(url, names=names).message == "The webhook URL must use https."
    with pytest.raises(WebhookForbidden):
        check_syntax(url, NONE)


# --- DNS answers ---


@pytest.mark.parametrize(
    "addresses",
    [
        [PUBLIC_V4, "10.0.0.5"],  # one public, one private
        ["10.0.0.5", PUBLIC_V4],
        [PUBLIC_V6, "fd00:ec2::254"],
        [PUBLIC_V4, PUBLIC_V6, "169.254.169.254"],
        [PUBLIC_V4, "::ffff:127.0.0.1"],
    ],
)
def test_a_name_with_any_non_public_address_is_refused(addresses: list[str]) -> None:
    error = refused("https://hooks.example.com/", names=Names({"hooks.example.com": addresses}))
    assert "private or reserved" in error.message
    assert not any(a in error.message for a in addresses)


def test_a_name_that_resolves_to_nothing_is_refused() -> None:
    error = refused("https://hooks.example.com/", names=Names({"hooks.example.com": []}))
    assert error.message == NOT_PUBLIC


@pytest.mark.parametrize(
    "failure",
    [socket.gaierror(socket.EAI_NONAME, "Name or service not known"), TimeoutError("slow"), OSError("x")],
)
def test_a_failing_lookup_is_refused_with_a_neutral_message(failure: OSError) -> None:
    def resolve(host: str, port: int) -> list[str]:
        raise failure

    with pytest.raises(WebhookForbidden) as info:
        check_url("https://hooks.example.com/", NONE, resolve)
    assert info.value.message == NOT_PUBLIC  # the same words as a private answer: no oracle


def test_a_resolver_answer_that_is_not_an_address_is_refused() -> None:
    error = refused("https://hooks.example.com/", names=Names({"hooks.example.com": ["localhost"]}))
    assert error.message == NOT_PUBLIC


def test_a_public_name_gives_its_checked_addresses() -> None:
    names = Names({"hooks.example.com": [PUBLIC_V4, PUBLIC_V6, PUBLIC_V4]})
    target = check_url("https://Hooks.Example.COM.:8443/in/ä?tenant=t1&x=%20", NONE, names)
    assert target == Target(
        url="https://hooks.example.com:8443/in/%C3%A4?tenant=t1&x=%20",
        scheme="https",
        host="hooks.example.com",
        port=8443,
        path="/in/%C3%A4?tenant=t1&x=%20",
        addresses=(PUBLIC_V4, PUBLIC_V6),
    )
    assert names.calls == [("hooks.example.com", 8443)]  # lower case, no trailing dot, once


@pytest.mark.parametrize(
    ("url", "path", "port"),
    [("https://hooks.example.com", "/", 443), ("https://hooks.example.com?a=1", "/?a=1", 443),
     ("https://hooks.example.com:443/", "/", 443), ("https://hooks.example.com:0443/x", "/x", 443),
     ("HTTPS://hooks.example.com:1/", "/", 1), ("https://hooks.example.com:65535/", "/", 65535)],
)  # fmt: skip
def test_paths_and_ports_are_normalised(url: str, path: str, port: int) -> None:
    target = check_url(url, NONE, Names({"hooks.example.com": [PUBLIC_V4]}))
    assert (target.path, target.port) == (path, port)
    assert target.url == "https://hooks.example.com" + ("" if port == 443 else f":{port}") + path


def test_an_idn_host_is_idna_encoded() -> None:
    names = Names({"xn--bcher-kva.example": [PUBLIC_V4]})
    assert check_url("https://Bücher.example/", NONE, names).host == "xn--bcher-kva.example"


# --- the allow-list ---


def test_allow_list_parsing() -> None:
    allow = AllowList.parse(" localhost, 127.0.0.0/8, ::1 ,Hooks.Internal., , 10.1.2.3 ")
    assert allow.hosts == frozenset({"localhost", "hooks.internal"})
    assert allow.networks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("10.1.2.3/32"),
    )
    assert AllowList.parse("") == AllowList(frozenset(), ())
    assert allow.allows_host("LOCALHOST.") and not allow.allows_host("localhost.localdomain")
    assert allow.allows_address(ipaddress.ip_address("127.9.9.9"))
    assert allow.allows_address(ipaddress.ip_address("::ffff:127.0.0.1"))
    assert not allow.allows_address(ipaddress.ip_address("::2"))
    assert not allow.allows_address(ipaddress.ip_address("0.0.0.1"))  # not inside ::1/128


@pytest.mark.parametrize("entry", ["127.0.0.1/8", "10.0.0.0/33", "not a host", "*.example.com", "2130706433",
                                   "127.1", "fe80::/10%eth0", "hooks..internal", "[::1]"])  # fmt: skip
def test_a_bad_allow_list_entry_is_a_value_error(entry: str) -> None:
    with pytest.raises(ValueError, match="allow-list entry"):
        AllowList.parse(f"localhost, {entry}")


def test_an_allow_listed_host_may_be_private_and_plain_http() -> None:
    allow = AllowList.parse("hooks.internal")
    names = Names({"hooks.internal": ["10.0.0.5"]})
    check_syntax("http://HOOKS.internal.:8080/x", allow)
    target = check_url("http://HOOKS.internal.:8080/x", allow, names)
    assert (target.scheme, target.host, target.port, target.addresses) == (
        "http",
        "hooks.internal",
        8080,
        ("10.0.0.5",),
    )
    assert target.url == "http://hooks.internal:8080/x"
    refused("http://other.internal/", allow, Names({"other.internal": ["10.0.0.5"]}))
    refused("http://sub.hooks.internal/", allow, Names({"sub.hooks.internal": ["10.0.0.5"]}))  # exact match


def test_allow_listed_networks_admit_literals_in_any_spelling() -> None:
    allow = AllowList.parse("10.0.0.0/8, fd00::/8")
    cases = [
        ("http://10.1.2.3:8000/", "10.1.2.3"),
        ("http://0x0a.1.2.3:8000/", "10.1.2.3"),
        ("http://167838211:8000/", "10.1.2.3"),
        (
            "https://[::ffff:10.1.2.3]:8000/",
            str(ipaddress.ip_address("::ffff:10.1.2.3")),
        ),  # as Python writes it
        ("http://[fd00::5]:8000/", "fd00::5"),
    ]
    for url, address in cases:
        assert check_url(url, allow, Names()).addresses == (address,)
    assert "private" in refused("http://192.168.0.1/", allow).message
    assert "private" in refused("https://[fd01::1]/", AllowList.parse("fd00::/16")).message


def test_allow_listed_networks_must_hold_every_address_for_plain_http() -> None:
    allow = AllowList.parse("10.0.0.0/8")
    check_syntax("http://svc.example.com/", allow)  # only the addresses can tell
    names = Names({"svc.example.com": ["10.1.2.3", "10.9.9.9"], "mixed.example.com": ["10.1.2.3", PUBLIC_V4],
                   "other.example.com": ["192.168.1.1"]})  # fmt: skip
    assert check_url("http://svc.example.com/", allow, names).addresses == ("10.1.2.3", "10.9.9.9")
    assert refused("http://mixed.example.com/", allow, names).message == "The webhook URL must use https."
    assert check_url("https://mixed.example.com/", allow, names).addresses == ("10.1.2.3", PUBLIC_V4)
    assert "private" in refused("https://other.example.com/", allow, names).message


def test_a_local_name_needs_all_its_addresses_allow_listed() -> None:
    allow = AllowList.parse("127.0.0.0/8, ::1")
    names = Names({"localhost": ["::1", "127.0.0.1"]})
    assert check_url("http://localhost:8000/h", allow, names).addresses == ("::1", "127.0.0.1")
    names.table["localhost"] = ["127.0.0.1", PUBLIC_V4]
    assert "not a public host name" in refused("https://localhost:8000/h", allow, names).message
    metadata = Names({"metadata.google.internal": ["169.254.169.254"]})
    assert "not a public host name" in refused("http://metadata.google.internal/", allow, metadata).message


def test_check_syntax_does_no_dns_and_passes_a_public_https_name() -> None:
    check_syntax("https://hooks.example.com/x", NONE)  # no resolver: none is needed
    with pytest.raises(WebhookForbidden):
        check_syntax("https://localhost/x", NONE)
    with pytest.raises(WebhookForbidden):
        check_syntax("https://10.0.0.1/x", NONE)
    check_syntax("https://10.0.0.1/x", AllowList.parse("10.0.0.0/24"))


def test_the_error_is_a_value_error_with_a_code() -> None:
    error = refused("https://127.0.0.1/")
    assert isinstance(error, ValueError) and error.code == "webhook_forbidden"
    assert str(error) == error.message


# --- system_resolver ---


def test_system_resolver_answers_numeric_hosts_without_dns() -> None:
    assert system_resolver("127.0.0.1", 443) == ["127.0.0.1"]


def patch_getaddrinfo(monkeypatch: pytest.MonkeyPatch, answer: Callable[[str], list[str]]) -> None:
    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list[tuple[object, ...]]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answer(host)]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_system_resolver_deduplicates_keeping_order(monkeypatch: pytest.MonkeyPatch) -> None:
    patch_getaddrinfo(monkeypatch, lambda host: ["10.0.0.2", "10.0.0.1", "10.0.0.2", "10.0.0.3"])
    assert system_resolver("hooks.example.com", 443) == ["10.0.0.2", "10.0.0.1", "10.0.0.3"]


def test_system_resolver_gives_up_on_a_hanging_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    patch_getaddrinfo(monkeypatch, lambda host: [PUBLIC_V4] if release.wait(30) else [])
    monkeypatch.setattr(webhook_guard, "RESOLVE_TIMEOUT_S", 0.2)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            system_resolver("hooks.example.com", 443)
        with pytest.raises(WebhookForbidden, match="must resolve to public addresses only"):
            check_url("https://hooks.example.com/", NONE)
        assert time.monotonic() - started < 5
    finally:
        release.set()


def test_system_resolver_bounds_the_lookups_left_running(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    patch_getaddrinfo(monkeypatch, lambda host: [PUBLIC_V4] if release.wait(30) else [])
    monkeypatch.setattr(webhook_guard, "RESOLVE_TIMEOUT_S", 0.05)
    monkeypatch.setattr(webhook_guard, "_lookup_slots", threading.BoundedSemaphore(1))
    try:
        with pytest.raises(TimeoutError):
            system_resolver("a.example.com", 443)  # still running: holds the one slot
        with pytest.raises(OSError, match="lookups pending"):
            system_resolver("b.example.com", 443)
    finally:
        release.set()


def test_system_resolver_raises_lookup_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(host: str) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    patch_getaddrinfo(monkeypatch, fail)
    with pytest.raises(socket.gaierror):
        system_resolver("hooks.example.com", 443)


def test_a_busy_resolver_is_not_a_verdict_on_the_target() -> None:
    def busy(host: str, port: int) -> list[str]:
        raise webhook_guard.ResolverBusy("more than 32 host name lookups pending")

    with pytest.raises(webhook_guard.ResolverBusy):
        check_url("https://hooks.example.com/in", AllowList.parse(""), busy)


def test_a_url_too_long_once_encoded_is_refused() -> None:
    url = "https://hooks.example.com/" + "é" * 400  # 426 characters, 2,426 once %-encoded
    with pytest.raises(WebhookForbidden, match="once encoded"):
        check_url(url, AllowList.parse(""), lambda host, port: ["93.184.216.34"])
