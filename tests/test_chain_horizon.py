"""
The chain horizon: when a CA certificate that resumed sessions may lean on
ends, a context's sessions are void (see L{ghosttwist.tls.ChainHorizon}).
"""

from __future__ import annotations

import datetime
import math

from OpenSSL import SSL, crypto

from ghosttwist.tls import ChainHorizon, ContextHolder
from tests.pki import mint

_NOW = datetime.datetime.now(datetime.UTC)


def _chain(intermediate_ends: datetime.timedelta) -> dict[int, crypto.X509]:
    root = mint("root", ca=True, not_after=_NOW + datetime.timedelta(days=2))
    intermediate = mint(
        "intermediate", ca=True, issuer=root, not_after=_NOW + intermediate_ends
    )
    leaf = mint(
        "leaf", issuer=intermediate, not_after=_NOW + datetime.timedelta(hours=2)
    )
    return {
        depth: crypto.X509.from_cryptography(issued.cert)
        for depth, issued in enumerate((leaf, intermediate, root))
    }


def test_a_ca_ending_before_its_leaf_sets_the_horizon():
    horizon = ChainHorizon()
    horizon.note(_chain(datetime.timedelta(hours=1)))

    expected = (_NOW + datetime.timedelta(hours=1)).replace(microsecond=0)
    assert horizon.ends == expected.timestamp()
    assert not horizon.passed()


def test_cas_that_outlive_their_leaf_leave_the_horizon_open():
    horizon = ChainHorizon()
    horizon.note(_chain(datetime.timedelta(days=1)))
    horizon.note({0: _chain(datetime.timedelta(seconds=1))[0]})

    assert horizon.ends == math.inf


def test_a_passed_horizon_renews_the_context_before_a_connection():
    built = []

    def build(identity):
        built.append(identity)
        return SSL.Context(SSL.TLS_METHOD)

    holder = ContextHolder(build)
    holder.update("identity")
    first, horizon = holder.context, holder.horizon
    horizon.ends = 0

    class Transport:
        handshake = None

    transport = Transport()
    holder.serverConnectionForTLS(transport)

    assert built == ["identity", "identity"]
    assert holder.context is not first
    assert transport.handshake.horizon is holder.horizon is not horizon
    assert not holder.horizon.passed()


def test_a_context_that_cannot_be_rebuilt_keeps_refusing_resumption():
    """
    If rebuilding fails, the old context stays in service with its horizon
    still passed, which refuses every resumption on it.
    """
    calls = []

    def build(identity):
        calls.append(identity)
        if len(calls) > 1:
            raise ValueError("no luck")
        return SSL.Context(SSL.TLS_METHOD)

    holder = ContextHolder(build)
    holder.update("identity")
    first = holder.context
    holder.horizon.ends = 0

    class Transport:
        handshake = None

    transport = Transport()
    holder.serverConnectionForTLS(transport)

    assert holder.context is first
    assert transport.handshake.horizon.passed()
