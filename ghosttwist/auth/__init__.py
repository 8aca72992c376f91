"""
Who a TLS peer is (authentication of its X509-SVID) and whether it may
connect (authorization by SPIFFE ID). Pure functions of certificates and
configuration: no I/O, no TLS connections.
"""

from ghosttwist.auth.policy import (
    Authorizer,
    Decision,
    InvalidPattern,
    SpiffeIdPattern,
)
from ghosttwist.auth.svid import (
    MAX_INTERMEDIATES,
    REASONS,
    BundleVerifier,
    SvidError,
    authenticate,
    spiffe_id_of,
)

__all__ = [
    "MAX_INTERMEDIATES",
    "REASONS",
    "Authorizer",
    "BundleVerifier",
    "Decision",
    "InvalidPattern",
    "SpiffeIdPattern",
    "SvidError",
    "authenticate",
    "spiffe_id_of",
]
