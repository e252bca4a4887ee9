"""The exporter's ``--web-config``: TLS, client certificates and basic auth, as Prometheus exporters lock theirs.

The file has the format of Prometheus' exporter-toolkit (``--web.config.file`` of node_exporter and the others),
so one file and one habit serve a fleet's every exporter::

    tls_server_config:
      cert_file: server.pem          # paths are relative to this file's folder
      key_file: server-key.pem
      client_auth_type: RequireAndVerifyClientCert   # mTLS; VerifyClientCertIfGiven; NoClientCert (default)
      client_ca_file: clients-ca.pem
      client_allowed_sans: [prometheus.example.org]  # optional: the client certificate must name one of them
      min_version: TLS12             # TLS10, TLS11, TLS12 (default), TLS13; max_version likewise
    http_server_config:
      headers: {X-Content-Type-Options: nosniff}
    basic_auth_users:
      prometheus: $2b$12$...          # a bcrypt hash (infertop exporter --hash-password)

As in exporter-toolkit, an unknown key is an error, not ignored. What Python's ``ssl`` cannot do the way Go's
``crypto/tls`` does is refused in words rather than silently weakened: ``RequestClientCert`` and
``RequireAnyClientCert`` (they accept any certificate), Go's cipher-suite and curve names, inline ``cert`` and
``key``, and ``rate_limit``. The file is read once, at start.

Passwords are checked with bcrypt, one check at a time (a flood of wrong passwords costs one core); a verdict
is cached by a SHA-256 of user, hash and password, so a scrape every second costs one bcrypt, not one per
scrape. An unknown user is checked against a hash of the same cost, so the time taken does not say which users
exist.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import ssl
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt


class WebConfigError(ValueError):
    """The web config cannot be used; the message names the file and the field."""


CLIENT_AUTH_TYPES = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# The response headers exporter-toolkit lets a config set, and the values it allows where they are a choice.
EXTRA_HEADERS: dict[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}
_BCRYPT_HASH = re.compile(r"^\$2[abxy]\$(\d\d)\$[./A-Za-z0-9]{53}$")
_UNSUPPORTED_TLS = {
    "cert": "inline certificates are not supported: use cert_file",
    "key": "inline keys are not supported: use key_file",
    "cipher_suites": "not supported (Go's cipher-suite names): OpenSSL's defaults for the TLS versions apply",
    "curve_preferences": "not supported (Go's curve names): OpenSSL's defaults apply",
}
_TLS_KEYS = {
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "client_ca",
    "client_allowed_sans",
    "min_version",
    "max_version",
    "prefer_server_cipher_suites",
    *_UNSUPPORTED_TLS,
}


@dataclass(frozen=True)
class TlsServerConfig:
    """``tls_server_config``, checked; :attr:`context` is built at load (a bad file fails at start)."""

    cert_file: Path
    key_file: Path
    client_auth_type: str
    client_ca_file: Path | None
    client_allowed_sans: tuple[str, ...]
    min_version: ssl.TLSVersion
    max_version: ssl.TLSVersion
    context: ssl.SSLContext = field(compare=False, repr=False)

    @property
    def verifies_clients(self) -> bool:
        """Every client must show a certificate signed by the client CA (mTLS)."""
        return self.client_auth_type == "RequireAndVerifyClientCert"


@dataclass(frozen=True)
class WebConfig:
    """A loaded ``--web-config``: TLS (None: plain HTTP), basic-auth users (name -> bcrypt hash), headers."""

    path: Path | None = None
    tls: TlsServerConfig | None = None
    users: Mapping[str, str] = field(default_factory=dict)
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def authenticates(self) -> bool:
        """Whether every request must prove who sends it (a password or a verified client certificate)."""
        return bool(self.users) or (self.tls is not None and self.tls.verifies_clients)


def load_web_config(path: Path) -> WebConfig:
    """Read and check ``path``. Raises :class:`WebConfigError` naming the file and the field."""
    try:
        import yaml
    except ImportError:  # pragma: no cover - a declared dependency
        raise WebConfigError(f"{path}: reading a web config needs PyYAML (pip install pyyaml)") from None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WebConfigError(f"{path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise WebConfigError(f"{path}: not YAML ({where}{problem})") from None
    return parse_web_config(data, path)


def parse_web_config(data: Any, path: Path) -> WebConfig:
    """A web config from its parsed YAML; relative file names are read from ``path``'s folder."""
    if data is None:
        return WebConfig(path=path)  # an empty file: plain HTTP, no users (as exporter-toolkit)
    top = _mapping(data, path, "the top level")
    _known_keys(top, {"tls_server_config", "http_server_config", "basic_auth_users", "rate_limit"}, path, "")
    if "rate_limit" in top:
        raise WebConfigError(f"{path}: rate_limit: not supported (the exporter caps connections and workers)")
    tls = None
    if top.get("tls_server_config") is not None:
        tls = _tls(_mapping(top["tls_server_config"], path, "tls_server_config"), path)
    headers: tuple[tuple[str, str], ...] = ()
    if top.get("http_server_config") is not None:
        headers = _http(_mapping(top["http_server_config"], path, "http_server_config"), path)
    users: dict[str, str] = {}
    if top.get("basic_auth_users") is not None:
        for user, hashed in _mapping(top["basic_auth_users"], path, "basic_auth_users").items():
            where = f"basic_auth_users.{user}"
            if not isinstance(user, str) or not user or ":" in user:
                raise WebConfigError(f"{path}: {where}: a user name is a string without ':'")
            if not isinstance(hashed, str) or not _BCRYPT_HASH.match(hashed):
                raise WebConfigError(
                    f"{path}: {where}: not a bcrypt hash ($2b$12$ and 53 characters; infertop exporter "
                    "--hash-password makes one)"
                )
            if not 4 <= bcrypt_cost(hashed) <= 31:
                raise WebConfigError(f"{path}: {where}: a bcrypt cost is from 4 to 31")
            users[user] = hashed
    return WebConfig(path=path, tls=tls, users=users, headers=headers)


def bcrypt_cost(hashed: str) -> int:
    return int(hashed[4:6])


def _mapping(value: Any, path: Path, where: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise WebConfigError(f"{path}: {where}: expected a mapping of keys to values")
    return value


def _known_keys(section: Mapping[Any, Any], known: set[str], path: Path, prefix: str) -> None:
    for key in section:
        if key not in known:
            raise WebConfigError(f"{path}: {prefix}{key}: unknown field (known: {', '.join(sorted(known))})")


def _string(section: Mapping[str, Any], key: str, path: Path, where: str) -> str | None:
    value = section.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise WebConfigError(f"{path}: {where}.{key}: expected a non-empty string")
    return value


def _file(section: Mapping[str, Any], key: str, path: Path, where: str) -> Path | None:
    name = _string(section, key, path, where)
    if name is None:
        return None
    file = Path(name).expanduser()
    file = file if file.is_absolute() else path.parent / file
    try:
        with file.open("rb"):
            pass
    except OSError as exc:
        raise WebConfigError(f"{path}: {where}.{key}: cannot read {file} ({exc.strerror or exc})") from None
    return file


def _tls(section: Mapping[str, Any], path: Path) -> TlsServerConfig:
    where = "tls_server_config"
    _known_keys(section, _TLS_KEYS, path, f"{where}.")
    for key, why in _UNSUPPORTED_TLS.items():
        if section.get(key) not in (None, "", []):
            raise WebConfigError(f"{path}: {where}.{key}: {why}")
    cert_file = _file(section, "cert_file", path, where)
    key_file = _file(section, "key_file", path, where)
    if cert_file is None or key_file is None:
        missing = "cert_file" if cert_file is None else "key_file"
        raise WebConfigError(f"{path}: {where}.{missing}: required (the server's certificate and its key)")
    auth = _string(section, "client_auth_type", path, where) or "NoClientCert"
    if auth in ("RequestClientCert", "RequireAnyClientCert"):
        raise WebConfigError(
            f"{path}: {where}.client_auth_type: {auth} accepts any certificate and is not supported: use "
            "RequireAndVerifyClientCert with client_ca_file"
        )
    if auth not in CLIENT_AUTH_TYPES:
        raise WebConfigError(
            f"{path}: {where}.client_auth_type: {auth!r} is not one of {', '.join(CLIENT_AUTH_TYPES)}"
        )
    ca_file = _file(section, "client_ca_file", path, where)
    ca_text = _string(section, "client_ca", path, where)
    if ca_file is not None and ca_text is not None:
        raise WebConfigError(f"{path}: {where}.client_ca: give client_ca or client_ca_file, not both")
    has_ca = ca_file is not None or ca_text is not None
    if has_ca and auth == "NoClientCert":
        raise WebConfigError(
            f"{path}: {where}.client_auth_type: a client CA is set but NoClientCert checks no certificate "
            "(RequireAndVerifyClientCert does)"
        )
    if not has_ca and auth != "NoClientCert":
        raise WebConfigError(
            f"{path}: {where}.client_ca_file: {auth} needs the CA that signs client certificates"
        )
    sans = section.get("client_allowed_sans") or []
    if not isinstance(sans, list) or not all(isinstance(s, str) and s for s in sans):
        raise WebConfigError(f"{path}: {where}.client_allowed_sans: expected a list of names")
    if sans and auth != "RequireAndVerifyClientCert":
        raise WebConfigError(
            f"{path}: {where}.client_allowed_sans: needs client_auth_type RequireAndVerifyClientCert"
        )
    versions = []
    for key, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        name = _string(section, key, path, where) or default
        if name not in TLS_VERSIONS:
            raise WebConfigError(f"{path}: {where}.{key}: {name!r} is not one of {', '.join(TLS_VERSIONS)}")
        versions.append(TLS_VERSIONS[name])
    if versions[0] > versions[1]:
        raise WebConfigError(f"{path}: {where}.min_version: above max_version")
    prefer = section.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        raise WebConfigError(f"{path}: {where}.prefer_server_cipher_suites: expected true or false")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version, context.maximum_version = versions
    context.options |= ssl.OP_NO_RENEGOTIATION
    if prefer:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    except ssl.SSLError as exc:
        raise WebConfigError(
            f"{path}: {where}.cert_file, key_file: not a PEM certificate and its private key "
            f"({exc.reason or exc})"
        ) from None
    if has_ca:
        try:
            context.load_verify_locations(cafile=ca_file, cadata=ca_text)
        except (ssl.SSLError, ValueError) as exc:
            field_name = "client_ca_file" if ca_file is not None else "client_ca"
            raise WebConfigError(
                f"{path}: {where}.{field_name}: no PEM certificate in it ({getattr(exc, 'reason', None) or exc})"
            ) from None
    context.verify_mode = CLIENT_AUTH_TYPES[auth]
    return TlsServerConfig(
        cert_file=cert_file,
        key_file=key_file,
        client_auth_type=auth,
        client_ca_file=ca_file,
        client_allowed_sans=tuple(sans),
        min_version=versions[0],
        max_version=versions[1],
        context=context,
    )


def _http(section: Mapping[str, Any], path: Path) -> tuple[tuple[str, str], ...]:
    where = "http_server_config"
    _known_keys(section, {"http2", "headers"}, path, f"{where}.")
    if not isinstance(section.get("http2", True), bool):  # HTTP/1.1 is served either way
        raise WebConfigError(f"{path}: {where}.http2: expected true or false")
    headers = _mapping(section.get("headers") or {}, path, f"{where}.headers")
    out = []
    for name, value in headers.items():
        if name not in EXTRA_HEADERS:
            raise WebConfigError(
                f"{path}: {where}.headers.{name}: cannot be set (only {', '.join(EXTRA_HEADERS)})"
            )
        allowed = EXTRA_HEADERS[name]
        if not isinstance(value, str) or "\r" in value or "\n" in value or (allowed and value not in allowed):
            expected = f"one of {', '.join(allowed)}" if allowed else "a one-line string"
            raise WebConfigError(f"{path}: {where}.headers.{name}: expected {expected}")
        if value:  # blank: unset
            out.append((name, value))
    return tuple(out)


def basic_credentials(authorization: str | None) -> tuple[bytes, bytes] | None:
    """The user and password of an ``Authorization: Basic`` header; None when there are none to read."""
    if not authorization:
        return None
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    return (user, password) if colon else None


class BasicAuth:
    """Checks ``Authorization: Basic`` headers against bcrypt hashes, as exporter-toolkit does.

    Thread-safe. A verdict (good or bad) is cached for a (user, hash, password) under its SHA-256, never the
    password itself; the cache holds ``cache_size`` entries, the least recently used going first.
    """

    REALM = "infertop exporter"

    def __init__(self, users: Mapping[str, str], *, cache_size: int = 100) -> None:
        if not users:
            raise ValueError("BasicAuth needs at least one user")
        self._users = {u.encode(): h.encode() for u, h in users.items()}
        cost = max(bcrypt_cost(h) for h in users.values())
        # An unknown user costs what a known one does: the time taken does not tell who exists.
        self._decoy = bcrypt.hashpw(b"infertop: no such user", bcrypt.gensalt(rounds=cost))
        self._cache: OrderedDict[bytes, bool] = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()
        self._bcrypt_lock = threading.Lock()  # bcrypt is slow on purpose: one at a time

    @property
    def challenge(self) -> str:
        """The ``WWW-Authenticate`` header of a 401."""
        return f'Basic realm="{self.REALM}", charset="UTF-8"'

    def check(self, authorization: str | None) -> bool:
        """Whether the header carries a configured user's password."""
        credentials = basic_credentials(authorization)
        if credentials is None:
            return False
        user, password = credentials
        hashed = self._users.get(user)
        known = hashed is not None
        hashed = hashed if hashed is not None else self._decoy
        key = hashlib.sha256(b"\0".join((str(len(user)).encode(), user, hashed, password))).digest()
        with self._cache_lock:
            verdict = self._cache.get(key)
            if verdict is not None:
                self._cache.move_to_end(key)
        if verdict is None:
            with self._bcrypt_lock:
                try:
                    verdict = bcrypt.checkpw(password, hashed)
                except ValueError:  # longer than bcrypt's 72 bytes, or a NUL in it: not a password it made
                    verdict = False
            with self._cache_lock:
                self._cache[key] = verdict
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return known and verdict
