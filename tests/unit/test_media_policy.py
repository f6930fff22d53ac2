"""The media guard's rules that need no network: host patterns, address classes, settings."""

from __future__ import annotations

import ipaddress

import pytest

from core.config import Environment, Settings
from webhooks.media import MediaPolicy, MediaRefused, address_refusal, vet

DEFAULTS = MediaPolicy.from_settings(
    Settings(env=Environment.production, sandbox=False, graph_api_url="https://graph.facebook.com")
)


@pytest.mark.parametrize(
    "host",
    [
        "lookaside.fbsbx.com",
        "LOOKASIDE.fbsbx.com.",
        "scontent.xx.fbcdn.net",
        "scontent-ams4-1.xx.fbcdn.net",
        "video.fmad1-1.fna.fbcdn.net",
        "scontent.cdninstagram.com",
        "graph.facebook.com",
    ],
)
def test_default_allowlist_accepts_meta_hosts(host: str) -> None:
    assert DEFAULTS.allows_host(host)


@pytest.mark.parametrize(
    "host",
    [
        "fbcdn.net.evil.com",
        "evilfbcdn.net",
        "fbcdn.net",
        "lookaside.fbsbx.com.evil.com",
        "xlookaside.fbsbx.com",
        "graph.facebook.com.evil.com",
        "127.0.0.1",
        "localhost",
        "",
    ],
)
def test_default_allowlist_refuses_others(host: str) -> None:
    assert not DEFAULTS.allows_host(host)


def test_label_wildcard_stays_inside_one_label() -> None:
    policy = MediaPolicy(allowed_hosts=("scontent*.xx.fbcdn.net",))
    assert policy.allows_host("scontent-ams4-1.xx.fbcdn.net")
    assert policy.allows_host("scontent.xx.fbcdn.net")
    assert not policy.allows_host("scontent.evil.com.xx.fbcdn.net")
    assert not policy.allows_host("other.xx.fbcdn.net")


def test_production_policy() -> None:
    assert DEFAULTS.https_only
    assert DEFAULTS.max_bytes == 16 * 1024 * 1024
    assert DEFAULTS.loopback_origins == frozenset()


def test_sandbox_loopback_names_only_the_graph_origin() -> None:
    settings = Settings(
        env=Environment.development,
        sandbox=True,
        graph_api_url="http://127.0.0.1:8000/sandbox/graph",
        media_sandbox_loopback=True,
    )
    policy = MediaPolicy.from_settings(settings)
    assert policy.loopback_origins == frozenset({("127.0.0.1", 8000)})
    assert not policy.https_only
    assert policy.allows_host("127.0.0.1")


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("::ffff:169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("10.1.2.3", "private"),
        ("172.31.255.255", "private"),
        ("192.168.0.1", "private"),
        ("fd12:3456::1", "private"),
        ("100.64.0.1", "shared"),
        ("0.0.0.0", "unspecified"),  # noqa: S104 - an address to refuse, not a bind
        ("::", "unspecified"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "private"),
        ("64:ff9b::7f00:1", "loopback"),
        ("2002:a9fe:a9fe::1", "link-local"),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),  # Teredo client 127.0.0.1
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "private"),  # Teredo client 192.0.2.45
    ],
)
def test_internal_addresses(address: str, reason: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("address", ["157.240.1.35", "31.13.64.35", "2a03:2880:f10c:83::1"])
def test_public_addresses(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    "host", ["2130706433", "0x7f000001", "0177.0.0.1", "127.1", "0x7f.1", "017700000001"]
)
def test_numeric_host_forms_refused_without_resolving(host: str) -> None:
    policy = MediaPolicy(allowed_hosts=("*",), https_only=False)
    with pytest.raises(MediaRefused, match="numeric host form|invalid url"):
        vet(f"http://{host}/", policy)
