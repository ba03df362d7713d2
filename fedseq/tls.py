"""Mutual TLS for every gRPC channel: a run's certificate authority, one certificate per service,
and the role each certificate carries.

Every certificate that :func:`make_certs` signs names exactly one role (README "Security model"):

    orchestrator   schedules rounds: round and run control on the server, Train/Evaluate on workers
    server         the aggregation server
    worker         a client worker *or* an attacker worker (the server cannot tell them apart)
    operator       a person or the ``fedseq run`` launcher: run status and stop

The role is a DNS name in the certificate's subject alternative names, ``<role>.fedseq``, and
the certificate's organizational unit. Clients verify the server they dial by role, not by host
name: a channel to a worker checks that the peer holds a ``worker.fedseq`` certificate of the
run's CA (``grpc.ssl_target_name_override``), so a stranger listening on an address cannot receive
a worker's upload or an orchestrator's tokens. Servers read the caller's role from the verified
peer certificate (:func:`peer_role`) and check it against their policy (:mod:`fedseq.authz`).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

ROLES: tuple[str, ...] = ("orchestrator", "server", "worker", "operator")
ROLE_DOMAIN = "fedseq"  # role names are <role>.fedseq in the certificates
CA_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
# the certificates `fedseq certs DIR` makes when no --name is given: one per service of a
# compose deployment (every worker container shares the "worker" certificate)
DEFAULT_NAMES: dict[str, str] = {"server": "server", "orchestrator": "orchestrator", "worker": "worker",
                                 "operator": "operator"}


class TLSError(ValueError):
    """Certificates missing, unreadable or not made for the role asked."""


def role_name(role: str) -> str:
    """``worker`` -> ``worker.fedseq``: the name a certificate of that role carries."""
    if role not in ROLES:
        raise TLSError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    return f"{role}.{ROLE_DOMAIN}"


@dataclass(frozen=True)
class Identity:
    """One service's TLS material: the run's CA, its certificate (one role) and key (PEM bytes)."""

    name: str
    role: str
    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def load(cls, directory: str | os.PathLike, name: str) -> Identity:
        """``DIR/ca.pem``, ``DIR/<name>.pem`` and ``DIR/<name>.key``, as written by :func:`make_certs`.
        TLSError naming the missing file and the command that makes it."""
        d = Path(directory)
        files = {"ca": d / CA_FILE, "cert": d / f"{name}.pem", "key": d / f"{name}.key"}
        for what, path in files.items():
            if not path.is_file():
                raise TLSError(f"TLS {what} file {path} not found (make the run's certificates with "
                               f"`fedseq certs {d}`, or pass --insecure to run without TLS)")
        data = {k: p.read_bytes() for k, p in files.items()}
        role = cert_role(data["cert"])
        return cls(name=name, role=role, ca=data["ca"], cert=data["cert"], key=data["key"])

    def server_credentials(self) -> grpc.ServerCredentials:
        """Server side of mutual TLS: the peer must present a certificate of this CA."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)


def cert_role(pem: bytes) -> str:
    """The role a certificate made by :func:`make_certs` carries (TLSError if none or several)."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise TLSError(f"not a PEM certificate: {e}") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = set(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = set()
    roles = [r for r in ROLES if role_name(r) in names]
    if len(roles) != 1:
        raise TLSError(f"certificate {cert.subject.rfc4514_string()} carries {len(roles)} fedseq roles "
                       f"(expected exactly one of {', '.join(ROLES)})")
    return roles[0]


def peer_role(context: grpc.ServicerContext) -> str | None:
    """The role of the verified peer certificate of this call (None: no or no fedseq certificate).

    gRPC puts the certificate's subject alternative names into the call's auth context only after
    the chain verified against the server's CA, so a name there is proof of the role."""
    ctx = context.auth_context() or {}
    names = {n.decode(errors="replace") for n in ctx.get("x509_subject_alternative_name", [])}
    roles = [r for r in ROLES if role_name(r) in names]
    return roles[0] if len(roles) == 1 else None


def peer_name(context: grpc.ServicerContext) -> str:
    """The peer certificate's common name ('' without one)."""
    ctx = context.auth_context() or {}
    cn = ctx.get("x509_common_name", [])
    return cn[0].decode(errors="replace") if cn else ""


def channel_options(peer: str) -> list[tuple[str, str]]:
    """Channel options that make a TLS channel verify the server by role (``peer``)."""
    return [("grpc.ssl_target_name_override", role_name(peer))]


# ---------------------------------------------------------------------------- certificate factory
def _write(path: Path, data: bytes, private: bool = False) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certs(directory: str | os.PathLike, names: Mapping[str, str] | None = None,
               hosts: Iterable[str] = DEFAULT_HOSTS, days: int = 365) -> dict[str, Path]:
    """Make (or extend) a run's certificate authority in ``directory`` and one certificate per
    ``name -> role`` (default :data:`DEFAULT_NAMES`). An existing CA is reused, so certificates
    can be added later; existing certificates of the same name are replaced. Keys are written
    0600. ``hosts`` become extra subject alternative names (DNS names or IP addresses) for
    tools that verify by host name. Returns ``name -> certificate path``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    names = dict(DEFAULT_NAMES if names is None else names)
    for n, r in names.items():
        if not n or not all(c.isalnum() or c in "-_." for c in n):
            raise TLSError(f"certificate name {n!r} must be letters, digits, '-', '_' or '.'")
        role_name(r)  # validates the role
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_cert_path, ca_key_path = d / CA_FILE, d / CA_KEY_FILE
    if ca_cert_path.exists() and ca_key_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    else:
        ca_key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedseq"),
                             x509.NameAttribute(NameOID.COMMON_NAME, f"fedseq run CA {os.urandom(4).hex()}")])
        ca_cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .sign(ca_key, hashes.SHA256()))
        _write(ca_key_path, _pem_key(ca_key), private=True)
        _write(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM))
    extra: list[x509.GeneralName] = []
    for h in hosts:
        if h.endswith("." + ROLE_DOMAIN):
            raise TLSError(f"host name {h!r} would grant a role; names under .{ROLE_DOMAIN} are reserved")
        try:
            extra.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            extra.append(x509.DNSName(h))
    out = {}
    for name, role in names.items():
        key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedseq"),
                             x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                             x509.NameAttribute(NameOID.COMMON_NAME, name)])
        sans: list[x509.GeneralName] = [x509.DNSName(role_name(role))]
        if name != role and "." not in name:
            sans.append(x509.DNSName(name))  # the compose service name, e.g. "server"
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName(sans + extra), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
        _write(d / f"{name}.key", _pem_key(key), private=True)
        path = d / f"{name}.pem"
        _write(path, cert.public_bytes(serialization.Encoding.PEM))
        out[name] = path
    return out


def parse_names(values: Iterable[str]) -> dict[str, str]:
    """``["client-0:worker", "server"]`` -> ``{"client-0": "worker", "server": "server"}`` (a bare
    name is its own role). TLSError for an unknown role."""
    out: dict[str, str] = {}
    for v in values:
        name, _, role = v.partition(":")
        role = role or name
        role_name(role)
        out[name] = role
    return out
