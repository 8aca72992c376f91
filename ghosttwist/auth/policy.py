"""
Authorization: may a peer with this (already verified) SPIFFE ID connect?

A pure function of the SPIFFE ID, so it can be tested as a table. Allowed
IDs are written as patterns: an exact SPIFFE ID, or one with wildcards in
its path. C{*} stands for exactly one path segment; C{**}, only as the last
segment, for one or more. The trust domain is always spelled out: a
wildcard there would let any federated trust domain in.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
from spiffe import SpiffeId

from ghosttwist.spiffeid import InvalidSpiffeId, parse_spiffe_id

_SCHEME = "spiffe://"
_ONE = "*"
_MANY = "**"


class InvalidPattern(ValueError):
    """
    Text that is not a SPIFFE ID pattern; the message says why, in one line.
    """


def _refuse(text: str, why: str) -> InvalidPattern:
    return InvalidPattern(f"{text!r} is not a valid SPIFFE ID pattern: {why}")


def _is_valid_id(text: str) -> bool:
    try:
        parse_spiffe_id(text)
    except InvalidSpiffeId:
        return False
    return True


def _parse(text: str) -> tuple[str, tuple[str, ...]]:
    if not isinstance(text, str):
        raise InvalidPattern(f"{text!r} is not a SPIFFE ID pattern: not a string")

    if not text.startswith(_SCHEME):
        raise _refuse(text, "it must start with spiffe://")

    if not (text.isascii() and text.isprintable()):
        raise _refuse(text, "it has control or non-ASCII characters")

    trust_domain, slash, path = text[len(_SCHEME):].partition("/")
    if "*" in trust_domain:
        raise _refuse(text, "wildcards are not allowed in the trust domain")

    if not _is_valid_id(_SCHEME + trust_domain):
        raise _refuse(text, f"{trust_domain!r} is not a valid trust domain name")

    segments = tuple(path.split("/")) if slash else ()
    for index, segment in enumerate(segments):
        _check_segment(text, segment, last=index == len(segments) - 1)

    return trust_domain, segments


def _check_segment(text: str, segment: str, last: bool) -> None:
    if segment == _ONE:
        return

    if segment == _MANY:
        if not last:
            raise _refuse(text, "'**' is allowed only as the last path segment")
        return

    if "*" in segment:
        raise _refuse(text, "a wildcard must be a whole path segment ('*' or '**')")

    if not segment:
        raise _refuse(text, "the path has an empty segment or a trailing '/'")

    if not _is_valid_id(f"{_SCHEME}t/{segment}"):
        raise _refuse(
            text,
            f"path segment {segment!r} is not valid: segments hold only "
            "letters, digits, '.', '-' and '_', and are not '.' or '..'",
        )


def _split(spiffe_id: SpiffeId | str) -> tuple[str, tuple[str, ...]]:
    rest = str(spiffe_id)[len(_SCHEME):]
    trust_domain, slash, path = rest.partition("/")
    return trust_domain, tuple(path.split("/")) if slash else ()


@attrs.frozen(repr=False)
class SpiffeIdPattern:
    """
    A SPIFFE ID, or a SPIFFE ID with wildcard path segments, that peers are
    matched against. Build it with L{SpiffeIdPattern.parse} (or the class
    itself, which checks the same way).

    @ivar text: the pattern as written.
    """

    text: str
    _trust_domain: str = attrs.field(init=False, eq=False)
    _segments: tuple[str, ...] = attrs.field(init=False, eq=False)

    def __attrs_post_init__(self) -> None:
        trust_domain, segments = _parse(self.text)
        object.__setattr__(self, "_trust_domain", trust_domain)
        object.__setattr__(self, "_segments", segments)

    @classmethod
    def parse(cls, text: str) -> SpiffeIdPattern:
        """
        Parse C{text} as a pattern.

        @raise InvalidPattern: with a one-line explanation.
        """
        return cls(text)

    def __repr__(self) -> str:
        return f"SpiffeIdPattern({self.text!r})"

    def __str__(self) -> str:
        return self.text

    def matches(self, spiffe_id: SpiffeId | str) -> bool:
        """
        Whether C{spiffe_id} (already parsed and verified) fits this pattern.
        """
        trust_domain, segments = _split(spiffe_id)
        if trust_domain != self._trust_domain:
            return False

        pattern = self._segments
        if pattern and pattern[-1] == _MANY:
            if len(segments) < len(pattern):
                return False
            segments = segments[: len(pattern) - 1]
            pattern = pattern[:-1]

        if len(segments) != len(pattern):
            return False

        return all(p in (_ONE, s) for p, s in zip(pattern, segments))


def _to_patterns(
    patterns: Iterable[SpiffeIdPattern | str],
) -> tuple[SpiffeIdPattern, ...]:
    if isinstance(patterns, str):
        raise TypeError("patterns must be a collection of patterns, not one string")

    return tuple(
        p if isinstance(p, SpiffeIdPattern) else SpiffeIdPattern.parse(p)
        for p in patterns
    )


@attrs.frozen
class Decision:
    """
    The outcome of an authorization check.

    @ivar allowed: whether the peer may connect.
    @ivar reason: why, for the connection's log line.
    """

    allowed: bool
    reason: str


@attrs.frozen
class Authorizer:
    """
    Who may connect: everyone whose certificate verified (C{allow_all}), or
    those whose SPIFFE ID matches one of C{patterns}. With neither, nobody.
    """

    allow_all: bool = False
    patterns: tuple[SpiffeIdPattern, ...] = attrs.field(
        default=(), converter=_to_patterns
    )

    def check(self, spiffe_id: SpiffeId | str) -> Decision:
        """
        Decide whether the peer authenticated as C{spiffe_id} may connect.
        """
        if self.allow_all:
            return Decision(allowed=True, reason="allow-all")

        for pattern in self.patterns:
            if pattern.matches(spiffe_id):
                return Decision(allowed=True, reason=f"allowed by {pattern}")

        if not self.patterns:
            return Decision(
                allowed=False, reason=f"{spiffe_id}: no URIs are allowed"
            )

        return Decision(
            allowed=False, reason=f"{spiffe_id} matches no allowed URI"
        )
