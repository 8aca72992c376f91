"""
SPIFFE IDs, parsed as strictly as the SPIFFE ID specification writes them.

The C{spiffe} package folds upper-case schemes and trust domains to lower
case; a certificate or a flag that spells them differently is not a SPIFFE
ID as the specification defines it, so it is refused here instead.
"""

from __future__ import annotations

import re

from spiffe import SpiffeId

_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
_MAX_LENGTH = 2048


class InvalidSpiffeId(ValueError):
    """
    A string that is not a SPIFFE ID; the message says which rule it broke.
    """


def parse_spiffe_id(text: str) -> SpiffeId:
    """
    Parse C{text} as a SPIFFE ID, following the specification to the letter.

    @raise InvalidSpiffeId: with a one-line explanation.
    """
    if not text.startswith("spiffe://"):
        raise InvalidSpiffeId(f"{text!r} is not a SPIFFE ID: it must start with spiffe://")

    if len(text.encode("utf-8")) > _MAX_LENGTH:
        raise InvalidSpiffeId(f"SPIFFE ID is longer than {_MAX_LENGTH} bytes")

    rest = text[len("spiffe://"):]
    trust_domain, slash, path = rest.partition("/")
    if not trust_domain:
        raise InvalidSpiffeId(f"{text!r} is not a SPIFFE ID: the trust domain is empty")

    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise InvalidSpiffeId(
            f"{text!r} is not a SPIFFE ID: the trust domain may hold only "
            "lower-case letters, digits, '.', '-' and '_'"
        )

    if slash:
        for segment in path.split("/"):
            _check_segment(text, segment)

    return SpiffeId(text)


def _check_segment(text: str, segment: str) -> None:
    if not segment:
        raise InvalidSpiffeId(
            f"{text!r} is not a SPIFFE ID: the path has an empty segment "
            "or a trailing '/'"
        )

    if segment in (".", ".."):
        raise InvalidSpiffeId(
            f"{text!r} is not a SPIFFE ID: the path has a '.' or '..' segment"
        )

    if not _SEGMENT.fullmatch(segment):
        raise InvalidSpiffeId(
            f"{text!r} is not a SPIFFE ID: path segments may hold only letters, "
            "digits, '.', '-' and '_'"
        )
