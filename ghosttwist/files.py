"""
Identities from files, as ghostunnel reads them: a keystore (PEM holding a
chain and a key in any order, or PKCS#12), or a certificate file and a key
file, plus a CA bundle (by default the system's trust store).

L{load_identity} reads them once and fails with one line that names the file
and what is wrong with it. L{FileSource} is the identity source that reads
them at start and again on SIGUSR1, SIGHUP and every C{--timed-reload}; a
reload that fails keeps the identity in service and logs why.
"""

from __future__ import annotations

import os
import re
import signal
import ssl
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.utils import CryptographyDeprecationWarning
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from ghosttwist.auth.svid import spiffe_id_of
from ghosttwist.identity import Identity, IdentityFeed, IIdentitySource

log = Logger()

RELOAD_SIGNALS = (signal.SIGUSR1, signal.SIGHUP)
"""
The signals that make a L{FileSource} read its files again.
"""

_PEM_KEY = re.compile(
    rb"-----BEGIN ((?:RSA |EC |ENCRYPTED )?PRIVATE KEY)-----.+?"
    rb"-----END \1-----",
    re.DOTALL,
)
_KEY_TYPES = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)


class FileIdentityError(Exception):
    """
    Identity files that cannot be used; the message is one line naming the
    file and the problem.
    """


@attrs.frozen
class IdentityFiles:
    """
    Where the tunnel's identity and trust live on disk.

    @ivar keystore: PEM (chain and key, any order) or PKCS#12 file.
    @ivar cert: PEM certificate chain, used with C{key}.
    @ivar key: PEM private key for C{cert}.
    @ivar cacert: PEM bundle of trusted CAs; L{None} for the system store.
    @ivar password: decrypts the keystore or key (C{--storepass}).
    """

    keystore: str | None = None
    cert: str | None = None
    key: str | None = None
    cacert: str | None = None
    password: str | None = attrs.field(default=None, repr=False)

    def describe(self) -> str:
        """
        The files, for log lines.
        """
        parts = [
            f"{name}={value}"
            for name, value in (
                ("keystore", self.keystore),
                ("cert", self.cert),
                ("key", self.key),
                ("cacert", self.cacert or "(system)"),
            )
            if value
        ]
        return " ".join(parts)


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise FileIdentityError(f"{path}: cannot read: {error.strerror}") from None


def _password(files: IdentityFiles) -> bytes | None:
    return files.password.encode() if files.password else None


def _pem_certificates(path: str, data: bytes) -> list[x509.Certificate]:
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise FileIdentityError(f"{path}: no PEM certificate in the file")
    try:
        with warnings.catch_warnings():
            # Some system trust stores hold old roots with negative serials.
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise FileIdentityError(
            f"{path}: a PEM certificate is incomplete or corrupt (half-written?)"
        ) from None


def _pem_key(path: str, data: bytes, password: bytes | None):
    blocks = [match.group(0) for match in _PEM_KEY.finditer(data)]
    if not blocks:
        raise FileIdentityError(f"{path}: no PEM private key in the file")
    if len(blocks) > 1:
        raise FileIdentityError(f"{path}: more than one private key in the file")

    encrypted = b"ENCRYPTED" in blocks[0] or b"Proc-Type: 4,ENCRYPTED" in blocks[0]
    try:
        return serialization.load_pem_private_key(
            blocks[0], password if encrypted else None
        )
    except TypeError:
        raise FileIdentityError(
            f"{path}: the private key is encrypted; give --storepass"
        ) from None
    except ValueError as error:
        raise FileIdentityError(f"{path}: bad private key: {_first(error)}") from None


def _pkcs12(path: str, data: bytes, password: bytes | None):
    try:
        key, certificate, extra = pkcs12.load_key_and_certificates(data, password)
    except ValueError as error:
        raise FileIdentityError(
            f"{path}: neither PEM nor a PKCS#12 file this password opens "
            f"({_first(error)})"
        ) from None

    if certificate is None:
        raise FileIdentityError(f"{path}: the PKCS#12 file holds no certificate")
    if key is None:
        raise FileIdentityError(f"{path}: the PKCS#12 file holds no private key")
    return key, [certificate, *extra]


def _first(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _public(value) -> bytes:
    return value.public_key().public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def order_chain(
    path: str, key, certificates: Sequence[x509.Certificate]
) -> tuple[x509.Certificate, ...]:
    """
    Put the certificate matching C{key} first, then each one's issuer in
    turn; certificates that are nobody's issuer follow in file order.

    @raise FileIdentityError: when no certificate matches the key.
    """
    mine = _public(key)
    leaves = [c for c in certificates if _public(c) == mine]
    if not leaves:
        raise FileIdentityError(
            f"{path}: the private key does not match any certificate in it"
        )

    chain = [leaves[0]]
    rest = [c for c in certificates if c is not leaves[0]]
    while True:
        last = chain[-1]
        if last.issuer == last.subject:
            break
        issuer = next((c for c in rest if c.subject == last.issuer), None)
        if issuer is None:
            break
        chain.append(issuer)
        rest.remove(issuer)

    return tuple(chain + rest)


def _check_key_type(path: str, key) -> None:
    if not isinstance(key, _KEY_TYPES):
        raise FileIdentityError(
            f"{path}: unsupported key type {type(key).__name__}; use RSA, "
            "ECDSA or Ed25519"
        )


def _load_keystore(files: IdentityFiles):
    path = files.keystore
    data = _read(path)
    if b"-----BEGIN" in data:
        certificates = _pem_certificates(path, data)
        key = _pem_key(path, data, _password(files))
    else:
        key, certificates = _pkcs12(path, data, _password(files))
    return path, key, certificates


def _load_pair(files: IdentityFiles):
    certificates = _pem_certificates(files.cert, _read(files.cert))
    key = _pem_key(files.key, _read(files.key), _password(files))
    return f"{files.cert} and {files.key}", key, certificates


def load_bundle(path: str | None) -> tuple[str, tuple[x509.Certificate, ...]]:
    """
    The trusted CAs: the PEM bundle at C{path}, or the system trust store
    OpenSSL would use (C{SSL_CERT_FILE}, C{SSL_CERT_DIR} and their defaults).

    @return: a name for the bundle and its certificates.
    """
    if path is not None:
        return "cacert", tuple(_pem_certificates(path, _read(path)))

    found: list[x509.Certificate] = []
    defaults = ssl.get_default_verify_paths()
    if defaults.cafile and os.path.isfile(defaults.cafile):
        found = _pem_certificates(defaults.cafile, _read(defaults.cafile))
    elif defaults.capath and os.path.isdir(defaults.capath):
        for entry in sorted(Path(defaults.capath).iterdir()):
            data = entry.read_bytes() if entry.is_file() else b""
            if b"-----BEGIN CERTIFICATE-----" in data:
                found += _pem_certificates(str(entry), data)
    if not found:
        raise FileIdentityError(
            "no system trust store found; give --cacert with a PEM CA bundle"
        )
    return "system", tuple(found)


def load_identity(files: IdentityFiles) -> Identity:
    """
    Read the files into an L{Identity}; no keystore and no certificate
    means an identity that presents nothing and only trusts.

    @raise FileIdentityError: with one line naming the file and the problem.
    """
    name, bundle = load_bundle(files.cacert)
    if files.keystore:
        where, key, certificates = _load_keystore(files)
    elif files.cert:
        where, key, certificates = _load_pair(files)
    else:
        return Identity(chain=(), key=None, bundles={name: bundle}, source="files")

    _check_key_type(where, key)
    chain = order_chain(where, key, certificates)
    return Identity(
        chain=chain,
        key=key,
        bundles={name: bundle},
        spiffe_id=spiffe_id_of(chain[0]),
        source="files",
    )


@implementer(IIdentitySource)
class FileSource(IdentityFeed):
    """
    An identity source that reads files at start, on SIGUSR1 and SIGHUP,
    and every C{timed_reload} seconds (0: never by timer).

    C{before_reload} callables run first on each reload (the tunnel reloads
    its Rego policy this way), so one signal refreshes everything.

    @ivar reloads: how many reloads were attempted.
    """

    def __init__(
        self,
        files: IdentityFiles,
        reactor,
        timed_reload: float = 0.0,
        before_reload: Sequence[Callable[[], None]] = (),
    ) -> None:
        super().__init__()
        self.files = files
        self.reloads = 0
        self._reactor = reactor
        self._timed_reload = timed_reload
        self._before_reload = tuple(before_reload)
        self._previous_handlers: dict[int, object] = {}
        self._timer: LoopingCall | None = None

    def start(self) -> None:
        """
        Read the files and deliver the identity, then watch for reloads.

        @raise FileIdentityError: when the files cannot be used.
        """
        identity = load_identity(self.files)

        # Before the first identity goes out: publishing it starts the
        # listener, and a reload signal from then on must not be fatal.
        try:
            for number in RELOAD_SIGNALS:
                previous = signal.signal(number, self._signalled)
                self._previous_handlers[number] = previous
        except ValueError:
            log.warn(  # noqa: G010 - twisted.logger's name
                "not in the main thread: reloads come from --timed-reload or "
                "FileSource.reload() only, not from signals"
            )

        self._publish(identity)

        if self._timed_reload:
            self._timer = LoopingCall(self.reload, "timer")
            self._timer.clock = self._reactor
            self._timer.start(self._timed_reload, now=False)

    def stop(self) -> None:
        """
        Stop the timer and give the signals back to their previous handlers.
        """
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers.clear()

        if self._timer is not None and self._timer.running:
            self._timer.stop()
        self._timer = None

    def _signalled(self, number, frame) -> None:
        name = signal.Signals(number).name
        self._reactor.callFromThread(self.reload, name)

    def reload(self, why: str = "request") -> None:
        """
        Read the files again; keep the identity in service if they fail.
        """
        self.reloads += 1
        for hook in self._before_reload:
            hook()

        try:
            identity = load_identity(self.files)
        except FileIdentityError as error:
            log.error(
                "reload ({why}) failed, keeping the previous identity: {error}",
                why=why,
                error=str(error),
            )
            return

        log.info(
            "reload ({why}): read {files} serial={serial}",
            why=why,
            files=self.files.describe(),
            serial=identity.serial or "(none)",
        )
        self._publish(identity)

