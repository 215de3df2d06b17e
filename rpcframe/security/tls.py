"""TLS and mTLS: one frozen :class:`TLSConfig` for servers and clients.

PEM material is given either as a path (``str`` or ``os.PathLike``) or as the
PEM bytes themselves. A server whose certificate and key come from files
reloads them when the files change, without a restart: grpc asks the
credentials for their certificate configuration before every new TLS
handshake, and :class:`CertificateReloader` answers "unchanged" (a stat of
each file) until a file's size or modification time moves, then re-reads and
checks the new pair before handing it over. Connections already open keep
the certificate they were made with.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc

from ..errors import ConfigError

__all__ = ["PEMSource", "TLSConfig", "CertificateReloader", "channel_credentials", "server_credentials"]

_LOG = logging.getLogger("rpcframe.security")

#: A path to a PEM file, or the PEM bytes themselves.
PEMSource = str | os.PathLike[str] | bytes

ClientAuth = Literal["require", "none"]


def read_pem(name: str, source: PEMSource) -> bytes:
    """The PEM bytes ``source`` stands for; ConfigError naming ``name`` if unreadable."""
    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ConfigError(f"TLSConfig.{name}: cannot read {os.fspath(source)!r}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"TLSConfig.{name}: not PEM data (no '-----BEGIN' line)")
    return data


def _stamp(source: PEMSource | None) -> tuple[int, int] | None:
    """A file's (mtime_ns, size), the cheap signal that it was rewritten."""
    if source is None or isinstance(source, bytes):
        return None
    try:
        st = os.stat(source)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def check_pair(cert: bytes, key: bytes) -> None:
    """Raise ConfigError unless ``key`` is the private key of ``cert``'s first certificate."""
    # Imported here: cryptography costs about as much to import as grpc, and only TLS setup needs it.
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        leaf = x509.load_pem_x509_certificates(cert)[0]
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"TLSConfig: certificate or key does not parse: {exc}") from None
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*der) != private.public_key().public_bytes(*der):
        raise ConfigError("TLSConfig: the private key does not belong to the certificate")


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """Transport security for a server (``ServerConfig.tls``) or a client (``ChannelConfig.tls``).

    Attributes:
        cert: own certificate chain (PEM path or bytes): the server's
            certificate, or the client's for mTLS.
        key: private key of ``cert`` (PEM path or bytes, unencrypted).
        ca: certificates that verify the peer. On a server, setting it turns
            on mTLS: clients must present a certificate this CA signed. On a
            client, the roots the server's certificate must chain to
            (``None``: the system roots).
        client_auth: server side, with ``ca`` set: ``"require"`` (default)
            refuses handshakes without a valid client certificate; ``"none"``
            does not ask for one. grpcio's Python API offers no
            "request but do not require" mode, so there is no "optional".
        server_name: client side: the name the server's certificate must
            carry, when it differs from the target's host (also sent as SNI).
        reload: server side: re-read ``cert``/``key``/``ca`` files when they
            change (checked before each new handshake).

    Build it with :meth:`for_server` / :meth:`for_client` for readability.
    """

    cert: PEMSource | None = None
    key: PEMSource | None = None
    ca: PEMSource | None = None
    client_auth: ClientAuth = "require"
    server_name: str | None = None
    reload: bool = True

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("TLSConfig: cert and key go together (set both or neither)")
        if self.client_auth not in ("require", "none"):
            raise ConfigError(
                f"TLSConfig.client_auth must be 'require' or 'none', got {self.client_auth!r} "
                "(grpcio cannot request a client certificate without requiring it)"
            )
        for name in ("cert", "key", "ca"):
            source = getattr(self, name)
            if source is not None:
                read_pem(name, source)  # fail where the config is written, not at the first handshake

    @classmethod
    def for_server(
        cls, cert: PEMSource, key: PEMSource, *, client_ca: PEMSource | None = None, reload: bool = True
    ) -> TLSConfig:
        """Server TLS; with ``client_ca``, mTLS (client certificates required)."""
        return cls(cert=cert, key=key, ca=client_ca, reload=reload)

    @classmethod
    def for_client(
        cls,
        ca: PEMSource | None = None,
        *,
        cert: PEMSource | None = None,
        key: PEMSource | None = None,
        server_name: str | None = None,
    ) -> TLSConfig:
        """Client TLS: trust ``ca`` (system roots if None); ``cert``/``key`` for mTLS."""
        return cls(cert=cert, key=key, ca=ca, server_name=server_name)

    @property
    def mutual(self) -> bool:
        """Server side: whether client certificates are required."""
        return self.ca is not None and self.client_auth == "require"

    def channel_options(self) -> tuple[tuple[str, Any], ...]:
        """Extra grpc channel arguments (the server-name override)."""
        if self.server_name is None:
            return ()
        return (("grpc.ssl_target_name_override", self.server_name),)


class CertificateReloader:
    """Server certificate configuration that follows its files.

    grpc calls :meth:`fetch` before each new handshake; it returns ``None``
    ("keep the current one") unless a file changed. A half-written or
    mismatched pair is logged and skipped, so a rotation in progress never
    breaks new connections: the old certificate stays until the new pair is
    complete.
    """

    def __init__(self, tls: TLSConfig) -> None:
        self._tls = tls
        self._lock = threading.Lock()
        self._stamps = self._current_stamps()
        self.initial = self._load()
        self.reloads = 0

    def _current_stamps(self) -> tuple[tuple[int, int] | None, ...]:
        return tuple(_stamp(s) for s in (self._tls.cert, self._tls.key, self._tls.ca))

    def _load(self) -> Any:
        key_cert, ca = server_material(self._tls)
        return grpc.ssl_server_certificate_configuration([key_cert], root_certificates=ca)

    def fetch(self) -> Any:
        """The new certificate configuration if the files changed, else None."""
        stamps = self._current_stamps()
        if stamps == self._stamps:
            return None
        with self._lock:
            if stamps == self._stamps:
                return None
            try:
                config = self._load()
            except ConfigError as exc:
                _LOG.warning("TLS certificate reload skipped (keeping the current one): %s", exc)
                return None
            self._stamps = stamps
            self.reloads += 1
            _LOG.info("TLS certificate reloaded from %s", os.fspath(self._tls.cert))  # type: ignore[arg-type]
            return config


def server_material(tls: TLSConfig) -> tuple[tuple[bytes, bytes], bytes | None]:
    """((key, cert chain), client CA or None) for a server, checked to belong together."""
    if tls.cert is None or tls.key is None:
        raise ConfigError("ServerConfig.tls needs cert and key")
    cert, key = read_pem("cert", tls.cert), read_pem("key", tls.key)
    check_pair(cert, key)
    ca = read_pem("ca", tls.ca) if tls.mutual and tls.ca is not None else None
    return (key, cert), ca


def server_credentials(tls: TLSConfig) -> Any:
    """grpc server credentials for ``tls`` (reloading when its files may change)."""
    files = [s for s in (tls.cert, tls.key, tls.ca) if s is not None and not isinstance(s, bytes)]
    if not (tls.reload and files):
        # Nothing can change: static credentials skip the per-handshake check.
        key_cert, ca = server_material(tls)
        return grpc.ssl_server_credentials([key_cert], root_certificates=ca, require_client_auth=tls.mutual)
    reloader = CertificateReloader(tls)
    return grpc.dynamic_ssl_server_credentials(
        reloader.initial, reloader.fetch, require_client_authentication=tls.mutual
    )


def channel_credentials(tls: TLSConfig) -> Any:
    """grpc channel credentials for ``tls`` (client side)."""
    ca = read_pem("ca", tls.ca) if tls.ca is not None else None
    key = read_pem("key", tls.key) if tls.key is not None else None
    cert = read_pem("cert", tls.cert) if tls.cert is not None else None
    if cert is not None and key is not None:
        check_pair(cert, key)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
