"""Received headers: the client our server wrote down, in every MTA's format.

The rows are headers other people published (tests/data/received/published.toml,
each with its source); the Postfix and Sendmail forms are also read from mail
the tests' own MTAs delivered (tests/test_whatif_mail.py).
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Any

import pytest

from heloguard.received import by_host, ours, parse

PUBLISHED = Path(__file__).resolve().parent / "data" / "received" / "published.toml"
HEADERS: list[dict[str, Any]] = tomllib.loads(PUBLISHED.read_text(encoding="utf-8"))["header"]


@pytest.mark.parametrize("row", HEADERS, ids=[f"{h['form']}:{h['by']}" for h in HEADERS])
def test_published_headers(row: dict[str, Any]) -> None:
    client = parse(row["text"])
    assert client is not None, row["source"]
    assert client.address == ipaddress.ip_address(row["address"])
    assert client.ptr == row.get("ptr")
    assert client.helo == row["helo"]
    assert client.by == row["by"]
    assert client.form == row["form"]
    assert by_host(row["text"]) == row["by"]


def test_ours_is_the_first_header_by_one_of_our_names() -> None:
    texts = [h["text"] for h in HEADERS]
    index, client = ours(texts, ["vger.kernel.org"])
    assert index == len(texts) - 1 and client is not None
    assert client.helo == "p3plsmtpa08-03.prod.phx3.secureserver.net"
    # a domain written with a leading dot names every host in it
    index, client = ours(texts, [".ovh.net"])
    assert index == 3 and client is not None and client.by == "in37.mail.ovh.net"
    assert ours(texts, ["mx.example.net"]) == (-1, None)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "from",
        "from x (y [999.1.2.3]) by z",
        "from x (y [1.2.3.4",
        "from [::1:::] (helo=x) by y",
        "from \x00\xff (\u2028 [1.2.3.4]) by z",
        "from " + "a" * 100_000,
    ],
)
def test_hostile_headers_give_none_or_a_client(text: str) -> None:
    client = parse(text)
    assert client is None or isinstance(
        client.address, ipaddress.IPv4Address | ipaddress.IPv6Address
    )
