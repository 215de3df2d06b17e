"""Helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import socket
import sys
from typing import Any

from ..errors import ConfigError
from ..security.auth import ApiKeys, AuthConfig, JWTConfig, JWTVerifier
from ..security.tls import TLSConfig, server_material
from ..security.tokens import check_token_transport


class CliError(Exception):
    """A user-facing failure: printed as one line, exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1, *, prefix: bool = True) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        # Compiler-style messages (file:line: text) are printed as they are.
        self.prefix = prefix


def load_object(spec: str) -> Any:
    """Import ``MODULE:ATTR`` (ATTR may be dotted), like uvicorn's app loading."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"{spec!r}: expected MODULE:OBJECT, e.g. examples.echo:servicer", 2)
    # Like `python -m`, resolve modules from the working directory first.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"cannot import module {module_name!r}: {exc}") from None
    except SyntaxError as exc:  # the user's module: where, not a traceback of importlib
        raise CliError(f"cannot import module {module_name!r}: {exc.msg} ({exc.filename}, line {exc.lineno})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CliError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def split_host_port(address: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[::1]:PORT`` for IPv6) with a clear error."""
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise CliError(f"{address!r}: expected HOST:PORT", 2)
    try:
        number = int(port)
    except ValueError:
        raise CliError(f"{address!r}: port must be a number", 2) from None
    if not 0 <= number <= 65535:
        raise CliError(f"{address!r}: port must be in 0..65535", 2)
    return host, number


def _in_use(address: str) -> bool:
    """Whether something listens on the TCP ``HOST:PORT`` this process failed to bind."""
    try:
        host, port = split_host_port(address)
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (CliError, OSError):
        return False
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def bind_error(exc: Exception, binds: list[str]) -> CliError:
    """The server's failure as a CliError, "address already in use" when that is why a bind failed.

    grpc's own message only says to set GRPC_VERBOSITY=debug.
    """
    message = str(exc)
    for address in binds:
        if message.startswith(f"cannot bind {address}") and _in_use(address):
            return CliError(f"cannot bind {address}: address already in use")
    return CliError(message)


_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:", "xds:")


def check_target(target: str) -> None:
    """A client TARGET without a scheme is HOST:PORT or a comma-separated list of them: CliError (exit 2) if not.

    Checked before connecting, so a typo is reported at once, not as a timeout.
    """
    if target.startswith(_SCHEMES):
        return  # the resolver's own syntax: grpc checks it
    for address in target.split(","):
        split_host_port(address.strip())


# --- security flags: TLS and tokens for clients (call, health), TLS and auth for serve ----------

_CLIENT_TLS_FIELDS = (("TLSConfig.ca", "--tls-ca"), ("TLSConfig.cert", "--tls-cert"), ("TLSConfig.key", "--tls-key"))
_SERVER_TLS_FIELDS = (
    ("TLSConfig.ca", "--client-ca"),
    ("TLSConfig.cert", "--tls-cert"),
    ("TLSConfig.key", "--tls-key"),
    ("TLSConfig: the private key does not belong to the certificate", "--tls-key is not the key of --tls-cert"),
    ("TLSConfig: certificate or key", "--tls-cert or --tls-key"),
)


def _usage_error(exc: ConfigError, fields: tuple[tuple[str, str], ...] = ()) -> CliError:
    """A ConfigError about a flag's value, worded with the flag's name; exit code 2."""
    message = str(exc)
    for field, flag in fields:
        message = message.replace(field, flag)
    return CliError(message, 2)


def add_client_security_flags(parser: argparse.ArgumentParser, *, probe_spellings: bool = False) -> None:
    """``--tls``, ``--tls-ca``, ``--tls-cert``, ``--tls-key``, ``--server-name``, ``--token``.

    ``probe_spellings`` also accepts grpc-health-probe's names of the same
    flags (``-tls-ca-cert`` ...), so ``health`` drops into probes written for it.
    """

    def names(name: str, probe: str) -> tuple[str, ...]:
        return (name, probe) if probe_spellings else (name,)

    sec = parser.add_argument_group("security")
    sec.add_argument(*names("--tls", "-tls"), action="store_true",
                     help="connect with TLS (implied by the other --tls-* flags)")  # fmt: skip
    sec.add_argument(*names("--tls-ca", "-tls-ca-cert"), metavar="FILE",
                     help="CA certificates (PEM) the server's must chain to (default: the system roots)")  # fmt: skip
    sec.add_argument(*names("--tls-cert", "-tls-client-cert"), metavar="FILE", help="client certificate (PEM) for mTLS")
    sec.add_argument(*names("--tls-key", "-tls-client-key"), metavar="FILE", help="private key (PEM) of --tls-cert")
    sec.add_argument(*names("--server-name", "-tls-server-name"), metavar="NAME",
                     help="name the server's certificate must carry (and SNI)")  # fmt: skip
    sec.add_argument("--token", metavar="TOKEN",
                     help="send 'authorization: Bearer TOKEN'; refused over plaintext except to loopback")  # fmt: skip


def client_tls(args: argparse.Namespace) -> TLSConfig | None:
    """The client TLS the flags ask for (None: plaintext); CliError (exit 2) on bad flags or files."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.server_name):
        return None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise CliError("--tls-cert and --tls-key go together", 2)
    try:
        return TLSConfig.for_client(args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.server_name)
    except ConfigError as exc:
        raise _usage_error(exc, _CLIENT_TLS_FIELDS) from None


def client_security(args: argparse.Namespace) -> tuple[TLSConfig | None, str | None]:
    """``(tls, token)`` for ``ChannelConfig`` from the client flags, a token only over TLS or to loopback."""
    tls = client_tls(args)
    if args.token is not None and tls is None:
        try:
            check_token_transport(args.target, False, False)
        except ConfigError:
            raise CliError(
                f"--token is not sent in clear text to {args.target}: connect with TLS (--tls, --tls-ca ...); "
                "plaintext is allowed only to loopback addresses and unix sockets", 2,
            ) from None  # fmt: skip
    return tls, args.token


def add_server_security_flags(parser: argparse.ArgumentParser) -> None:
    """``--tls-cert``, ``--tls-key``, ``--client-ca``, ``--api-key-file``, ``--jwt-*``."""
    sec = parser.add_argument_group(
        "security",
        "Certificate files are re-read when they change (rotate them without a restart). With --api-key-file or "
        "--jwt-jwks every call needs a key or token, also over mTLS (health and reflection stay open).",
    )
    sec.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate chain (PEM); needs --tls-key")
    sec.add_argument("--tls-key", metavar="FILE", help="private key (PEM, unencrypted) of --tls-cert")
    sec.add_argument("--client-ca", metavar="FILE",
                     help="mTLS: require client certificates signed by these CA certificates (PEM)")  # fmt: skip
    sec.add_argument("--api-key-file", metavar="FILE",
                     help="accept the API keys of FILE, one NAME:KEY a line (# comments); only their SHA-256 "
                          "digests are kept. Clients send 'x-api-key: KEY', or 'authorization: Bearer KEY' "
                          "(rpcframe call --token KEY) when --jwt-jwks is not set")  # fmt: skip
    sec.add_argument("--jwt-jwks", metavar="FILE",
                     help="accept JWT bearer tokens signed by a key of this JWKS file (followed: keys added "
                          "or removed count within about a second); needs --jwt-issuer and --jwt-audience")  # fmt: skip
    sec.add_argument("--jwt-issuer", metavar="ISS", help="the 'iss' a JWT must carry")
    sec.add_argument("--jwt-audience", metavar="AUD", action="append",
                     help="an 'aud' a JWT may carry (repeatable)")  # fmt: skip


def server_tls(args: argparse.Namespace) -> TLSConfig | None:
    """``ServerConfig.tls`` from the serve flags (None: plaintext); CliError (exit 2) on bad flags or files."""
    if args.tls_cert is None and args.tls_key is None:
        if args.client_ca is not None:
            raise CliError("--client-ca needs --tls-cert and --tls-key (mTLS is TLS that also checks clients)", 2)
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise CliError("--tls-cert and --tls-key go together", 2)
    try:
        tls = TLSConfig.for_server(args.tls_cert, args.tls_key, client_ca=args.client_ca)
        server_material(tls)  # the key belongs to the certificate: say so now, not at bind
    except ConfigError as exc:
        raise _usage_error(exc, _SERVER_TLS_FIELDS) from None
    return tls


def _read_api_keys(path: str) -> ApiKeys:
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise CliError(f"--api-key-file: cannot read {path!r}: {reason}", 2) from None
    keys: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        name, sep, key = text.partition(":")
        name, key = name.strip(), key.strip()
        if not sep or not name or not key:
            raise CliError(f"--api-key-file {path} line {number}: expected NAME:KEY", 2)
        if name in keys:
            raise CliError(f"--api-key-file {path} line {number}: the name {name!r} is used twice", 2)
        keys[name] = key
    if not keys:
        raise CliError(f"--api-key-file {path}: no NAME:KEY line", 2)
    return ApiKeys.from_plain(keys)


def _jwt(args: argparse.Namespace) -> JWTConfig | None:
    given = [args.jwt_jwks is not None, args.jwt_issuer is not None, bool(args.jwt_audience)]
    if not any(given):
        return None
    if not all(given):
        raise CliError("--jwt-jwks, --jwt-issuer and --jwt-audience go together", 2)
    try:
        config = JWTConfig(issuer=args.jwt_issuer, audience=tuple(args.jwt_audience), jwks_file=args.jwt_jwks)
        JWTVerifier(config)  # reads the JWKS file: an unreadable one is an error now, not at the first call
    except ConfigError as exc:
        raise _usage_error(exc, (("JWTConfig.jwks_file", "--jwt-jwks"),)) from None
    return config


def server_auth(args: argparse.Namespace) -> AuthConfig | None:
    """``ServerConfig.auth`` from the serve flags (None: no call is checked).

    A key or token is required even with ``--client-ca``: the certificate
    admits the connection, the token the call (``AuthConfig.mtls`` off).
    """
    jwt = _jwt(args)
    api_keys = _read_api_keys(args.api_key_file) if args.api_key_file is not None else None
    if jwt is None and api_keys is None:
        return None
    return AuthConfig(jwt=jwt, api_keys=api_keys, mtls=False)
