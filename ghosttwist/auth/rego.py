"""
Rego policies over the peer's certificate, evaluated with C{regopy}
(rego-cpp): C{--allow-policy}/C{--allow-query} in server mode and
C{--verify-policy}/C{--verify-query} in client mode.

A policy is a C{.rego} file, a folder of them, or an OPA bundle
(C{.tar.gz}, as C{opa build} writes it); C{data.json} files in a folder or
bundle become the policy's data. The peer is allowed when the query yields
exactly one result, one expression whose value is C{true}, and no bindings.
The input document is built by L{input_document}; docs/access-control.md
shows its shape.
"""

from __future__ import annotations

import base64
import json
import tarfile
from pathlib import Path
from urllib.parse import urlsplit

import attrs
from cryptography import x509
from twisted.logger import Logger

from ghosttwist.auth.certnames import Names, spki_der
from ghosttwist.auth.svid import spiffe_id_of

log = Logger()

_NAME_FIELDS = {
    "CommonName": x509.NameOID.COMMON_NAME,
    "SerialNumber": x509.NameOID.SERIAL_NUMBER,
}
_LIST_FIELDS = {
    "Country": x509.NameOID.COUNTRY_NAME,
    "Organization": x509.NameOID.ORGANIZATION_NAME,
    "OrganizationalUnit": x509.NameOID.ORGANIZATIONAL_UNIT_NAME,
    "Locality": x509.NameOID.LOCALITY_NAME,
    "Province": x509.NameOID.STATE_OR_PROVINCE_NAME,
    "StreetAddress": x509.NameOID.STREET_ADDRESS,
    "PostalCode": x509.NameOID.POSTAL_CODE,
}


class PolicyError(Exception):
    """
    A policy that cannot be loaded or evaluated; the message is one line.
    """


def _name(name: x509.Name) -> dict[str, object]:
    document: dict[str, object] = {}
    for field, oid in _NAME_FIELDS.items():
        values = name.get_attributes_for_oid(oid)
        document[field] = str(values[0].value) if values else ""
    for field, oid in _LIST_FIELDS.items():
        document[field] = [str(a.value) for a in name.get_attributes_for_oid(oid)]
    return document


def _uri(text: str) -> dict[str, object]:
    """
    A URI SAN split as Go's C{url.URL}; parts that are empty are left out,
    so C{not uri.User} or C{not uri.RawQuery} hold when they are absent.
    A URI that does not parse (C{"x://["}) keeps only C{Raw}, empty parts.
    """
    try:
        parts = urlsplit(text)
    except ValueError:
        return {"Raw": text, "Scheme": "", "Host": "", "Path": ""}
    opaque = not parts.netloc and not parts.path.startswith("/")
    document: dict[str, object] = {
        "Raw": text,
        "Scheme": parts.scheme,
        "Host": parts.netloc.rpartition("@")[2],
        "Path": "" if opaque else parts.path,
    }
    optional = {
        "Opaque": parts.path if opaque else "",
        "User": {"Username": parts.username} if parts.username is not None else None,
        "RawQuery": parts.query,
        "Fragment": parts.fragment,
        "RawFragment": parts.fragment,
    }
    document.update((key, value) for key, value in optional.items() if value)
    return document


def input_document(chain: list[x509.Certificate]) -> dict[str, object]:
    """
    The C{input} a policy sees for a peer presenting C{chain} (leaf first):
    C{input.certificate} with field names as ghostunnel's (Go's
    C{x509.Certificate}) for the fields listed in docs/access-control.md,
    plus C{SpiffeID}; C{input.chain} holds the issuers' subjects.
    """
    leaf = chain[0]
    names = Names.of(leaf)
    spiffe_id = spiffe_id_of(leaf)

    certificate = {
        "Subject": _name(leaf.subject),
        "Issuer": _name(leaf.issuer),
        "SerialNumber": str(leaf.serial_number),
        "SerialNumberHex": format(leaf.serial_number, "x"),
        "NotBefore": leaf.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "NotAfter": leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "NotBeforeUnix": int(leaf.not_valid_before_utc.timestamp()),
        "NotAfterUnix": int(leaf.not_valid_after_utc.timestamp()),
        "DNSNames": list(names.dns_names),
        "IPAddresses": list(names.ip_addresses),
        "EmailAddresses": _emails(leaf),
        "URIs": [_uri(text) for text in names.uris],
        "SpiffeID": str(spiffe_id) if spiffe_id else None,
        "RawSubjectPublicKeyInfo": base64.b64encode(spki_der(leaf)).decode(),
    }
    return {
        "certificate": certificate,
        "chain": [{"Subject": _name(c.subject)} for c in chain[1:]],
    }


def _emails(certificate: x509.Certificate) -> list[str]:
    try:
        san = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.RFC822Name)]


def _read_modules(path: str) -> tuple[dict[str, str], list[object]]:
    source = Path(path)
    modules: dict[str, str] = {}
    data: list[object] = []
    try:
        if source.is_dir():
            for file in sorted(source.rglob("*")):
                _collect(str(file.relative_to(source)), file, modules, data)
        elif path.endswith((".tar.gz", ".tgz")):
            with tarfile.open(path, "r:gz") as archive:
                for member in archive.getmembers():
                    if member.isfile():
                        content = archive.extractfile(member).read()
                        _collect(member.name, content, modules, data)
        else:
            modules[source.name] = source.read_text()
    except (OSError, tarfile.TarError, UnicodeDecodeError) as error:
        raise PolicyError(f"{path}: cannot read the policy: {error}") from None
    except json.JSONDecodeError as error:
        raise PolicyError(f"{path}: bad data.json: {error}") from None

    if not modules:
        raise PolicyError(f"{path}: no .rego module in the policy")
    return modules, data


def _collect(name: str, file, modules: dict[str, str], data: list[object]) -> None:
    if not (name.endswith(".rego") or name.endswith("data.json")):
        return
    content = file if isinstance(file, bytes) else file.read_bytes()
    if name.endswith(".rego"):
        modules[name] = content.decode()
    else:
        data.append(json.loads(content))


@attrs.frozen
class Allowed:
    """
    The outcome of one policy evaluation.
    """

    allowed: bool
    reason: str


class RegoPolicy:
    """
    One loaded policy and the query that decides.
    """

    def __init__(self, path: str, query: str) -> None:
        self.path = path
        self.query = query
        self._modules, self._data = _read_modules(path)
        self._interpreter = self._compile()

    def _compile(self):
        try:
            from regopy import Interpreter, RegoError
        except ImportError as error:
            raise PolicyError(f"Rego policies need the regopy package: {error}")

        interpreter = Interpreter()
        try:
            for name, text in self._modules.items():
                interpreter.add_module(name, text)
            for document in self._data:
                interpreter.add_data(document)
            interpreter.set_input({})
            output = interpreter.query(self.query)
        except RegoError as error:
            raise PolicyError(
                f"{self.path}: policy or query {self.query!r} does not compile: "
                f"{_rego_message(error)}"
            ) from None
        if not output.ok():
            raise PolicyError(
                f"{self.path}: policy or query {self.query!r} does not compile"
            )
        return interpreter

    def evaluate(self, chain: list[x509.Certificate]) -> Allowed:
        """
        Evaluate the query for a peer presenting C{chain}.
        """
        from regopy import RegoError

        try:
            self._interpreter.set_input(input_document(chain))
            output = self._interpreter.query(self.query)
        except RegoError as error:
            return Allowed(False, f"policy error: {_rego_message(error)}")

        if not output.ok():
            return Allowed(False, "policy evaluation failed")

        results = output.results
        if len(results) != 1:
            return Allowed(False, f"{self.query} is undefined")
        result = results[0]
        if not result.expressions:
            return Allowed(False, f"{self.query} is undefined")
        if result.bindings or len(result.expressions) != 1:
            return Allowed(False, f"{self.query} did not yield one value")
        if result.expressions[0] is not True:
            return Allowed(False, f"{self.query} is not true")
        return Allowed(True, f"allowed by policy {self.query}")


def _rego_message(error: Exception) -> str:
    return " ".join(str(error).split())[:200]


class PolicyHolder:
    """
    The policy in service, replaced on reload only by one that loads.
    """

    def __init__(self, path: str, query: str) -> None:
        self.path = path
        self.query = query
        self.current = RegoPolicy(path, query)

    def reload(self) -> None:
        """
        Load the policy again; a policy that fails keeps the old one.
        """
        try:
            self.current = RegoPolicy(self.path, self.query)
        except PolicyError as error:
            log.error(
                "policy reload failed, keeping the previous policy: {error}",
                error=str(error),
            )
            return
        log.info("policy reloaded from {path}", path=self.path)

    def evaluate(self, chain: list[x509.Certificate]) -> Allowed:
        """
        Evaluate the policy in service.
        """
        return self.current.evaluate(chain)
