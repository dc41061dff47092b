#!/usr/bin/env python3
"""smsapi: an HTTP API in front of the SMS Server Tools 3 (smsd) spool.

Cron jobs, monitoring and scripts send and track SMS with one curl call;
smsd does the talking to the GSM modem. The API is compatible with the
clients of the old smstools-http-api (v0.1).

Run it:
    python3 smsapi.py [--config PATH]           serve (waitress, else wsgiref)
    python3 smsapi.py hash-password             make a password hash for the config
    python3 smsapi.py check-config [--config P] validate the config and spool

Security stance: every message route needs HTTP Basic auth against salted
scrypt hashes from the config (no password is stored or logged in clear); a
user sees only its own messages; message ids are unguessable and are checked
against a strict pattern before any file is touched; message files are
written atomically under names smsd ignores, so smsd never sees half a file.
Speak plain HTTP on loopback only, or put a TLS reverse proxy in front.
"""

###############################################################################
# Imports ######################################################################
###############################################################################

import argparse
import base64
import binascii
import configparser
import dataclasses
import errno
import functools
import getpass
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import sys
import time
import urllib.parse
from http import HTTPStatus

__version__ = "1.0.0"

###############################################################################
# Constants ####################################################################
###############################################################################

API = "/api/v1.0"
KINDS = ("outgoing", "checked", "sent", "failed", "incoming")
DEFAULT_CONFIGS = ("smsapi.ini", "/etc/smsapi/smsapi.ini")
DEFAULT_SPOOL = {kind: "/var/spool/sms/" + kind for kind in KINDS}  # Debian's
EX_CONFIG = 78  # sysexits.h: configuration error

#: A message id is a spool file name: nothing that could leave the directory,
#: nothing smsd would skip (a leading dot), nothing longer than a sane name.
MESSAGE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}", re.ASCII)
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
QUEUE_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}", re.ASCII)
#: International format: digits only, no leading zero, at most 15 (E.164).
MOBILE = re.compile(r"[1-9][0-9]{2,14}", re.ASCII)
MOBILE_SEPARATORS = re.compile(r"[\s().-]")
LEADING_SPACE = re.compile(r"^ (?=[0-9])")
MOBILE_PATTERN = re.compile(r"[0-9]{1,15}\*?", re.ASCII)
VALIDITY = re.compile(r"([0-9]{1,3})\s*(min|hour|day|week|month|year)?", re.ASCII)

MAX_SPOOL_FILE = 1 << 20  # bytes read from one spool file at the most
TEMP_PREFIX = ".smsapi-"  # smsd skips names that start with a dot

#: Characters of the GSM 03.38 basic table that smsd 3.1.21 converts exactly
#: from a UTF-8 file. The currency sign U+00A4 is left out on purpose: smsd
#: reads it as ISO-8859-15 byte 0xA4, which is the euro sign.
GSM_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM_EXTENSION = frozenset("\f^{}\\[~]|€")  # each costs an escape septet too
GSM_SINGLE, GSM_PART = 160, 153  # septets in one message / in each part
UCS2_SINGLE, UCS2_PART = 70, 67  # UTF-16 code units likewise

###############################################################################
# Errors #######################################################################
###############################################################################


class ApiError(Exception):
    """An HTTP error for the client: status, a one-line message, extra headers."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status = HTTPStatus(status)
        self.message = message
        self.headers = list(headers)


def not_found():
    """The one answer for anything missing or not visible to the caller."""
    return ApiError(HTTPStatus.NOT_FOUND, "Not found")


class ConfigError(Exception):
    """The configuration has problems; args[0] is the list of messages."""

    @property
    def problems(self):
        return self.args[0]


###############################################################################
# Configuration ################################################################
###############################################################################


@dataclasses.dataclass(frozen=True)
class User:
    """An API user from a [user:NAME] section."""

    name: str
    password: str  # the hash string, never the password
    mobiles: tuple = ()  # allow-list patterns; empty means any number
    admin: bool = False
    inbox: bool = False

    def may_send_to(self, mobile):
        """True when the normalised number is on this user's allow-list."""
        if not self.mobiles:
            return True
        return any(
            mobile.startswith(p[:-1]) if p.endswith("*") else mobile == p
            for p in self.mobiles
        )


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the daemon reads from its INI file, validated."""

    path: str = "smsapi.ini"
    listen: tuple = ("127.0.0.1:5000",)
    threads: int = 4
    max_body: int = 65536
    max_parts: int = 10
    max_recipients: int = 100
    fsync: bool = True
    queues: tuple = ()
    spool: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_SPOOL))
    users: dict = dataclasses.field(default_factory=dict)


def as_bool(value):
    """yes/no, true/false, on/off, 1/0."""
    word = value.strip().lower()
    if word in ("yes", "true", "on", "1"):
        return True
    if word in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"expected yes or no, got {value!r}")


def as_count(value):
    """A whole number of at least 1."""
    number = int(value) if value.strip().isdigit() else 0
    if number < 1:
        raise ValueError(f"expected a number of at least 1, got {value!r}")
    return number


def as_size(value):
    """A byte count, with an optional k or M suffix."""
    text = value.strip().lower()
    scale = {"k": 1 << 10, "m": 1 << 20}.get(text[-1:], 1)
    return as_count(text[:-1] if scale > 1 else text) * scale


def as_listen(value):
    """Space-separated host:port addresses; IPv6 hosts in brackets."""
    addresses = tuple(value.split())
    if not addresses:
        raise ValueError("expected host:port")
    for address in addresses:
        parse_address(address)
    return addresses


def parse_address(address):
    """Split 'host:port' or '[v6]:port' into (host, port), or raise ValueError."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or ":" in host and "[" not in address:
        raise ValueError(f"expected host:port or [ipv6]:port, got {address!r}")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad port in {address!r}")
    return host, int(port)


def as_queues(value):
    """Space-separated smsd queue (provider) names."""
    names = tuple(value.split())
    for name in names:
        if not QUEUE_NAME.fullmatch(name):
            raise ValueError(f"bad queue name {name!r}")
    return names


def as_mobile_patterns(value):
    """Space- or comma-separated numbers, each may end in * (a prefix)."""
    patterns = tuple(p.lstrip("+") for p in value.replace(",", " ").split())
    for pattern in patterns:
        if not MOBILE_PATTERN.fullmatch(pattern):
            raise ValueError(
                f"bad number pattern {pattern!r} (digits, optionally ending in *)"
            )
    return patterns


def as_password_hash(value):
    """A hash made by hash-password; a plain password is refused."""
    value = value.strip()
    parse_password_hash(value)
    return value


def as_path(value):
    """A non-empty filesystem path."""
    if not value.strip():
        raise ValueError("expected a path")
    return value.strip()


#: The schema: section -> option -> converter; [user:NAME] sections use USER_OPTIONS.
SERVER_OPTIONS = {
    "listen": as_listen,
    "threads": as_count,
    "max_body": as_size,
    "max_parts": as_count,
    "max_recipients": as_count,
    "fsync": as_bool,
    "queues": as_queues,
}
SPOOL_OPTIONS = {kind: as_path for kind in KINDS}
USER_OPTIONS = {
    "password": as_password_hash,
    "mobiles": as_mobile_patterns,
    "admin": as_bool,
    "inbox": as_bool,
}


def find_config(path=None):
    """The config file to use: the given one, ./smsapi.ini, or /etc/smsapi/smsapi.ini."""
    if path:
        return path
    return next((p for p in DEFAULT_CONFIGS if os.path.exists(p)), DEFAULT_CONFIGS[-1])


def load_config(path):
    """Read and validate the INI file at path; raise ConfigError with every problem."""
    parser = configparser.ConfigParser(
        interpolation=None, inline_comment_prefixes=(";", "#"), default_section="\0"
    )
    try:
        with open(path, encoding="utf-8") as file:
            parser.read_file(file)
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise ConfigError([f"{path}: cannot read: {one_line(exc)}"]) from None
    problems = []
    values = {"path": path, "spool": dict(DEFAULT_SPOOL), "users": {}}
    for section in parser.sections():
        if section == "server":
            values.update(read_section(parser, path, section, SERVER_OPTIONS, problems))
        elif section == "spool":
            values["spool"].update(
                read_section(parser, path, section, SPOOL_OPTIONS, problems)
            )
        elif section.startswith("user:") and USER_NAME.fullmatch(section[5:]):
            values["users"][section[5:]] = read_user(parser, path, section, problems)
        else:
            problems.append(f"{path}: [{section}]: unknown section")
    config = Config(**values)
    problems += check_spool(config)
    if problems:
        raise ConfigError(problems)
    return config


def read_section(parser, path, section, schema, problems):
    """Convert the options of one section by schema, collecting problems."""
    values = {}
    for key, raw in parser.items(section):
        convert = schema.get(key)
        if convert is None:
            problems.append(f"{path}: [{section}] {key}: unknown option")
            continue
        try:
            values[key] = convert(raw)
        except ValueError as exc:
            problems.append(f"{path}: [{section}] {key}: {exc}")
    return values


def read_user(parser, path, section, problems):
    """Build the User of one [user:NAME] section, collecting problems."""
    if not parser.has_option(section, "password"):
        problems.append(f"{path}: [{section}] password: missing")
    values = read_section(parser, path, section, USER_OPTIONS, problems)
    return User(name=section[5:], **{"password": "", **values})


def check_spool(config):
    """Problems with the spool directories: missing, or not usable by this process."""
    problems = []
    for kind, directory in config.spool.items():
        where = f"{config.path}: [spool] {kind}: {directory}"
        if not os.path.isdir(directory):
            problems.append(where + " is not a directory")
        elif kind == "outgoing" and not os.access(directory, os.W_OK | os.X_OK):
            problems.append(where + " is not writable by this process")
        elif not os.access(directory, os.R_OK | os.X_OK):
            problems.append(where + " is not readable by this process")
    return problems


###############################################################################
# Logging ######################################################################
###############################################################################

log = logging.getLogger("smsapi")
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")


def escape(value):
    """Make client-supplied text safe for a one-line log record."""
    return CONTROL_CHARS.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))


def one_line(exc):
    """An exception as a short single line."""
    return escape(str(exc) or type(exc).__name__)


def setup_logging():
    """Log to stderr; journald (JOURNAL_STREAM) adds its own timestamps."""
    fmt = "%(levelname)s %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=logging.INFO, format=fmt, stream=sys.stderr)


###############################################################################
# GSM and UCS2 encoding ########################################################
###############################################################################


@dataclasses.dataclass(frozen=True)
class Encoding:
    """How a text goes on the air: alphabet, parts, and the file body for smsd."""

    alphabet: str  # "GSM" (sent 7-bit) or "UCS2"
    parts: int
    units: int  # septets for GSM, UTF-16 code units for UCS2
    body: bytes
    header: str  # the Alphabet: header value smsd reads


def encode_text(text):
    """Choose the encoding smsd will use and count the parts it will send."""
    septets = gsm_septets(text)
    if septets is not None:
        parts = 1 if septets <= GSM_SINGLE else math.ceil(septets / GSM_PART)
        return Encoding("GSM", parts, septets, text.encode("utf-8"), "UTF-8")
    body = text.encode("utf-16-be")
    units = len(body) // 2
    parts = 1 if units <= UCS2_SINGLE else math.ceil(units / UCS2_PART)
    return Encoding("UCS2", parts, units, body, "UCS2")


def gsm_septets(text):
    """Septets text needs in the GSM alphabet, or None if it must go as UCS2.

    smsd cuts a long 7-bit text every 153 septets even inside an escape pair,
    which the phone cannot decode; such a text goes as UCS2 instead.
    """
    septets, straddles = 0, False
    for char in text:
        if char in GSM_BASIC:
            septets += 1
        elif char in GSM_EXTENSION:
            straddles = straddles or septets % GSM_PART == GSM_PART - 1
            septets += 2
        else:
            return None
    return None if straddles and septets > GSM_SINGLE else septets


def non_gsm_chars(text):
    """The distinct characters that keep a text out of the GSM alphabet."""
    return sorted({c for c in text if c not in GSM_BASIC and c not in GSM_EXTENSION})


###############################################################################
# Spool ########################################################################
###############################################################################


def new_message_id():
    """A fresh spool file name: recognisable prefix, 96 random bits."""
    return "smsapi." + secrets.token_urlsafe(12)


def render_message(user, mobile, encoding, options):
    """The bytes of an smsd message file: header lines, a blank line, the body."""
    lines = ["From: " + user, "To: " + mobile, "Alphabet: " + encoding.header]
    lines += [f"{name}: {value}" for name, value in options]
    return ("\n".join(lines) + "\n\n").encode("ascii") + encoding.body


def write_messages(config, files):
    """Put {message_id: bytes} into outgoing atomically; all or nothing.

    Each file is written and fsynced under a dot name smsd skips, then all are
    renamed to their ids and the directory is fsynced: a 201 is on disk.
    """
    outgoing = config.spool["outgoing"]
    temps = []
    try:
        for message_id, data in files.items():
            temp = os.path.join(outgoing, TEMP_PREFIX + message_id)
            write_file(temp, data, config.fsync)
            temps.append((temp, os.path.join(outgoing, message_id)))
        for temp, final in temps:
            os.rename(temp, final)
        if config.fsync:
            fsync_directory(outgoing)
    except OSError as exc:
        for temp, _ in temps:
            remove_quietly(temp)
        raise storage_error(exc) from exc


def write_file(path, data, sync):
    """Create path exclusively, group-writable for smsd, write data, fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o660)
    try:
        os.fchmod(fd, 0o660)  # smsd (group smsd via the setgid spool) rewrites it
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    except OSError:
        os.close(fd)
        remove_quietly(path)
        raise
    os.close(fd)


def fsync_directory(path):
    """Make renames in directory path durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_quietly(path):
    """Unlink path if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def storage_error(exc):
    """The HTTP error for a failed spool write."""
    log.error("spool write failed: %s", one_line(exc))
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ApiError(
            HTTPStatus.INSUFFICIENT_STORAGE, "Spool is full: message not stored"
        )
    return ApiError(
        HTTPStatus.SERVICE_UNAVAILABLE, "Spool is not writable: message not stored"
    )


def clean_temp_files(config):
    """Remove temporary files a crash left in outgoing; smsd never saw them."""
    outgoing = config.spool["outgoing"]
    for name in os.listdir(outgoing):
        if name.startswith(TEMP_PREFIX):
            remove_quietly(os.path.join(outgoing, name))
            log.warning("removed unfinished temporary file %s", escape(name))


@dataclasses.dataclass(frozen=True)
class Message:
    """A spool file as read back: where it is, its headers and decoded text."""

    message_id: str
    kind: str
    headers: dict
    text: str = None
    mtime: float = 0.0

    @property
    def owner(self):
        return self.headers.get("From")


def message_path(config, kind, message_id):
    """The file of message_id in spool kind; 404 for an id of the wrong form."""
    if not MESSAGE_ID.fullmatch(message_id):
        raise not_found()
    return os.path.join(config.spool[kind], message_id)


def read_message(config, kind, message_id):
    """The Message stored under message_id in kind, or None if there is none."""
    path = message_path(config, kind, message_id)
    try:
        with open(path, "rb") as file:
            mtime = os.fstat(file.fileno()).st_mtime
            data = file.read(MAX_SPOOL_FILE)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    headers, text = parse_message(data)
    return Message(message_id, kind, headers, text, mtime)


def parse_message(data):
    """Split smsd file bytes into ({header: value}, text); never raises."""
    head, sep, body = data.partition(b"\n\n")
    if not sep and b"\r\n\r\n" in data:
        head, _, body = data.partition(b"\r\n\r\n")
    headers = {}
    for line in head.decode("utf-8", "replace").splitlines():
        key, colon, value = line.partition(":")
        if colon and key.strip():
            headers.setdefault(key.strip(), value.strip())
    return headers, decode_body(headers.get("Alphabet", ""), body)


def decode_body(alphabet, body):
    """The text of a message body in smsd's Alphabet (only the first 3 letters count)."""
    kind = alphabet[:3].upper()
    if kind in ("UCS", "CHI", "UNI"):
        return body[: len(body) & ~1].decode("utf-16-be", "replace")
    if kind == "BIN":
        return None
    if kind in ("ISO", "LAT", "ANS"):
        return body.decode("iso8859-15")
    return body.decode("utf-8", "replace")


def find_message(config, message_id):
    """The message wherever it is now: one lookup per spool, in lifecycle order."""
    for kind in ("outgoing", "checked", "sent", "failed"):
        message = read_message(config, kind, message_id)
        if message is not None:
            return message
    return None


def list_names(config, kind):
    """File names in spool kind that are messages, newest first."""
    entries = []
    with os.scandir(config.spool[kind]) as scan:
        for entry in scan:
            if is_message_name(entry.name):
                try:
                    entries.append((entry.stat().st_mtime, entry.name))
                except FileNotFoundError:
                    continue  # smsd moved it meanwhile
    entries.sort(reverse=True)
    return [name for _, name in entries]


def is_message_name(name):
    """True for a file smsd would treat as a message (not temp, not lock)."""
    return bool(MESSAGE_ID.fullmatch(name)) and not (
        name.endswith(".LOCK") or name.startswith("LOCKED")
    )


###############################################################################
# HTTP helpers #################################################################
###############################################################################


class Request:
    """The parts of a WSGI environ a handler needs."""

    def __init__(self, environ, config):
        self.environ = environ
        self.config = config
        self.method = environ["REQUEST_METHOD"].upper()
        self.path = environ.get("PATH_INFO", "") or "/"
        self.args = {}  # filled by the router
        self.user = None  # filled by authenticate()

    @functools.cached_property
    def query(self):
        """The query string as {name: [values]}; 400 unless it is UTF-8."""
        return parse_form(self.environ.get("QUERY_STRING", "").encode("latin-1"))

    def header(self, name):
        """A request header by its HTTP name, or ''."""
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        return self.environ.get(key, "")

    def body(self):
        """The request body, refused with 413 past the limit without reading it all."""
        limit = self.config.max_body
        length = self.header("Content-Length").strip()
        if length:
            if not length.isdigit():
                raise ApiError(HTTPStatus.BAD_REQUEST, "Bad Content-Length")
            if int(length) > limit:
                raise too_large(limit)
            size = int(length)
        elif self.environ.get("wsgi.input_terminated"):
            size = limit + 1  # no length given, but the server ends the stream
        else:
            return b""
        data = self.environ["wsgi.input"].read(size)
        if len(data) > limit:
            raise too_large(limit)
        return data

    def param(self, name, default=None):
        """The last value of a query parameter, or default."""
        values = self.query.get(name)
        return values[-1] if values else default


def too_large(limit):
    return ApiError(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"Body is larger than {limit} bytes"
    )


def read_fields(request):
    """The send request's fields from JSON, a form, or the query string."""
    if request.method in ("GET", "HEAD"):
        return form_fields(request.query)
    media_type = request.header("Content-Type").split(";")[0].strip().lower()
    body = request.body()
    if media_type == "application/json" or media_type.endswith("+json"):
        return json_fields(body)
    if media_type == "application/x-www-form-urlencoded":
        return form_fields(parse_form(body))
    raise ApiError(
        HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
        "Content-Type must be application/json or application/x-www-form-urlencoded",
    )


def parse_form(data):
    """Decode urlencoded bytes strictly as UTF-8 into {name: [values]}."""
    try:
        return urllib.parse.parse_qs(
            data.decode("utf-8"), keep_blank_values=True, errors="strict"
        )
    except (UnicodeDecodeError, ValueError):
        raise ApiError(HTTPStatus.BAD_REQUEST, "Form data is not valid UTF-8") from None


def json_fields(body):
    """Decode a JSON object body."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ApiError(HTTPStatus.BAD_REQUEST, "Body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, "Body must be a JSON object")
    return data


def form_fields(query):
    """Fields from parsed form data; mobiles may be comma-separated or repeated."""
    fields = {key: values[-1] for key, values in query.items()}
    if "mobiles" in query:
        # An unescaped + in a query string arrives as a space: read it as +.
        fields["mobiles"] = [
            LEADING_SPACE.sub("+", m)
            for value in query["mobiles"]
            for m in value.split(",")
        ]
    for name in ("flash", "report"):
        if name in fields:
            fields[name] = form_bool(name, fields[name])
    for name in ("retries", "class"):
        if name in fields and fields[name].strip().isdigit():
            fields[name] = int(fields[name])
    return fields


def form_bool(name, value):
    try:
        return as_bool(value)
    except ValueError:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{name} must be yes or no") from None


def json_response(status, data, headers=()):
    """Status line, headers and body bytes of a JSON response."""
    body = (json.dumps(data, ensure_ascii=False, indent=1) + "\n").encode("utf-8")
    return (
        status,
        [("Content-Type", "application/json; charset=utf-8")] + list(headers),
        body,
    )


###############################################################################
# Authentication ###############################################################
###############################################################################

SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1  # 16 MiB, about 50 ms a check
PASSWORD_HASH = re.compile(
    r"\$scrypt\$ln=([0-9]{1,2}),r=([0-9]{1,2}),p=([0-9]{1,2})\$([A-Za-z0-9+/]{16,})\$([A-Za-z0-9+/]{43})",
    re.ASCII,
)


def hash_password(password, salt=None):
    """A salted scrypt hash string for the config: $scrypt$ln=..,r=..,p=..$salt$hash."""
    salt = salt or secrets.token_bytes(16)
    digest = scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    ln = SCRYPT_N.bit_length() - 1
    return f"$scrypt$ln={ln},r={SCRYPT_R},p={SCRYPT_P}${b64(salt)}${b64(digest)}"


def parse_password_hash(value):
    """(n, r, p, salt, digest) of a hash string, or ValueError naming the problem."""
    match = PASSWORD_HASH.fullmatch(value)
    if not match:
        if value.startswith("$scrypt$"):
            raise ValueError("malformed password hash")
        raise ValueError(
            "must be a hash from 'smsapi.py hash-password', not a password in clear"
        )
    ln, r, p = (int(g) for g in match.groups()[:3])
    if not 10 <= ln <= 20 or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise ValueError("password hash parameters out of range")
    return 1 << ln, r, p, unb64(match.group(4)), unb64(match.group(5))


def scrypt(password, salt, n, r, p):
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        dklen=32,
        maxmem=128 * r * n * p + (1 << 20),
    )


def b64(data):
    return base64.b64encode(data).decode("ascii").rstrip("=")


def unb64(text):
    return base64.b64decode(text + "=" * (-len(text) % 4))


class Authenticator:
    """Checks Basic credentials against the config, with a cache of successes.

    The cache keeps an HMAC of the password under a key that lives only in
    this process, so a hot credential costs one HMAC, not one scrypt, and the
    memory never holds the password itself.
    """

    def __init__(self, users):
        self.users = users
        self.key = secrets.token_bytes(32)
        self.verified = {}  # (user, stored hash) -> HMAC of the password
        self.dummy = hash_password(secrets.token_urlsafe(16))

    def check(self, name, password):
        """The User for these credentials, or None; same cost for unknown users."""
        user = self.users.get(name)
        stored = user.password if user else self.dummy
        tag = hmac.new(self.key, password.encode("utf-8", "replace"), "sha256").digest()
        cached = self.verified.get((name, stored)) if user else None
        if cached is not None and hmac.compare_digest(cached, tag):
            return user
        # Every failure costs one scrypt, so timing tells nothing about names.
        n, r, p, salt, digest = parse_password_hash(stored)
        good = hmac.compare_digest(scrypt(password, salt, n, r, p), digest)
        if good and user is not None:
            self.verified[(name, stored)] = tag
            return user
        return None


def authenticate(request, authenticator):
    """Set request.user from the Authorization header, or raise 401."""
    scheme, _, credentials = request.header("Authorization").strip().partition(" ")
    if scheme.lower() != "basic":
        raise unauthorized()
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise unauthorized() from None
    name, colon, password = decoded.partition(":")
    if not colon:
        raise unauthorized()
    request.user = authenticator.check(name, password)
    if request.user is None:
        log.warning("authentication failed for user %s", escape(name))
        raise unauthorized()


def unauthorized():
    return ApiError(
        HTTPStatus.UNAUTHORIZED,
        "Unauthorized access",
        [("WWW-Authenticate", 'Basic realm="smsapi", charset="UTF-8"')],
    )


###############################################################################
# Handlers #####################################################################
###############################################################################

SEND_FIELDS = frozenset(
    [
        "mobiles",
        "text",
        "queue",
        "flash",
        "report",
        "priority",
        "validity",
        "retries",
        "class",
    ]
)


def send_message(request):
    """Validate a send request completely, then queue one file per recipient."""
    fields = read_fields(request)
    unknown = sorted(set(fields) - SEND_FIELDS)
    if unknown:
        raise ApiError(
            HTTPStatus.BAD_REQUEST,
            "Unknown field(s): " + ", ".join(map(escape, unknown)),
        )
    recipients = read_recipients(request, fields.get("mobiles"))
    text = read_text(fields.get("text"))
    encoding = encode_text(text)
    if encoding.parts > request.config.max_parts:
        raise ApiError(
            HTTPStatus.BAD_REQUEST,
            f"Text needs {encoding.parts} parts; the limit is {request.config.max_parts}",
        )
    options = message_options(request.config, fields)
    ids = {mobile: new_message_id() for mobile in dict.fromkeys(recipients.values())}
    files = {
        ids[mobile]: render_message(request.user.name, mobile, encoding, options)
        for mobile in ids
    }
    write_messages(request.config, files)
    request.environ["smsapi.ids"] = list(files)
    return HTTPStatus.CREATED, {
        "message_id": {given: ids[mobile] for given, mobile in recipients.items()},
        "parts_count": encoding.parts,
        "sent_text": text,
        "encoding": encoding.alphabet,
    }


def read_recipients(request, mobiles):
    """{mobile as given: normalised number}, or 400/403 naming every bad one."""
    if isinstance(mobiles, str):
        mobiles = [mobiles]
    if (
        not isinstance(mobiles, list)
        or not mobiles
        or not all(isinstance(m, str) for m in mobiles)
    ):
        raise ApiError(
            HTTPStatus.BAD_REQUEST, "mobiles must be a non-empty list of phone numbers"
        )
    if len(mobiles) > request.config.max_recipients:
        raise ApiError(
            HTTPStatus.BAD_REQUEST,
            f"Too many recipients: {len(mobiles)}, the limit is {request.config.max_recipients}",
        )
    recipients, malformed, forbidden = {}, [], []
    for given in mobiles:
        number = normalise_mobile(given)
        if number is None:
            malformed.append(given)
        elif not request.user.may_send_to(number):
            forbidden.append(given)
        else:
            recipients[given] = number
    if malformed:
        raise ApiError(
            HTTPStatus.BAD_REQUEST,
            "Malformed phone number(s), expected international format: "
            + quoted(malformed),
        )
    if forbidden:
        raise ApiError(
            HTTPStatus.FORBIDDEN, "Not allowed to send to: " + quoted(forbidden)
        )
    return recipients


def normalise_mobile(given):
    """Digits of an international number ('+7 916-000', '79160...'), or None."""
    number = MOBILE_SEPARATORS.sub("", given)
    number = number.removeprefix("+")
    return number if MOBILE.fullmatch(number) else None


def quoted(values):
    return ", ".join(json.dumps(escape(v)) for v in values)


def read_text(text):
    """The message text: a non-empty string of valid Unicode without NUL."""
    if not isinstance(text, str) or not text:
        raise ApiError(HTTPStatus.BAD_REQUEST, "text must be a non-empty string")
    if "\0" in text:
        raise ApiError(HTTPStatus.BAD_REQUEST, "text must not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(HTTPStatus.BAD_REQUEST, "text is not valid Unicode") from None
    return text


def message_options(config, fields):
    """smsd headers for the optional fields, each validated: [(header, value)]."""
    options = []
    if fields.get("queue") is not None:
        if fields["queue"] not in config.queues:
            raise ApiError(
                HTTPStatus.BAD_REQUEST,
                "Unknown queue; known: " + " ".join(config.queues),
            )
        options.append(("Queue", fields["queue"]))
    for name, header in (("flash", "Flash"), ("report", "Report")):
        if fields.get(name) is not None:
            options.append((header, "yes" if expect(fields, name, bool) else "no"))
    priority = fields.get("priority")
    if priority is not None:
        if priority not in ("high", "normal"):
            raise ApiError(HTTPStatus.BAD_REQUEST, "priority must be high or normal")
        if priority == "high":
            options.append(("Priority", "High"))
    if fields.get("validity") is not None:
        options.append(("Validity", read_validity(fields["validity"])))
    if fields.get("retries") is not None:
        options.append(("Retries", str(expect(fields, "retries", int, 0, 100))))
    if fields.get("class") is not None:
        options.append(("Class", str(expect(fields, "class", int, 0, 3))))
    return options


def expect(fields, name, kind, low=None, high=None):
    """fields[name] if it is of kind (and within low..high), else 400."""
    value = fields[name]
    if type(value) is not kind or low is not None and not low <= value <= high:
        what = (
            "yes/no (a boolean)"
            if kind is bool
            else f"a whole number from {low} to {high}"
        )
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{name} must be {what}")
    return value


def read_validity(value):
    """smsd's Validity: a number 0-255 or a count of min/hour/day/week/month/year."""
    text = (
        str(value).strip()
        if isinstance(value, (str, int)) and not isinstance(value, bool)
        else ""
    )
    match = VALIDITY.fullmatch(text)
    if not match or match.group(2) is None and int(match.group(1)) > 255:
        raise ApiError(
            HTTPStatus.BAD_REQUEST, "validity must be like 30min, 2hour, 1day or 0-255"
        )
    return "".join(g for g in match.groups() if g)


def visible(request, message):
    """True when the caller may see message: its own, or any for admins."""
    user = request.user
    if message.kind == "incoming":
        return user.admin or user.inbox
    return user.admin or message.owner == user.name


def get_message(request):
    """Every header of one message file, plus its id and decoded text."""
    kind, message_id = request.args["kind"], request.args["message_id"]
    message = read_message(request.config, kind, message_id)
    if message is None or not visible(request, message):
        raise not_found()
    return HTTPStatus.OK, message_fields(message)


def message_fields(message):
    return {**message.headers, "message_id": message.message_id, "text": message.text}


def get_status(request):
    """Where a message is in smsd's lifecycle, found by name, never by a scan."""
    message = find_message(request.config, request.args["message_id"])
    if message is None or not visible(request, message):
        raise not_found()
    headers = message.headers
    status = {"outgoing": "queued", "checked": "sending"}.get(
        message.kind, message.kind
    )
    data = {"message_id": message.message_id, "status": status, "to": headers.get("To")}
    if status == "sent":
        data.update(sent_at=headers.get("Sent"), modem=headers.get("Modem"))
    elif status == "failed":
        data.update(failed_at=headers.get("Failed"), reason=headers.get("Fail_reason"))
    return HTTPStatus.OK, data


def list_messages(request):
    """Ids in one spool the caller may see, newest first, a page at a time."""
    kind = request.args["kind"]
    limit = query_int(request, "limit", 100, 1, 1000)
    offset = query_int(request, "offset", 0, 0, 10**9)
    names = list_names(request.config, kind)
    if not request.user.admin:
        names = [n for n in names if visible_name(request, kind, n)]
    return HTTPStatus.OK, {
        "message_id": names[offset : offset + limit],
        "total_count": len(names),
        "limit": limit,
        "offset": offset,
    }


def visible_name(request, kind, name):
    message = read_message(request.config, kind, name)
    return message is not None and visible(request, message)


def query_int(request, name, default, low, high):
    value = request.param(name)
    if value is None:
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise ApiError(
            HTTPStatus.BAD_REQUEST,
            f"{name} must be a number from {low} to {high}",
        )
    return int(value)


def cancel_message(request):
    """Delete a message: a user's own while queued; an admin's anything smsd is not sending."""
    config, kind, message_id = (
        request.config,
        request.args["kind"],
        request.args["message_id"],
    )
    message = read_message(config, kind, message_id)
    if message is None or not visible(request, message):
        raise not_found()
    if kind == "checked":
        raise ApiError(
            HTTPStatus.CONFLICT, "smsd is sending this message; it cannot be cancelled"
        )
    if kind != "outgoing" and not request.user.admin:
        raise ApiError(HTTPStatus.CONFLICT, "Only a queued message can be cancelled")
    path = message_path(config, kind, message_id)
    if kind == "outgoing":
        take_from_smsd(config, path, message_id)
    else:
        remove_quietly(path)
    return HTTPStatus.OK, {"message_id": message_id, "deleted": True}


def take_from_smsd(config, path, message_id):
    """Cancel a queued file: rename it to a name smsd skips, then unlink it.

    The rename is atomic, so either we own the file or smsd already took it.
    """
    hidden = os.path.join(
        config.spool["outgoing"], TEMP_PREFIX + "cancel-" + message_id
    )
    try:
        os.rename(path, hidden)
    except FileNotFoundError:
        raise ApiError(
            HTTPStatus.CONFLICT,
            "smsd took this message already; it cannot be cancelled",
        ) from None
    os.unlink(hidden)
    if os.path.exists(os.path.join(config.spool["checked"], message_id)):
        raise ApiError(
            HTTPStatus.CONFLICT,
            "smsd took this message already; it cannot be cancelled",
        )


def monitoring(request):
    """Is the spool usable? 200 {"monitoring": "ok"} or 503 with the reason."""
    problems = [p.split(": ", 1)[-1] for p in check_spool(request.config)]
    if problems:
        return HTTPStatus.SERVICE_UNAVAILABLE, {
            "monitoring": "fail",
            "error": "; ".join(problems),
        }
    return HTTPStatus.OK, {"monitoring": "ok"}


###############################################################################
# Routes #######################################################################
###############################################################################

#: (methods, path template, handler, needs auth). {kind} is one of KINDS;
#: {message_id} is one path segment, checked against MESSAGE_ID by the spool.
ROUTES = [
    ("GET", API + "/monitoring", monitoring, False),
    ("POST GET", API + "/sms/outgoing", send_message, True),
    ("GET", API + "/sms/status/{message_id}", get_status, True),
    ("GET", API + "/sms/{kind}/", list_messages, True),
    ("GET", API + "/sms/{kind}/{message_id}", get_message, True),
    ("DELETE", API + "/sms/{kind}/{message_id}", cancel_message, True),
]

PLACEHOLDERS = {"kind": "|".join(KINDS), "message_id": "[^/]+"}


def compile_route(template):
    """A regex for a path template with {name} placeholders."""
    pattern = re.sub(
        r"\{(\w+)\}",
        lambda m: f"(?P<{m.group(1)}>{PLACEHOLDERS[m.group(1)]})",
        re.escape(template).replace(r"\{", "{").replace(r"\}", "}"),
    )
    return re.compile(pattern)


COMPILED_ROUTES = [
    (frozenset(methods.split()), compile_route(template), handler, auth)
    for methods, template, handler, auth in ROUTES
]


def match_route(method, path):
    """(handler, needs auth, args) for the request, or 404/405."""
    allowed = set()
    for methods, pattern, handler, auth in COMPILED_ROUTES:
        match = pattern.fullmatch(path)
        if match is None:
            continue
        if method in methods or method == "HEAD" and "GET" in methods:
            return handler, auth, match.groupdict()
        allowed |= methods
    if not allowed:
        raise not_found()
    if "GET" in allowed:
        allowed.add("HEAD")
    raise ApiError(
        HTTPStatus.METHOD_NOT_ALLOWED,
        "Method not allowed",
        [("Allow", ", ".join(sorted(allowed)))],
    )


###############################################################################
# Application ##################################################################
###############################################################################


class Application:
    """The WSGI application: route, authenticate, handle, answer JSON."""

    def __init__(self, config):
        self.config = config
        self.authenticator = Authenticator(config.users)

    def __call__(self, environ, start_response):
        started = time.monotonic()
        request = Request(environ, self.config)
        status, headers, body = self.respond(request)
        headers.append(("Content-Length", str(len(body))))
        start_response(f"{status.value} {status.phrase}", headers)
        self.log_request(request, status, started)
        return [b"" if request.method == "HEAD" else body]

    def respond(self, request):
        """Status, headers and body for a request; every error becomes JSON here."""
        try:
            handler, auth, request.args = match_route(request.method, request.path)
            if auth:
                authenticate(request, self.authenticator)
            status, data = handler(request)
            return json_response(status, data)
        except ApiError as exc:
            return json_response(exc.status, {"error": exc.message}, exc.headers)
        except OSError as exc:  # the spool, not the request, is at fault
            log.error(
                "spool error on %s %s: %s",
                request.method,
                escape(request.path),
                one_line(exc),
            )
            return json_response(
                HTTPStatus.SERVICE_UNAVAILABLE, {"error": "Spool is not readable"}
            )
        except Exception:  # the one place the unexpected is caught
            log.exception(
                "internal error on %s %s", request.method, escape(request.path)
            )
            return json_response(
                HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "Internal server error"}
            )

    def log_request(self, request, status, started):
        log.info(
            "%s %s %d user=%s ids=%s %.1fms",
            request.method,
            escape(request.path),
            status,
            escape(request.user.name) if request.user else "-",
            ",".join(request.environ.get("smsapi.ids", ())) or "-",
            (time.monotonic() - started) * 1000,
        )


###############################################################################
# Command line and server start ################################################
###############################################################################


def main(argv=None):
    """Parse the command line and run the chosen command; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="smsapi.py", description="HTTP API for the SMS Server Tools 3 spool."
    )
    parser.add_argument(
        "--config", help="INI file (default ./smsapi.ini, else /etc/smsapi/smsapi.ini)"
    )
    parser.add_argument(
        "--version", action="version", version="%(prog)s " + __version__
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "hash-password", help="read a password on stdin, print its hash for the config"
    )
    check = commands.add_parser(
        "check-config", help="validate the config and spool, exit 0 or 78"
    )
    check.add_argument("--config", dest="check_config", help="INI file to check")
    args = parser.parse_args(argv)
    if args.command == "hash-password":
        return hash_password_command()
    path = find_config(getattr(args, "check_config", None) or args.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EX_CONFIG
    if args.command == "check-config":
        print(f"{path}: ok ({len(config.users)} users)")
        return 0
    setup_logging()
    return serve(config)


def hash_password_command():
    """Read one password line (no echo on a terminal), print its hash."""
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("hash-password: empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def serve(config, ready=None):
    """Serve the API until stopped; waitress when installed, else wsgiref."""
    clean_temp_files(config)
    if not config.users:
        log.warning("no [user:NAME] sections: every message request will be refused")
    app = Application(config)
    try:
        import waitress.server
    except ImportError:
        log.warning("waitress is not installed; using the slower wsgiref server")
        return serve_wsgiref(config, app)
    server = waitress.server.create_server(
        app,
        listen=" ".join(config.listen),
        threads=config.threads,
        ident="smsapi",
        # waitress answers absurd bodies itself; up to this much, the app
        # gives the JSON 413 after looking at Content-Length.
        max_request_body_size=config.max_body * 16,
    )
    for address in listen_urls(server):
        log.info("smsapi %s listening on %s", __version__, address)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def listen_urls(server):
    """http:// URLs of every socket waitress bound, ports resolved."""
    pairs = getattr(server, "effective_listen", None) or [
        (server.effective_host, server.effective_port)
    ]
    return [f"http://{f'[{h}]' if ':' in h else h}:{p}" for h, p in pairs]


def serve_wsgiref(config, app):
    """The fallback: the standard library's threading WSGI server, first address only."""
    import socket
    import socketserver
    from wsgiref import simple_server

    host, port = parse_address(config.listen[0])

    class Server(socketserver.ThreadingMixIn, simple_server.WSGIServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Handler(simple_server.WSGIRequestHandler):
        def log_message(self, *args):  # the app logs each request itself
            pass

    with simple_server.make_server(host, port, app, Server, Handler) as server:
        bound = server.socket.getsockname()
        log.info(
            "smsapi %s listening on http://%s:%d",
            __version__,
            f"[{bound[0]}]" if ":" in bound[0] else bound[0],
            bound[1],
        )
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
