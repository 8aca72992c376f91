"""
Durations written the way ghostunnel's flags take them: Go's notation.

``10s``, ``5m``, ``1h30m``, ``250ms`` and ``0`` are all accepted; a bare
number other than zero is refused, because ``--close-timeout 5`` is far more
likely a mistake than a request for five nanoseconds.
"""

from __future__ import annotations

import re

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}

_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h)")

# Go's durations stop near 292 years; anything longer is a typo.
MAX_SECONDS = 290 * 365 * 24 * 3600.0


class InvalidDuration(ValueError):
    """
    A duration string that does not follow Go's duration notation.
    """


def parse_duration(text: str) -> float:
    """
    Return the number of seconds that C{text} stands for.

    @raise InvalidDuration: when C{text} is not a non-negative Go duration.
    """
    text = text.strip()

    if text in ("0", "+0"):
        return 0.0

    if not text:
        raise InvalidDuration("empty duration")

    position = 0
    total = 0.0
    while position < len(text):
        match = _PART.match(text, position)
        if match is None:
            raise InvalidDuration(
                f"invalid duration {text!r} (use a form like 10s, 5m, 1h30m)"
            )
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()

    if total > MAX_SECONDS:
        raise InvalidDuration(f"duration {text!r} is out of range (290 years at most)")
    return total


def format_duration(seconds: float) -> str:
    """
    Return a short human form of C{seconds}, for log lines and help text.
    """
    if seconds == 0:
        return "0s"

    if seconds < 1:
        return f"{seconds * 1000:g}ms"

    parts = []
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if secs or not parts:
        parts.append(f"{secs + (seconds - whole):g}s")
    return "".join(parts)
