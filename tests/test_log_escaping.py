"""
Text from a peer's certificate goes into log lines only escaped.
"""

from __future__ import annotations

import pytest

from ghosttwist.proxy import printable


@pytest.mark.parametrize(
    "text, expected",
    [
        ("spiffe://domain.test/web", "spiffe://domain.test/web"),
        ("CN=client1", "CN=client1"),
        ("x\n[ghosttwist.proxy#info] forged", "x\\n[ghosttwist.proxy#info] forged"),
        ("nul\x00byte", "nul\\x00byte"),
        ("tab\tand\x1b[31mcolour", "tab\\tand\\x1b[31mcolour"),
        ("ünïcode is printable", "ünïcode is printable"),
    ],
)
def test_printable_escapes_control_characters(text, expected):
    assert printable(text) == expected
    assert "\n" not in printable(text)
