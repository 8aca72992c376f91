"""
Tests for L{ghosttwist.auth.policy}: SPIFFE ID patterns and the authorizer,
as tables, plus properties of the parsers on arbitrary text.
"""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ghosttwist.auth import Authorizer, Decision, InvalidPattern, SpiffeIdPattern
from ghosttwist.spiffeid import InvalidSpiffeId, parse_spiffe_id

MATCHES = [
    ("spiffe://d.test/x", "spiffe://d.test/x", True),
    ("spiffe://d.test/x", "spiffe://d.test/x/y", False),
    ("spiffe://d.test/x", "spiffe://d.test/X", False),
    ("spiffe://d.test/x", "spiffe://d.test/xy", False),
    ("spiffe://d.test/x", "spiffe://e.test/x", False),
    ("spiffe://d.test", "spiffe://d.test", True),
    ("spiffe://d.test", "spiffe://d.test/x", False),
    ("spiffe://d.test/x/*", "spiffe://d.test/x/y", True),
    ("spiffe://d.test/x/*", "spiffe://d.test/x", False),
    ("spiffe://d.test/x/*", "spiffe://d.test/x/y/z", False),
    ("spiffe://d.test/x/*", "spiffe://e.test/x/y", False),
    ("spiffe://d.test/*/y", "spiffe://d.test/x/y", True),
    ("spiffe://d.test/*/y", "spiffe://d.test/x/z", False),
    ("spiffe://d.test/*", "spiffe://d.test", False),
    ("spiffe://d.test/*/*", "spiffe://d.test/a/b", True),
    ("spiffe://d.test/*/*", "spiffe://d.test/a", False),
    ("spiffe://d.test/x/**", "spiffe://d.test/x/y", True),
    ("spiffe://d.test/x/**", "spiffe://d.test/x/y/z/w", True),
    ("spiffe://d.test/x/**", "spiffe://d.test/x", False),
    ("spiffe://d.test/x/**", "spiffe://d.test/xy/z", False),
    ("spiffe://d.test/x/**", "spiffe://e.test/x/y", False),
    ("spiffe://d.test/**", "spiffe://d.test/a", True),
    ("spiffe://d.test/**", "spiffe://d.test/a/b/c", True),
    ("spiffe://d.test/**", "spiffe://d.test", False),
    ("spiffe://d.test/*/x/**", "spiffe://d.test/a/x/b", True),
    ("spiffe://d.test/*/x/**", "spiffe://d.test/a/y/b", False),
    ("spiffe://d.test/*/x/**", "spiffe://d.test/a/x", False),
]


@pytest.mark.parametrize(
    "text, spiffe_id, expected",
    MATCHES,
    ids=[f"{p} {'~' if e else '!~'} {i}" for p, i, e in MATCHES],
)
def test_matches(text: str, spiffe_id: str, expected: bool) -> None:
    pattern = SpiffeIdPattern.parse(text)
    assert pattern.matches(parse_spiffe_id(spiffe_id)) is expected


BAD_PATTERNS = [
    pytest.param("spiffe://*.test/x", id="wildcard-in-trust-domain"),
    pytest.param("spiffe://*/x", id="whole-trust-domain-wildcard"),
    pytest.param("spiffe://**/x", id="double-wildcard-trust-domain"),
    pytest.param("spiffe://d.test/**/x", id="double-star-in-middle"),
    pytest.param("spiffe://d.test/a*", id="star-in-segment"),
    pytest.param("spiffe://d.test/*a", id="star-prefix-in-segment"),
    pytest.param("spiffe://d.test/***", id="triple-star"),
    pytest.param("spiffe://d.test/x/", id="trailing-slash"),
    pytest.param("spiffe://d.test/*/", id="trailing-slash-after-star"),
    pytest.param("spiffe://d.test/", id="root-with-slash"),
    pytest.param("spiffe://d.test//x", id="empty-segment"),
    pytest.param("spiffe://d.test/../x", id="dot-dot"),
    pytest.param("spiffe://d.test/x%20y", id="percent-encoded"),
    pytest.param("spiffe://D.test/x", id="uppercase-trust-domain"),
    pytest.param("spiffe:///x", id="empty-trust-domain"),
    pytest.param("https://d.test/x", id="not-spiffe"),
    pytest.param("SPIFFE://d.test/x", id="uppercase-scheme"),
    pytest.param("d.test/x", id="no-scheme"),
    pytest.param("", id="empty"),
    pytest.param("spiffe://d.test/x\n", id="trailing-newline"),
]


@pytest.mark.parametrize("text", BAD_PATTERNS)
def test_bad_patterns(text: str) -> None:
    with pytest.raises(InvalidPattern) as caught:
        SpiffeIdPattern.parse(text)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_pattern_text() -> None:
    pattern = SpiffeIdPattern.parse("spiffe://d.test/x/*")
    assert str(pattern) == "spiffe://d.test/x/*"
    assert repr(pattern) == "SpiffeIdPattern('spiffe://d.test/x/*')"
    assert pattern == SpiffeIdPattern.parse("spiffe://d.test/x/*")
    assert hash(pattern) == hash(SpiffeIdPattern("spiffe://d.test/x/*"))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        pattern.text = "spiffe://d.test/y"  # type: ignore[misc]


DECISIONS = [
    pytest.param(
        Authorizer(allow_all=True),
        "spiffe://any.test/x",
        Decision(True, "allow-all"),
        id="allow-all",
    ),
    pytest.param(
        Authorizer(),
        "spiffe://d.test/x",
        Decision(False, "spiffe://d.test/x: no URIs are allowed"),
        id="empty-refuses",
    ),
    pytest.param(
        Authorizer(patterns=["spiffe://d.test/x"]),
        "spiffe://d.test/x",
        Decision(True, "allowed by spiffe://d.test/x"),
        id="exact",
    ),
    pytest.param(
        Authorizer(patterns=["spiffe://d.test/x/*", "spiffe://d.test/y"]),
        "spiffe://d.test/y",
        Decision(True, "allowed by spiffe://d.test/y"),
        id="second-pattern",
    ),
    pytest.param(
        Authorizer(patterns=["spiffe://d.test/x/*"]),
        "spiffe://d.test/x/a",
        Decision(True, "allowed by spiffe://d.test/x/*"),
        id="wildcard",
    ),
    pytest.param(
        Authorizer(patterns=["spiffe://d.test/x/*"]),
        "spiffe://d.test/y",
        Decision(False, "spiffe://d.test/y matches no allowed URI"),
        id="no-match",
    ),
    pytest.param(
        Authorizer(patterns=["spiffe://d.test/**"]),
        "spiffe://e.test/x",
        Decision(False, "spiffe://e.test/x matches no allowed URI"),
        id="other-trust-domain",
    ),
]


@pytest.mark.parametrize("authorizer, spiffe_id, expected", DECISIONS)
def test_decisions(authorizer: Authorizer, spiffe_id: str, expected: Decision) -> None:
    assert authorizer.check(parse_spiffe_id(spiffe_id)) == expected


def test_authorizer_parses_strings() -> None:
    authorizer = Authorizer(patterns=["spiffe://d.test/x"])
    assert authorizer.patterns == (SpiffeIdPattern.parse("spiffe://d.test/x"),)
    with pytest.raises(InvalidPattern):
        Authorizer(patterns=["spiffe://*/x"])
    with pytest.raises(TypeError):
        Authorizer(patterns="spiffe://d.test/x")  # type: ignore[arg-type]


_ID_ALPHABET = st.sampled_from(list("spiffe:/.-_*%aZ09@?#\n\t ÀΩ/"))
_ID_LIKE = st.builds(
    lambda tail: "spiffe://" + tail, st.text(_ID_ALPHABET, max_size=40)
)


@given(st.one_of(st.text(), _ID_LIKE))
def test_parse_spiffe_id_raises_only_invalid_spiffe_id(text: str) -> None:
    try:
        parse_spiffe_id(text)
    except InvalidSpiffeId:
        pass


@given(st.one_of(st.text(), _ID_LIKE))
def test_pattern_parse_raises_only_invalid_pattern(text: str) -> None:
    try:
        SpiffeIdPattern.parse(text)
    except InvalidPattern as e:
        assert "\n" not in str(e)


@given(_ID_LIKE)
def test_valid_ids_match_themselves(text: str) -> None:
    """
    Every valid SPIFFE ID without a trailing newline is a pattern matching
    exactly itself.
    """
    try:
        spiffe_id = parse_spiffe_id(text)
    except InvalidSpiffeId:
        return

    if "\n" in text:
        return

    pattern = SpiffeIdPattern.parse(text)
    assert pattern.matches(spiffe_id)
    assert Authorizer(patterns=[pattern]).check(spiffe_id).allowed


@pytest.mark.parametrize("text", ["spiffe://d.test/x\n", "spiffe://d.test\n"])
def test_parse_spiffe_id_refuses_trailing_newline(text: str) -> None:
    with pytest.raises(InvalidSpiffeId):
        parse_spiffe_id(text)
