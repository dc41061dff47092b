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
scrypt hashes from the config (no password is stored or logged in clear), or,
on the optional unix socket, a local account the kernel vouches for
(SO_PEERCRED) and the config maps to a user; a user sees only its own
messages; message ids are unguessable and are checked against a strict
pattern before any file is touched; message files are written atomically
under names smsd ignores, so smsd never sees half a file.
Speak plain HTTP on loopback only, or put a TLS reverse proxy in front.
"""

###############################################################################
# Imports #####################################################################
###############################################################################

import base64
import binascii
import bisect
import collections
import configparser
import contextlib
import copy
import ctypes
import datetime
import encodings.iso8859_15  # the codecs too: loaded at start, not on a first request
import encodings.utf_16_be  # noqa: F401
import errno
import functools
import grp
import heapq
import html
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import pwd
import re
import signal
import socket
import stat
import string  # logging has loaded it already
import struct
import sys
import threading
import time
import types
import urllib.parse
import weakref
from http import HTTPStatus

# The digests a request uses, from the standard library's own modules: hashlib
# would load OpenSSL (3.8 MB), which only scrypt needs, at the first login.
# CPython renames these private modules between versions; hashlib is the fallback.
try:
    from _blake2 import blake2b
except ImportError:  # pragma: no cover
    from hashlib import blake2b
try:
    from _sha2 import sha256  # CPython 3.12 and later
except ImportError:
    try:
        from _sha256 import sha256  # CPython 3.11 and earlier
    except ImportError:  # pragma: no cover
        from hashlib import sha256

__version__ = "1.0.0"

###############################################################################
# Constants ###################################################################
###############################################################################

API = "/api/v1.0"
KINDS = ("outgoing", "checked", "sent", "failed", "incoming", "scheduled")
DEFAULT_CONFIGS = ("smsapi.ini", "/etc/smsapi/smsapi.ini")
#: The README beside this file (a checkout), else where install.sh puts it.
README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
if not os.path.exists(README):
    README = "/usr/local/share/doc/smsapi/README.md"
SMSD_PIDFILE = "/var/run/smsd.pid"  # smsd's default when smsd.conf names none
#: Debian's settings of its smsd service: GROUP= is the group smsd runs as
#: (dialout, without smsd's own group), which must be able to read our files.
SMSTOOLS_DEFAULTS = "/etc/default/smstools"
#: The settings of smsd.conf without which smsapi does less (check-smsd).
SMSD_ADVICE = {
    "report": "not set: status reports are told from SMS by smsd's 'UDH: no' line;"
    " report = DIR (a directory smsd writes) lets no SMS pass for one",
    "stats": "not set: /health cannot tell the modems' state and signal",
    "incoming_utf8": "not yes: received texts are stored as ISO-8859-15,"
    " and GSM letters outside it (Δ, Ω, ...) are lost",
}
CALLS_ON = ("clip", "2", "yes", "1")  # a modem's phonecalls: missed calls reported
EX_CONFIG = 78  # sysexits.h: configuration error
SECTION_HEADER = re.compile(
    r"\s*\[([^\]]*)\]\s*(?:[;#].*)?"
)  # an INI section, a comment after

# -- names and numbers a request or a file may hold ---------------------------

#: A message id is a spool file name: nothing that could leave the directory,
#: nothing smsd would skip (a leading dot), nothing longer than a sane name.
MESSAGE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}", re.ASCII)
OUR_ID = re.compile(r"smsapi\.([a-z2-7]{6})\.([0-9a-z]{10})[A-Za-z0-9_-]{16}", re.ASCII)
ID_TIME = slice(14, 24)  # where the creation time stands in one of our ids
ID_LENGTH = 40
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
TOPIC_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)  # ntfy's
#: The first segments of the routes' paths: no [topic:NAME] may take one.
ROUTE_ROOTS = ("api", "metrics", "status", "message")
#: ntfy's priorities, by number and by name.
NTFY_PRIORITIES = {"1": 1, "min": 1, "2": 2, "low": 2, "3": 3, "default": 3}
NTFY_PRIORITIES.update({"4": 4, "high": 4, "5": 5, "urgent": 5, "max": 5})
#: What ntfy reads from a publish: field -> (its headers, its query parameters).
NTFY_FIELDS = {
    "title": (("X-Title", "Title", "ti", "t"), ("title", "ti", "t")),
    "priority": (("X-Priority", "Priority", "prio", "p"), ("priority", "prio", "p")),
    "tags": (("X-Tags", "Tags", "tag", "ta"), ("tags", "tag", "ta")),
}
#: RFC 9218's Priority header (u=N, i), which proxies and browsers add: not ntfy's.
HTTP_PRIORITY = re.compile(r"u=\d(?:,\s*(?:i|\d))?", re.ASCII)
#: An RFC 2047 encoded word, and the white space before the next one (not part of the text).
ENCODED_WORD = re.compile(
    r"=\?([\w.:-]+)\?([BbQq])\?([^?\s]*)\?=(?:\s+(?==\?))?", re.ASCII
)
UNIX_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,31}\$?", re.ASCII)
QUEUE_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}", re.ASCII)
#: International format: digits only, no leading zero, at most 15 (E.164).
MOBILE = re.compile(r"[1-9][0-9]{2,14}", re.ASCII)
#: An entry of mobiles: a number, or @NAME of a [group:NAME].
RECIPIENT = re.compile(rf"\+?(?:{MOBILE.pattern})|@{USER_NAME.pattern}", re.ASCII)
MOBILE_SEPARATORS = re.compile(r"[\s().-]")
LEADING_SPACE = re.compile(r"^ (?=[0-9])")
MOBILE_PATTERN = re.compile(r"[0-9]{0,15}\*|[0-9]{1,15}", re.ASCII)  # * alone: any
#: A duration in the config: seconds, or a number and a unit (Prometheus's
#: short ones too: 5m, 1h, 7d).
DURATION = re.compile(r"([0-9]{1,9})\s*(s|m|min|h|hour|d|day|w|week)?", re.ASCII)
DURATION_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600}
DURATION_UNITS.update(d=86400, day=86400, w=7 * 86400, week=7 * 86400)
#: A step's delay: a number with its unit, or 0 (a number alone is a phone number).
STEP_DELAY = re.compile(r"0|[0-9]{1,9}\s*(?:s|m|min|h|hour|d|day|w|week)", re.ASCII)
#: send_at and valid_until: a delay from now, +N and a unit; else an ISO 8601 time.
DELAY = re.compile(r"\+([0-9]{1,9})\s*(s|min|hour|day|week)", re.ASCII)
FORM_OFFSET = re.compile(r" (?=[0-9]{2}:?[0-9]{2}$)")  # a form's + before an offset
QUIET_HOURS = re.compile(
    r"([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-3]):([0-5][0-9])"
)
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
#: smsd's Validity: a count of min/hour/day/week/month/year, or a bare 0-255.
VALIDITY = re.compile(
    r"[0-9]{1,3}\s*(?:min|hour|day|week|month|year)|25[0-5]|2[0-4][0-9]|[01]?[0-9]{1,2}",
    re.ASCII,
)
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]([\x20-\x7e]{0,253}[\x21-\x7e])?", re.ASCII)
PRIORITIES = ("high", "normal")
#: Whole-number fields of a send: (lowest, highest).
NUMBER_FIELDS = {"retries": (0, 100), "class": (0, 3)}
CONTROL_PARAMS = frozenset(["wait", "wait_for", "dry_run", "token"])  # never fields
WAIT_TARGETS = ("sent", "delivered")
INBOX_TYPES = {"sms": ("sms",), "report": ("report",), "all": ("sms", "report")}
PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000  # ?limit= default and highest
MAX_OFFSET = 10**9
JSON_TYPES = ("application/json",)
YES, NO = ("yes", "true", "on", "1"), ("no", "false", "off", "0")  # as_bool reads
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")  # escaped in log lines
ALERT_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # made spaces in alert texts
SURROGATE = re.compile("[\ud800-\udfff]")  # a lone one, from a JSON escape
SYSLOG_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}

# -- the spool, and smsd's files ---------------------------------------------

#: Bytes read from one spool file at the most. The longest SMS smsd can join
#: (255 parts) is under 64 KiB as a file; anything bigger is not a message.
MAX_SPOOL_FILE = 128 << 10
MAX_PAGE_READ = 1 << 20  # bytes of files one inbox page reads at the most
#: Times read from the spool are clamped to this range (a file may say 1969
#: or the year 33658); both ends print as ISO 8601 in any time zone.
EARLIEST, LATEST = 0.0, 32503680000.0  # 1970 and 3000
#: How spool files are opened: never through a symlink, never waiting on a FIFO.
SPOOL_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
TEMP_PREFIX = ".smsapi-"  # smsd skips names that start with a dot
#: A held message taken out of the scheduled directory, for outgoing (a move
#: across filesystems) or for failed (expired): its name while that is under way.
CLAIMS = {".release-": "outgoing", ".expire-": "failed"}
SMSD_TIME = re.compile(
    r"([0-9]{1,2})-([0-9]{1,2})-([0-9]{1,2}) ([0-9]{1,2}):([0-9]{1,2}):([0-9]{1,2})"
)
REPORT_BODY = "SMS STATUS REPORT"
REPORT_NUMBER = re.compile(r"[0-9]{1,3}", re.ASCII)  # TP-MR and TP-ST: one octet
CONCATENATED = re.compile(r".*-concatenated", re.ASCII)  # smsd's store of parts
FINAL = frozenset(["sent", "failed"])
#: Lines of smsd's status file that a working modem may show.
MODEM_STATES = ("Idle", "Sending", "Receiving")
SIGNAL = re.compile(r"ssi: (-?[0-9]+) dBm(?: \((\w+)\))?")

# -- what the watcher keeps, and how often it looks ---------------------------

JOURNAL = "reports.journal"  # the delivery report index, in state_dir
REBUILD_CHUNK = 2000  # sent files read per tick when catching up
CLOCK_MARGIN = 5.0  # seconds before the journal's last clock that a restart reads again
SETTLE = 1.0  # seconds a polled file must stand unchanged before it is read
#: Seconds a changed config that drops sections or widens rights must stand
#: unchanged before it is taken (SIGHUP takes it at once).
CONFIG_CAREFUL = 10
RETENTION_EVERY = 300  # seconds between passes that remove old files
RETENTION_CHUNK = 5000  # files removed in one pass at most
#: What the change stream says of a name: it appeared, was written and closed,
#: was renamed in, went away; or the whole directory must be looked at again.
CREATED, WRITTEN, MOVED_IN, GONE, RESCAN = (
    "created",
    "written",
    "moved in",
    "gone",
    "rescan",
)

# -- webhooks ------------------------------------------------------------------

ALERTS_OWNER = (
    "\0alerts"  # whose records a notification's are: no user's (no name has NUL)
)
#: The From: of what smsapi sends by itself: no user can have such a name (a
#: colon), so none can list or cancel these messages as its own.
HEARTBEAT_SENDER = "smsapi:heartbeat"
HEARTBEATS = (
    "heartbeats.json"  # in state_dir: each heartbeat's last beat, and if missed
)
BUDGETS_JOURNAL = (
    "budgets.journal"  # in state_dir: what users with a budget sent lately
)
EVENT_TYPES = (
    "sms.received",
    "sms.sent",
    "sms.failed",
    "sms.delivered",
    "sms.undelivered",
    "alert.acknowledged",
    "alert.escalated",
)

# -- pages and replies -----------------------------------------------------------

PAGER_SENDER = "smsapi:pager"  # the From: of the pager's own SMS, as HEARTBEAT_SENDER
PAGES_JOURNAL = "pages.journal"  # in state_dir: pages, replies heard, SMS to write
OPEN_STATES = ("firing", "acknowledged")  # a page's status while it is open
#: A page's silence: none to make; wanted (to make); made; expire (its group
#: resolved: to end now); ended.
SILENCE_STATES = ("none", "wanted", "made", "expire", "ended")
PAGE_KEPT = 86400.0  # seconds a closed page is listed, and its late replies answered
PAGE_TITLE = 60  # characters of a page's title at most
MAX_REPLY = 40  # a longer SMS is no reply code (and is not read further)
#: A reply, once made lower case with its spaces single: 3a, 3 a, 3ack, ack 3,
#: a 3, a, ack (acknowledge); 3e, esc 3 (escalate). A code is 1-999.
REPLY = re.compile(
    r"(?P<code>[1-9][0-9]{0,2}) ?(?P<verb>ack|a|esc|e)"
    r"|(?P<word>ack|a|esc|e)(?: ?(?P<after>[1-9][0-9]{0,2}))?",
    re.ASCII,
)
REPLY_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb\u201e"
HELP_EVERY, HELP_MAX = 300.0, 5  # what to send: once in 5 min, not past 5 an hour
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*", re.ASCII)  # Prometheus's
ALERTMANAGER_TIMEOUT = 10.0  # seconds an Alertmanager has for its whole answer
ALERTMANAGER_RETRY = (10, 30, 60, 120, 300)  # seconds between tries while none answers
MAX_ALERTMANAGER_ANSWER = 8 << 20  # bytes of an answer read at most
FIRING_CHECK = 300.0  # seconds between looks at whether a page's group still fires
#: The text of a voice call smsd makes (Voicecall: yes): ring up to 40 s, and
#: when answered play # three times, three times over.
VOICE_CALL = "TONE: TIME: 40 3 #,#,#"
MIN_ROUND_GAP = 60  # seconds at least between a chain's last step and its next round
#: The smsd headers of what the pager writes: its notices (confirmations, and
#: what to send), a page's SMS (reported: undelivered moves the chain on), a call.
OUTBOX_HEADERS = {
    "notice": [("Priority", "High")],
    "page": [("Priority", "High"), ("Report", "yes")],
    "call": [("Priority", "High"), ("Voicecall", "yes")],
}

WEBHOOK_SECRET = re.compile(r"whsec_([A-Za-z0-9+/]+={0,2})", re.ASCII)
WEBHOOK_SECRET_BYTES = (24, 64)  # Standard Webhooks: 24 to 64 random bytes
WEBHOOKS = "webhooks"  # in state_dir: a directory of stored events per webhook
EVENTS_JOURNAL = (
    "events.journal"  # in state_dir: the events emitted lately, and the clock
)
EVENT_FILE = re.compile(r"([0-9]{20})-(msg_[a-z2-7]{32})", re.ASCII)  # a stored event
MAX_EVENT_FILE = 1 << 20  # a received SMS's text, JSON-escaped, is well under this
EMITTED_KEPT = 600.0  # seconds an emitted event's id is remembered (past any rescan)
WEBHOOK_STALE = 600.0  # /health warns when an event waited this long
MAX_RETRY_AFTER = 86400.0  # a receiver's Retry-After is honoured up to a day
SCHEDULE_RETRY = 10.0  # seconds before a move that failed is tried again
#: What became of an event: taken (2xx); refused (tried again later); dropped
#: (the retry schedule's time spent); gone (a 410, or emitted while stopped by
#: one); overflowed (past max_events, the oldest).
WEBHOOK_OUTCOMES = ("delivered", "failed", "dropped", "gone", "overflowed")

# -- passwords and guessing ---------------------------------------------------

SCRYPT_LN, SCRYPT_R, SCRYPT_P = 14, 8, 1  # N = 2^14: 16 MiB, about 50 ms a check
PASSWORD_HASH = re.compile(
    r"\$scrypt\$ln=([0-9]{1,2}),r=([0-9]{1,2}),p=([0-9]{1,2})\$([A-Za-z0-9+/]{16,})\$([A-Za-z0-9+/]{43})",
    re.ASCII,
)
FAILURE_LIMIT, FAILURE_WINDOW, MAX_LOCKOUT = 10, 60.0, 900.0
#: An access token, as ntfy makes them: tk_ and 29 letters and digits (172 bits).
TOKEN = re.compile(r"tk_[A-Za-z0-9]{29}", re.ASCII)
TOKEN_SHOWN = 7  # characters of a token kept in the config, to name it by
#: What [user:NAME] tokens holds for each: the token's first characters, and the
#: SHA-256 of the whole (a token is random enough to need no salt, no scrypt).
TOKEN_DIGEST = re.compile(r"(tk_[A-Za-z0-9]{4}):([0-9a-f]{64})", re.ASCII)

# -- health and metrics ------------------------------------------------------

GRADES = ("pass", "warn", "fail")
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
PLAIN_TEXT = "text/plain; charset=utf-8"
HTML = "text/html; charset=utf-8"
RECENT_FILED = 50  # messages smsd filed that the status page lists
RECENT_RECEIVED = 20  # received SMS that it lists
STATUS_REFRESH = 30  # seconds between the status page's reloads
STATUS_LINES = {status: f"{status.value} {status.phrase}" for status in HTTPStatus}

# -- serving -----------------------------------------------------------------

PEER_UID = "smsapi.peer_uid"  # WSGI environ key: the uid of a unix-socket caller
TURN = "smsapi.turn"  # WSGI environ key: the server gave it its user's slow-lane turn
BACKLOG = 1024  # connections the kernel holds for us before accept()
SD_LISTEN_FDS_START = 3  # the first socket systemd hands over (sd_listen_fds(3))
STOP_GRACE = 10.0  # seconds requests in progress get to finish after SIGTERM
M_MMAP_THRESHOLD = -3  # glibc's mallopt(): blocks from this size on come from mmap
UNIX_RESERVE = 100  # connections the unix socket may have beyond connection_limit
OPEN_ROUTE_RATE = 100  # requests a second answered on the routes that need no login

# -- GSM 03.38 ---------------------------------------------------------------

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
#: Characters outside the GSM alphabet with a plain look-alike in it, for a
#: send that asks to substitute (and for alerts): typographic quotes, dashes,
#: the ellipsis, Unicode spaces, bullets, signs and arrows.
LOOKALIKES = {
    **dict.fromkeys("‘’‚‛′´`", "'"),
    **dict.fromkeys("“”„‟″«»", '"'),
    **dict.fromkeys("‐‑‒–—―−", "-"),
    **dict.fromkeys("\u00a0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007", " "),
    **dict.fromkeys("\u2008\u2009\u200a\u202f\u205f\u3000", " "),
    **dict.fromkeys("\u200b\u200c\u200d\u2060\ufeff", ""),
    **dict.fromkeys("•‣◦∙·", "*"),
    "…": "...", "×": "x", "÷": "/", "™": "TM", "©": "(c)", "®": "(R)", "‹": "<", "›": ">",
    "≤": "<=", "≥": ">=", "≠": "!=", "→": "->", "←": "<-", "↔": "<->", "⇒": "=>",
    "⇐": "<=", "↑": "^", "↓": "v",
}  # fmt: skip


###############################################################################
# Errors ######################################################################
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
# Logging helpers #############################################################
###############################################################################


log = logging.getLogger("smsapi")


def escape(value):
    """Make client-supplied text safe for a one-line log record."""
    return CONTROL_CHARS.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))


def one_line(exc):
    """An exception as a short single line."""
    return escape(str(exc) or type(exc).__name__)


class JournalFormatter(logging.Formatter):
    """journald adds the time itself; a <N> prefix gives each line its priority."""

    def format(self, record):
        return f"<{SYSLOG_PRIORITY.get(record.levelname, 6)}>{super().format(record)}"


def setup_logging():
    """Log to stderr: under journald with priorities, elsewhere with ISO timestamps."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S%z"
            )
        )
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    # No record needs its caller, thread or process: looking them up is most of
    # a record's cost (the logging HOWTO's "Optimization").
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None


def sd_notify(state):
    """Tell systemd about our state (READY=1, STOPPING=1, WATCHDOG=1) if it listens."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
        ) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd: %s", one_line(exc))


###############################################################################
# The clock ###################################################################
###############################################################################


class Clock:
    """The time, and waiting for it. Every part that waits or expires reads the
    time here and waits here, so that the tests move time instead of sleeping."""

    def time(self):
        """Seconds since the epoch: what is stored, shown and compared with mtimes."""
        return time.time()

    def monotonic(self):
        """Seconds that only go forward: what durations are measured with."""
        return time.monotonic()

    def wait(self, waitable, seconds):
        """Wait on an Event, or on a Condition the caller holds, for at most
        seconds (None: until it is set or notified)."""
        return waitable.wait(seconds)


###############################################################################
# Passwords ###################################################################
###############################################################################


def hash_password(password, ln=SCRYPT_LN, salt=None):
    """A salted scrypt hash string for the config; N = 2^ln (tests choose a low ln)."""
    salt = salt or os.urandom(16)
    digest = scrypt(password, salt, ln, SCRYPT_R, SCRYPT_P)
    return password_hash(ln, SCRYPT_R, SCRYPT_P, salt, digest)


def password_hash(ln, r, p, salt, digest):
    """The one form of a hash string: $scrypt$ln=..,r=..,p=..$salt$digest."""
    return f"$scrypt$ln={ln},r={r},p={p}${b64(salt)}${b64(digest)}"


def parse_password_hash(value):
    """(ln, r, p, salt, digest) of a hash string, or ValueError naming the problem."""
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
    return ln, r, p, unb64(match.group(4)), unb64(match.group(5))


def scrypt(password, salt, ln, r, p):
    import hashlib  # OpenSSL's: loaded by the first password check, not at start

    n = 1 << ln
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


###############################################################################
# Options #####################################################################
###############################################################################


def is_number(text):
    """True for 1 to 18 ASCII digits: str.isdigit() also takes '²' and '٣', which
    int() refuses, and int() refuses 4,301 digits; no number here needs 19."""
    return len(text) <= 18 and text.isascii() and text.isdigit()


def as_bool(value):
    """yes/no, true/false, on/off, 1/0."""
    word = value.strip().lower()
    if word in YES:
        return True
    if word in NO:
        return False
    raise ValueError(f"expected yes or no, got {value!r}")


def as_count(value):
    """A whole number of at least 1."""
    number = int(value) if is_number(value.strip()) else 0
    if number < 1:
        raise ValueError(f"expected a number of at least 1, got {value!r}")
    return number


def as_whole(value):
    """A whole number, 0 or more."""
    if not is_number(value.strip()):
        raise ValueError(f"expected a whole number, got {value!r}")
    return int(value)


def as_size(value):
    """A byte count, with an optional k or M suffix."""
    text = value.strip().lower()
    scale = {"k": 1 << 10, "m": 1 << 20}.get(text[-1:], 1)
    return as_count(text[:-1] if scale > 1 else text) * scale


def as_duration(value):
    """Seconds, or a number with s, min, hour or day: '90', '30min', '7day'."""
    match = DURATION.fullmatch(value.strip())
    if not match:
        raise ValueError(
            f"expected a duration like 30, 30min, 2hour, 1h or 7day, got {value!r}"
        )
    return int(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]


def as_count_of_seconds(value):
    """A duration of at least a second."""
    seconds = as_duration(value)
    if seconds < 1:
        raise ValueError(f"expected at least 1s, got {value!r}")
    return seconds


def as_listen(value):
    """Space-separated host:port addresses (IPv6 hosts in brackets) or unix:/path."""
    addresses = tuple(value.split())
    if not addresses:
        raise ValueError("expected host:port")
    for address in addresses:
        if address.startswith("unix:"):
            as_socket_path(address[5:])
        else:
            parse_address(address)
    return addresses


def as_socket_path(value):
    """An absolute path short enough for a unix socket."""
    if not value.startswith("/") or len(os.fsencode(value)) > 107:
        raise ValueError(
            f"expected unix:/absolute/path (107 bytes at most), got {value!r}"
        )
    return value


def parse_address(address):
    """Split 'host:port' or '[v6]:port' into (host, port), or raise ValueError."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or ":" in host and "[" not in address:
        raise ValueError(f"expected host:port or [ipv6]:port, got {address!r}")
    if not is_number(port) or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad port in {address!r}")
    return host, int(port)


def as_addresses(value):
    """Space-separated IP addresses (of reverse proxies)."""
    addresses = tuple(value.split())
    for address in addresses:
        ipaddress.ip_address(address)  # ValueError names the bad one
    return addresses


def as_queues(value):
    """Space-separated smsd queue (provider) names."""
    names = tuple(value.split())
    for name in names:
        if not QUEUE_NAME.fullmatch(name):
            raise ValueError(f"bad queue name {name!r}")
    return names


def as_mobile_patterns(value):
    """Space- or comma-separated numbers, each may end in * (a prefix); * alone is
    any number. Nothing at all is an error: a line cut short must not mean any."""
    patterns = tuple(p.lstrip("+") for p in value.replace(",", " ").split())
    if not patterns:
        raise ValueError("empty: write `mobiles = *` for any number")
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


def as_group_name(value):
    """The name of a local group."""
    try:
        grp.getgrnam(value.strip())
    except KeyError:
        raise ValueError(f"no local group {value.strip()!r}") from None
    return value.strip()


def as_optional_path(value):
    """A filesystem path, or empty for none."""
    return value.strip()


def as_age(value):
    """A duration of at least a minute (files younger than that are never removed)."""
    seconds = as_duration(value)
    if seconds < 60:
        raise ValueError(f"expected at least 1min, got {value!r}")
    return seconds


def as_unix_names(value):
    """Space-separated local account names."""
    names = tuple(value.split())
    for name in names:
        if not UNIX_NAME.fullmatch(name):
            raise ValueError(f"bad user name {name!r}")
    return names


def as_metrics_access(value):
    """local (no password from loopback and the unix socket), users, open or off."""
    word = value.strip().lower()
    if word not in ("local", "users", "open", "off"):
        raise ValueError(f"expected local, users, open or off, got {value!r}")
    return word


def as_webhook_url(value):
    """An http:// or https:// URL with a host."""
    url = urllib.parse.urlsplit(value.strip())
    if url.scheme not in ("http", "https") or not url.hostname or url.port == 0:
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    return value.strip()


def as_urls(value):
    """Space-separated http:// or https:// URLs (none: an empty tuple)."""
    return tuple(as_webhook_url(word) for word in value.split())


def as_token(value):
    """A bearer token: printable ASCII without spaces; the error never repeats it."""
    token = value.strip()
    if not token or not all("!" <= char <= "~" for char in token):
        raise ValueError("expected a token of printable ASCII without spaces")
    return token


def as_webhook_secret(value):
    """whsec_ and the base64 of 24 to 64 bytes; the error never repeats the value."""
    webhook_key(value)
    return value.strip()


def webhook_key(secret):
    """The HMAC key a Standard Webhooks secret stands for; ValueError if it is none."""
    match = WEBHOOK_SECRET.fullmatch(secret.strip())
    try:
        encoded = match.group(1) if match else ""
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        key = b""
    low, high = WEBHOOK_SECRET_BYTES
    if not low <= len(key) <= high:
        raise ValueError(
            f"expected whsec_ and the base64 of {low} to {high} random bytes"
            " (python3 smsapi.py new-webhook-secret prints one)"
        )
    return key


def as_event_types(value):
    """Space-separated event types, at least one."""
    types_given = tuple(dict.fromkeys(value.split()))
    unknown = [t for t in types_given if t not in EVENT_TYPES]
    if unknown or not types_given:
        raise ValueError(f"expected some of {' '.join(EVENT_TYPES)}, got {value!r}")
    return types_given


def as_section_name(value):
    """The NAME of a [kind:NAME] section."""
    if not USER_NAME.fullmatch(value.strip()):
        raise ValueError(f"bad name {value!r}")
    return value.strip()


def as_token_digests(value):
    """Space-separated token digests, as add-token writes them."""
    digests = tuple(value.split())
    for digest in digests:
        if not TOKEN_DIGEST.fullmatch(digest):
            raise ValueError(
                "expected what python3 smsapi.py add-token writes (tk_xxxx:digest)"
            )
    return digests


def as_topic_name(value):
    """A [topic:NAME]: ntfy's letters, and not the first part of a route."""
    if not TOPIC_NAME.fullmatch(value) or value in ROUTE_ROOTS:
        raise ValueError(
            f"a topic is 1-64 letters, digits, - and _, none of {' '.join(ROUTE_ROOTS)}"
        )
    return value


def as_user_names(value):
    """Space-separated API user names."""
    names = tuple(value.split())
    for name in names:
        if not USER_NAME.fullmatch(name):
            raise ValueError(f"bad user name {name!r}")
    return names


def as_durations(value):
    """Space-separated durations, each as as_duration reads it."""
    return tuple(as_duration(word) for word in value.split())


def normalise_mobile(given):
    """Digits of an international number ('+7 916-000', '79160...'), or None."""
    number = MOBILE_SEPARATORS.sub("", given)
    number = number.removeprefix("+")
    return number if MOBILE.fullmatch(number) else None


def as_numbers(value):
    """Space- or comma-separated international numbers, normalised, each once."""
    numbers = {}
    for given in value.replace(",", " ").split():
        number = given.removeprefix("+")
        if not MOBILE.fullmatch(number):
            raise ValueError(f"bad number {given!r} (international format, digits)")
        numbers[number] = None
    if not numbers:
        raise ValueError("expected at least one number")
    return tuple(numbers)


def as_recipients(value):
    """Space- or comma-separated numbers and @NAMEs of groups."""
    entries = tuple(value.replace(",", " ").split())
    for entry in entries:
        if not RECIPIENT.fullmatch(entry):
            raise ValueError(f"bad recipient {entry!r} (a number, or @group)")
    if not entries:
        raise ValueError("expected at least one number or @group")
    return entries


class Step(collections.namedtuple("Step", "delay call recipients")):
    """One step of an escalation chain: when it is paged (seconds from the start
    of the round), whether its numbers are rung, and its numbers and @groups."""

    __slots__ = ()


def as_steps(value):
    """Comma-separated steps: [DELAY] [call] RECIPIENT...; the first step's delay
    0, none before the one above it, a delay not given being the one above."""
    steps = []
    for text in value.split(","):
        words = text.split()
        delay = steps[-1].delay if steps else 0
        if words and STEP_DELAY.fullmatch(words[0]):
            delay = as_duration(words.pop(0))
        call = bool(words) and words[0].lower() == "call"
        recipients = tuple(words[1:] if call else words)
        if not recipients or not all(RECIPIENT.fullmatch(r) for r in recipients):
            raise ValueError(
                f"expected [delay] [call] numbers or @groups in step {text.strip()!r}"
            )
        if delay < (steps[-1].delay if steps else 0) or not steps and delay:
            raise ValueError(
                f"step {text.strip()!r}: the first step's delay is 0, and no"
                " step's is before the one above it"
            )
        steps.append(Step(delay, call, recipients))
    return tuple(steps)


def string_template(text):
    """A string.Template ($name placeholders) of text."""
    return string.Template(text)


def as_template(value):
    """A string.Template text; its $names are checked when it is used."""
    try:
        string_template(value).substitute(collections.defaultdict(str))
    except ValueError as exc:
        raise ValueError(f"bad template: {exc}") from None
    return value


def as_quiet_hours(value):
    """A daily window of local time, HH:MM-HH:MM; it may span midnight."""
    match = QUIET_HOURS.fullmatch(value.strip())
    if not match:
        raise ValueError(f"expected a window like 22:00-07:00, got {value!r}")
    hour, minute, end_hour, end_minute = map(int, match.groups())
    start, end = hour * 60 + minute, end_hour * 60 + end_minute
    if start == end:
        raise ValueError(f"the window {value!r} is empty")
    return start, end


def as_weekdays(value):
    """Space-separated days (mon ... sun), not all seven: their numbers, Monday 0."""
    words = value.lower().replace(",", " ").split()
    unknown = [w for w in words if w not in WEEKDAYS]
    if unknown:
        raise ValueError(f"expected days like sat sun, got {value!r}")
    days = tuple(sorted({WEEKDAYS.index(w) for w in words}))
    if len(days) == 7:
        raise ValueError("every day quiet: nothing would ever be sent")
    return days


class Option(
    collections.namedtuple("Option", "section key default convert help restart")
):
    """One key of the INI file: its section ("user" for every [user:NAME]), its
    default as written in the file (None: unset unless given), the converter
    that reads it, one line of help (the README's table), and whether only a
    restart takes a change of it."""

    __slots__ = ()

    @property
    def value(self):
        """The default, converted; None when there is none."""
        return None if self.default is None else self.convert(self.default)


def option(section, key, default, convert, help_text, restart=False):
    return Option(section, key, default, convert, help_text, restart)


def restart_only(section, key, default, convert, help_text):
    """An Option that a reload does not change (the sockets, threads, files in use)."""
    return option(section, key, default, convert, help_text, restart=True)


#: Every option, in the order of smsapi.ini. The README's table and the shipped
#: smsapi.ini are checked against it by the tests.
OPTIONS = [
    restart_only("server", "listen", "127.0.0.1:5000", as_listen,
                 "`host:port`, several separated by spaces; IPv6 as `[::1]:5000`; `unix:/path`"),
    restart_only("server", "threads", "4", as_count,
                 "HTTP worker threads"),
    option("server", "max_body", "64k", as_size,
           "largest request body (bytes; `k`, `M` suffixes)"),
    option("server", "max_parts", "10", as_count,
           "longest text, in SMS parts"),
    option("server", "max_recipients", "100", as_count,
           "most numbers in one request"),
    restart_only("server", "fsync", "yes", as_bool,
                 "fsync each file and the directory before 201; `no` spares flash, risks loss at power cut"),
    option("server", "queues", "", as_queues,
           "smsd queue names a request may choose"),
    restart_only("server", "state_dir", "/var/lib/smsapi", as_path,
                 "the daemon's own state: report index, idempotency records, webhook events"),
    option("server", "max_wait", "60", as_whole,
           "longest `?wait=N`, in seconds; 0 turns waiting off"),
    restart_only("server", "max_waiters", "2", as_count,
                 "requests that may wait at once (keep below `threads`)"),
    option("server", "report", None, as_bool,
           "ask for delivery reports by default; unset: smsd's own setting decides"),
    option("server", "report_window", "7day", as_duration,
           "how long after sending a report may still be matched"),
    restart_only("server", "connection_limit", "1000", as_count,
                 "open client connections at most"),
    restart_only("server", "channel_timeout", "60", as_duration,
                 "seconds an idle keep-alive connection is kept"),
    restart_only("server", "request_timeout", "10", as_duration,
                 "seconds a request (headers and body) may take to arrive, in all; slower ones are closed"),
    option("server", "trusted_proxies", "", as_addresses,
           "addresses of reverse proxies whose `X-Forwarded-For` names the client"),
    option("server", "metrics", "local", as_metrics_access,
           "who may read `/metrics`: `local`, `users`, `open` or `off`"),
    option("server", "log_text", "no", as_bool,
           "put each message's text (control characters escaped) in its log line"),
    option("server", "max_schedule", "35day", as_duration,
           "how far ahead `send_at` and `valid_until` may be"),
    option("spool", "smsd_conf", "/etc/smsd.conf", as_optional_path,
           "smsd's config: the directories below default to what it says; its `pidfile` and `stats` feed `/health`; empty for none"),
    restart_only("spool", "outgoing", "/var/spool/sms/outgoing", as_path,
                 "where smsapi puts messages for smsd (smsd.conf's, else this)"),
    restart_only("spool", "checked", "/var/spool/sms/checked", as_path,
                 "where smsd keeps a message while it sends it (smsd.conf's, else this)"),
    restart_only("spool", "sent", "/var/spool/sms/sent", as_path,
                 "where smsd files sent messages (smsd.conf's, else this)"),
    restart_only("spool", "failed", "/var/spool/sms/failed", as_path,
                 "where smsd files failed messages (smsd.conf's, else this)"),
    restart_only("spool", "incoming", "/var/spool/sms/incoming", as_path,
                 "where smsd files received messages (smsd.conf's, else this)"),
    restart_only("spool", "report", None, as_path,
                 "smsd's `report =` directory (smsd.conf's; unset: reports land in `incoming`)"),
    restart_only("spool", "scheduled", None, as_path,
                 "where smsapi holds messages until their time (unset: `state_dir/scheduled`); best on `outgoing`'s filesystem"),
    restart_only("spool", "smsd_group", None, as_group_name,
                 "the group smsd runs as, given to each message file so smsd can read it (unset: `GROUP=` of /etc/default/smstools, else `outgoing`'s group)"),
    option("health", "queue_warn", "50", as_count,
           "warn at this many messages waiting in `outgoing` and `checked`"),
    option("health", "queue_fail", "500", as_count,
           "fail (503) at this many"),
    option("health", "queue_age_warn", "10min", as_duration,
           "warn when the oldest of them waited this long"),
    option("health", "queue_age_fail", "1hour", as_duration,
           "fail when it waited this long"),
    option("health", "failed_warn", "1", as_count,
           "warn at this many messages failed in the last hour"),
    option("health", "failed_fail", "10", as_count,
           "fail at this many"),
    option("retention", "sent", None, as_age,
           "remove sent files older than this (at least `1min`); unset: kept"),
    option("retention", "failed", None, as_age,
           "remove failed files older than this; unset: kept"),
    option("retention", "incoming", None, as_age,
           "remove received files (and reports) older than this; unset: kept"),
    option("retention", "state", "1day", as_age,
           "how long `Idempotency-Key` records live"),
    option("user", "password", None, as_password_hash,
           "hash from `smsapi.py hash-password`; required unless `unix_users`"),
    option("user", "mobiles", None, as_mobile_patterns,
           "allow-list: numbers, or prefixes ending in `*` (`79680000000 7916*`); `*`: any; unset: any; empty: an error"),
    option("user", "admin", "no", as_bool,
           "may read, list and delete every message, and read the inbox"),
    option("user", "inbox", "no", as_bool,
           "may read and delete received messages"),
    option("user", "report", None, as_bool,
           "this user's default for `report`; unset: the server's"),
    option("user", "metrics", "no", as_bool,
           "may read `/metrics` from anywhere"),
    option("user", "unix_users", "", as_unix_names,
           "local accounts that are this user on the unix socket, with no password"),
    option("user", "max_per_hour", None, as_count,
           "SMS (parts times recipients) this user may send in any hour, sends and alerts alike; past it, 429"),
    option("user", "max_per_day", None, as_count,
           "the same in any 24 hours"),
    option("user", "quiet_hours", None, as_quiet_hours,
           "`22:00-07:00` (local time): a message sent then without `\"priority\": \"high\"` waits until it ends"),
    option("user", "quiet_days", "", as_weekdays,
           "`sat sun`: whole days held the same way"),
    option("user", "tokens", "", as_token_digests,
           "access tokens of this user (`smsapi.py add-token`): `Authorization: Bearer`, `X-Gotify-Key` or `?token=`"),
    option("user", "default_to", None, as_recipients,
           "numbers and `@group`s this user's Gotify messages go to"),
    option("alerts", "max_parts", "1", as_count,
           "the longest alert SMS, in parts; alerts that do not fit are counted as `+N more`"),
    option("alerts", "substitute", "yes", as_bool,
           "replace typographic characters (quotes, dashes, `…`, Unicode spaces) by plain look-alikes when that keeps an alert SMS in the GSM alphabet"),
    option("alerts", "dedupe_window", "5min", as_duration,
           "a notification identical to one sent within this is not sent again"),
    option("alerts", "template", None, as_template,
           "the alert text as a `string.Template` (see Alerts); unset: `$head $alerts`"),
    option("alerts", "ack", "no", as_bool,
           "pages take reply codes: each firing SMS ends `Reply Na to ack`, and that reply silences the group (see Acknowledging by reply)"),
    option("alerts", "alertmanager_url", "", as_urls,
           "the Alertmanager(s) where an acknowledgement becomes a silence; for an HA pair both, the first that accepts wins; a path prefix is kept"),
    option("alerts", "alertmanager_token", None, as_token,
           "sent to them as `Authorization: Bearer`"),
    option("alerts", "ack_for", "1h", as_count_of_seconds,
           "how long one acknowledgement silences the group; extended while the group still fires"),
    option("alerts", "ack_by_call", "no", as_bool,
           "a missed call from a number with an open page acknowledges its newest one, as `a` would (smsd: `phonecalls = clip`)"),
    option("heartbeat", "every", None, as_count_of_seconds,
           "a beat is expected at least this often (`5min`); required"),
    option("heartbeat", "to", None, as_recipients,
           "numbers and `@group`s told when beats stop, and when they are back; required unless `escalation`"),
    option("heartbeat", "max_per_day", "10", as_count,
           "notices (missed or back) sent in any 24 hours at most; past it a flapping heartbeat is logged, counted and not sent"),
    option("heartbeat", "text", None, as_template,
           "the missed text, with `$name` and `$last_beat`; unset: `heartbeat $name missed, last beat at $last_beat`"),
    option("heartbeat", "escalation", None, as_section_name,
           "a missed heartbeat is paged through this `[escalation:NAME]`, with reply codes; unset: `to` is told"),
    option("escalation", "steps", None, as_steps,
           "`@primary, 5min @backup, 10min call @primary, 15min @manager 79681112233`: each step's delay from the first page, `call` to ring, and its numbers and `@group`s; required"),
    option("escalation", "repeat", "0", as_whole,
           "rounds of the steps again while nobody acknowledges"),
    option("escalation", "round", None, as_count_of_seconds,
           "how long a round lasts, from its first step to the next round's; unset: its last step's delay, and as long again as the gap before that step (a minute at least)"),
    option("group", "mobiles", None, as_numbers,
           "the group's numbers; `@NAME` in any `mobiles` (or `to`) stands for them; required"),
    option("topic", "to", None, as_recipients,
           "the numbers and `@group`s an ntfy message to this topic goes to; required"),
    option("topic", "users", "", as_user_names,
           "who may publish to it; empty: every user allowed to text all of `to`"),
    option("webhook", "url", None, as_webhook_url,
           "where each event is POSTed: `http://` or `https://`; required"),
    option("webhook", "secret", None, as_webhook_secret,
           "`whsec_` and base64 of 24-64 random bytes, from `smsapi.py new-webhook-secret`; required"),
    option("webhook", "events", " ".join(EVENT_TYPES), as_event_types,
           "the event types this receiver gets"),
    option("webhook", "users", "", as_user_names,
           "only events of messages these API users sent (not `sms.received`); empty: all"),
    option("webhook", "retry_schedule", "5s 5min 30min 2hour 5hour 10hour 14hour 20hour 24hour", as_durations,
           "delays after each failed attempt, each lengthened by up to 10%; once their sum has passed since the event, it is dropped"),
    option("webhook", "timeout", "10", as_count_of_seconds,
           "seconds a receiver has for its whole answer, however slowly it sends it"),
    option("webhook", "max_events", "10000", as_count,
           "events kept waiting at most; past it the oldest are dropped (counted, and `/health` warns)"),
]  # fmt: skip


SECTIONS = {
    section: {o.key: o for o in OPTIONS if o.section == section}
    for section in dict.fromkeys(o.section for o in OPTIONS)
}


NAMED_SECTIONS = (
    "user",
    "webhook",
    "group",
    "heartbeat",
    "escalation",
    "topic",
)  # [kind:NAME], any number of each


#: What a reload cannot change: the file, the sockets, threads and files in use.
RESTART_ONLY = ("path", "spool") + tuple(
    o.key for o in OPTIONS if o.section == "server" and o.restart
)


def defaults(section):
    """{key: default value} of one section's options; None for those unset by default."""
    return {key: option.value for key, option in SECTIONS[section].items()}


def default_spool():
    """The spool directories when neither [spool] nor smsd.conf names them: Debian's."""
    return {
        kind: path for kind, path in defaults("spool").items() if kind in KINDS and path
    }


class User(types.SimpleNamespace):
    """An API user from a [user:NAME] section: its name, and its options as attributes."""

    def __init__(self, name, **options):
        super().__init__(name=name, **{**defaults("user"), **options})

    def may_send_to(self, mobile):
        """True when the normalised number is on this user's allow-list (none: any)."""
        if not self.mobiles:
            return True
        return any(
            mobile.startswith(p[:-1]) if p.endswith("*") else mobile == p
            for p in self.mobiles
        )


class Webhook(types.SimpleNamespace):
    """A receiver of events, from a [webhook:NAME] section: its name, and its options."""

    def __init__(self, name, **options):
        super().__init__(name=name, **{**defaults("webhook"), **options})

    def wants(self, event_type, sender):
        """True when this receiver takes events of event_type about sender's messages."""
        if event_type not in self.events:
            return False
        return event_type == "sms.received" or not self.users or sender in self.users


class Config(types.SimpleNamespace):
    """Everything the daemon reads from its INI file, validated; never changed.

    The [server] options are attributes (config.threads); spool, health and
    retention are read-only mappings of those sections (config.spool["outgoing"]);
    smsd holds the pid file and stats directory that smsd.conf names (empty
    without one); users maps names to Users, unix_users local accounts to
    Users, webhooks names to Webhooks, groups names to their numbers. A reload
    makes a new Config.
    """

    def __init__(self, path="smsapi.ini", **given):
        values = {
            **defaults("server"),
            "spool": default_spool(),
            "health": defaults("health"),
            "alerts": defaults("alerts"),
            "retention": {k: v for k, v in defaults("retention").items() if v},
            "smsd": {},
            "users": {},
            "unix_users": {},
            "webhooks": {},
            "groups": {},
            "heartbeats": {},
            "escalations": {},
            "topics": {},
        }
        values.update(given)
        values["spool"] = {
            "scheduled": os.path.join(values["state_dir"], "scheduled"),
            **values["spool"],
        }
        for name, value in values.items():
            if isinstance(value, dict):
                values[name] = types.MappingProxyType(value)
        super().__init__(path=path, **values)

    def __setattr__(self, name, value):
        raise AttributeError("a Config does not change: make one with replace()")

    def replace(self, **changes):
        return Config(**{**vars(self), **changes})


###############################################################################
# Loading the config ##########################################################
###############################################################################


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
    read, named = read_sections(parser, path, problems)
    spool, smsd = spool_settings(path, read["spool"], problems)
    health = {**defaults("health"), **read["health"]}
    problems += [
        f"{path}: [health] {name}_warn: must not be above {name}_fail"
        for name in ("queue", "queue_age", "failed")
        if health[name + "_warn"] > health[name + "_fail"]
    ]
    config = Config(
        path,
        **read["server"],
        spool=spool,
        smsd=smsd,
        health=health,
        alerts={**defaults("alerts"), **read["alerts"]},
        retention={"state": defaults("retention")["state"], **read["retention"]},
        unix_users=unix_user_map(path, named["users"], problems),
        **named,
    )
    problems += [f"{path}: {problem}" for problem in cross_problems(config)]
    problems += [f"{path}: {problem}" for problem in check_spool(config)]
    if problems:
        raise ConfigError(problems)
    return config


def read_sections(parser, path, problems):
    """({section: options} of the single sections, {"users": {name: User}, ...}
    of the [kind:NAME] ones), collecting problems."""
    read = {name: {} for name in SECTIONS if name not in NAMED_SECTIONS}
    named = {
        "users": {},
        "webhooks": {},
        "groups": {},
        "heartbeats": {},
        "escalations": {},
        "topics": {},
    }
    for section in parser.sections():
        kind, _, name = section.partition(":")
        if section in read:
            read[section] = read_section(parser, path, section, problems)
        elif kind not in NAMED_SECTIONS or not USER_NAME.fullmatch(name):
            problems.append(f"{path}: [{section}]: unknown section")
        elif kind == "user":
            named["users"][name] = read_user(parser, path, section, problems)
        elif kind == "webhook":
            named["webhooks"][name] = read_webhook(parser, path, section, problems)
        elif kind == "group":
            group = read_named(parser, path, section, ("mobiles",), problems)
            named["groups"][name] = group.get("mobiles", ())
        elif kind == "escalation":
            values = read_named(parser, path, section, ("steps",), problems)
            named["escalations"][name] = types.SimpleNamespace(
                name=name, **{**defaults("escalation"), **values}
            )
        elif kind == "topic":
            try:
                as_topic_name(name)
            except ValueError as exc:
                problems.append(f"{path}: [{section}]: {exc}")
            values = read_named(parser, path, section, ("to",), problems)
            named["topics"][name] = types.SimpleNamespace(
                name=name, **{**defaults("topic"), **values}
            )
        else:
            values = read_named(parser, path, section, ("every",), problems)
            if "to" not in values and "escalation" not in values:
                problems.append(f"{path}: [{section}] to: required (or escalation)")
            named["heartbeats"][name] = types.SimpleNamespace(
                name=name, **{**defaults("heartbeat"), **values}
            )
    return read, named


def cross_problems(config):
    """Names one section gives that no other section defines."""
    problems = [
        f"[heartbeat:{heartbeat.name}] to: no [group:{entry[1:]}]"
        for heartbeat in config.heartbeats.values()
        for entry in heartbeat.to or ()
        if entry.startswith("@") and entry[1:] not in config.groups
    ]
    problems += [
        f"[escalation:{chain.name}] steps: no [group:{entry[1:]}]"
        for chain in config.escalations.values()
        for step in chain.steps or ()
        for entry in step.recipients
        if entry.startswith("@") and entry[1:] not in config.groups
    ]
    problems += [
        f"[{kind}:{name}] {key}: no [group:{entry[1:]}]"
        for kind, key, named in (
            ("topic", "to", config.topics),
            ("user", "default_to", config.users),
        )
        for name, section in named.items()
        for entry in getattr(section, key) or ()
        if entry.startswith("@") and entry[1:] not in config.groups
    ]
    problems += [
        f"[topic:{topic.name}] users: no [user:{name}]"
        for topic in config.topics.values()
        for name in topic.users
        if name not in config.users
    ]
    problems += [
        f"[heartbeat:{heartbeat.name}] escalation: no [escalation:{heartbeat.escalation}]"
        for heartbeat in config.heartbeats.values()
        if heartbeat.escalation and heartbeat.escalation not in config.escalations
    ]
    return problems + [
        f"[webhook:{webhook.name}] users: no [user:{name}]"
        for webhook in config.webhooks.values()
        for name in webhook.users
        if name not in config.users
    ]


def read_section(parser, path, section, problems):
    """Convert the options of one section (for [user:NAME], the user options)."""
    schema = SECTIONS[section.partition(":")[0]]
    values = {}
    for key, raw in parser.items(section):
        if key not in schema:
            problems.append(f"{path}: [{section}] {key}: unknown option")
            continue
        try:
            values[key] = schema[key].convert(raw)
        except ValueError as exc:
            problems.append(f"{path}: [{section}] {key}: {exc}")
    return values


def read_user(parser, path, section, problems):
    """Build the User of one [user:NAME] section, collecting problems."""
    values = read_section(parser, path, section, problems)
    if not parser.has_option(section, "password") and not (
        values.get("unix_users") or values.get("tokens")
    ):
        problems.append(f"{path}: [{section}] password: missing (or tokens)")
    return User(section[5:], **values)


def read_webhook(parser, path, section, problems):
    """Build the Webhook of one [webhook:NAME] section, collecting problems."""
    values = read_named(parser, path, section, ("url", "secret"), problems)
    return Webhook(section.partition(":")[2], **values)


def read_named(parser, path, section, required, problems):
    """The options of one [kind:NAME] section; a required one missing is a problem."""
    values = read_section(parser, path, section, problems)
    for key in required:
        if not parser.has_option(section, key):
            problems.append(f"{path}: [{section}] {key}: missing")
    return values


def expand_groups(groups, mobiles):
    """mobiles with each @NAME replaced by the group's numbers; ValueError naming
    each unknown group."""
    unknown = [m for m in mobiles if m.startswith("@") and m[1:] not in groups]
    if unknown:
        named = ", ".join(json.dumps(escape(m)) for m in unknown)
        raise ValueError("Unknown group(s): " + named)
    expanded = []
    for given in mobiles:
        expanded += groups[given[1:]] if given.startswith("@") else [given]
    return expanded


def unix_user_map(path, users, problems):
    """{local account name: User} from the users' unix_users; one user per account."""
    mapping = {}
    for user in users.values():
        for name in user.unix_users:
            if name in mapping:
                problems.append(
                    f"{path}: [user:{user.name}] unix_users: {name} is already"
                    f" [user:{mapping[name].name}]"
                )
            mapping.setdefault(name, user)
    return mapping


def loosened(old, new):
    """What a new config gives up of the one in use, each as a phrase for the log:
    the sections it no longer has, and what it lets a user do that the old one
    did not. A file caught half-written does one or the other."""
    found = [
        f"drops [{kind[:-1]}:{name}]"
        for kind in (
            "users",
            "webhooks",
            "groups",
            "heartbeats",
            "escalations",
            "topics",
        )
        for name in getattr(old, kind)
        if name not in getattr(new, kind)
    ]
    found += [
        f"lets more users publish to [topic:{name}]"
        for name, topic in new.topics.items()
        if name in old.topics
        and old.topics[name].users
        and not set(topic.users or new.users) <= set(old.topics[name].users)
    ]
    for name, user in new.users.items():
        before = old.users.get(name)
        if before is None:
            continue  # a new user widens nobody's rights
        if any(not covered(p, before.mobiles) for p in user.mobiles or ["*"]):
            found.append(f"lets [user:{name}] send to numbers it could not")
        for key in ("admin", "inbox", "metrics"):
            if getattr(user, key) and not getattr(before, key):
                found.append(f"makes [user:{name}] {key}")
        for key in ("max_per_hour", "max_per_day"):
            limit, was = getattr(user, key), getattr(before, key)
            if was is not None and (limit is None or limit > was):
                found.append(f"raises [user:{name}] {key}")
        if set(user.unix_users) - set(before.unix_users):
            found.append(f"maps more local accounts to [user:{name}]")
    return found


def covered(pattern, patterns):
    """True when every number pattern matches is matched by one of patterns (none: any)."""
    if not patterns:
        return True
    digits = pattern.rstrip("*")
    return any(
        digits.startswith(p[:-1]) if p.endswith("*") else p == pattern for p in patterns
    )


def spool_settings(path, spool, problems):
    """The spool directories, and smsd's pid file and stats directory.

    What [spool] leaves out comes from smsd.conf, else Debian's defaults.
    """
    default_conf = defaults("spool")["smsd_conf"]
    conf = spool.pop("smsd_conf", default_conf)
    group = spool.pop("smsd_group", None) or smstools_group()
    try:
        settings = read_smsd_conf(conf) if conf else None
    except OSError as exc:
        if conf != default_conf or exc.errno != errno.ENOENT:
            problems.append(f"{path}: [spool] smsd_conf: {one_line(exc)}")
        settings = None
    if settings is None:
        spool = {**default_spool(), **spool}
        return spool, {"gid": smsd_gid(group, spool["outgoing"])}
    from_smsd = {k: v for k, v in settings.items() if k in KINDS or k == "report"}
    spool = {**default_spool(), **from_smsd, **spool}
    smsd = {
        "conf": conf,
        "pidfile": settings.get("pidfile", SMSD_PIDFILE),
        "stats": settings.get("stats", ""),
        "gid": smsd_gid(group, spool["outgoing"]),
    }
    return spool, smsd


def smstools_group(path=SMSTOOLS_DEFAULTS):
    """The group Debian runs smsd as (GROUP= in /etc/default/smstools), or None."""
    with (
        contextlib.suppress(OSError),
        open(path, encoding="utf-8") as file,
    ):
        for line in file:
            key, equals, value = line.strip().partition("=")
            if equals and key.strip() == "GROUP" and value.strip("\"' "):
                return value.strip().strip("\"'")
    return None


def smsd_gid(group, outgoing):
    """The gid of the group smsd runs as (a name, or None: outgoing's group)."""
    with contextlib.suppress(KeyError, OSError):
        return grp.getgrnam(group).gr_gid if group else os.stat(outgoing).st_gid
    return None


def read_smsd_conf(path):
    """The global settings of smsd's config file (before its first [section])."""
    return read_smsd_sections(path)[""]


def read_smsd_sections(path):
    """{section: {key: value}} of smsd's config file; "" holds the global settings.
    A key set twice keeps its last value, as smsd does."""
    sections, current = {"": {}}, ""
    with open(path, encoding="utf-8", errors="replace") as file:
        for line in file:
            line = line.strip()
            if line.startswith("[") and line.endswith("]"):
                current = line[1:-1].strip()
                sections.setdefault(current, {})
                continue
            key, equals, value = line.partition("=")
            if equals and not key.startswith("#") and value.strip():
                sections[current][key.strip().lower()] = value.strip()
    return sections


def smsd_advice(config):
    """[(grade, setting, what is wrong)] of the smsd.conf smsapi reads: a
    "problem" keeps messages from going as they should; "advice" costs a feature."""
    sections = read_smsd_sections(config.smsd["conf"])
    given, found = sections[""], []

    def add(grade, setting, what):
        found.append((grade, setting, what))

    for kind in ("outgoing", "checked", "sent", "failed", "incoming"):
        theirs = given.get(kind)
        if theirs and not same_directory(theirs, config.spool[kind]):
            add("problem", kind, f"{theirs}, but smsapi's is {config.spool[kind]}")
    if given.get("autosplit", "3") != "3":
        add(
            "problem",
            "autosplit",
            "not 3: long texts go otherwise than parts_count says",
        )
    devices = [d.strip() for d in given.get("devices", "").split(",") if d.strip()]
    if not devices:
        add("problem", "devices", "not set: smsd has no modem")
    for name in devices:
        modem = sections.get(name, {})
        if "device" not in modem:
            add("problem", f"[{name}] device", "not set: the modem cannot be reached")
        if modem.get("incoming", "no").lower() not in ("yes", "high", "1", "true"):
            add("advice", f"[{name}] incoming", "not yes: no SMS is received")
        calls = modem.get("phonecalls", sections.get("default", {}).get("phonecalls"))
        if config.alerts["ack_by_call"] and (calls or "no").lower() not in CALLS_ON:
            add(
                "problem", f"[{name}] phonecalls", "not clip: ack_by_call hears no call"
            )
    calls_dir = given.get("phonecalls")  # the global one: where call records go
    if (
        config.alerts["ack_by_call"]
        and calls_dir
        and not same_directory(calls_dir, config.spool["incoming"])
    ):
        add("problem", "phonecalls", f"{calls_dir}: smsapi reads calls in incoming")
    for setting, what in SMSD_ADVICE.items():
        if setting not in given or given[setting].lower() in NO:
            add("advice", setting, what)
    return found


def same_directory(one, other):
    """True when two paths name one directory (through symlinks, too)."""
    return os.path.realpath(one) == os.path.realpath(other)


def check_spool(config):
    """Problems with the spool and state directories: missing, or not usable by us.

    Each names section and key; load_config puts the file's path before it.
    """
    problems = check_own_dir("[server] state_dir", config.state_dir)
    problems += check_smsd_group(config.smsd.get("gid"), os.geteuid(), os.getgroups())
    for kind, directory in config.spool.items():
        where = f"[spool] {kind}: {directory}"
        if kind == "scheduled":
            problems += check_own_dir("[spool] scheduled", directory)
        elif not os.path.isdir(directory):
            problems.append(where + " is not a directory")
        elif kind == "outgoing" and not os.access(directory, os.W_OK | os.X_OK):
            problems.append(where + " is not writable by this process")
        elif not os.access(directory, os.R_OK | os.X_OK):
            problems.append(where + " is not readable by this process")
    return problems


def check_smsd_group(gid, euid, groups):
    """A problem when this process (euid, in groups) cannot give its files the
    group smsd runs as: smsd could not read them, and no message would go."""
    if gid is None or euid == 0 or gid in groups or gid == os.getegid():
        return []
    name = grp.getgrgid(gid).gr_name
    problem = (
        f"[spool] smsd_group: this process is not in {name}, the group smsd runs as:"
        f" it could not read the messages (usermod -a -G {name} smsapi)"
    )
    return [problem]


def check_own_dir(option, directory):
    """Problems with a directory of smsapi's own (made at start if its parent allows)."""
    where = f"{option}: {directory}"
    for _ in range(2):  # the scheduled directory is made in the state directory
        if not os.path.exists(directory):
            directory = os.path.dirname(os.path.abspath(directory))
    if not os.path.exists(directory):
        return [where + " does not exist, nor does its parent"]
    if not os.path.isdir(directory):
        return [where + " is not a directory"]
    if not os.access(directory, os.W_OK | os.X_OK):
        return [where + " is not writable by this process"]
    return []


###############################################################################
# Spool files #################################################################
###############################################################################


def new_message_id(user, now):
    """A fresh spool file name: prefix, owner tag, creation time, 96 random bits.

    The tag and the time let a listing pick one user's messages, newest
    first, from the names alone, without opening or stat-ing every file.
    """
    micros = int(now * 1e6)
    random = base64.urlsafe_b64encode(os.urandom(12)).decode()  # 16 characters
    return f"smsapi.{owner_tag(user)}.{base36(micros):0>10}{random}"


@functools.lru_cache(maxsize=1024)
def owner_tag(user):
    """Six characters derived from the user name, for message ids."""
    return base64.b32encode(sha256(user.encode()).digest()[:5]).decode()[:6].lower()


def base36(number):
    """number (0 or more) in base 36; negative numbers count as 0."""
    digits = ""
    while number > 0:
        number, digit = divmod(number, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[digit] + digits
    return digits or "0"


def render_message(user, mobile, encoding, options):
    """The bytes of an smsd message file: header lines, a blank line, the body."""
    lines = ["From: " + user, "To: " + mobile, "Alphabet: " + encoding.header]
    lines += [f"{name}: {value}" for name, value in options]
    return ("\n".join(lines) + "\n\n").encode("ascii") + encoding.body


class Message(
    collections.namedtuple(
        "Message", "message_id kind headers text mtime", defaults=(None, 0.0)
    )
):
    """A spool file as read back: its id, its spool, its headers, its decoded
    text (None for binary), its mtime."""

    __slots__ = ()

    @property
    def owner(self):
        return self.headers.get("From")


def message_path(config, kind, message_id):
    """The file of message_id in spool kind; 404 for an id of the wrong form."""
    if not MESSAGE_ID.fullmatch(message_id):
        raise not_found()
    return os.path.join(config.spool[kind], message_id)


def read_message(config, kind, message_id, limit=MAX_SPOOL_FILE):
    """The Message stored under message_id in kind, or None if there is none."""
    found = read_spool_file(message_path(config, kind, message_id), limit)
    if found is None:
        return None
    headers, text = parse_message(found[0])
    return Message(message_id, kind, headers, text, found[1])


def read_spool_file(path, limit=MAX_SPOOL_FILE):
    """(up to limit bytes, clamped mtime) of the regular file at path, else None.

    A spool file is hostile input: a symlink, a FIFO, a device or a directory
    under a message's name is no message, and is neither followed nor waited on.
    """
    try:
        fd = os.open(path, SPOOL_OPEN)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EACCES):  # a symlink, a socket
            return None
        raise
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            return None
        chunks, wanted = [], min(limit, status.st_size + 1)
        while wanted > 0:
            chunk = os.read(fd, wanted)
            if not chunk:
                break
            chunks.append(chunk)
            wanted -= len(chunk)
        return b"".join(chunks)[:limit], clamp_time(status.st_mtime)
    finally:
        os.close(fd)


def clamp_time(seconds):
    """A time read from the spool, within what the API can print."""
    return min(max(seconds, EARLIEST), LATEST)


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
    """The message wherever it is now: one lookup per spool, the latest step of
    its life first. smsd writes a message where it goes before it removes it
    from where it was, and the later place is the truth."""
    for kind in ("failed", "sent", "checked", "outgoing", "scheduled"):
        message = read_message(config, kind, message_id)
        if message is not None:
            return message
    return None


class Paging(collections.namedtuple("Paging", "limit offset")):
    """Which part of a listing to show: limit names from offset on."""

    __slots__ = ()


def list_page(config, kind, page, owner=None):
    """(how many, the page's names) of messages in spool kind, newest first.

    Only owner's, if given. Our ids carry owner tag and creation time (fixed
    width, base 36), so one user's names order by time as plain strings; only
    names other tools wrote cost a stat, and only in a listing of everything.
    """
    names = os.listdir(config.spool[kind])
    if owner:
        prefix = f"smsapi.{owner_tag(owner)}."
        mine = [n for n in names if n.startswith(prefix) and len(n) == ID_LENGTH]
        return len(mine), heapq.nlargest(page.offset + page.limit, mine)[page.offset :]
    keyed = []
    for name in names:
        if OUR_ID.fullmatch(name):
            keyed.append((name[ID_TIME], name))
        elif is_message_name(name):
            try:
                mtime = os.lstat(os.path.join(config.spool[kind], name)).st_mtime
            except OSError:
                continue  # smsd moved it meanwhile
            keyed.append((f"{base36(int(clamp_time(mtime) * 1e6)):0>10}", name))
    shown = heapq.nlargest(page.offset + page.limit, keyed)[page.offset :]
    return len(keyed), [name for _, name in shown]


def is_message_name(name):
    """True for a file smsd would treat as a message (not temp, not lock)."""
    return bool(MESSAGE_ID.fullmatch(name)) and not (
        name.endswith(".LOCK") or name.startswith("LOCKED")
    )


###############################################################################
# Durable writes and journals #################################################
###############################################################################


def write_files(directory, files, sync, mode=0o640, group=None, owner=None):
    """Put {name: bytes} into directory, all or nothing, durably: the one way
    smsapi writes what must outlast a crash or a power cut.

    Each file is written under a dot name (which smsd, and every reader here,
    skips) and fsynced; then all are renamed into place; then the directory is
    fsynced. With sync false, nothing is fsynced. mode is the files' (smsd,
    in group smsd, rewrites what it sends: 0660); group, a gid to give them;
    owner, a (uid, gid) to give them instead (a config that add-user rewrites).
    """
    temps = []
    try:
        for name, data in files.items():
            temp = os.path.join(directory, f"{TEMP_PREFIX}{name}.{os.urandom(4).hex()}")
            temps.append(temp)
            write_file(temp, data, sync, mode, (-1, group) if owner is None else owner)
        for temp, name in zip(temps, files):
            os.replace(temp, os.path.join(directory, name))
        if sync:
            fsync_directory(directory)
    except OSError:
        for temp in temps:
            remove_quietly(temp)
        raise


def write_file(path, data, sync, mode, owner=(-1, None)):
    """Create path exclusively with mode (whatever the umask), owned by owner
    ((uid, gid); -1 or None: as made), write data, fsync if sync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        if owner[1] is not None:
            os.fchown(fd, owner[0], owner[1])
        if mode & process_umask():  # else open() made it so already
            os.fchmod(fd, mode)
        write_all(fd, data)
        if sync:
            os.fsync(fd)
    except OSError:
        os.close(fd)
        remove_quietly(path)
        raise
    os.close(fd)


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@functools.lru_cache(maxsize=1)
def process_umask():
    """This process's umask, read without setting it (Linux 4.7 on); else 0o777."""
    with (
        contextlib.suppress(OSError, ValueError),
        open("/proc/self/status", "rb") as status,
    ):
        for line in status:
            if line.startswith(b"Umask:"):
                return int(line.split()[1], 8)
    return 0o777


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


class SpoolWriter:
    """A spool directory (smsd's outgoing, or the scheduled one) written so that
    a 201 is on disk: write_files(), with smsd's group able to rewrite the files.
    (A group commit of the directory fsync, one for many writers, was slower on
    ext4, whose journal already batches concurrent fsyncs.)"""

    def __init__(self, directory, fsync=True, group=None):
        self.directory = directory
        self.fsync = fsync
        #: the group smsd runs as (Debian: dialout, not the spool's smsd): the
        #: files get it, unless the setgid directory gives it already
        if group is not None and group == os.stat(directory).st_gid:
            group = None
        self.group = group

    def write(self, files):
        """Put {message_id: bytes} into the directory, all or nothing; 507 or 503 if it refuses."""
        try:
            write_files(self.directory, files, self.fsync, 0o660, self.group)
        except OSError as exc:
            raise storage_error(exc) from exc


def clean_temp_files(config):
    """Remove temporary files a crash left in outgoing; smsd never saw them."""
    with os.scandir(config.spool["outgoing"]) as entries:  # no list of the queue
        for entry in entries:
            if entry.name.startswith(TEMP_PREFIX):
                remove_quietly(entry.path)
                log.warning("removed unfinished temporary file %s", escape(entry.name))


class Journal:
    """State kept as an append-only file of JSON lines: replayed at start (a
    damaged line is counted, skipped and logged), appended a change at a time
    (fsynced), and written anew, whole, when most of it is stale: past 1000
    lines and four times the lines still live."""

    def __init__(self, path, sync):
        self.path, self.sync = path, sync
        self.lines = 0  # in the file

    def replay(self, apply):
        """apply(line) to each line, oldest first; False when there is no journal.

        apply raises ValueError, TypeError, IndexError or KeyError for a line
        that is not one of its own.
        """
        try:
            with open(self.path, "rb") as file:
                journal = file.readlines()
        except FileNotFoundError:
            return False
        damaged = 0
        for raw in journal:
            try:
                apply(json.loads(raw))
            except (ValueError, TypeError, IndexError, KeyError, RecursionError):
                damaged += 1
        self.lines = len(journal)
        if damaged:
            log.warning("%s: %d damaged lines skipped", self.path, damaged)
        return True

    def append(self, lines, live, everything):
        """Append lines; when the file would pass max(1000, 4 * live) lines, write
        everything() (the live lines) instead. OSError if the disk refuses."""
        if self.lines + len(lines) > max(1000, 4 * live):
            self.rewrite(everything())
            return
        created = not os.path.exists(self.path)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(self.path, flags, 0o640)
        try:
            write_all(fd, json_lines(lines))
            if self.sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if created and self.sync:
            fsync_directory(os.path.dirname(self.path))
        self.lines += len(lines)

    def rewrite(self, lines):
        """Replace the journal with these lines, all or nothing."""
        directory, name = os.path.split(self.path)
        write_files(directory, {name: json_lines(lines)}, self.sync)
        self.lines = len(lines)


def json_lines(lines):
    return "".join(
        json.dumps(line, separators=(",", ":")) + "\n" for line in lines
    ).encode()


def write_json(path, data, sync):
    """Replace the file at path with data as JSON, durably (write_files)."""
    directory, name = os.path.split(path)
    write_files(
        directory, {name: json.dumps(data, separators=(",", ":")).encode()}, sync
    )


def read_json(path):
    """The JSON object stored at path, or None if it is missing or damaged."""
    try:
        found = read_spool_file(path)
        data = json.loads(found[0]) if found else None
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def is_time(value):
    """True for a JSON number that can be a time (not a bool, not NaN)."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and (EARLIEST <= value <= LATEST)
    )


def dict_of(value):
    return value if isinstance(value, dict) else {}


###############################################################################
# HTTP helpers ################################################################
###############################################################################


@functools.lru_cache(maxsize=64)
def environ_key(header):
    """The WSGI environ key of an HTTP header: Content-Type, X-Forwarded-For..."""
    key = header.upper().replace("-", "_")
    return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key


def too_large(limit):
    return ApiError(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"Body is larger than {limit} bytes"
    )


class Request:
    """One request: the parts of its WSGI environ a handler needs, the config
    it is served under, and what the application learns while answering it."""

    def __init__(self, environ, config, now):
        self.environ = environ
        self.config = (
            config  # as it was when the request came: a reload makes a new one
        )
        self.now = now  # when it came: the one time its answer is made of
        self.method = environ["REQUEST_METHOD"].upper()
        self.path = environ.get("PATH_INFO", "") or "/"
        self.args = {}  # the route's placeholders, filled by the router
        self.route = "other"  # the route's template, for the metrics
        self.user = None  # filled by authenticate()
        self.written = []  # ids of the message files it wrote
        self.log_detail = ""  # what its log line says after the ids: numbers, parts
        self.replayed = False  # answered from an Idempotency-Key record

    @functools.cached_property
    def query(self):
        """The query string as {name: [values]}; 400 unless it is UTF-8."""
        # PEP 3333 hands bytes over as latin-1; anything else becomes "?".
        query = self.environ.get("QUERY_STRING", "")
        return parse_form(query.encode("latin-1", "replace")) if query else {}

    def header(self, name):
        """A request header by its HTTP name, or ''."""
        return self.environ.get(environ_key(name), "")

    def body(self):
        """The request body, refused with 413 past the limit without reading it all."""
        limit = self.config.max_body
        length = self.header("Content-Length").strip()
        if length:
            if not is_number(length):
                raise ApiError(HTTPStatus.BAD_REQUEST, "Bad Content-Length")
            if int(length) > limit:
                raise too_large(limit)
            size = int(length)
        elif self.environ.get("wsgi.input_terminated"):
            size = limit + 1  # no length given, but the server ends the stream
        else:
            return b""
        try:
            data = self.environ["wsgi.input"].read(size)
        except TimeoutError:  # the wsgiref fallback's request_timeout, mid-body
            raise ApiError(
                HTTPStatus.REQUEST_TIMEOUT, "Request body too slow"
            ) from None
        if len(data) > limit:
            raise too_large(limit)
        return data

    def param(self, name, default=None):
        """The last value of a query parameter, or default."""
        values = self.query.get(name)
        return values[-1] if values else default


def wants_plain_text(request):
    """True when the client asks for text/plain rather than JSON (curl in a shell script)."""
    accept = request.header("Accept").lower()
    return "text/plain" in accept and "json" not in accept


def wants_html(request):
    """True for a browser: it asks for text/html, and not for JSON."""
    accept = request.header("Accept").lower()
    return "text/html" in accept and "json" not in accept


def read_fields(request):
    """The send request's fields from JSON, a form, or the query string."""
    if request.method in ("GET", "HEAD"):
        fields = {k: v for k, v in request.query.items() if k not in CONTROL_PARAMS}
        return form_fields(fields)
    media_type = request.header("Content-Type").split(";")[0].strip().lower()
    body = request.body()
    # curl -d sends a form's Content-Type: a body that is a JSON object is one
    if (
        media_type in JSON_TYPES
        or media_type.endswith("+json")
        or body.lstrip()[:1] == b"{"
    ):
        return json_fields(body)
    if media_type == "application/x-www-form-urlencoded":
        return form_fields(parse_form(body))
    raise ApiError(
        HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
        "Content-Type must be application/json (curl -H 'Content-Type: application/json')"
        " or application/x-www-form-urlencoded",
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
    try:  # in a key as well as in a value; only a \u escape can make one
        if b"\\u" in body:
            json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ApiError(
            HTTPStatus.BAD_REQUEST, "Body holds a lone surrogate (\\ud800): not Unicode"
        ) from None
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
    for name in ("flash", "report", "substitute", "truncate"):
        if name in fields:
            fields[name] = form_bool(name, fields[name])
    for name in ("retries", "class", "max_parts"):
        if name in fields and is_number(fields[name].strip()):
            fields[name] = int(fields[name])
    return fields


def form_bool(name, value):
    try:
        return as_bool(value)
    except ValueError:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{name} must be yes or no") from None


def query_int(request, name, default, low, high):
    value = request.param(name)
    if value is None:
        return default
    if not is_number(value) or not low <= int(value) <= high:
        raise ApiError(
            HTTPStatus.BAD_REQUEST,
            f"{name} must be a number from {low} to {high}",
        )
    return int(value)


def query_bool(request, name):
    """A yes/no query parameter; absent is no."""
    value = request.param(name)
    return value is not None and form_bool(name, value or "yes")


def quoted(values):
    return ", ".join(json.dumps(escape(v)) for v in values)


def anchored(regex, prefix=""):
    """A JSON Schema pattern for what regex matches whole (after an optional prefix)."""
    return f"^{prefix}(?:{regex.pattern})$"


# A handler takes the request and, as keyword-only arguments, the parts of the
# application it uses (the Application hands them over by name); it returns an
# Answer.


class Answer(collections.namedtuple("Answer", "status data text", defaults=(None,))):
    """What a handler answers: the status, the data (JSON, or Raw), and the
    plain-text form for Accept: text/plain (None: it has none, JSON goes out)."""

    __slots__ = ()


class Raw(collections.namedtuple("Raw", "body content_type headers", defaults=((),))):
    """Data of an answer that is not JSON: the body, its Content-Type, and
    headers of its own."""

    __slots__ = ()


def read_page(request):
    """The Paging the query asks for (?limit=, ?offset=), bounded."""
    return Paging(
        limit=query_int(request, "limit", PAGE_SIZE, 1, MAX_PAGE_SIZE),
        offset=query_int(request, "offset", 0, 0, MAX_OFFSET),
    )


def listing(ids, total, page, **extra):
    """A page of a listing; its plain-text form is the ids, one a line."""
    data = {"message_id": ids, **extra, "total_count": total, **page._asdict()}
    return Answer(HTTPStatus.OK, data, "".join(i + "\n" for i in ids))


###############################################################################
# Authentication ##############################################################
###############################################################################


class Authenticator:
    """Checks Basic credentials against the config, with a cache of successes.

    The cache keeps a keyed BLAKE2b hash of the password, under a key that
    lives only in this process, so a hot credential costs one fast hash, not
    one scrypt, and memory never holds the password itself.
    """

    def __init__(self):
        self.key = os.urandom(32)
        self.verified = {}  # (user, stored hash) -> keyed hash of the password
        self.dummies = {}  # (ln, r, p) -> a hash that matches no password
        self.hashes_checked = 0  # scrypt runs: the same for every kind of failure

    def check(self, users, name, password):
        """The User of users for these credentials, or None; same cost for unknown users."""
        user = users.get(name)
        if user is not None and not user.password:  # a unix_users-only user
            user = None
        stored = user.password if user else self.dummy(users)
        tag = blake2b(
            password.encode("utf-8", "replace"), key=self.key, digest_size=32
        ).digest()
        cached = self.verified.get((name, stored)) if user else None
        import hmac  # loaded with OpenSSL by the first check (scrypt's), like hashlib

        if cached is not None and hmac.compare_digest(cached, tag):
            return user
        # Every failure costs one scrypt, so timing tells nothing about names.
        self.hashes_checked += 1
        ln, r, p, salt, digest = parse_password_hash(stored)
        good = hmac.compare_digest(scrypt(password, salt, ln, r, p), digest)
        if good and user is not None:
            self.verified[(name, stored)] = tag
            return user
        return None

    def token_user(self, users, token):
        """The User one of whose tokens this is, or None; every token of every
        user compared, in constant time, at one SHA-256's cost."""
        import hmac  # OpenSSL with it, at the first token, as scrypt at a password

        digest = sha256(token.encode("utf-8", "replace")).hexdigest()
        found = None
        for user in users.values():
            for entry in user.tokens:
                if hmac.compare_digest(entry[-64:], digest):
                    found = user
        return found

    def dummy(self, users):
        """What an unknown user's password is checked against: it matches nothing,
        and costs what the users' own hashes cost (the first one's parameters)."""
        model = next((u.password for u in users.values() if u.password), None)
        cost = (SCRYPT_LN, SCRYPT_R, SCRYPT_P)
        if model:
            cost = parse_password_hash(model)[:3]
        if cost not in self.dummies:
            salt, digest = os.urandom(16), os.urandom(32)
            self.dummies[cost] = password_hash(*cost, salt, digest)
        return self.dummies[cost]


class Failures:
    """Failed logins for one key: how many, since when, blocked until when (monotonic)."""

    __slots__ = ("count", "since", "until")

    def __init__(self, now):
        self.count, self.since, self.until = 0, now, 0.0


class Throttle:
    """Slows password guessing down, per client address and per user name.

    Ten failures within a minute from one address block that address: every
    attempt while blocked counts too and doubles the delay, up to 15 minutes;
    it costs no scrypt. Thirty for one user from all addresses together (many
    addresses guessing one password) put that user in the slow lane: from
    every address but those it logged in from before, one password check a
    second goes through (the waitress server holds the others, without a
    thread, until their turn; else they get 429 and Retry-After: 1). A guesser
    gets one guess a second; the real user gets in late, never not at all,
    and from its own addresses at once. Memory is bounded: names are kept as
    short digests, and past MAX_ENTRIES the least recently failing keys are
    forgotten.
    """

    MAX_ENTRIES = 10_000
    USER_BUDGET = 30  # failures a minute for one user from all addresses together
    TRUSTED = 8  # addresses remembered per user that logged in

    def __init__(self, clock):
        self.clock = clock
        self.lock = threading.Lock()
        self.counters = collections.OrderedDict()  # key -> Failures, oldest first
        self.trusted = {}  # user digest -> [addresses it logged in from]
        self.turns = {}  # user digest -> when its next check in the slow lane may go
        self.quiet = True  # no failure yet: nothing to look up

    def retry_after(self, address, user, turn=False):
        """Whole seconds the caller must wait before trying again, or 0 to go on.
        turn: the server already gave this request its user's check of the second."""
        if self.quiet:
            return 0
        now, user = self.clock.monotonic(), name_digest(user)
        with self.lock:
            blocked = self.blocked(address, now)
            if blocked:
                for key in blocked:  # hammering while blocked makes it longer
                    self.count(key, now)
                wait = max(self.counters[k].until - now for k in blocked)
                return max(1, math.ceil(round(wait, 3)))  # now + 900 - now: 900.0001
            if turn or not self.over_budget(user, address, now):
                return 0
            return 0 if self.take_turn(user, now) else 1

    def blocked(self, address, now):
        """The keys that block address now: its own (under the lock)."""
        key = ("address", address)
        return [key] if key in self.counters and self.counters[key].until > now else []

    def slow(self, address, name):
        """True when a request by address for the user name must wait its turn."""
        if self.quiet:
            return False
        now, user = self.clock.monotonic(), name_digest(name)
        with self.lock:
            return self.over_budget(user, address, now) and not self.blocked(
                address, now
            )

    def turn(self, name):
        """Take the slow lane's check of this second for the user name: True if free."""
        with self.lock:
            return self.take_turn(name_digest(name), self.clock.monotonic())

    def take_turn(self, user, now):
        if now < self.turns.get(user, 0.0):
            return False
        self.turns[user] = now + 1.0
        return True

    def over_budget(self, user, address, now):
        """True when user failed too often from everywhere, and address is not its own."""
        entry = self.counters.get(("user", user))
        return (
            entry is not None
            and entry.count >= self.USER_BUDGET
            and self.live(("user", user), now)
            and address not in self.trusted.get(user, ())
        )

    def failed(self, address, user):
        """Count one failed attempt by address for user (None: for no user)."""
        now = self.clock.monotonic()
        keys = [("address", address)]
        if user is not None:
            keys.append(("user", name_digest(user)))
        with self.lock:
            self.quiet = False
            for key in keys:
                self.count(key, now)
            if len(self.counters) > self.MAX_ENTRIES:
                self.prune(now)

    def succeeded(self, address, user):
        """Remember an address that logged in as user (the real user's own)."""
        user = name_digest(user)
        if address in self.trusted.get(user, ()):
            return  # known already: the usual case, and no lock for it
        with self.lock:
            known = self.trusted.setdefault(user, [])
            if address not in known:
                known[:] = [*known, address][-self.TRUSTED :]

    def live(self, key, now):
        entry = self.counters.get(key)
        return entry is not None and (
            now - entry.since < FAILURE_WINDOW or entry.until > now
        )

    def count(self, key, now):
        entry = self.counters.get(key)
        if entry is None or not self.live(key, now):
            entry = self.counters[key] = Failures(now)
        self.counters.move_to_end(key)
        entry.count += 1
        if entry.count >= FAILURE_LIMIT:
            entry.until = now + lockout(entry.count - FAILURE_LIMIT)

    def prune(self, now):
        """Forget what expired; if that is not enough, the least recently failing."""
        for key in [k for k in self.counters if not self.live(k, now)]:
            del self.counters[key]
        self.turns = {u: t for u, t in self.turns.items() if t > now}
        while len(self.counters) > self.MAX_ENTRIES * 3 // 4:
            self.counters.popitem(last=False)


def lockout(excess):
    """Seconds blocked after excess failures past the limit: 1, 2, 4, ... up to
    MAX_LOCKOUT; the power is capped before it is taken, since a patient guesser
    drives excess past what a float can hold."""
    return min(2.0 ** min(excess, 30), MAX_LOCKOUT)  # 2^30 s: past any lockout


def name_digest(name):
    """A short digest of a client-supplied user name: what the throttle keeps of it."""
    return blake2b(name.encode(errors="replace"), digest_size=8).digest()


def client_address(request):
    """The caller's address: its uid on the unix socket; behind a trusted proxy,
    the address the proxy appended to X-Forwarded-For (if it is one)."""
    if PEER_UID in request.environ:
        return f"uid:{request.environ[PEER_UID]}"
    return forwarded_for(
        request.environ.get("REMOTE_ADDR", ""),
        request.header("X-Forwarded-For"),
        request.config.trusted_proxies,
    )


def forwarded_for(address, forwarded, trusted_proxies):
    """address, or behind a trusted proxy the valid address it appended last."""
    if address in trusted_proxies:
        with contextlib.suppress(ValueError):
            last = forwarded.split(",")[-1].strip()[:64]
            return str(ipaddress.ip_address(last))
    return address


def is_local(request):
    """True on the unix socket and from loopback (behind a trusted proxy: the client's)."""
    if PEER_UID in request.environ:
        return True
    try:
        return ipaddress.ip_address(client_address(request)).is_loopback
    except ValueError:
        return False


def basic_credentials(header):
    """(user name, password) of an Authorization header; (None, None) if it is not
    Basic, and a name that says so without a password if it is malformed."""
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        decoded = ""
    name, colon, password = decoded.partition(":")
    if not colon:  # no "name:password": never log what might be a password
        return "(malformed credentials)", None
    return name, password


def authenticate(request, authenticator, throttle):
    """Set request.user from a token, the Authorization header or the unix
    socket's peer, or raise 401 (429 when throttled)."""
    header = request.header("Authorization")
    scheme, _, value = header.strip().partition(" ")
    name, password = basic_credentials(header)
    token = request_token(request, scheme, value, name, password)
    if token is not None:
        name, password = "", None
    name = name or ""
    if not scheme and token is None:  # a local account the kernel vouches for
        request.user = unix_peer_user(request)
        if request.user is not None:
            return
    address = client_address(request)
    wait = throttle.retry_after(address, name, bool(request.environ.get(TURN)))
    if wait:
        log.warning("throttled: %s for user %s", escape(address), logged_name(name))
        raise ApiError(
            HTTPStatus.TOO_MANY_REQUESTS,
            "Too many failed logins; retry later",
            [("Retry-After", str(wait))],
        )
    users = request.config.users
    if token is not None:
        request.user = authenticator.token_user(users, token)
    elif password is not None:
        request.user = authenticator.check(users, name, password)
    if request.user is not None:
        if token is None:
            throttle.succeeded(address, name)
        return
    if scheme or token is not None:  # no header at all asks for the challenge
        # A wrong token names no user: only its address pays for it.
        throttle.failed(address, name if token is None else None)
        who = "a token" if token is not None else "user " + logged_name(name)
        log.warning("authentication failed for %s from %s", who, escape(address))
    raise unauthorized()


def request_token(request, scheme, value, name, password):
    """The access token a request comes with, or None: Authorization: Bearer
    (scheme and value), X-Gotify-Key, ?token=, or ntfy's Basic with no user
    name and the token for a password."""
    if scheme.lower() == "bearer":
        return value.strip()
    if request.header("X-Gotify-Key"):
        return request.header("X-Gotify-Key").strip()
    if request.param("token") is not None:
        return request.param("token")
    return password if name == "" and password else None


def logged_name(name):
    """A client-supplied user name for a log line: escaped, and cut short."""
    return escape(name[:64]) + ("..." if len(name) > 64 else "")


def unix_peer_user(request):
    """The API user a caller on the unix socket is, by its local account, or None."""
    uid = request.environ.get(PEER_UID)
    try:
        name = pwd.getpwuid(uid).pw_name if uid is not None else None
    except KeyError:  # an account without a name
        return None
    return request.config.unix_users.get(name)


def unauthorized():
    return ApiError(
        HTTPStatus.UNAUTHORIZED,
        "Unauthorized access",
        [("WWW-Authenticate", 'Basic realm="smsapi"')],
    )


###############################################################################
# GSM and UCS2 encoding #######################################################
###############################################################################


class Encoding(collections.namedtuple("Encoding", "alphabet parts units body header")):
    """How a text goes on the air: alphabet ("GSM", sent 7-bit, or "UCS2"), parts,
    units (septets for GSM, UTF-16 code units for UCS2), the file body for smsd,
    and the Alphabet: header value smsd reads."""

    __slots__ = ()


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


def fitted(text, max_parts, after=""):
    """text, or as much of it as fits in max_parts with after behind it, cut at
    a character and ending with "..": more characters never take fewer parts."""
    if encode_text(text + after).parts <= max_parts:
        return text
    fits, past = 0, len(text)
    while past - fits > 1:
        middle = (fits + past) // 2
        if encode_text(text[:middle] + ".." + after).parts <= max_parts:
            fits = middle
        else:
            past = middle
    return text[:fits] + ".."


def with_lookalikes(text):
    """(text with its LOOKALIKES replaced, how many were) when that keeps it in
    the GSM alphabet in no more parts; else (text, 0): a text that goes UCS2
    anyway is sent as posted."""
    count = sum(char in LOOKALIKES for char in text)
    if not count:
        return text, 0
    plain = "".join(LOOKALIKES.get(char, char) for char in text)
    encoding = encode_text(plain)
    if encoding.alphabet != "GSM" or encoding.parts > encode_text(text).parts:
        return text, 0
    return plain, count


def non_gsm_chars(text):
    """The distinct characters that keep a text out of the GSM alphabet."""
    return sorted({c for c in text if c not in GSM_BASIC and c not in GSM_EXTENSION})


###############################################################################
# Spool changes ###############################################################
###############################################################################


class Change(collections.namedtuple("Change", "kind name event")):
    """A name that came into or left one spool directory (kind).

    RESCAN (with no name) says the whole directory must be looked at again:
    at start, when a watch was lost and is back, when events were dropped.
    """

    __slots__ = ()

    @property
    def complete(self):
        """The file is all there: smsd closed it after writing, or renamed it in."""
        return self.event in (WRITTEN, MOVED_IN)

    @property
    def new(self):
        """The name has just appeared (counted once per file)."""
        return self.event in (CREATED, MOVED_IN)


class Inotify:
    """Linux inotify through ctypes (stdlib): the names that come and go in directories."""

    IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO = 0x8, 0x40, 0x80
    IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
    IN_Q_OVERFLOW, IN_IGNORED, IN_ONLYDIR = 0x4000, 0x8000, 0x1000000
    EVENTS = (
        (IN_CREATE, CREATED),
        (IN_CLOSE_WRITE, WRITTEN),
        (IN_MOVED_TO, MOVED_IN),
        (IN_DELETE | IN_MOVED_FROM, GONE),
    )
    IN_MASK_ADD = 0x20000000
    DEPARTURES = IN_MOVED_FROM | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
    MASK = DEPARTURES | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE
    EVENT = struct.Struct("iIII")  # struct inotify_event, then len bytes of name

    def __init__(self):
        """OSError if inotify is not to be had."""
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        # closed when its owner goes, even one never stopped (a test's)
        self.close = weakref.finalize(self, os.close, self.fd)

    def watch(self, path, mask=MASK):
        """A new (or the existing, its mask widened) watch descriptor for directory path."""
        mask |= self.IN_MASK_ADD
        watch = self.libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if watch < 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error), path)
        return watch

    def unwatch(self, watch):
        self.libc.inotify_rm_watch(self.fd, watch)

    def events(self):
        """[(watch, mask, name)] of what happened since the last call."""
        found = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return found
            offset = 0
            while offset + self.EVENT.size <= len(data):
                watch, mask, _, length = self.EVENT.unpack_from(data, offset)
                offset += self.EVENT.size + length
                name = data[offset - length : offset].rstrip(b"\0")
                found.append((watch, mask, os.fsdecode(name)))


class SpoolChanges:
    """The one stream of changes in the spool, for everything that follows smsd.

    inotify tells each name that comes and goes, so a tick costs what changed,
    not what is queued. A directory removed and made anew is watched again.
    Without inotify, the directories smsd files into are listed again when
    their mtime moves (the queue is not: that would cost O(queued) a tick).
    """

    POLLED = ("sent", "failed", "incoming", "report")
    #: Where only the names that leave count (a cancel): our own writes would be
    #: most of the events, and no part follows what arrives in the queue.
    DEPARTURES_ONLY = ("outgoing", "checked")

    def __init__(self, directories, clock, inotify=True):
        self.directories = directories  # kind -> path
        self.clock = clock
        self.watches = {}  # watch descriptor -> kinds
        self.lost = set(directories)  # kinds with no watch yet
        self.complained = set()  # kinds whose trouble is logged already
        self.inotify = None
        if inotify:
            try:
                self.inotify = Inotify()
            except OSError as exc:
                log.warning("no inotify (%s): polling the spool", one_line(exc))
        self.known = {}  # polling: kind -> names seen
        self.stamps = {}  # polling: kind -> the directory's mtime when listed
        self.unsettled = set()  # polling: kinds with files still being written
        self.started = self.rewatch() if self.inotify else []  # watching from now on

    def read(self):
        """[Change] since the last read; every directory has a RESCAN first."""
        if self.inotify is None:
            return self.poll()
        changes, self.started = self.started, []
        for watch, mask, name in self.inotify.events():
            if mask & Inotify.IN_Q_OVERFLOW:
                log.warning("inotify dropped events: looking at the spool again")
                changes += [Change(k, "", RESCAN) for k in self.directories]
            kinds = self.watches.get(watch, ())
            if mask & (Inotify.IN_IGNORED | Inotify.IN_MOVE_SELF) and kinds:
                self.lose(watch)
                continue
            for bits, event in Inotify.EVENTS:
                if mask & bits and name:
                    changes += [Change(kind, name, event) for kind in kinds]
        return changes + self.rewatch()

    def lose(self, watch):
        """A watched directory was removed or moved away: watch its path again later."""
        kinds = self.watches.pop(watch)
        with contextlib.suppress(OSError):
            self.inotify.unwatch(watch)
        self.lost.update(kinds)
        log.warning("spool directory %s went away: watching for it", kinds[0])

    def rewatch(self):
        """Watch the directories that have no watch; a RESCAN for each one that is back."""
        changes = []
        lost = [k for k in self.directories if k in self.lost]  # sent before incoming
        for kind in lost:
            mask = Inotify.DEPARTURES if kind in self.DEPARTURES_ONLY else Inotify.MASK
            try:
                watch = self.inotify.watch(self.directories[kind], mask)
            except OSError as exc:
                self.complain(kind, exc)
                continue
            self.watches[watch] = self.watches.get(watch, ()) + (kind,)
            self.lost.discard(kind)
            self.complained.discard(kind)
            changes.append(Change(kind, "", RESCAN))
        return changes

    def complain(self, kind, exc):
        """Log a directory's trouble once, not every tick."""
        if kind not in self.complained:
            self.complained.add(kind)
            log.error("cannot watch the %s spool: %s", kind, one_line(exc))

    def poll(self):
        """The changes since the last poll, from listing the directories that moved."""
        changes = []
        for kind in self.POLLED:
            path = self.directories.get(kind)
            if path is None:
                continue
            try:
                stamp = os.stat(path).st_mtime_ns
                if stamp == self.stamps.get(kind) and kind not in self.unsettled:
                    continue
                names = set(os.listdir(path))
            except OSError as exc:
                self.complain(kind, exc)
                self.known.pop(kind, None)  # a RESCAN when it is back
                self.stamps.pop(kind, None)
                continue
            self.complained.discard(kind)
            self.stamps[kind] = stamp
            changes += self.compare(kind, path, names)
        return changes

    def compare(self, kind, path, names):
        """The changes between the names known of kind and names, as now listed."""
        known = self.known.get(kind)
        if known is None:
            self.known[kind] = names
            return [Change(kind, "", RESCAN)]
        now = self.clock.time()
        ready = {n for n in names - known if settled(path, n, now)}
        self.unsettled.discard(kind)
        if names - known - ready:
            self.unsettled.add(kind)  # look again next tick
        self.known[kind] = (known & names) | ready
        return [Change(kind, n, GONE) for n in known - names] + [
            Change(kind, n, MOVED_IN) for n in ready
        ]


def settled(directory, name, now):
    """True when a polled file is no longer being written: no lock, and not changed
    within SETTLE seconds before now (an mtime in the future is no write in progress)."""
    try:
        age = now - os.lstat(os.path.join(directory, name)).st_mtime
    except OSError:
        return True  # gone again; the next listing tells
    written = 0 <= age < SETTLE
    return not written and not os.path.lexists(os.path.join(directory, name + ".LOCK"))


###############################################################################
# Delivery reports ############################################################
###############################################################################


def smsd_time(value):
    """Seconds since the epoch of an smsd timestamp, yy-mm-dd HH:MM:SS in local
    time, or None. (time.strptime would load _strptime and locale for this.)"""
    match = SMSD_TIME.fullmatch(value or "")
    if match is None:
        return None
    year, *rest = (int(field) for field in match.groups())
    year += 1900 if year >= 69 else 2000  # as strptime's %y reads it
    try:
        return clamp_time(datetime.datetime(year, *rest).timestamp())
    except (ValueError, OverflowError, OSError):
        return None


def iso_time(seconds):
    """An ISO 8601 local time with offset, for JSON answers."""
    return (
        datetime.datetime.fromtimestamp(clamp_time(seconds))
        .astimezone()
        .isoformat(timespec="seconds")
    )


class Report(
    collections.namedtuple(
        "Report",
        "name modem message_ref to received submitted code detail discharged",
    )
):
    """An smsd status report file, parsed.

    name is the file's (a report is attached once, whatever reads it again);
    message_ref is TP-MR, 0-255, smsd's Message_id; to is the recipient the
    report is about (the file's From); submitted is the SMSC's timestamp of the
    original message, if any.
    """

    __slots__ = ()

    @property
    def outcome(self):
        """delivered, undelivered, or None while the SMSC is still trying (32-63)."""
        if self.code < 32:
            return "delivered"
        return None if self.code < 64 else "undelivered"


def parse_report(name, headers, text, received):
    """A Report from a status report file's name, headers and text; None if it is not one."""
    if not (text or "").startswith(REPORT_BODY):
        return None
    fields = {}
    for line in text.splitlines()[1:8]:  # smsd writes four lines
        key, _, value = line.partition(": ")
        fields.setdefault(key, value)
    ref = fields.get("Message_id", "")
    code, _, detail = fields.get("Status", "").partition(",")
    if not (REPORT_NUMBER.fullmatch(ref) and REPORT_NUMBER.fullmatch(code.strip())):
        return None
    if int(ref) > 255 or int(code) > 255:
        return None
    return Report(
        name=name,
        modem=headers.get("Modem", ""),
        message_ref=int(ref),
        to=headers.get("From", "").lstrip("+"),
        received=received,
        submitted=smsd_time(headers.get("Sent")),
        code=int(code),
        detail=detail.partition(",")[2] or detail,
        discharged=fields.get("Discharge_timestamp", "")[:32],
    )


def filed_as_report(kind, headers, report_dir):
    """True when smsd filed a received file as a status report, not an SMS reading like one.

    With its own report directory (report_dir), only files there are: no SMS
    can reach it. Without one, smsd 3.1.21 writes "UDH: no" into a status
    report's file and no UDH line into an SMS's (see the README on smsd).
    """
    if report_dir:
        return kind == "report"
    return headers.get("UDH") == "no"


class Awaiting(collections.namedtuple("Awaiting", "modem ref to sent")):
    """A sent message that asked for a report: what the report will carry."""

    __slots__ = ()


class Outcome(collections.namedtuple("Outcome", "status at detail report")):
    """What a status report said: delivered or undelivered, when, why; its file's name."""

    __slots__ = ()


def status_data(message, outcome):
    """What GET /sms/status/<id> answers of a Message and its report's Outcome (or None)."""
    headers = message.headers
    status = {"outgoing": "queued", "checked": "sending"}.get(
        message.kind, message.kind
    )
    data = {"message_id": message.message_id, "status": status, "to": headers.get("To")}
    if status == "sent":
        data.update(sent_at=headers.get("Sent"), modem=headers.get("Modem"))
        if outcome:
            data["status"] = outcome.status
            data.update({outcome.status + "_at": outcome.at, "report": outcome.detail})
            if outcome.status == "undelivered":
                data["reason"] = outcome.detail
        elif headers.get("Report", "").lower() == "yes":
            data["report"] = "pending"
    elif status == "failed":
        data.update(failed_at=headers.get("Failed"), reason=headers.get("Fail_reason"))
    elif status == "scheduled":
        data["send_at"] = headers.get("Send_at")
        for key, header in (("held", "Held"), ("valid_until", "Valid_until")):
            if header in headers:
                data[key] = headers[header]
    return data


class ReportIndex:
    """Which sent message each status report belongs to.

    Each message smsd files in sent/ that asked for a report is remembered by
    modem, message reference and recipient until its report comes. The index
    lives in an append-only journal in the state directory: a tick appends
    its changes (O(change)), and the journal is rewritten when mostly stale.
    After a restart the sent files newer than the journal's clock are read
    again; without a journal, every sent file within report_window is.
    """

    def __init__(self, settings, counts, clock):
        config = settings()
        self.settings, self.clock = settings, clock
        self.spool, self.sync = config.spool, config.fsync  # restart-only
        self.counts = counts  # delivered and undelivered are counted here
        self.journal = Journal(os.path.join(config.state_dir, JOURNAL), self.sync)
        self.awaiting = {}  # message id -> Awaiting
        self.outcomes = {}  # message id -> Outcome
        self.attached = {}  # report file name -> message id
        self.deferred = []  # Reports that came while catching up, matching nothing yet
        self.unsaved = []  # journal lines of this tick
        self.to_read = []  # names in sent/ to read, a chunk a tick
        self.catching_up = False  # until to_read is done
        self.seen = None  # when the journal last saw the spool
        if not self.journal.replay(self.replayed):
            self.migrate(os.path.join(config.state_dir, "reports.json"))
        self.swept = clock.time()

    def outcome(self, message_id):
        """The Outcome of message_id's report, or None."""
        return self.outcomes.get(message_id)

    # -- what the spool tells --------------------------------------------------

    def learn(self, message):
        """Remember a message just filed in sent/, if it asked for a report."""
        headers = message.headers
        ref, sent = headers.get("Message_id", ""), smsd_time(headers.get("Sent"))
        if headers.get("Report", "").lower() != "yes" or not sent:
            return
        if not REPORT_NUMBER.fullmatch(ref) or int(ref) > 255:
            return
        if message.message_id in self.outcomes:
            return
        entry = Awaiting(
            headers.get("Modem", "")[:64], int(ref), headers.get("To", "")[:32], sent
        )
        if self.awaiting.get(message.message_id) != entry:
            self.record(["await", message.message_id, *entry])

    def attach(self, report):
        """Give a report to the one sent message it can belong to, if any.

        A candidate has the same modem, message reference and recipient, and
        was sent before the report came, within report_window. Of several (the
        reference wraps at 256) the one sent closest to the SMSC's timestamp
        of the original, then the oldest, wins.
        """
        if report.outcome is None or report.name in self.attached:
            return  # the SMSC is still trying, or this file was read before
        key = (report.modem, report.message_ref, report.to)
        window = self.settings().report_window
        candidates = [
            (
                abs(report.submitted - entry.sent) if report.submitted else 0,
                entry.sent,
                message_id,
            )
            for message_id, entry in self.awaiting.items()
            if entry[:3] == key
            and entry.sent - 60 <= report.received <= entry.sent + window
        ]
        if candidates:
            message_id = min(candidates)[2]
            outcome = Outcome(
                report.outcome, report.discharged, report.detail, report.name
            )
            self.record(["outcome", message_id, *outcome])
            self.counts[report.outcome] += 1
        elif self.to_read:
            self.deferred.append(report)  # its message may be among those still to read

    def forget(self, message_id):
        """A sent file went away: nothing about it is worth keeping."""
        if message_id in self.awaiting or message_id in self.outcomes:
            self.record(["forget", message_id])

    def catch_up(self, now):
        """Plan to read the sent files that may have come while nobody looked."""
        since = now - self.settings().report_window
        if self.seen is not None:  # a clock stepped back since: from now
            since = max(since, min(self.seen, now) - CLOCK_MARGIN)
        else:
            log.info(
                "delivery report index %s missing: building it from the spool",
                self.journal.path,
            )
        self.catching_up = True
        with os.scandir(self.spool["sent"]) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mtime >= since:
                        self.to_read.append(entry.name)

    def next_chunk(self):
        """The names in sent/ to read this tick."""
        chunk, self.to_read = self.to_read[:REBUILD_CHUNK], self.to_read[REBUILD_CHUNK:]
        if self.catching_up and not self.to_read:
            self.catching_up = False
            log.info(
                "delivery report index caught up: %d sent messages await reports",
                len(self.awaiting),
            )
        return chunk

    def retry_deferred(self):
        """Once caught up, the reports that came meanwhile try again."""
        if not self.to_read:
            deferred, self.deferred = self.deferred, []
            for report in deferred:
                self.attach(report)

    def sweep(self, now):
        """Hourly: forget reports never to come, and outcomes of files gone."""
        self.swept = now
        cutoff = now - self.settings().report_window
        for message_id in [i for i, e in self.awaiting.items() if e.sent < cutoff]:
            self.forget(message_id)
        for message_id in list(self.outcomes):
            if not os.path.lexists(os.path.join(self.spool["sent"], message_id)):
                self.forget(message_id)

    # -- the journal ------------------------------------------------------------

    def record(self, line):
        """Apply one journal line now; it is written at the end of the tick."""
        self.apply(line)
        self.unsaved.append(line)

    def apply(self, line):
        """Change the index by one journal line; ValueError if it is not one."""
        verb, message_id, *rest = line
        if not isinstance(message_id, str) or not MESSAGE_ID.fullmatch(message_id):
            raise ValueError("not a message id")
        if verb == "await" and valid_awaiting(rest):
            self.awaiting[message_id] = Awaiting(*rest)
        elif verb == "outcome" and valid_outcome(rest):
            self.awaiting.pop(message_id, None)
            self.outcomes[message_id] = Outcome(*rest)
            if rest[3]:  # "" for outcomes taken from smsapi 1.0
                self.attached[rest[3]] = message_id
        elif verb == "forget" and not rest:
            self.awaiting.pop(message_id, None)
            outcome = self.outcomes.pop(message_id, None)
            if outcome:
                self.attached.pop(outcome.report, None)
        else:
            raise ValueError("not a journal line")

    def replayed(self, line):
        """Take one line of the journal in at start: a change, or the clock."""
        if line[0] == "clock" and is_time(line[1]):
            self.seen = line[1]
        else:
            self.apply(line)

    def migrate(self, path):
        """Take the outcomes and awaited reports from the index of smsapi 1.0."""
        old = read_json(path) or {}
        for message_id, entry in dict_of(old.get("awaiting")).items():
            with contextlib.suppress(ValueError, TypeError):
                self.apply(["await", message_id, *entry])
        for message_id, outcome in dict_of(old.get("outcomes")).items():
            fields = [dict_of(outcome).get(k) for k in ("status", "at", "detail")]
            with contextlib.suppress(ValueError, TypeError):
                self.apply(["outcome", message_id, *fields, ""])
        if old:  # written first, with no clock: the first start reads all of sent/
            self.journal.rewrite(self.live_lines(None))
            log.info("%s: taken into %s", path, self.journal.path)
            remove_quietly(path)

    def save(self, now):
        """Append this tick's lines and the clock (the journal rewrites itself when mostly stale)."""
        if not self.unsaved and self.seen is not None and 0 <= now - self.seen < 60:
            return  # (a clock stepped back writes its time at once)
        lines, self.unsaved = self.unsaved + [["clock", now]], []
        live = len(self.awaiting) + len(self.outcomes)
        try:
            self.journal.append(lines, live, lambda: self.live_lines(now))
            self.seen = now
        except OSError as exc:
            log.error("cannot save %s: %s", self.journal.path, one_line(exc))

    def live_lines(self, now):
        """The journal's lines for what is live, and the clock (unless None)."""
        lines = [["await", i, *e] for i, e in self.awaiting.items()]
        lines += [["outcome", i, *o] for i, o in self.outcomes.items()]
        return lines + ([["clock", now]] if now else [])


def valid_awaiting(fields):
    modem, ref, to, sent = fields  # ValueError if there are not four
    return (
        isinstance(modem, str)
        and isinstance(ref, int)
        and 0 <= ref <= 255
        and isinstance(to, str)
        and is_time(sent)
    )


def valid_outcome(fields):
    status, at, detail, report = fields  # ValueError if there are not four
    return status in ("delivered", "undelivered") and all(
        isinstance(field, str) for field in (at, detail, report)
    )


###############################################################################
# The inbox ###################################################################
###############################################################################


class InboxEntry(collections.namedtuple("InboxEntry", "received name sender kind")):
    """A received file as the inbox lists it: kind is sms or report."""

    __slots__ = ()


class InboxIndex:
    """The received messages and status reports in incoming, by name.

    Requests read it under a lock that guards only the dictionary: files are
    read by the watcher, outside it.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.entries = {}  # name -> InboxEntry

    def add(self, entry):
        with self.lock:
            self.entries[entry.name] = entry

    def remove(self, name):
        with self.lock:
            self.entries.pop(name, None)

    def keep_only(self, names):
        """Forget every entry whose file is not among names; the names not known yet."""
        with self.lock:
            for name in set(self.entries).difference(names):
                del self.entries[name]
            return [n for n in names if n not in self.entries]

    def listing(self, kinds):
        """InboxEntries of the given kinds, newest first."""
        with self.lock:
            found = [e for e in self.entries.values() if e.kind in kinds]
        return sorted(found, reverse=True)


def inbox_entry(entry, text):
    """An InboxEntry as the inbox lists it, with its text (None: binary, or not read)."""
    return {
        "message_id": entry.name,
        "type": entry.kind,
        "from": entry.sender,
        "received": iso_time(entry.received),
        "text": text,
    }


def inbox_name(name):
    """True for a file in incoming that is a message (not smsd's store of parts)."""
    return is_message_name(name) and not CONCATENATED.fullmatch(name)


def list_inbox(request, inbox):
    """Received messages with sender, time and text, newest first, for polling scripts.

    ?type=sms (default), report (status reports) or all; ?since=<ISO time or
    id> keeps what came after it; ?from=<number> keeps one sender.
    """
    if not (request.user.admin or request.user.inbox):
        raise ApiError(
            HTTPStatus.FORBIDDEN, "This user may not read the inbox (inbox = yes)"
        )
    page = read_page(request)
    kinds = INBOX_TYPES.get(request.param("type", "sms"))
    if kinds is None:
        raise ApiError(HTTPStatus.BAD_REQUEST, "type must be sms, report or all")
    entries = inbox.listing(kinds)
    since = request.param("since")
    if since:
        after = read_since(since, entries)
        entries = [e for e in entries if e.received > after]
    sender = request.param("from")
    if sender is not None:
        number = normalise_mobile(sender)
        entries = [e for e in entries if e.sender.lstrip("+") == number]
    messages, budget = [], MAX_PAGE_READ
    for entry in entries[page.offset : page.offset + page.limit]:
        found = None
        if budget > 0:  # past it, texts are null: GET each message instead
            found = read_spool_file(
                os.path.join(request.config.spool["incoming"], entry.name)
            )
            budget -= len(found[0]) if found else 0
        messages.append(
            inbox_entry(entry, parse_message(found[0])[1] if found else None)
        )
    ids = [m["message_id"] for m in messages]
    return listing(ids, len(entries), page, messages=messages)


def read_since(since, entries):
    """The received time that ?since= names: an ISO 8601 time, or a message id."""
    for entry in entries:
        if entry.name == since:
            return entry.received
    try:
        return datetime.datetime.fromisoformat(since.replace("Z", "+00:00")).timestamp()
    except (ValueError, OverflowError, OSError):  # also year 1 in local time
        raise ApiError(
            HTTPStatus.BAD_REQUEST, "since must be an ISO 8601 time or a message id"
        ) from None


###############################################################################
# Retention ###################################################################
###############################################################################


class Retention:
    """Removes spool files older than [retention] allows, every few minutes, a chunk a pass."""

    def __init__(self, settings, counts, chunk=RETENTION_CHUNK):
        self.settings = settings
        self.counts = counts  # "removed" is counted here
        self.chunk = chunk
        self.last = 0.0  # when the last pass ran

    def due(self, now):
        return bool(self.settings().retention) and now - self.last >= RETENTION_EVERY

    def run(self, now):
        """One pass; when a chunk was not enough, the next tick goes on."""
        if not self.due(now):
            return
        self.last, budget = now, self.chunk
        for directory, age in self.directories():
            budget -= remove_older(directory, now - age, budget)
        self.counts["removed"] += self.chunk - budget
        if budget <= 0:
            self.last = 0.0  # more to do: carry on next tick

    def directories(self):
        """(directory, age) for each spool directory with a retention age."""
        config, found = self.settings(), {}
        spool = config.spool
        for kind, age in config.retention.items():
            if kind in spool:
                found[spool[kind]] = age
            if kind == "incoming" and "report" in spool:
                found[spool["report"]] = age
        return found.items()


def remove_older(directory, cutoff, limit):
    """Remove up to limit message files last changed before cutoff; return how many went."""
    removed, refused = 0, None
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if removed >= limit:
                    break
                if not is_message_name(entry.name):
                    continue
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                    if mtime < cutoff and entry.is_file(follow_symlinks=False):
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:  # smsd or a client was quicker
                    pass
                except OSError as exc:
                    refused = exc
    except OSError as exc:
        refused = exc
    if refused is not None:
        hint = ""
        with contextlib.suppress(OSError):
            if os.stat(directory).st_mode & stat.S_ISVTX:
                hint = " (a sticky directory: only a file's owner may remove it)"
        log.warning(
            "retention: cannot remove from %s: %s%s", directory, one_line(refused), hint
        )
    return removed


###############################################################################
# Recent messages #############################################################
###############################################################################


class RecentFailures:
    """The files smsd filed in failed/ within the last hour, for /health.

    Told by the change stream, so /health never lists failed/, however big it
    is; only a RESCAN (at start, or when the watch was lost) does, once.
    """

    def __init__(self, directory, clock):
        self.directory, self.clock = directory, clock
        self.lock = threading.Lock()
        self.times = {}  # file name -> its mtime, within the last hour
        self.heap = []  # (mtime, name): the oldest leaves first, when its hour is up

    def arrived(self, name):
        try:
            mtime = os.lstat(os.path.join(self.directory, name)).st_mtime
        except FileNotFoundError:
            return
        if is_message_name(name) and within_the_hour(mtime, self.clock.time()):
            with self.lock:
                self.times[name] = mtime
                heapq.heappush(self.heap, (mtime, name))

    def gone(self, name):
        with self.lock:
            self.times.pop(name, None)

    def rescan(self):
        found, now = {}, self.clock.time()
        with os.scandir(self.directory) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                    if is_message_name(entry.name) and within_the_hour(mtime, now):
                        found[entry.name] = mtime
        with self.lock:
            self.times = found
            self.heap = [(mtime, name) for name, mtime in found.items()]
            heapq.heapify(self.heap)

    def count(self):
        """How many failed within the last hour (older ones are forgotten now:
        each once, however often it is asked)."""
        cutoff = self.clock.time() - 3600
        with self.lock:
            while self.heap and self.heap[0][0] <= cutoff:
                mtime, name = heapq.heappop(self.heap)
                if self.times.get(name) == mtime:
                    del self.times[name]
            return len(self.times)


def within_the_hour(mtime, now):
    """True for a time in the last hour before now (a file dated ahead did not fail now)."""
    return now - 3600 < mtime <= now + 60


class Filed(collections.namedtuple("Filed", "at name kind owner to parts")):
    """A message smsd filed in sent/ or failed/, as the status page lists it
    (parts None: its text is not one)."""

    __slots__ = ()


class RecentMessages:
    """The newest messages smsd filed in sent/ or failed/, and when each modem
    last sent and received, for the status page.

    Told by the watcher as files arrive, so the page lists no directory; a
    RESCAN (at start, or when the watch was lost) reads the newest files once.
    Names and numbers come from files anyone may have written: they are cut
    short, and at most MAX_MODEMS modems are kept.
    """

    MAX_MODEMS = 64

    def __init__(self, size=RECENT_FILED):
        self.size = size
        self.lock = threading.Lock()
        self.filed = {}  # name -> Filed: the newest size of them
        self.modems = {}  # modem name -> {"sent": time, "received": time}

    def add(self, message):
        """Take in a Message read from sent/ or failed/."""
        headers, kind = message.headers, message.kind
        at = smsd_time(headers.get(kind.capitalize())) or message.mtime
        parts = None if message.text is None else encode_text(message.text).parts
        owner, to = headers.get("From", "")[:64], headers.get("To", "")[:64]
        entry = Filed(at, message.message_id, kind, owner, to, parts)
        with self.lock:
            self.filed[entry.name] = entry
            if len(self.filed) > self.size:
                del self.filed[min(self.filed.values()).name]
            if kind == "sent" and headers.get("Modem"):
                self.saw(headers["Modem"], "sent", at)

    def heard(self, modem, at):
        """A modem received an SMS at this time."""
        with self.lock:
            self.saw(modem, "received", at)

    def saw(self, modem, what, at):
        """(under the lock)"""
        modem = modem[:32]
        if modem in self.modems or len(self.modems) < self.MAX_MODEMS:
            times = self.modems.setdefault(modem, {})
            times[what] = max(at, times.get(what, at))

    def listing(self):
        """The Filed messages, newest first."""
        with self.lock:
            return sorted(self.filed.values(), reverse=True)

    def modem_times(self):
        """{modem: {"sent": time, "received": time}}, each as far as known."""
        with self.lock:
            return {modem: dict(times) for modem, times in self.modems.items()}


###############################################################################
# Waiters #####################################################################
###############################################################################


class Waiters:
    """Requests that wait for smsd: woken when a name they wait for changes.

    The lock guards only the registry; a woken request looks its messages up
    itself, so no file is read while the lock is held.
    """

    RECHECK = 5.0  # seconds: a waiter looks again even if nothing woke it

    def __init__(self, clock):
        self.clock = clock
        self.changed = threading.Condition()
        self.watched = collections.Counter()  # ids that requests wait for
        self.generation = 0
        self.stopping = False

    def wake(self, names):
        """Wake the requests waiting for any of names (all of them for None)."""
        with self.changed:
            if names is None or not self.watched.keys().isdisjoint(names):
                self.generation += 1
                self.changed.notify_all()

    def stop(self):
        with self.changed:
            self.stopping = True
            self.changed.notify_all()

    def wait(self, ids, look, done, seconds):
        """Block until done(look()), for at most seconds; return the last look()."""
        deadline = self.clock.monotonic() + seconds
        with self.changed:
            self.watched.update(ids)
        try:
            while True:
                with self.changed:
                    generation = self.generation
                states = look()
                remaining = deadline - self.clock.monotonic()
                if done(states) or remaining <= 0 or self.stopping:
                    return states
                with self.changed:
                    if self.generation == generation and not self.stopping:
                        self.clock.wait(self.changed, min(remaining, self.RECHECK))
        finally:
            with self.changed:
                self.watched.subtract(ids)
                self.watched += collections.Counter()  # drops the ids at zero


###############################################################################
# Scheduled messages ##########################################################
###############################################################################


def held_headers(send_at, valid_until, held):
    """The headers a held message's file carries (smsd ignores them): when it
    goes, until when it may, and why it waits when that is quiet hours."""
    headers = [("Send_at", iso_time(send_at))]
    if valid_until is not None:
        headers.append(("Valid_until", iso_time(valid_until)))
    if held:
        headers.append(("Held", held))
    return headers


def header_time(headers, name):
    """Seconds since the epoch of an ISO 8601 header a held file carries, or None."""
    try:
        return datetime.datetime.fromisoformat(headers.get(name, "")).timestamp()
    except (ValueError, OverflowError, OSError):
        return None


def can_rename(source_dir, target_dir):
    """True when rename() moves a file from one directory into the other:
    tried with a name that smsd skips."""
    name = f"{TEMP_PREFIX}probe-{os.urandom(6).hex()}"
    probe, moved = os.path.join(source_dir, name), os.path.join(target_dir, name)
    write_file(probe, b"", False, 0o600)
    try:
        os.rename(probe, moved)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        return False
    finally:
        remove_quietly(probe)
    remove_quietly(moved)
    return True


class Schedule:
    """The messages held back, for a send_at or by quiet hours: each a file in
    the scheduled directory until its time, then moved into outgoing; or into
    failed, with its reason, when its valid_until comes first.

    The watcher runs it every tick, and wakes for the next time due. On the
    filesystem of outgoing a move is one rename: a message is in one place or
    the other, whatever stops the process. Elsewhere the file is first renamed
    to a claim (so that a second process, or a cancel, cannot take it too),
    copied into outgoing, and the claim removed; a claim left by a crash is
    finished at the next start.
    """

    def __init__(self, settings, wake, clock):
        config = settings()
        self.settings, self.clock = settings, clock
        self.spool, self.sync = config.spool, config.fsync  # restart-only
        self.directory = config.spool["scheduled"]
        self.wake = wake  # the watcher's: set when a new time may be the next
        self.lock = threading.Lock()
        self.times = {}  # message id -> (send_at, valid_until or None)
        self.heap = []  # (moment, message id): each send_at and valid_until
        os.makedirs(self.directory, 0o750, exist_ok=True)
        self.group = config.smsd.get("gid")  # smsd's: it reads and rewrites the file
        self.copy = False
        if not can_rename(self.directory, config.spool["outgoing"]):
            self.copy_from_now()
        self.writer = SpoolWriter(self.directory, config.fsync, self.group)
        self.load()

    def copy_from_now(self):
        """rename() cannot move into outgoing (another filesystem, or another mount
        of it, as systemd's ReadWritePaths= makes): copy instead."""
        self.copy = True
        log.warning(
            "%s is not on the filesystem of %s (or not on its mount): a message due is"
            " copied, fsynced, renamed into outgoing, then removed",
            self.directory,
            self.spool["outgoing"],
        )

    def load(self):
        """Take in the held files; finish the moves a crash cut short."""
        for name in sorted(os.listdir(self.directory)):
            claim = next((c for c in CLAIMS if name.startswith(c)), None)
            if claim:
                self.isolated(self.finish, claim, name[len(claim) :], self.clock.time())
            elif name.startswith("."):  # a write or cancel that a crash cut short
                with contextlib.suppress(OSError):  # a directory stays
                    os.unlink(os.path.join(self.directory, name))
            elif is_message_name(name):
                self.isolated(self.learn, name)

    def learn(self, name):
        """Take in one held file by its headers; one that is no held message is skipped."""
        found = read_spool_file(os.path.join(self.directory, name))
        headers = parse_message(found[0])[0] if found else {}
        send_at = header_time(headers, "Send_at")
        if send_at is None:
            log.warning("scheduled: skipped %s: no Send_at header", escape(name))
            return
        self.add(name, send_at, header_time(headers, "Valid_until"))

    def hold(self, files, send_at, valid_until):
        """Write {message id: bytes} durably into the scheduled directory (503/507
        if it refuses), and keep them until send_at."""
        self.writer.write(files)
        for message_id in files:
            self.add(message_id, send_at, valid_until)

    def add(self, message_id, send_at, valid_until):
        with self.lock:
            self.times[message_id] = (send_at, valid_until)
            heapq.heappush(self.heap, (send_at, message_id))
            if valid_until is not None:
                heapq.heappush(self.heap, (valid_until, message_id))
        self.wake.set()

    def forget(self, message_id):
        """A held message was cancelled (its moments stay in the heap until they come,
        or until the heap is mostly such: then it is made anew)."""
        with self.lock:
            self.times.pop(message_id, None)
            if len(self.heap) > 2 * len(self.times) + 64:
                self.heap = [
                    (moment, held)
                    for held, moments in self.times.items()
                    for moment in moments
                    if moment is not None
                ]
                heapq.heapify(self.heap)

    def count(self):
        with self.lock:
            return len(self.times)

    def upcoming(self, limit):
        """[(send_at, message id)] of the limit messages due first."""
        with self.lock:
            return heapq.nsmallest(limit, ((t[0], i) for i, t in self.times.items()))

    def next_time(self):
        """When the next message is due to move (infinity: none is held)."""
        with self.lock:
            return self.heap[0][0] if self.heap else math.inf

    def run(self, now):
        """Move every message whose time came: into outgoing, or failed when expired."""
        while True:
            with self.lock:
                if not self.heap or self.heap[0][0] > now:
                    return
                message_id = heapq.heappop(self.heap)[1]
                times = self.times.get(message_id)
                if times is None or min(t for t in times if t is not None) > now:
                    continue  # moved or cancelled already; or expires later
                del self.times[message_id]
            valid_until = times[1]
            expired = valid_until is not None and valid_until <= now
            action = self.expire if expired else self.release
            if not self.isolated(action, message_id, now):  # tried again later
                self.add(message_id, now + SCHEDULE_RETRY, valid_until)

    def isolated(self, action, *args):
        """One move; an error is logged with its message, and the others go on."""
        try:
            action(*args)
        except Exception:  # one file must not stop the others
            log.exception(
                "scheduled: %s failed for %s", action.__name__, escape(args[0])
            )
            return False
        return True

    def release(self, message_id, now):
        """Move a due message into outgoing, for smsd."""
        source = os.path.join(self.directory, message_id)
        if self.copy:
            self.claim_and_finish(".release-", message_id, now)
            return
        try:
            os.rename(source, os.path.join(self.spool["outgoing"], message_id))
        except FileNotFoundError:
            return  # cancelled, or moved by another process
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            self.copy_from_now()  # the mounts changed since the start
            self.claim_and_finish(".release-", message_id, now)
            return
        if self.sync:
            fsync_directory(self.spool["outgoing"])

    def expire(self, message_id, now):
        """File a message whose valid_until passed before it was sent in failed, with why."""
        self.claim_and_finish(".expire-", message_id, now)

    def claim_and_finish(self, claim, message_id, now):
        """Rename a held file to its claim (it is ours, or gone), then finish the move."""
        claimed = os.path.join(self.directory, claim + message_id)
        try:
            os.rename(os.path.join(self.directory, message_id), claimed)
        except FileNotFoundError:
            if not os.path.lexists(claimed):  # else a try that failed: again
                return
        self.finish(claim, message_id, now)

    def finish(self, claim, message_id, now):
        """Write a claimed file where it goes (once: not if it is there already),
        then remove the claim."""
        path = os.path.join(self.directory, claim + message_id)
        kind = CLAIMS[claim]
        if not MESSAGE_ID.fullmatch(message_id):
            remove_quietly(path)
            return
        if kind == "outgoing" and find_message(self.settings(), message_id) is None:
            found = read_spool_file(path)
            if found:
                SpoolWriter(self.spool["outgoing"], self.sync).write(
                    {message_id: found[0]}
                )
        elif kind == "failed":
            self.file_as_failed(path, message_id, now)
        remove_quietly(path)

    def file_as_failed(self, path, message_id, now):
        """Write the claimed file into failed, with smsd's Failed and Fail_reason headers."""
        found = read_spool_file(path)
        if found is None:
            return
        head, _, body = found[0].partition(b"\n\n")
        valid_until = parse_message(found[0])[0].get("Valid_until", "")
        failed = time.strftime("%y-%m-%d %H:%M:%S", time.localtime(now))
        reason = f"expired before it was sent (valid_until {valid_until})"
        head += f"\nFailed: {failed}\nFail_reason: {reason}".encode()
        files = {message_id: head + b"\n\n" + body}
        write_files(self.spool["failed"], files, self.sync, 0o660)


###############################################################################
# Budgets #####################################################################
###############################################################################


class Budgets:
    """What each user with max_per_hour or max_per_day sent lately, in SMS
    parts times recipients, over a sliding hour and a sliding day.

    A send takes its units before it writes (429 when they would pass a
    limit), and gives them back if the write fails: a refused request uses
    nothing. What was taken is appended to a journal in state_dir, so the
    budget outlives a restart; the journal is rewritten when mostly stale.
    A take costs the same however much was sent: each window keeps its sum.
    """

    WINDOWS = (("max_per_hour", 3600), ("max_per_day", 86400))

    def __init__(self, state_dir, fsync, clock):
        self.journal = Journal(os.path.join(state_dir, BUDGETS_JOURNAL), fsync)
        self.lock = threading.Lock()
        self.spent = {}  # user name -> {seconds: Window}
        self.load(clock.time())

    def take(self, user, units, now):
        """Take units from user's budget, or 429 with Retry-After; a token for give_back."""
        if all(getattr(user, key) is None for key, _ in self.WINDOWS):
            return None
        with self.lock:
            windows = self.windows(user.name, now)
            for key, seconds in self.WINDOWS:
                limit, window = getattr(user, key), windows[seconds]
                if limit is not None and window.total + units > limit:
                    oldest = window.entries[0][0] if window.entries else now
                    raise ApiError(
                        HTTPStatus.TOO_MANY_REQUESTS,
                        f"Budget used up: {units} more SMS would pass {limit} per"
                        f" {'hour' if seconds == 3600 else 'day'}",
                        [
                            (
                                "Retry-After",
                                str(max(1, math.ceil(oldest + seconds - now))),
                            )
                        ],
                    )
            entry = [now, units]
            for window in windows.values():
                window.add(entry)
        return user.name, entry

    def give_back(self, token):
        """The write failed: the units were not used."""
        if token is not None:
            with self.lock, contextlib.suppress(ValueError, KeyError):
                for window in self.spent[token[0]].values():
                    window.remove(token[1])

    def note(self, token):
        """The write succeeded: put what it took in the journal."""
        if token is None:
            return
        name, (now, units) = token
        with self.lock:
            live = sum(len(w[86400].entries) for w in self.spent.values())
            try:
                self.journal.append([[name, now, units]], live, self.live_lines)
            except OSError as exc:
                log.error("cannot save %s: %s", self.journal.path, one_line(exc))

    def refund(self, name, when, units):
        """A message that took units at when is cancelled before it went: they
        are name's again (and the journal says so)."""
        with self.lock:
            windows = self.spent.get(name, {})
            if self.give(windows, when, units):
                with contextlib.suppress(OSError):
                    live = sum(len(w[86400].entries) for w in self.spent.values())
                    line = ["refund", name, when, units]
                    self.journal.append([line], live, self.live_lines)

    @staticmethod
    def give(windows, when, units):
        """Take units off the entry made at when, in each window it is in; False if none is."""
        day = windows.get(86400)
        entry = day and next((e for e in day.entries if abs(e[0] - when) < 1e-3), None)
        if entry is None:
            return False
        units = min(units, entry[1])
        for window in windows.values():
            if any(e is entry for e in window.entries):
                window.total -= units
                if entry[1] == units:
                    window.entries.remove(entry)
        entry[1] -= units
        return True

    def live_lines(self):
        return [[n, *e] for n, w in self.spent.items() for e in w[86400].entries]

    def used(self, user, now):
        """{max_per_hour: (used, limit), ...} of the limits user has."""
        with self.lock:
            windows = self.windows(user.name, now)
            return {
                key: (windows[seconds].total, getattr(user, key))
                for key, seconds in self.WINDOWS
                if getattr(user, key) is not None
            }

    def windows(self, name, now):
        """name's windows, slid to now (under the lock)."""
        windows = self.spent.get(name)
        if windows is None:
            windows = self.spent[name] = {s: Window(s) for _, s in self.WINDOWS}
        for window in windows.values():
            window.slide(now)
        return windows

    def load(self, now):
        """Read the journal: what each user took in the day before now."""
        cutoff, found, refunds = now - 86400, {}, []

        def replayed(line):
            refund = line[0] == "refund"  # a cancel: ["refund", name, when, units]
            name, when, units = line[1:] if refund else line
            if not (isinstance(name, str) and is_time(when) and is_count(units)):
                raise ValueError("not a line of the budgets journal")
            if when > cutoff and refund:
                refunds.append((name, when, units))
            elif when > cutoff:
                found.setdefault(name, []).append([when, units])

        self.journal.replay(replayed)
        for name, entries in found.items():  # appends may interleave a little
            windows = self.windows(name, now)
            for entry in sorted(entries):
                for window in windows.values():
                    window.add(entry)
        for name, when, units in refunds:
            self.give(self.spent.get(name, {}), when, units)


class Window:
    """What one user sent within a sliding window: entries [when, units], oldest
    first, and their sum."""

    __slots__ = ("entries", "seconds", "total")

    def __init__(self, seconds):
        self.seconds, self.entries, self.total = seconds, collections.deque(), 0

    def add(self, entry):
        self.entries.append(entry)
        self.total += entry[1]

    def remove(self, entry):
        """Take an entry out again; ValueError if it is not in the window."""
        self.entries.remove(entry)
        self.total -= entry[1]

    def slide(self, now):
        """Forget what is older than the window before now."""
        while self.entries and self.entries[0][0] <= now - self.seconds:
            self.total -= self.entries.popleft()[1]


def is_count(value):
    """True for a JSON whole number of at least 1 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


###############################################################################
# Reading messages ############################################################
###############################################################################


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
    fields = {**message.headers, "message_id": message_id, "text": message.text}
    return Answer(HTTPStatus.OK, fields)


def get_status(request, *, reports):
    """Where a message is in smsd's lifecycle, found by name, never by a scan."""
    data = message_status(request, reports, request.args["message_id"])
    return Answer(HTTPStatus.OK, data, data["status"] + "\n")


def message_status(request, reports, message_id):
    """The status answer of one message; 404 if missing or not visible."""
    message = find_message(request.config, message_id)
    if message is None or not visible(request, message):
        raise not_found()
    return status_data(message, reports.outcome(message_id))


def list_messages(request, *, inbox):
    """Ids in one spool the caller may see, newest first, a page at a time."""
    kind = request.args["kind"]
    if kind == "incoming":
        return list_inbox(request, inbox)
    page = read_page(request)
    if request.user.admin:
        total, shown = list_page(request.config, kind, page)
    else:  # the tag narrows it down; the page's files confirm the owner
        total, shown = list_page(request.config, kind, page, request.user.name)
        shown = [n for n in shown if visible_name(request, kind, n)]
    return listing(shown, total, page)


def visible_name(request, kind, name):
    message = read_message(request.config, kind, name)
    return message is not None and visible(request, message)


###############################################################################
# Sending #####################################################################
###############################################################################


class SendPlan(
    collections.namedtuple(
        "SendPlan",
        "recipients numbers text encoding options report timing suffixes"
        " substituted truncated",
        defaults=(None, None, False),
    )
):
    """A validated send request: everything needed to write its files.

    recipients maps each mobile as given to its normalised number; numbers
    are those, each once; options are the smsd headers [(header, value)];
    report is whether it asks for one; timing, when it may go; suffixes, if
    any, {number: what ends its text} (a page's reply code); substituted, how
    many look-alikes replaced characters (None: it did not ask); truncated,
    whether the text was cut to fit.
    """

    __slots__ = ()

    @property
    def fingerprint(self):
        """What an Idempotency-Key is bound to: everything that shapes the files
        (and the times as given: "+2hour" is the same request a minute later)."""
        canonical = [self.recipients, self.text, self.options]
        if any(self.timing.given):
            canonical.append(self.timing.given)
        return sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()

    def encoding_for(self, number):
        """How the text to number goes on the air."""
        if not self.suffixes:
            return self.encoding
        return encode_text(self.text + self.suffixes[number])


class Timing(collections.namedtuple("Timing", "send_at valid_until held given")):
    """When a send may go: send_at (None: now), valid_until (None: any time),
    held ("quiet_hours", or None), and the send_at and valid_until as given."""

    __slots__ = ()

    def answer(self):
        """What the answer to a send says of it: nothing, unless it is held."""
        if self.send_at is None:
            return {}
        held = {"held": self.held} if self.held else {}
        return {"status": "scheduled", "send_at": iso_time(self.send_at), **held}


#: The fields of a send, as JSON Schema: plan_send refuses any other, and the
#: OpenAPI document shows these (with the queue names of the config).
SEND_FIELDS = {
    "mobiles": {
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "string",
            "pattern": anchored(RECIPIENT),
            "example": "+79680000000",
        },
    },
    "text": {"type": "string", "minLength": 1, "example": "Hi, Jack!"},
    "queue": {"type": "string"},
    "flash": {"type": "boolean"},
    "report": {"type": "boolean"},
    "substitute": {
        "type": "boolean",
        "description": "replace typographic characters by plain look-alikes when"
        " that keeps the text in the GSM alphabet",
    },
    "max_parts": {
        "type": "integer",
        "minimum": 1,
        "description": "the most parts this text may take (at most [server] max_parts)",
    },
    "truncate": {
        "type": "boolean",
        "description": "cut a text that needs more parts to fit, ending with ..",
    },
    "priority": {"type": "string", "enum": list(PRIORITIES)},
    **{
        name: {
            "type": "string",
            "description": "an ISO 8601 time with its offset, or a delay: +N and"
            " s, min, hour, day or week",
            "example": "+2hour",
        }
        for name in ("send_at", "valid_until")
    },
    "validity": {
        "oneOf": [
            {"type": "string", "pattern": anchored(VALIDITY), "example": "2hour"},
            {"type": "integer", "minimum": 0, "maximum": 255},
        ]
    },
    **{
        name: {"type": "integer", "minimum": low, "maximum": high}
        for name, (low, high) in NUMBER_FIELDS.items()
    },
}


def plan_send(request):
    """Read and validate every field of a send request, or raise 4xx."""
    return plan_fields(request, read_fields(request))


def plan_fields(request, fields):
    """Validate every field of a send (a request's, or an alert's), or raise 4xx."""
    unknown = sorted(set(fields) - set(SEND_FIELDS))
    if unknown:
        raise ApiError(
            HTTPStatus.BAD_REQUEST,
            "Unknown field(s): " + ", ".join(map(escape, unknown)),
        )
    recipients = read_recipients(request, fields.get("mobiles"))
    text = read_text(fields.get("text"))
    substituted = None
    if fields.get("substitute") is not None and expect(fields, "substitute", bool):
        text, substituted = with_lookalikes(text)
    text, truncated = capped(request.config, fields, text)
    encoding = encode_text(text)
    user, config = request.user, request.config
    report = fields.get("report")
    if report is None:
        report = user.report if user.report is not None else config.report
        fields = dict(fields, report=report)
    options = message_options(config, fields)
    numbers = list(dict.fromkeys(recipients.values()))
    timing = read_timing(request, fields, ("Priority", "High") in options)
    return SendPlan(recipients, numbers, text, encoding, options, bool(report), timing,
                    None, substituted, truncated)  # fmt: skip


def capped(config, fields, text):
    """(text, whether it was cut): within the request's max_parts (at most
    [server] max_parts), cut to fit and ending with .. when it asks to
    truncate; 400 when it does not fit and may not be cut."""
    limit = config.max_parts
    if fields.get("max_parts") is not None:
        limit = expect(fields, "max_parts", int, 1, limit)
    parts = encode_text(text).parts
    if parts <= limit:
        return text, False
    if fields.get("truncate") is None or not expect(fields, "truncate", bool):
        raise ApiError(
            HTTPStatus.BAD_REQUEST, f"Text needs {parts} parts; the limit is {limit}"
        )
    return fitted(text, limit), True


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
    try:
        mobiles = expand_groups(request.config.groups, mobiles)
    except ValueError as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, str(exc)) from None
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
        if priority not in PRIORITIES:
            raise ApiError(HTTPStatus.BAD_REQUEST, "priority must be high or normal")
        if priority == "high":
            options.append(("Priority", "High"))
    if fields.get("validity") is not None:
        options.append(("Validity", read_validity(fields["validity"])))
    for name, (low, high) in NUMBER_FIELDS.items():
        if fields.get(name) is not None:
            options.append((name.title(), str(expect(fields, name, int, low, high))))
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
    """smsd's Validity, from a string or a JSON number: 30min, 2hour, 1day or 0-255."""
    text = (
        str(value).strip()
        if isinstance(value, (str, int)) and not isinstance(value, bool)
        else ""
    )
    if not VALIDITY.fullmatch(text):
        raise ApiError(
            HTTPStatus.BAD_REQUEST, "validity must be like 30min, 2hour, 1day or 0-255"
        )
    return "".join(text.split())


def read_timing(request, fields, urgent):
    """The Timing of a send: its send_at and valid_until, else the end of the
    sender's quiet hours when they cover now (not for priority high)."""
    now = request.now
    given = (fields.get("send_at"), fields.get("valid_until"))
    send_at, valid_until = (
        read_moment(request, name, value, now)
        for name, value in zip(("send_at", "valid_until"), given)
    )
    if valid_until is not None and send_at is None:
        raise ApiError(
            HTTPStatus.BAD_REQUEST,
            "valid_until needs send_at: it ends how long smsapi may hold a message"
            " back (validity is how long the network keeps trying)",
        )
    if valid_until is not None and valid_until <= send_at:
        raise ApiError(HTTPStatus.BAD_REQUEST, "valid_until must come after send_at")
    held = None
    if send_at is None and not urgent:
        user = request.user
        send_at = quiet_end(user.quiet_hours, user.quiet_days, now)
        held = "quiet_hours" if send_at else None
    return Timing(send_at, valid_until, held, given)


def read_moment(request, name, value, now):
    """The moment a send_at or valid_until names, in whole seconds: a delay
    (+90s, +2hour; rounded up) or an ISO 8601 time with its offset; None if
    not given. 400 unless it is ahead, and at most max_schedule ahead."""
    if value is None:
        return None
    text = LEADING_SPACE.sub("+", value).strip() if isinstance(value, str) else ""
    delay = DELAY.fullmatch(text)
    try:
        if delay:
            moment = now + int(delay.group(1)) * DURATION_UNITS[delay.group(2)]
        else:
            text = FORM_OFFSET.sub("+", re.sub("[Zz]$", "+00:00", text))
            moment = datetime.datetime.fromisoformat(text)
            moment = math.inf if moment.tzinfo is None else moment.timestamp()
    except (ValueError, OverflowError, OSError):
        moment = math.inf
    if moment == math.inf:
        raise ApiError(
            HTTPStatus.BAD_REQUEST,
            f"{name} must be an ISO 8601 time with its offset"
            " (2026-12-01T06:00:00+02:00, ...Z) or a delay like +90s or +2hour",
        )
    limit = request.config.max_schedule
    if moment <= now:
        broken = "is before the server's time"
    elif moment > now + limit:
        broken = f"is more than max_schedule ({spoken_duration(limit)}) after the server's time"
    else:
        return float(math.ceil(moment))
    raise ApiError(HTTPStatus.BAD_REQUEST, f"{name} {broken}, {iso_time(now)}")


def spoken_duration(seconds):
    """A duration as a person says it: 35 days, 2 hours, 90 seconds."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} seconds"


def quiet_end(hours, days, now):
    """When the quiet hours (minutes of the day, (start, end)) and quiet days
    (weekday numbers) that cover the moment now end, in local time; None when
    they do not cover it. Each step goes to the end of a quiet day or window."""
    moment = start = datetime.datetime.fromtimestamp(now)
    for _ in range(32):  # six quiet days, a window each, and the rest
        minute = moment.hour * 60 + moment.minute
        if moment.weekday() in days:
            moment = datetime.datetime.combine(
                moment.date() + datetime.timedelta(days=1), datetime.time()
            )
        elif hours and within(hours, minute):
            end = moment.replace(
                hour=hours[1] // 60, minute=hours[1] % 60, second=0, microsecond=0
            )
            moment = end if end > moment else end + datetime.timedelta(days=1)
        else:
            break
    return None if moment == start else first_moment_at(moment)


def first_moment_at(wall):
    """The first moment at which the local clock reads wall or later. A time the
    clock skips (02:30 as it springs from 02:00 to 03:00) is the moment it skips
    to, not an hour after; of a time it shows twice, the first."""
    early, late = wall.replace(fold=1).timestamp(), wall.replace(fold=0).timestamp()
    if early >= late:  # there, or shown twice (fall back: fold=0 is the first)
        return late
    while late - early > 1:  # skipped: the jump lies between, find it
        middle = (early + late) // 2
        if datetime.datetime.fromtimestamp(middle) >= wall:
            late = middle
        else:
            early = middle
    return late


def within(hours, minute):
    """True when a minute of the day falls in the window (start, end), which may span midnight."""
    start, end = hours
    return start <= minute < end if start < end else minute >= start or minute < end


def fitting(plan):
    """What a send's answer says of its text's fitting: substituted when it asked
    for look-alikes, truncated when it was cut."""
    return {
        **({"substituted": plan.substituted} if plan.substituted is not None else {}),
        **({"truncated": True} if plan.truncated else {}),
    }


def describe_plan(plan):
    """What a send would do, for ?dry_run=1."""
    non_gsm = non_gsm_chars(plan.text)
    answer = {
        "dry_run": True,
        "recipients": plan.recipients,
        "encoding": plan.encoding.alphabet,
        "parts_count": plan.encoding.parts,
        "units": plan.encoding.units,
        "non_gsm_characters": non_gsm,
        "headers": dict(plan.options),
        "sent_text": plan.text,
        "substituted": plan.substituted or 0,
        "truncated": plan.truncated,
        **plan.timing.answer(),
    }
    answer.pop("status", None)
    if plan.encoding.alphabet == "UCS2" and not non_gsm:
        answer["ucs2_reason"] = (
            "a two-septet character would straddle a part boundary, or the text has ¤"
        )
    return answer


def read_wait(request, plan):
    """(seconds, "sent" or "delivered") from ?wait=N&wait_for=..., or None."""
    seconds = query_int(request, "wait", 0, 0, request.config.max_wait)
    target = request.param("wait_for", WAIT_TARGETS[0])
    if target not in WAIT_TARGETS:
        raise ApiError(HTTPStatus.BAD_REQUEST, "wait_for must be sent or delivered")
    if target == "delivered" and not plan.report:
        raise ApiError(
            HTTPStatus.BAD_REQUEST, 'wait_for=delivered needs "report": true'
        )
    return (seconds, target) if seconds else None


class Idempotency:
    """Remembers, per user and Idempotency-Key, the first answer ([retention] state, 1day).

    A record is written, fsynced, before the message files, holding the ids
    the files will get; a retry after a crash finishes the same files instead
    of making new ones. Requests with the same key are serialised in-process.
    """

    def __init__(self, settings, clock):
        config = settings()
        self.directory = os.path.join(config.state_dir, "idempotency")
        self.sync = config.fsync
        self.settings, self.clock = settings, clock
        self.guard = threading.Lock()
        self.locks = {}  # record path -> [lock, users]
        self.expired = clock.time()  # when old records were last removed

    @property
    def ttl(self):
        """How long a record lives: [retention] state, as the config in use says."""
        return self.settings().retention["state"]

    def path(self, user, key):
        digest = sha256(f"{user}\0{key}".encode()).hexdigest()
        return os.path.join(self.directory, digest + ".json")

    BRIEF = 0.25  # seconds a request may wait for a record's lock as any request does

    @contextlib.contextmanager
    def held(self, path, blocked=contextlib.nullcontext):
        """Hold the in-process lock of one record; inside blocked() if it stays busy.

        Racing retries wait the few milliseconds a send takes; behind a request
        that waits for smsd, a request waits as a waiter does (blocked()).
        """
        with self.guard:
            entry = self.locks.setdefault(path, [threading.Lock(), 0])
            entry[1] += 1
        try:
            if not entry[0].acquire(timeout=self.BRIEF):
                with blocked():
                    entry[0].acquire()
            try:
                yield
            finally:
                entry[0].release()
        finally:
            with self.guard:
                entry[1] -= 1
                if not entry[1]:
                    del self.locks[path]

    def load(self, path, fingerprint, numbers, replace=False):
        """The live record at path, or None; one for another body is 422 (or, if
        it is to be replaced, None)."""
        record = read_json(path)
        if record is not None and not is_record(record, numbers):
            log.warning("idempotency record %s is damaged: ignored", path)
            return None
        if record is None or record["created"] < self.clock.time() - self.ttl:
            return None
        if record.get("fingerprint") != fingerprint:
            if replace:
                return None
            raise ApiError(
                HTTPStatus.UNPROCESSABLE_ENTITY,
                "Idempotency-Key was used before with a different request",
            )
        return record

    def save(self, path, record):
        """Write a record durably; 507 or 503 if the state directory refuses."""
        try:
            os.makedirs(self.directory, mode=0o750, exist_ok=True)
            write_json(path, record, self.sync)
        except OSError as exc:
            raise storage_error(exc) from exc

    def expire(self, now):
        """Delete the records that have outlived their time (their files' mtime tells)."""
        self.expired = now
        with (
            contextlib.suppress(FileNotFoundError),
            os.scandir(self.directory) as found,
        ):
            for entry in found:
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mtime < now - self.ttl:
                        os.unlink(entry.path)

    def expire_hourly(self, now):
        if now - self.expired > 3600:
            self.expire(now)


def is_record(record, numbers):
    """True for an idempotency record as Idempotency.save() writes it, for these numbers."""
    ids, status = record.get("ids"), record.get("status", 201)
    return (
        is_time(record.get("created"))
        and isinstance(record.get("fingerprint"), str)
        and isinstance(ids, dict)
        and set(ids) == set(numbers)
        and all(isinstance(i, str) and MESSAGE_ID.fullmatch(i) for i in ids.values())
        and isinstance(record.get("response", {}), dict)
        and status in (201, 502, 504)  # what deliver() answers
    )


class Sender:
    """What a valid send does: write its files (once per Idempotency-Key), count
    them, and, if asked, wait until smsd sent them (or the phones got them)."""

    def __init__(
        self,
        outgoing,
        schedule,
        budgets,
        idempotency,
        waiters,
        wait_slots,
        reports,
        metrics,
    ):
        self.outgoing = outgoing  # the spool writer
        self.schedule = schedule  # holds the messages that go later
        self.budgets = budgets
        self.idempotency = idempotency
        self.waiters = waiters  # the watcher's: woken when smsd moves a file
        self.wait_slots = wait_slots  # max_waiters of them
        self.reports = reports
        self.metrics = metrics

    @contextlib.contextmanager
    def wait_slot(self):
        """Hold one of max_waiters slots while waiting; 503 at once when none is free."""
        if not self.wait_slots.acquire(blocking=False):
            raise ApiError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "Too many requests are waiting; try again or send without wait",
                [("Retry-After", "5")],
            )
        try:
            yield
        finally:
            self.wait_slots.release()

    def send_once(self, request, plan, path, wait, fingerprint=None, since=0.0):
        """Send once per record at path (an Idempotency-Key's, or an alert group's):
        the first request does the work, repeats get its answer. fingerprint is
        what the record is bound to: a key's request (another is 422), or the
        group's last notification (another replaces it); a record made before
        since is no more."""
        store = self.idempotency
        fingerprint = fingerprint or plan.fingerprint
        # Blocked behind another request with this key, a request waits like ?wait does.
        blocked = contextlib.nullcontext if wait else self.wait_slot
        with store.held(path, blocked):
            record = store.load(path, fingerprint, plan.numbers, replace=since > 0)
            if record and record["created"] < since:
                record = None
            if record and "response" in record:
                request.replayed = True
                data = record["response"]
                return Answer(HTTPStatus(record["status"]), data, ids_text(data))
            new = record is None
            if new:
                ids = {
                    n: new_message_id(request.user.name, request.now)
                    for n in plan.numbers
                }
                record = {
                    "created": request.now,
                    "fingerprint": fingerprint,
                    "ids": ids,
                }
                store.save(path, record)  # before the files: a retry reuses these ids
            try:
                answer = self.send(request, plan, record["ids"], wait, retry=True)
            except ApiError:
                if new:  # nothing was written: neither is the record
                    remove_quietly(path)
                raise
            # If this write fails, the files are queued all the same; a retry finds them.
            with contextlib.suppress(ApiError):
                store.save(
                    path, dict(record, status=answer.status.value, response=answer.data)
                )
            return answer

    def send(self, request, plan, ids, wait, retry):
        """Queue the files; answer 201 at once, or once smsd is done with them if asked."""
        data = self.queue(request, plan, ids, retry)
        if wait:
            return self.wait_for(request, data, wait)
        return Answer(HTTPStatus.CREATED, data, ids_text(data))

    def queue(self, request, plan, ids, retry):
        """Write one file per number (on a retry, only those not queued yet); the answer's data."""
        config, timing = request.config, plan.timing
        options = plan.options
        if timing.send_at is not None:
            options = options + held_headers(*timing[:3])
        files, units = {}, 0
        for number in plan.numbers:
            if retry and find_message(config, ids[number]) is not None:
                continue  # written before a crash
            encoding = plan.encoding_for(number)
            files[ids[number]] = render_message(
                request.user.name, number, encoding, options
            )
            units += encoding.parts
        token = self.budgets.take(request.user, units, request.now) if files else None
        try:
            if timing.send_at is None:
                self.outgoing.write(files)
            else:
                self.schedule.hold(files, timing.send_at, timing.valid_until)
        except ApiError:
            self.budgets.give_back(token)
            raise
        self.budgets.note(token)
        self.metrics.count_accepted(len(files))
        request.written = list(files)
        to = ",".join(n for n in plan.numbers if ids[n] in files)
        request.log_detail = f" to={to} parts={plan.encoding.parts}" if files else ""
        if files and config.log_text:
            request.log_detail += f' text="{escape(plan.text)}"'
        return {
            "message_id": {g: ids[number] for g, number in plan.recipients.items()},
            "parts_count": max(plan.encoding_for(n).parts for n in plan.numbers),
            "sent_text": plan.text,
            "encoding": plan.encoding.alphabet,
            **fitting(plan),
            **timing.answer(),
        }

    def wait_for(self, request, data, wait):
        """Wait until every message is sent (or delivered): 201, 502 if any failed, 504 on time-out."""
        seconds, target = wait
        ids = list(dict.fromkeys(data["message_id"].values()))

        def done(states):
            if target == "delivered":
                return all(
                    kind == "failed" or outcome for kind, outcome in states.values()
                )
            return all(
                kind not in ("outgoing", "checked") for kind, _ in states.values()
            )

        def look():
            return {i: self.where_and_outcome(request.config, i) for i in ids}

        states = self.waiters.wait(ids, look, done, seconds)
        data["messages"] = {i: self.status_or_gone(request, i) for i in ids}
        bad = {
            i: s.get("reason") or s["status"]
            for i, s in data["messages"].items()
            if s["status"] in ("failed", "undelivered", "gone")
        }
        status = HTTPStatus.CREATED
        if not done(states):
            data["error"] = (
                f"Timed out after {seconds} s waiting for {target}; the messages stay queued"
            )
            status = HTTPStatus.GATEWAY_TIMEOUT
        elif bad:
            reasons = "; ".join(f"{i}: {reason}" for i, reason in bad.items())
            data["error"] = "Not all messages went through: " + reasons
            status = HTTPStatus.BAD_GATEWAY
        return Answer(status, data, ids_text(data))

    def where_and_outcome(self, config, message_id):
        """(the spool kind message_id is in, or None; its report's Outcome, or None)."""
        message = find_message(config, message_id)
        outcome = self.reports.outcome(message_id)
        return message.kind if message else None, outcome

    def status_or_gone(self, request, message_id):
        """message_status, or "gone" for a message deleted while we waited."""
        try:
            return message_status(request, self.reports, message_id)
        except ApiError:
            return {"message_id": message_id, "status": "gone"}


def ids_text(data):
    """The plain-text form of a send's answer: each message id on a line of its own."""
    ids = data.get("message_id")
    if not isinstance(ids, dict):
        return None
    return "".join(f"{i}\n" for i in dict.fromkeys(ids.values()))


def send_message(request, *, sender):
    """Validate a send completely; then dry-run it, or queue it (once per key) and maybe wait."""
    plan = plan_send(request)
    if query_bool(request, "dry_run"):
        return Answer(HTTPStatus.OK, describe_plan(plan))
    wait = read_wait(request, plan)
    if plan.timing.send_at is not None:
        wait = None  # held: the answer says until when, at once
    return send_plan(request, sender, plan, wait)


def send_plan(request, sender, plan, wait=None):
    """Queue a validated send, once per Idempotency-Key when the request has one,
    and wait for smsd if asked: the one way every send route sends."""
    key = request.header("Idempotency-Key")
    if key and not IDEMPOTENCY_KEY.fullmatch(key):
        raise ApiError(
            HTTPStatus.BAD_REQUEST,
            "Idempotency-Key must be 1-255 printable ASCII characters",
        )
    with sender.wait_slot() if wait else contextlib.nullcontext():
        if key:
            path = sender.idempotency.path(request.user.name, key)
            return sender.send_once(request, plan, path, wait)
        ids = {n: new_message_id(request.user.name, request.now) for n in plan.numbers}
        return sender.send(request, plan, ids, wait, retry=False)


def get_groups(request):
    """The groups whose every number the caller may send to."""
    groups = {
        name: list(numbers)
        for name, numbers in request.config.groups.items()
        if all(request.user.may_send_to(n) for n in numbers)
    }
    return Answer(HTTPStatus.OK, {"groups": groups})


def cancel_message(request, *, schedule, budgets):
    """Delete a message: a user's own while held or queued (what it took of a
    budget is given back); an admin's anything smsd is not sending. DELETE
    .../outgoing/<id> of a held message cancels it too."""
    config, kind = request.config, request.args["kind"]
    message_id = request.args["message_id"]
    message = read_message(config, kind, message_id)
    if message is None and kind == "outgoing":
        kind, message = "scheduled", read_message(config, "scheduled", message_id)
    if message is None or not visible(request, message):
        raise not_found()
    if kind == "checked":
        raise ApiError(
            HTTPStatus.CONFLICT, "smsd is sending this message; it cannot be cancelled"
        )
    may_delete = request.user.admin or kind == "incoming" and request.user.inbox
    if kind not in ("outgoing", "scheduled") and not may_delete:
        raise ApiError(HTTPStatus.CONFLICT, "Only a queued message can be cancelled")
    if kind == "scheduled" and take(config.spool["scheduled"], message_id):
        schedule.forget(message_id)
    elif kind in ("outgoing", "scheduled"):  # one just due may be in outgoing now
        take_from_smsd(config, message_id)
    else:
        remove_quietly(message_path(config, kind, message_id))
        return Answer(HTTPStatus.OK, {"message_id": message_id, "deleted": True})
    if OUR_ID.fullmatch(message_id) and message.text is not None:
        when = int(message_id[ID_TIME], 36) / 1e6  # the send's time, as its id says
        budgets.refund(message.owner, when, encode_text(message.text).parts)
    return Answer(HTTPStatus.OK, {"message_id": message_id, "deleted": True})


def take(directory, message_id):
    """Rename a file to a name that smsd and the scheduler skip, then unlink it.

    The rename is atomic, so either we own the file or another took it: False.
    """
    hidden = os.path.join(directory, TEMP_PREFIX + "cancel-" + message_id)
    try:
        os.rename(os.path.join(directory, message_id), hidden)
    except FileNotFoundError:
        return False
    os.unlink(hidden)
    return True


def take_from_smsd(config, message_id):
    """Cancel a queued file, or 409 when smsd took it already."""
    if not take(config.spool["outgoing"], message_id) or os.path.exists(
        os.path.join(config.spool["checked"], message_id)
    ):
        raise ApiError(
            HTTPStatus.CONFLICT,
            "smsd took this message already; it cannot be cancelled",
        )


###############################################################################
# ntfy and Gotify ##############################################################
###############################################################################

# The two protocols every notifying tool speaks, answered as their servers
# answer them, each message sent through send_plan() as any send is.


def post_ntfy(request, *, sender):
    """ntfy's publish: POST or PUT /TOPIC, the body the message; the title,
    priority and tags in headers or the query, as ntfy reads them."""
    body = request.body()
    try:
        message = body.decode("utf-8").strip() or "triggered"
    except UnicodeDecodeError:
        raise ApiError(HTTPStatus.BAD_REQUEST, "The message is not UTF-8") from None
    fields = ntfy_fields(request)
    return ntfy_publish(request, sender, request.args["topic"], message, fields)


def ntfy_fields(request):
    """The title, priority and tags of an ntfy publish, from its headers or query."""
    return {
        name: next((v for v in (ntfy_header(request, h) for h in headers) if v), None)
        or next((request.param(q) for q in queries if request.param(q)), None)
        for name, (headers, queries) in NTFY_FIELDS.items()
    }


def ntfy_header(request, name):
    """A header as ntfy reads it: UTF-8 as curl sends it (WSGI hands it on as
    Latin-1), RFC 2047's encoded words decoded, and RFC 9218's Priority left out."""
    value = request.header(name)
    with contextlib.suppress(UnicodeError):
        value = value.encode("latin-1").decode("utf-8")
    if name == "Priority" and HTTP_PRIORITY.fullmatch(value.strip()):
        return ""
    try:
        return ENCODED_WORD.sub(decoded_word, value)
    except (binascii.Error, LookupError, UnicodeError):  # malformed: as sent
        return value


def decoded_word(match):
    """The text of an RFC 2047 encoded word: =?charset?B|Q?text?=."""
    charset, coding, text = match.groups()
    if coding in "Bb":
        return base64.b64decode(text, validate=True).decode(charset)
    return binascii.a2b_qp(text, header=True).decode(charset)


def post_ntfy_json(request, *, sender):
    """ntfy's JSON publishing (Apprise's ntfy://): POST / with {topic, message,
    title, priority, tags}."""
    data = json_fields(request.body())
    topic, message = data.get("topic"), data.get("message", "triggered")
    if not isinstance(topic, str) or not isinstance(message, str):
        raise ApiError(HTTPStatus.BAD_REQUEST, "topic and message must be strings")
    fields = ntfy_fields(request)  # Apprise sends X-Priority and X-Tags as headers
    fields.update((k, data[k]) for k in NTFY_FIELDS if data.get(k) is not None)
    return ntfy_publish(request, sender, topic, message.strip() or "triggered", fields)


def ntfy_publish(request, sender, name, message, fields):
    """Send an ntfy message to its topic's numbers; ntfy's answer."""
    topic = request.config.topics.get(name)
    if topic is None:
        raise ApiError(HTTPStatus.NOT_FOUND, f"No [topic:{escape(name)}]")
    if topic.users and request.user.name not in topic.users:
        raise ApiError(HTTPStatus.FORBIDDEN, "Not allowed to publish to this topic")
    title = fields.get("title")
    if title is not None and not isinstance(title, str):
        raise ApiError(HTTPStatus.BAD_REQUEST, "title must be a string")
    priority = ntfy_priority(fields.get("priority"))
    tags = fields.get("tags") or []
    if isinstance(tags, str):
        tags = [t.strip() for t in tags.split(",") if t.strip()]
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ApiError(HTTPStatus.BAD_REQUEST, "tags must be strings")
    answer = send_notification(request, sender, topic.to, title, message, priority >= 4)
    data = {
        "id": next(iter(answer.data["message_id"].values())),
        "time": int(request.now),
        "event": "message",
        "topic": name,
        "message": message,
        **({"title": title} if title else {}),
        **({"priority": priority} if fields.get("priority") is not None else {}),
        **({"tags": tags} if tags else {}),
    }
    return Answer(HTTPStatus.OK, data)


def ntfy_priority(value):
    """1-5 from ntfy's priority (a number or a name; unset: 3); 400 otherwise."""
    if value is None:
        return 3
    word = str(value).strip().lower()
    if word not in NTFY_PRIORITIES:
        raise ApiError(
            HTTPStatus.BAD_REQUEST,
            "priority must be 1-5, min, low, default, high, urgent or max",
        )
    return NTFY_PRIORITIES[word]


def post_gotify(request, *, sender):
    """Gotify's POST /message (JSON or a form: message, title, priority 0-10),
    to the user's default_to."""
    fields = read_fields(request)
    message, title = fields.get("message"), fields.get("title")
    if not isinstance(message, str) or not message.strip():
        raise ApiError(HTTPStatus.BAD_REQUEST, "message must be a non-empty string")
    if title is not None and not isinstance(title, str):
        raise ApiError(HTTPStatus.BAD_REQUEST, "title must be a string")
    priority = fields.get("priority", 0)
    if isinstance(priority, str) and is_number(priority.strip()):
        priority = int(priority)
    if type(priority) is not int or not 0 <= priority <= 10:
        raise ApiError(HTTPStatus.BAD_REQUEST, "priority must be 0-10")
    to = request.user.default_to
    if not to:
        raise ApiError(
            HTTPStatus.BAD_REQUEST, f"[user:{request.user.name}] has no default_to"
        )
    text = unfenced(message)
    answer = send_notification(request, sender, to, title, text, priority >= 8)
    data = {
        "id": int(request.now * 1000) % 2**31,
        "appid": 1,
        "message": message,
        "title": title or "",
        "priority": priority,
        "date": iso_time(request.now),
        "extras": {"smsapi": {"message_id": answer.data["message_id"]}},
    }
    return Answer(HTTPStatus.OK, data)


def unfenced(message):
    """A message that is one Markdown code block (Proxmox VE sends its
    notifications so) without the fence, whose backticks would make it UCS-2."""
    lines = message.strip().split("\n")
    if len(lines) > 2 and lines[0].startswith("```") and lines[-1].strip() == "```":
        return "\n".join(lines[1:-1])
    return message


def send_notification(request, sender, to, title, message, urgent):
    """Send TITLE: MESSAGE (or the message alone) to the recipients, urgent ones
    past quiet hours: the send's answer."""
    text = f"{title}: {message}" if title else message
    parts, limit = encode_text(text).parts, request.config.max_parts
    if parts > limit:
        raise ApiError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"The SMS would take {parts} parts; the limit is {limit}",
        )
    fields = {
        "mobiles": list(to),
        "text": text,
        "priority": "high" if urgent else "normal",
    }
    return send_plan(request, sender, plan_fields(request, fields))


def dialect_error(dialect, status, message):
    """An error as ntfy's or Gotify's server answers it, so their clients log it."""
    if dialect == "ntfy":
        data = {"code": status * 100, "http": status, "error": message}
    else:
        data = {
            "error": status.phrase,
            "errorCode": status,
            "errorDescription": message,
        }
    return Answer(status, data, message + "\n")


###############################################################################
# Webhooks ####################################################################
###############################################################################


def event_id(event_type, name):
    """The webhook-id of the event of event_type about the file name: the same
    at every attempt and after every restart, so that receivers can de-duplicate."""
    digest = sha256(f"{event_type}\0{name}".encode()).digest()
    return "msg_" + base64.b32encode(digest[:20]).decode().lower()


def sign(key, webhook_id, timestamp, body):
    """webhook-signature: v1, then the base64 HMAC-SHA256 of "id.timestamp.body"."""
    import hmac  # with OpenSSL: loaded by the first delivery, not at start

    signed = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, "sha256")
    return "v1," + base64.b64encode(signed.digest()).decode()


def post_event(webhook, webhook_id, body, now, attempt):
    """POST one signed event at now, within webhook.timeout in all (attempt cuts
    it off): (HTTP status or None, Retry-After in seconds or None, what happened)."""
    timestamp = str(int(now))
    headers = {
        "Content-Type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": timestamp,
        "webhook-signature": sign(
            webhook_key(webhook.secret), webhook_id, timestamp, body
        ),
    }
    try:
        answer = http_exchange(
            "POST", webhook.url, body, headers, webhook.timeout, attempt, 65536
        )
    except HttpFailure as exc:
        return None, None, str(exc)
    delay = retry_after(answer.retry_after, now)
    return answer.status, delay, f"HTTP {answer.status} {answer.reason}"


class HttpAnswer(
    collections.namedtuple("HttpAnswer", "status reason retry_after body")
):
    """What a server answered: status, reason, its Retry-After header (or None),
    and the first bytes of the body (as many as the caller would read)."""

    __slots__ = ()


class HttpFailure(Exception):
    """No whole answer: the connection failed, or the time was up."""


def http_exchange(method, url, body, headers, timeout, attempt, limit):
    """One HTTP request to url, answered within timeout seconds in all (attempt
    cuts a slow answer off): an HttpAnswer with up to limit bytes of the body,
    or HttpFailure. user:password@ in the URL is sent as Basic auth (unless
    headers have an Authorization of their own)."""
    import http.client  # only a process that calls out loads it

    parts = urllib.parse.urlsplit(url)
    headers = {"User-Agent": "smsapi/" + __version__, **headers}
    if parts.username is not None and "Authorization" not in headers:
        credentials = ":".join(
            urllib.parse.unquote(part or "")
            for part in (parts.username, parts.password)
        )
        token = base64.b64encode(credentials.encode()).decode()
        headers["Authorization"] = "Basic " + token
    if parts.scheme == "https":
        import ssl

        connection = http.client.HTTPSConnection(
            parts.hostname,
            parts.port,
            timeout=timeout,
            context=ssl.create_default_context(),
        )
    else:
        connection = http.client.HTTPConnection(
            parts.hostname, parts.port, timeout=timeout
        )
    target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    attempt.begin(connection, timeout)
    try:
        connection.request(method, target, body, headers)
        response = connection.getresponse()
        data = response.read(limit)
        return HttpAnswer(
            response.status, response.reason, response.getheader("Retry-After"), data
        )
    except (OSError, http.client.HTTPException) as exc:
        if attempt.cut_off:
            raise HttpFailure(f"no whole answer within {timeout:.0f} s") from None
        raise HttpFailure(one_line(exc) or type(exc).__name__) from None
    finally:
        attempt.end()
        connection.close()


class Attempt:
    """The POST in flight of one webhook: cut off at its deadline however slowly
    the receiver answers (a socket's timeout counts a read, not the answer),
    or at once when the webhook stops."""

    def __init__(self):
        self.lock = threading.Lock()
        self.connection = self.timer = None
        self.cut_off = False

    def begin(self, connection, seconds):
        with self.lock:
            self.connection, self.cut_off = connection, False
            self.timer = threading.Timer(seconds, self.cut)
            self.timer.daemon = True
            self.timer.start()

    def end(self):
        with self.lock:
            if self.timer is not None:
                self.timer.cancel()
            self.connection = self.timer = None

    def cut(self):
        """Shut the connection down: a read waiting on it returns at once."""
        with self.lock:
            sock = getattr(self.connection, "sock", None)
            if sock is not None:
                self.cut_off = True
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def shown_url(url):
    """A webhook's URL for a log line: scheme, host and port; what may hold a
    credential or a token (user, password, path, query) stays out."""
    parts = urllib.parse.urlsplit(url)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def retry_after(value, now):
    """Seconds a Retry-After header asks to wait from now (seconds or an HTTP date), or None."""
    value = (value or "").strip()
    if is_number(value):
        return float(value)
    import email.utils

    try:
        return email.utils.parsedate_to_datetime(value).timestamp() - now
    except (TypeError, ValueError, OverflowError):
        return None


def jittered(seconds):
    """seconds lengthened by a random 0-10%."""
    return seconds * (1 + int.from_bytes(os.urandom(2), "big") / 65535 / 10)


class StoredEvent(collections.namedtuple("StoredEvent", "seq id message attempts due")):
    """An event in a webhook's queue: its order (nanoseconds when emitted), its
    webhook-id, the file it is about (its events go out in order), the attempts
    that failed, and when the next is due."""

    __slots__ = ()

    @property
    def file_name(self):
        return f"{self.seq:020d}-{self.id}"


class EventQueue:
    """One webhook's events: each a file in its directory until the receiver
    took it (2xx) or it was dropped, sent by a thread of its own, one at a time.

    Of each message's events only the oldest is due; the others wait behind
    it, so they arrive in order. Another message's event does not wait: one
    event that a receiver keeps refusing holds up nothing else. An event is
    dropped once the retry schedule's time since it was emitted is spent,
    however long its attempts took; past max_events the oldest are dropped. A
    410 Gone stops the sending until a reload or restart, and what is emitted
    meanwhile is not stored.
    """

    def __init__(self, webhook, directory, fsync, clock):
        self.webhook = webhook
        self.directory = directory
        self.fsync = fsync
        self.clock = clock
        self.lock = threading.Condition()
        self.messages = {}  # message -> deque of its StoredEvents, oldest first
        self.stored = (
            collections.OrderedDict()
        )  # webhook-id -> StoredEvent, oldest first
        self.heads = []  # heap of (due, seq, message): each message's oldest event
        self.outcomes = collections.Counter()  # of WEBHOOK_OUTCOMES
        self.in_flight = None  # the event being tried now
        self.attempt = Attempt()
        self.overflowed = -math.inf  # when max_events last dropped an event
        self.disabled = self.stopping = False
        self.thread = None
        os.makedirs(directory, 0o750, exist_ok=True)
        self.load()

    def configure(self, webhook):
        """A reload: take the webhook's new settings, and send again after a 410."""
        with self.lock:
            self.webhook, self.disabled = webhook, False
            self.lock.notify()

    def start(self):
        name = "smsapi-webhook-" + self.webhook.name
        self.thread = threading.Thread(target=self.run, name=name, daemon=True)
        self.thread.start()

    def stop(self):
        """Stop now: the delivery in flight is cut off (its event stays stored)."""
        with self.lock:
            self.stopping = True
            self.lock.notify()
        self.attempt.cut()

    def state(self):
        """(events stored, when the oldest was emitted or None, outcomes so far,
        disabled, when max_events last dropped one)."""
        with self.lock:
            oldest = next(iter(self.stored.values()), None)
            emitted = oldest.seq / 1e9 if oldest else None
            outcomes = dict(self.outcomes)
            return len(self.stored), emitted, outcomes, self.disabled, self.overflowed

    # -- storing ----------------------------------------------------------------

    def load(self):
        """Queue the events stored by an earlier run; a damaged one is logged and removed."""
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            event = self.read_event(name)
            if event is not None:
                self.enqueue(event)
                continue
            if not name.startswith("."):  # else a write that a crash cut short
                log.warning(
                    "webhook %s: removed damaged event file %s",
                    self.webhook.name,
                    escape(name),
                )
            with contextlib.suppress(OSError):  # a directory stays, and is skipped
                os.unlink(path)

    def read_event(self, name):
        """The StoredEvent of one file (its meta line), or None."""
        match = EVENT_FILE.fullmatch(name)
        found = match and read_spool_file(
            os.path.join(self.directory, name), MAX_EVENT_FILE
        )
        if not found:
            return None
        try:
            message, attempts, due = json.loads(found[0].partition(b"\n")[0])
        except (ValueError, TypeError, RecursionError):
            return None
        if not (
            isinstance(message, str) and isinstance(attempts, int) and is_time(due)
        ):
            return None
        return StoredEvent(int(match.group(1)), match.group(2), message, attempts, due)

    def store(self, events):
        """Write [(StoredEvent, body)] durably, then queue them (not those queued
        already); the oldest past max_events are dropped. While a 410 stops the
        webhook, nothing is stored."""
        with self.lock:
            if self.disabled:
                self.outcomes["gone"] += len(events)
                return
            events = [(e, b) for e, b in events if e.id not in self.stored]
        self.write(events)
        with self.lock:
            for event, _ in events:
                self.enqueue(event)
            dropped = self.trim()
            self.lock.notify()
        for event in dropped:
            remove_quietly(os.path.join(self.directory, event.file_name))
        if dropped:
            log.warning(
                "webhook %s: %d events dropped, the oldest, past max_events = %d",
                self.webhook.name,
                len(dropped),
                self.webhook.max_events,
            )

    def write(self, events):
        """Write [(StoredEvent, body)]'s files anew: each a meta line, then the body as sent."""
        files = {
            event.file_name: json.dumps(
                [event.message, event.attempts, event.due]
            ).encode()
            + b"\n"
            + body
            for event, body in events
        }
        write_files(self.directory, files, self.fsync)

    def enqueue(self, event):
        """Put an event behind its message's others (under the lock)."""
        queue = self.messages.setdefault(event.message, collections.deque())
        queue.append(event)
        self.stored[event.id] = event
        if len(queue) == 1:
            heapq.heappush(self.heads, (event.due, event.seq, event.message))

    def trim(self):
        """Drop the oldest events past max_events, never the one in flight (under
        the lock); the events dropped."""
        dropped = []
        excess = len(self.stored) - self.webhook.max_events
        if excess <= 0:
            return dropped
        for event in list(self.stored.values())[: excess + 1]:
            if len(dropped) < excess and event is not self.in_flight:
                self.forget(event)
                dropped.append(event)
        if dropped:
            self.outcomes["overflowed"] += len(dropped)
            self.overflowed = self.clock.time()
        return dropped

    def forget(self, event):
        """Take the oldest event of its message out of the queue (under the lock)."""
        queue = self.messages[event.message]
        del self.stored[queue.popleft().id]
        if queue:
            head = queue[0]
            heapq.heappush(self.heads, (head.due, head.seq, head.message))
        else:
            del self.messages[event.message]

    # -- sending ----------------------------------------------------------------

    def run(self):
        while True:
            event = self.next_due()
            if event is None:
                return
            try:
                self.deliver(event)
            except Exception:  # a bug must not stop the deliveries
                log.exception("webhook %s: event %s", self.webhook.name, event.id)
                self.settle(event, "dropped")

    def next_due(self):
        """Wait for the next event that is due, and hold it in flight; None when stopping."""
        with self.lock:
            self.in_flight = None
            while not self.stopping:
                wait = None
                if self.heads and not self.disabled:
                    due, seq, message = self.heads[0]
                    wait = due - self.clock.time()
                    if wait <= 0:
                        heapq.heappop(self.heads)
                        queue = self.messages.get(message)
                        if queue and queue[0].seq == seq:  # else gone meanwhile
                            self.in_flight = queue[0]
                            return queue[0]
                        continue
                self.clock.wait(self.lock, wait)
        return None

    def deliver(self, event):
        """Send one event and act on the answer."""
        webhook, now = self.webhook, self.clock.time()
        if now - event.seq / 1e9 > sum(webhook.retry_schedule) + webhook.timeout:
            self.drop(event, now, "its schedule's time spent before it could be tried")
            return
        found = read_spool_file(
            os.path.join(self.directory, event.file_name), MAX_EVENT_FILE
        )
        if found is None:
            log.error(
                "webhook %s: event %s is no longer stored", webhook.name, event.id
            )
            self.settle(event, "dropped")
            return
        body = found[0].partition(b"\n")[2]
        status, delay, what = post_event(webhook, event.id, body, now, self.attempt)
        if self.stopping and status is None:
            return  # cut off by the stop: the event stays stored as it was
        if status is not None and 200 <= status < 300:
            self.settle(event, "delivered")
        elif status == HTTPStatus.GONE:
            log.warning(
                "webhook %s: %s answered 410 Gone: no more events until a reload or restart",
                webhook.name,
                shown_url(webhook.url),
            )
            with self.lock:
                self.disabled = True
                self.outcomes["gone"] += 1
                heapq.heappush(self.heads, (event.due, event.seq, event.message))
        else:
            self.retry(event, delay, what)

    def retry(self, event, delay, what):
        """After a failed attempt: try again after the next delay (the last try at
        the end of the schedule's time), or drop the event once that is spent."""
        webhook, now = self.webhook, self.clock.time()
        schedule, emitted = webhook.retry_schedule, event.seq / 1e9
        if now - emitted >= sum(schedule):
            self.drop(event, now, f"the last: {escape(what)}", 1)
            return
        delay = min(delay or 0, MAX_RETRY_AFTER)
        wait = max(jittered(schedule[min(event.attempts, len(schedule) - 1)]), delay)
        due = min(now + wait, emitted + sum(schedule))
        log.warning(
            "webhook %s: event %s attempt %d failed (%s); next in %.0fs",
            webhook.name,
            event.id,
            event.attempts + 1,
            escape(what),
            due - now,
        )
        event = event._replace(attempts=event.attempts + 1, due=due)
        try:
            self.write([(event, self.read_body(event))])
        except OSError as exc:  # the attempts are then counted from the stored ones
            log.error(
                "webhook %s: cannot update %s: %s",
                webhook.name,
                event.id,
                one_line(exc),
            )
        with self.lock:
            self.messages[event.message][0] = self.stored[event.id] = event
            heapq.heappush(self.heads, (event.due, event.seq, event.message))
            self.outcomes["failed"] += 1

    def drop(self, event, now, why, tried=0):
        log.error(
            "webhook %s: event %s dropped after %d attempts in %.0f s, %s",
            self.webhook.name,
            event.id,
            event.attempts + tried,
            now - event.seq / 1e9,
            why,
        )
        self.settle(event, "dropped")

    def read_body(self, event):
        found = read_spool_file(
            os.path.join(self.directory, event.file_name), MAX_EVENT_FILE
        )
        if found is None:
            raise FileNotFoundError(errno.ENOENT, "event file gone", event.file_name)
        return found[0].partition(b"\n")[2]

    def settle(self, event, outcome):
        """The event is done with (delivered or dropped): forget it, free its message's next."""
        remove_quietly(os.path.join(self.directory, event.file_name))
        with self.lock:
            self.outcomes[outcome] += 1
            if event.id in self.stored:
                self.forget(event)


class Webhooks:
    """The events of what smsd does, for the configured webhooks.

    The watcher offers each change; an event that some webhook wants is put in
    those webhooks' queues at the end of the tick (fsynced), and only then is
    its id written to the journal of emitted events, before the report index
    moves on. So a kill -9 at any moment loses no event, and at worst one is
    emitted again, with the same webhook-id. The journal's clock says how far
    the spool was seen: at a start, the files that came since (less
    CLOCK_MARGIN) make their events, except those emitted already.
    """

    def __init__(self, settings, clock):
        config = settings()
        self.clock = clock
        self.fsync = config.fsync
        self.journal = Journal(
            os.path.join(config.state_dir, EVENTS_JOURNAL), self.fsync
        )
        self.directory = os.path.join(config.state_dir, WEBHOOKS)
        self.queues = {}  # webhook name -> EventQueue
        self.emitted = {}  # event id -> when, for the last EMITTED_KEPT seconds
        self.unsaved = []  # journal lines of this tick
        self.outbox = []  # (EventQueue, StoredEvent, body) of this tick
        self.seq = 0
        self.started = False
        self.seen = None  # when the journal last saw the spool
        if config.webhooks:
            self.journal.replay(self.replayed)
        #: Files that came after this are new to a RESCAN; with no journal, none is.
        #: (A clock stepped back since the journal's last clock starts from now.)
        now = clock.time()
        self.horizon = min(self.seen, now) - CLOCK_MARGIN if self.seen else now
        self.reconfigure(config)

    def reconfigure(self, config):
        """Make, keep or stop each webhook's queue as config says (at start and on reload)."""
        queues = {}
        for name, webhook in config.webhooks.items():
            queue = self.queues.get(name)
            if queue is None:
                queue = EventQueue(
                    webhook, os.path.join(self.directory, name), self.fsync, self.clock
                )
                if self.started:
                    queue.start()
            else:
                queue.configure(webhook)
            queues[name] = queue
        for name, queue in self.queues.items():
            if name not in queues:
                queue.stop()
        self.queues = queues

    def start(self):
        self.started = True
        for queue in self.queues.values():
            queue.start()

    def stop(self):
        """Stop every webhook's thread (an attempt in flight is cut off)."""
        for queue in self.queues.values():
            queue.stop()
        for queue in self.queues.values():
            if queue.thread is not None:
                queue.thread.join(STOP_GRACE)

    def states(self):
        """{webhook name: (events stored, oldest emitted at, outcomes, disabled)}."""
        return {name: queue.state() for name, queue in self.queues.items()}

    # -- what the watcher offers ------------------------------------------------

    def wanted(self, event_type):
        """True when some webhook takes events of this type (from someone)."""
        return any(event_type in q.webhook.events for q in self.queues.values())

    def offer(self, event_type, name, sender, data, at):
        """Emit the event of event_type about file name, unless it was already."""
        webhook_id = event_id(event_type, name)
        wanting = [
            q for q in self.queues.values() if q.webhook.wants(event_type, sender)
        ]
        if webhook_id in self.emitted or not wanting:
            return
        body = {"type": event_type, "timestamp": iso_time(at), "data": data}
        body = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        now = self.clock.time()
        self.seq = max(self.seq + 1, int(now * 1e9))
        event = StoredEvent(self.seq, webhook_id, name, 0, now)
        self.outbox += [(queue, event, body) for queue in wanting]
        self.emitted[webhook_id] = now
        self.unsaved.append(["emitted", webhook_id, now])

    def arrivals(self, directory):
        """The names in directory that came since the horizon: at a start, those
        smsd filed while smsapi was down (ctime: smsd renames files into place)."""
        if not self.queues:
            return []
        found = []
        with os.scandir(directory) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    status = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(status.st_mode) and status.st_ctime >= self.horizon:
                        found.append((status.st_ctime, entry.name))
        return [name for _, name in sorted(found) if is_message_name(name)]

    # -- the journal ------------------------------------------------------------

    def save(self, now):
        """Store this tick's events in their queues; then note them, and the clock."""
        outbox, self.outbox = self.outbox, []
        by_queue = {}
        for queue, event, body in outbox:
            by_queue.setdefault(queue, []).append((event, body))
        try:
            for queue, events in by_queue.items():
                queue.store(events)
        except OSError as exc:
            self.outbox = outbox + self.outbox  # tried again next tick
            log.error("cannot store webhook events: %s", one_line(exc))
            return
        if not self.queues or (
            not self.unsaved and self.seen is not None and 0 <= now - self.seen < 60
        ):
            return
        self.write_journal(now)

    def write_journal(self, now):
        lines, self.unsaved = self.unsaved + [["clock", now]], []
        cutoff = now - EMITTED_KEPT
        self.emitted = {i: t for i, t in self.emitted.items() if t >= cutoff}
        live = [["emitted", i, t] for i, t in self.emitted.items()]
        try:
            self.journal.append(lines, len(live), lambda: live + [["clock", now]])
        except OSError as exc:
            log.error("cannot save %s: %s", self.journal.path, one_line(exc))
            return
        self.seen, self.horizon = now, now - CLOCK_MARGIN

    def replayed(self, line):
        """Take one line of the journal in at start: an event emitted, or the clock."""
        verb, value, *rest = line
        if verb == "clock" and is_time(value):
            self.seen = value
        elif verb == "emitted" and isinstance(value, str) and is_time(rest[0]):
            self.emitted[value] = rest[0]
        else:
            raise ValueError("not a line of the events journal")


###############################################################################
# Pages and replies ###########################################################
###############################################################################

# A firing notification, with [alerts] ack = yes, is a page: each number paged
# gets a reply code, and a reply with it acknowledges the page. The pager
# keeps the pages, reads the replies the watcher hands it, and has a thread of
# its own for what takes the network: the Alertmanager silence that an
# acknowledgement makes, its extension while the group fires, its end.


class Command(collections.namedtuple("Command", "action code")):
    """What a reply asks: action "ack" (or "escalate") of the page with this
    code, or of the newest page sent to the number when code is None."""

    __slots__ = ()


def read_reply(text):
    """The Command of a reply SMS (3a, 3 a, ack 3, a 3, a, ack, 3e, esc 3), any
    case, surrounding spaces, quotes and one final dot ignored; None for any
    other text. Only MAX_REPLY characters are looked at, with one pattern
    that cannot backtrack far."""
    if not isinstance(text, str) or len(text) > MAX_REPLY:
        return None
    words = " ".join(text.split()).strip(REPLY_QUOTES).strip()
    words = words.removesuffix(".").strip().strip(REPLY_QUOTES).strip()
    match = REPLY.fullmatch(words.lower())
    if match is None:
        return None
    verb = match.group("verb") or match.group("word")
    code = match.group("code") or match.group("after")
    action = "ack" if verb in ("a", "ack") else "escalate"
    if action == "escalate" and code is None:
        return None  # which page to escalate is never guessed
    return Command(action, int(code) if code else None)


def page_suffix(code):
    """What ends a page's SMS to the number whose code it is."""
    return f" Reply {code}a to ack"


def silence_matchers(group):
    """Alertmanager matchers of exactly these labels."""
    return [
        {"name": name, "value": value, "isRegex": False, "isEqual": True}
        for name, value in sorted(group.items())
    ]


def label_value(value):
    """A label value escaped as Prometheus writes it: in its text format and in matchers."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def matcher_filter(group):
    """The ?filter= values that ask Alertmanager for what these labels match
    (names it could not parse are left to the check of the answer)."""
    return [
        ("filter", f'{name}="{label_value(value)}"')
        for name, value in sorted(group.items())
        if LABEL_NAME.fullmatch(name)
    ]


def clock_time(seconds):
    """HH:MM local time, as a phone shows it."""
    return time.strftime("%H:%M", time.localtime(clamp_time(seconds)))


class AlertmanagerError(Exception):
    """No Alertmanager of alertmanager_url gave an answer we could use."""


class Alertmanagers:
    """The Alertmanagers of [alerts] alertmanager_url, asked in order: the first
    that answers wins (an HA pair shares its silences among themselves). Each
    has ALERTMANAGER_TIMEOUT for its whole answer, however slowly it sends it.
    """

    def __init__(self, settings):
        self.settings = settings
        self.attempt = Attempt()

    def call(self, method, path, body=None, query=()):
        """The JSON of the first 2xx answer to method path?query, or
        AlertmanagerError saying what each Alertmanager did; a 404 from all of
        them is LookupError."""
        alerts = self.settings().alerts
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if alerts["alertmanager_token"]:
            headers["Authorization"] = "Bearer " + alerts["alertmanager_token"]
        target = path + ("?" + urllib.parse.urlencode(query) if query else "")
        failures, missing = [], 0
        for url in alerts["alertmanager_url"]:
            try:
                answer = http_exchange(
                    method,
                    url.rstrip("/") + target,
                    data,
                    headers,
                    ALERTMANAGER_TIMEOUT,
                    self.attempt,
                    MAX_ALERTMANAGER_ANSWER,
                )
            except HttpFailure as exc:
                failures.append(f"{shown_url(url)}: {exc}")
                continue
            if 200 <= answer.status < 300:
                try:
                    return json.loads(answer.body) if answer.body.strip() else None
                except (ValueError, RecursionError):
                    failures.append(f"{shown_url(url)}: an answer that is not JSON")
                    continue
            missing += answer.status == HTTPStatus.NOT_FOUND
            said = escape(answer.body[:200].decode("utf-8", "replace").strip())
            failures.append(f"{shown_url(url)}: HTTP {answer.status} {said}")
        if failures and missing == len(failures):
            raise LookupError("; ".join(failures))
        raise AlertmanagerError("; ".join(failures) or "no alertmanager_url")

    def find_silence(self, page):
        """The id of a live silence this page made before (a kill -9 may have
        come between asking and noting the answer), or None."""
        found = self.call(
            "GET", "/api/v2/silences", query=matcher_filter(page["group"])
        )
        wanted = silence_matchers(page["group"])
        for silence in found if isinstance(found, list) else []:
            silence = dict_of(silence)
            if (
                page["id"] in str(silence.get("comment"))
                and str(silence.get("createdBy")).startswith("smsapi")
                and dict_of(silence.get("status")).get("state") in ("active", "pending")
                and isinstance(silence.get("id"), str)
                and sorted_matchers(silence.get("matchers")) == wanted
            ):
                return silence["id"]
        return None

    def set_silence(self, page, starts, ends, silence_id=None):
        """Make (or, given its id, change) the page's silence, from starts to ends
        (RFC 3339 times): its id now."""
        number = page["acknowledged_by"]
        body = {
            "matchers": silence_matchers(page["group"]),
            "startsAt": starts,
            "endsAt": ends,
            "createdBy": f"smsapi (SMS from +{number})",
            "comment": f"page {page['id']} #{page['codes'][number]} acknowledged by"
            f" the reply {page['reply']!r} from +{number}: {page['title']}",
        }
        if silence_id:
            body["id"] = silence_id
        answer = self.call("POST", "/api/v2/silences", body)
        silence_id = dict_of(answer).get("silenceID")
        if not isinstance(silence_id, str) or not silence_id:
            raise AlertmanagerError("the answer names no silenceID")
        return silence_id

    def extend(self, page, now, ends):
        """Move the end of the page's silence to ends: its id now (the same when
        Alertmanager can change it in place; a new one when it ended before it
        could be extended, or Alertmanager lost it), or None when someone
        ended it early, by hand."""
        silence = page["silence"]
        path = "/api/v2/silence/" + urllib.parse.quote(silence["id"])
        try:
            found = dict_of(self.call("GET", path))
        except LookupError:
            found = {}
        state = dict_of(found.get("status")).get("state")
        if state in ("active", "pending"):
            starts = str(found.get("startsAt"))
            return self.set_silence(page, starts, iso_time(ends), silence["id"])
        if state == "expired" and now < silence["ends"] - 1:
            return None
        return self.set_silence(page, iso_time(now), iso_time(ends))

    def firing(self, group):
        """True while an alert of these labels is active or suppressed."""
        query = [*matcher_filter(group)]
        query += [(flag, "true") for flag in ("active", "silenced", "inhibited")]
        found = self.call("GET", "/api/v2/alerts", query=query)
        return any(
            all(dict_of(alert.get("labels")).get(n) == v for n, v in group.items())
            for alert in map(dict_of, found if isinstance(found, list) else [])
        )

    def expire(self, silence_id):
        """End a silence now; one that is gone or has ended already is done."""
        path = "/api/v2/silence/" + urllib.parse.quote(silence_id)
        try:
            found = self.call("GET", path)
            if dict_of(dict_of(found).get("status")).get("state") != "expired":
                self.call("DELETE", path)
        except LookupError:
            return


def sorted_matchers(matchers):
    """An Alertmanager silence's matchers as silence_matchers() writes them."""
    if not isinstance(matchers, list):
        return None
    return sorted(
        (
            {
                "name": m.get("name"),
                "value": m.get("value"),
                "isRegex": m.get("isRegex"),
                "isEqual": m.get("isEqual", True),
            }
            for m in map(dict_of, matchers)
        ),
        key=lambda m: str(m["name"]),
    )


class Pager:
    """The pages: one per user and notification group while it is open, with a
    reply code for each number paged, the smallest that none of that number's
    open pages has; closed pages are kept a day (a late reply is told so).

    The watcher hands every received SMS to heard(): a reply from a paged
    number acknowledges (or is answered with what to send). The pager's
    thread then makes the Alertmanager silence, tells the replier and the
    others, extends the silence while the group still fires, and ends it
    once the group resolves. Everything is in a journal in state_dir, written
    before it is acted on, so a kill -9 neither loses nor repeats anything:
    what the pager sends is noted with its message id first, and written at
    a start unless the spool has it.
    """

    def __init__(self, settings, outgoing, budgets, clock):
        config = settings()
        self.settings, self.outgoing, self.clock = settings, outgoing, clock
        self.budgets = budgets  # a page's user pays for the SMS of its later steps
        self.alertmanagers = Alertmanagers(settings)
        path = os.path.join(config.state_dir, PAGES_JOURNAL)
        self.journal = Journal(path, config.fsync)
        self.lock = threading.Lock()
        self.pages = {}  # page id -> page (a dict, as the journal has it)
        self.open_pages = {}  # (owner, group key) -> page id, while it is open
        self.paged = {}  # number -> ids of its pages, oldest first
        self.step_of = {}  # message id of a step -> page id
        self.heard_names = {}  # incoming file name -> when it was received
        self.nonsense = {}  # number -> [[when, answered]] of replies that were no code
        self.outbox = {}  # message id -> [number, text], noted, not yet written
        self.events = collections.deque()  # webhook events, for the watcher to offer
        self.acknowledgements = 0  # since the start
        self.escalations = collections.Counter()  # chain -> later steps paged
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread = None
        self.journal.replay(self.replayed)
        for page in self.pages.values():
            self.index(page)

    # -- pages, from the notifications ---------------------------------------------

    def open(self, owner, key, group, title, alerts, numbers, now, chain=None):
        """The open page of owner's group key (a new one if there is none), with a
        code for each of numbers: (a copy of it, undo). The journal has it before
        any SMS goes; undo() takes back what this call added, should none go
        (None: it added nothing). A new page with a chain is at its first step
        (its SMS are the caller's to send). OSError if the journal cannot be
        written."""
        with self.lock:
            before = self.pages.get(self.open_pages.get((owner, key)))
            page = copy.deepcopy(before)
            if page is None:
                page = new_page(owner, key, group, now)
                if self.settings().alerts["alertmanager_url"]:
                    page["due"] = now + FIRING_CHECK
                if chain:
                    page.update(chain=chain, step=0, round_at=now)
                    page["next_at"] = self.step_time(page, 1)
            page.update(title=title, alerts=alerts)
            for number in numbers:
                if number not in page["codes"]:
                    page["codes"][number] = self.free_code(number)
            if page == before:
                return copy.deepcopy(page), None
            self.store(page)
        self.wake.set()  # the thread looks at it (and its chain) from now on
        return copy.deepcopy(page), functools.partial(self.undo, page["id"], before)

    def undo(self, page_id, before):
        """Put a page back as it was before open(), or drop a new one (unless a
        reply changed it meanwhile)."""
        with self.lock:
            page = self.pages.get(page_id)
            expected = before["status"] if before else "firing"
            if page is None or page["status"] != expected:
                return
            try:
                if before is None:
                    self.journal_append([["drop", page_id]])
                    self.unindex(self.pages.pop(page_id))
                else:
                    self.store(before)
            except OSError as exc:
                log.error("cannot save %s: %s", self.journal.path, one_line(exc))

    def resolve(self, owner, key, now):
        """The group resolved: close its open page (its chain stops; a silence
        made for it is ended): the numbers it paged, those of the page of the
        group closed last when none is open, or None. OSError if the journal
        cannot be written."""
        with self.lock:
            page = copy.deepcopy(self.pages.get(self.open_pages.get((owner, key))))
            if page is None:
                closed = [
                    p
                    for p in self.pages.values()
                    if (p["owner"], p["key"]) == (owner, key)
                ]
                last = max(closed, key=lambda p: p["closed_at"], default=None)
                return list(last["codes"]) if last else None
            page.update(status="resolved", closed_at=now, tell=False, due=None)
            page["next_at"] = None
            if page["silence"]["state"] in ("wanted", "made"):  # wanted: made, perhaps
                page["silence"]["state"] = "expire"
                page.update(due=now, tries=0)
            self.store(page)
        self.wake.set()
        log.info("page %s (%s) closed: resolved", page["id"], escape(page["title"]))
        return list(page["codes"])

    def acknowledged(self, owner, key):
        """The acknowledgement of owner's open page of group key, or None: while
        its silence holds (or is yet to be made), nobody is paged for it again."""
        with self.lock:
            page = self.pages.get(self.open_pages.get((owner, key)))
            if page and page["status"] == "acknowledged":
                return page["acknowledged_by"], page["acknowledged_at"]
            return None

    # -- replies, from the watcher -------------------------------------------------

    def heard(self, name, sender, text, received, call=False):
        """A received SMS, or a missed call: a reply, when it comes from a paged
        number (a missed call is the reply a, with ack_by_call = yes)."""
        number = normalise_mobile(sender or "")
        if number is None:
            return
        now = self.clock.time()
        if call:
            if not self.settings().alerts["ack_by_call"]:
                return
            text = "a"
        if number not in self.paged:  # one log line for a code from it
            if received > now - 600 and read_reply(text):
                log.info("reply %s from +%s, who was not paged: ignored",
                         escape(text), number)  # fmt: skip
            return
        with self.lock:
            pages = [
                self.pages[i]
                for i in self.paged.get(number, ())
                if self.pages[i]["paged_at"] <= received + 1
            ]
            if name in self.heard_names or not pages:
                return  # found again by a rescan, or older than every page
            self.heard_names[name] = received
            lines = [["heard", name, received]]
            command = read_reply(text)
            page = copy.deepcopy(command and chosen_page(command, number, pages))
            said = escape(str(text)[:MAX_REPLY])
            if page is None and not any(p["status"] in OPEN_STATES for p in pages):
                log.info("SMS from +%s, who has no open page: %s", number, said)
                self.save(lines)
            elif page is None:
                self.help(number, pages, lines, now)
            elif page["status"] == "firing" and command.action == "escalate":
                self.escalate(page, number, lines, now)
            elif page["status"] == "firing":
                reply = "a missed call" if call else str(text)
                self.acknowledge(page, number, reply, received, lines, now)
            else:
                log.info("reply %s from +%s to page %s, %s already", said, number,
                         page["id"], page["status"])  # fmt: skip
                self.send(lines, self.notices([(number, late_news(page, number))], now))

    def escalate(self, page, number, lines, now):
        """number asked for the next step of page now: page it, and say who."""
        code = page["codes"][number]
        messages = (
            self.advance(page, now, f"asked by +{number}") if page["chain"] else []
        )
        if messages:
            paged = ", ".join("+" + m[1] for m in messages)
            answer = f"#{code} {page['title']}: escalated; paged {paged}."
        elif page["chain"]:
            answer = f"#{code} {page['title']}: no step is left to escalate to."
        else:
            answer = f"#{code} {page['title']}: no escalation chain to escalate."
        self.adopt(page)
        self.send(
            lines + [["page", page]], messages + self.notices([(number, answer)], now)
        )

    def acknowledge(self, page, number, reply, received, lines, now):
        """number acknowledged page: note it, then let the thread make the silence
        and tell everyone (at once, when there is no Alertmanager to ask)."""
        alerts = self.settings().alerts
        page.update(
            status="acknowledged",
            acknowledged_by=number,
            acknowledged_at=min(max(received, page["paged_at"]), now),
            reply=" ".join(reply.split())[:MAX_REPLY],
            tell=True,
            due=None,
            tries=0,
            quiet=0,
            next_at=None,
        )
        if alerts["alertmanager_url"] and page["group"]:
            page["silence"] = {
                "state": "wanted",
                "id": None,
                "ends": now + alerts["ack_for"],
            }
            page["due"] = now
        self.acknowledgements += 1
        self.events.append(
            ("alert.acknowledged", page["id"], page["owner"], page_view(page), now)
        )
        log.warning(
            "page %s (%s) acknowledged by +%s: %s",
            page["id"],
            escape(page["title"]),
            number,
            escape(page["reply"]),
        )
        if page["due"] is None:
            self.tell(page, lines, now)
        else:
            self.keep(page, lines)
            self.wake.set()

    def help(self, number, pages, lines, now):
        """A paged number sent what is no reply code (or none of its codes): say
        what to send (for its pages not yet acknowledged, if any), at most once
        in HELP_EVERY, and not past HELP_MAX such replies within the hour."""
        recent = [e for e in self.nonsense.get(number, []) if e[0] > now - 3600]
        answered = any(e[1] and e[0] > now - HELP_EVERY for e in recent)
        answer = len(recent) < HELP_MAX and not answered
        self.nonsense[number] = recent + [[now, answer]]
        lines.append(["nonsense", number, now, answer])
        if not answer:
            log.info(
                "SMS from +%s is no reply code; answered lately, not again", number
            )
            self.save(lines)
            return
        firing = [p for p in pages if p["status"] == "firing"]
        live = firing or [p for p in pages if p["status"] in OPEN_STATES]
        live.sort(key=lambda p: p["paged_at"], reverse=True)
        choices = ", ".join(
            f"{p['codes'][number]}a to ack #{p['codes'][number]} {p['title']}"
            for p in live
        )
        log.info("SMS from +%s is no reply code; told what to send", number)
        self.send(lines, self.notices([(number, "Reply " + choices)], now))

    # -- telling people ------------------------------------------------------------

    def tell(self, page, lines, now):
        """Send an acknowledgement's news: to the replier, that it is taken and
        what became of the silence; to each other number paged, by whom."""
        by, silence = page["acknowledged_by"], page["silence"]
        if silence["state"] == "made":
            said = f" Silenced until {clock_time(silence['ends'])}."
        elif silence["state"] == "wanted":
            said = " Silence pending: no Alertmanager answers yet; smsapi keeps trying."
        else:
            said = ""
        at = clock_time(page["acknowledged_at"])
        texts = [(by, f"#{page['codes'][by]} {page['title']}: acknowledged.{said}")]
        texts += [
            (number, f"#{code} {page['title']}: acknowledged by +{by} at {at}.")
            for number, code in page["codes"].items()
            if number != by
        ]
        page["tell"] = False
        self.adopt(page)
        self.send(lines + [["page", page]], self.notices(texts, now))  # told, and what

    @staticmethod
    def notices(texts, now):
        """The pager's own SMS [(number, text)] as messages for send(), each cut
        to one part."""
        return [
            [
                new_message_id(PAGER_SENDER, now),
                number,
                fitted(text, 1),
                PAGER_SENDER,
                "notice",
            ]
            for number, text in texts
        ]

    def send(self, lines, messages):
        """Note lines and the messages [[id, number, text, sender]] in the
        journal, then write the messages; what cannot be written now, the
        thread writes later."""
        for message_id, *entry in messages:
            self.outbox[message_id] = entry
            lines.append(["send", message_id, *entry])
        if self.save(lines):
            self.flush()

    def flush(self):
        """Write what the outbox holds, except what the spool has already: each
        a notice, a page's SMS (with a delivery report), or a voice call."""
        config = self.settings()
        files = {
            message_id: render_message(
                sender, number, encode_text(text), OUTBOX_HEADERS[kind]
            )
            for message_id, (number, text, sender, kind) in self.outbox.items()
            if find_message(config, message_id) is None
        }
        try:
            self.outgoing.write(files)
        except ApiError:  # logged by the writer; the thread tries again
            return
        written, self.outbox = list(self.outbox), {}
        self.save([["sent", message_id] for message_id in written])

    # -- escalation ----------------------------------------------------------------

    def notified(self, page_id, ids, text, max_parts, now):
        """A notification of a page with a chain went out, its SMS with these
        ids (by number): its text (in max_parts) is what later steps send; if it
        is the first, its SMS are the first step's, to follow, and the numbers
        the step calls are rung now."""
        with self.lock:
            page = copy.deepcopy(self.pages.get(page_id))
            if page is None or page["chain"] is None:
                return
            page.update(text=text, max_parts=max_parts)
            if page["step_ids"] or page["step"] or page["round"]:
                self.keep(page, [])
                return
            page["step_ids"] = {i: n for n, i in ids.items()}
            chain = self.settings().escalations.get(page["chain"])
            messages = []
            if chain and chain.steps[0].call:
                messages = self.ring(page, chain.steps[0], now)
            self.adopt(page)
            self.send([["page", page]], messages)

    def advance(self, page, now, why):
        """Page the next step of page's chain (after the last, the next round),
        or note that every step and round was paged: the messages to send, for
        the caller to note with page (under the lock)."""
        chain = self.settings().escalations.get(page["chain"])
        if chain is None:  # gone with a reload
            page["next_at"] = None
            return []
        index = page["step"] + 1
        if index == len(chain.steps):
            if page["round"] >= chain.repeat:
                page.update(next_at=None, exhausted=True)
                log.error("page %s (%s): every step of %s was paged, and nobody"
                          " acknowledged", page["id"], escape(page["title"]), chain.name)  # fmt: skip
                return []
            page.update(round=page["round"] + 1, round_at=now)
            index = 0
        step = chain.steps[index]
        messages = (
            self.ring(page, step, now) if step.call else self.text(page, step, now)
        )
        page.update(step=index, failed_ids=[], next_at=self.step_time(page, index + 1))
        page["step_ids"] = {m[0]: m[1] for m in messages}
        if index or page["round"]:  # an escalation: not the first step
            self.escalations[chain.name] += 1
            data = {**page_view(page), "reason": why}
            self.events.append(("alert.escalated", f"{page['id']}.{page['round']}.{index}",
                                page["owner"], data, now))  # fmt: skip
        log.warning("page %s (%s): %s step %d%s paged (%s): %s", page["id"],
                    escape(page["title"]), chain.name, index + 1,
                    f", round {page['round'] + 1}" if page["round"] else "", why,
                    " ".join("+" + m[1] for m in messages) or "none")  # fmt: skip
        return messages

    def page_heartbeat(self, name, text, now):
        """A missed heartbeat, paged through its chain: the first step now (once
        while its page is open)."""
        heartbeat = self.settings().heartbeats[name]
        key = "heartbeat:" + name
        with self.lock:
            if (HEARTBEAT_SENDER, key) in self.open_pages:
                return
            page = new_page(HEARTBEAT_SENDER, key, {}, now)
            page.update(title=f"heartbeat {name}", chain=heartbeat.escalation)
            page.update(step=-1, round_at=now, text=text)
            page["max_parts"] = self.settings().alerts["max_parts"]
            messages = self.advance(page, now, "the heartbeat was missed")
            self.adopt(page)
            self.send([["page", page]], messages)

    def step_numbers(self, page, step):
        """The numbers of a step, each once, each with its code for the page."""
        config = self.settings()
        entries = expand_groups(config.groups, step.recipients)
        numbers = list(dict.fromkeys(normalise_mobile(e) for e in entries))
        for number in numbers:
            if number not in page["codes"]:
                page["codes"][number] = self.free_code(number)
        return numbers

    def ring(self, page, step, now):
        """Voice calls to a step's numbers: they cost no SMS."""
        sender = page["owner"]
        return [
            [new_message_id(sender, now), number, VOICE_CALL, sender, "call"]
            for number in self.step_numbers(page, step)
        ]

    def text(self, page, step, now):
        """The page's SMS to a step's numbers, each with its code; the budget of
        the page's user counts them, and a step it refuses is logged and
        skipped (the chain goes on)."""
        config, sender = self.settings(), page["owner"]
        texts = [
            (number, fitted(page["text"], page["max_parts"], suffix) + suffix)
            for number in self.step_numbers(page, step)
            for suffix in [page_suffix(page["codes"][number])]
        ]
        user = config.users.get(sender)
        units = sum(encode_text(text).parts for _, text in texts)
        try:
            token = self.budgets.take(user, units, now) if user else None
        except ApiError as exc:
            log.error("page %s (%s): step not sent: %s", page["id"],
                      escape(page["title"]), exc.message)  # fmt: skip
            return []
        self.budgets.note(token)
        return [
            [new_message_id(sender, now), n, text, sender, "page"] for n, text in texts
        ]

    def step_time(self, page, index):
        """When step index of page's current round is due; past the last step,
        when the round ends; None without its chain."""
        chain = self.settings().escalations.get(page["chain"])
        if chain is None:
            return None
        steps = chain.steps
        if index < len(steps):
            return page["round_at"] + steps[index].delay
        return page["round_at"] + round_length(chain)

    def failed(self, message_id):
        """A message ended failed or undelivered: when every message of its
        page's current step did, the next step is due at once."""
        page_id = self.step_of.get(message_id)
        if page_id is None:
            return
        with self.lock:
            page = copy.deepcopy(self.pages.get(page_id))
            if (
                page is None
                or page["status"] != "firing"
                or message_id not in page["step_ids"]
                or message_id in page["failed_ids"]
            ):
                return
            page["failed_ids"].append(message_id)
            if set(page["failed_ids"]) >= set(page["step_ids"]) and page["next_at"]:
                page["next_at"] = self.clock.time()
                log.warning("page %s (%s): every message of step %d failed",
                            page_id, escape(page["title"]), page["step"] + 1)  # fmt: skip
                self.wake.set()
            self.keep(page, [])

    # -- the thread: Alertmanager --------------------------------------------------

    def start(self):
        self.thread = threading.Thread(
            target=self.run, name="smsapi-pager", daemon=True
        )
        self.thread.start()

    def stop(self):
        """Stop the thread; a call to Alertmanager in flight is cut off."""
        self.stopping.set()
        self.wake.set()
        self.alertmanagers.attempt.cut()
        if self.thread is not None:
            self.thread.join(STOP_GRACE)

    def run(self):
        while not self.stopping.is_set():
            try:
                due = self.step(self.clock.time())
            except Exception:  # a bug must not stop the pages
                log.exception("pager step failed")
                due = self.clock.time() + 60
            self.clock.wait(self.wake, min(60.0, max(0.0, due - self.clock.time())))
            self.wake.clear()

    def step(self, now):
        """Do what is due (the outbox; the silences to make, extend or end; the
        pages to look at): when the next thing is due."""
        with self.lock:
            if self.outbox:
                self.flush()
            self.forget_old(now)
            for page in list(self.pages.values()):
                if page["status"] == "firing" and (page["next_at"] or math.inf) <= now:
                    page = copy.deepcopy(page)
                    failed = page["step_ids"] and set(page["failed_ids"]) >= set(
                        page["step_ids"]
                    )
                    why = (
                        "every message of the step before failed"
                        if failed
                        else "its time came"
                    )
                    messages = self.advance(page, now, why)
                    self.adopt(page)
                    self.send([["page", page]], messages)
            due = [
                copy.deepcopy(p)
                for p in self.pages.values()
                if p["due"] is not None and p["due"] <= now
            ]
        for page in due:
            if self.stopping.is_set():
                break
            outcome = self.ask(page, now)
            with self.lock:
                self.noted(page, outcome, now)
        with self.lock:
            times = [
                time
                for page in self.pages.values()
                for time in (page["due"], page["next_at"])
                if time is not None
            ]
            return min(times, default=now + 60)

    def ask(self, page, now):
        """What Alertmanager says to one due page (asked without the lock):
        {"id": the silence's, "ends": ...}, {"quiet": True} when nothing of its
        group fires, {"gone": True} when its silence was ended by someone else,
        {} when all is as it was, or {"failed": why}."""
        silence, managers = page["silence"], self.alertmanagers
        ack_for = self.settings().alerts["ack_for"]
        ends = now + ack_for
        try:
            if silence["state"] == "expire":  # its group resolved
                silence_id = silence["id"] or managers.find_silence(page)
                if silence_id:
                    managers.expire(silence_id)
                return {"id": silence_id}
            if silence["state"] == "wanted":
                silence_id = managers.find_silence(page) or managers.set_silence(
                    page, iso_time(now), iso_time(ends)
                )
                return {"id": silence_id, "ends": ends}
            if not managers.firing(page["group"]):
                return {"quiet": True}
            ending = silence.get("ends", math.inf) - now <= 2 * check_every(ack_for)
            if silence["state"] != "made" or not ending:
                return {}
            silence_id = managers.extend(page, now, ends)
            return {"id": silence_id, "ends": ends} if silence_id else {"gone": True}
        except (AlertmanagerError, LookupError) as exc:
            return {"failed": str(exc)}

    def noted(self, asked, outcome, now):
        """Take what Alertmanager said into the page (under the lock), unless the
        page has changed meanwhile: a silence made for a page resolved since
        is to end."""
        page = copy.deepcopy(self.pages.get(asked["id"]))
        state = asked["status"], asked["silence"]["state"]
        if page is None or (page["status"], page["silence"]["state"]) != state:
            if page and page["status"] == "resolved" and outcome.get("id"):
                page["silence"]["id"] = outcome["id"]
                page["due"] = now
                self.keep(page, [])
            return
        silence, ack_for = page["silence"], self.settings().alerts["ack_for"]
        if "failed" in outcome:
            tries = page["tries"] + 1
            delay = ALERTMANAGER_RETRY[min(tries, len(ALERTMANAGER_RETRY)) - 1]
            log.error("page %s: no Alertmanager took it (%s); again in %d s",
                      page["id"], outcome["failed"], delay)  # fmt: skip
            page.update(tries=tries, due=now + delay)
            if silence["state"] == "expire" and silence["ends"] <= now:
                silence["state"], page["due"] = "ended", None  # it ended by itself
        elif silence["state"] == "expire":
            silence["state"], page["due"] = "ended", None
            log.info("page %s: silence %s ended", page["id"], outcome["id"])
        elif outcome.get("quiet") and page["quiet"] >= 1:  # twice in a row
            page.update(status="resolved", closed_at=now, due=None)
            if silence["state"] == "made":
                silence["state"] = "ended"  # it ends by itself
            log.info("page %s (%s) closed: nothing of its group fires any more",
                     page["id"], escape(page["title"]))  # fmt: skip
        elif outcome.get("gone"):
            page.update(status="firing", acknowledged_by=None, acknowledged_at=None)
            page.update(silence={"state": "none", "id": None}, due=now + FIRING_CHECK)
            log.warning("page %s: its silence was ended by hand; it may be"
                        " acknowledged again", page["id"])  # fmt: skip
        else:
            page["quiet"] = page["quiet"] + 1 if outcome.get("quiet") else 0
            if "id" in outcome:
                if silence["state"] == "wanted":
                    log.info("page %s: silence %s until %s", page["id"],
                             outcome["id"], iso_time(outcome["ends"]))  # fmt: skip
                silence.update(state="made", id=outcome["id"], ends=outcome["ends"])
            every = FIRING_CHECK if page["status"] == "firing" else check_every(ack_for)
            page.update(tries=0, due=now + every)
        if page["tell"] and (silence["state"] != "wanted" or page["tries"] >= 1):
            self.tell(page, [], now)  # made, or the first try failed: pending
        else:
            self.keep(page, [])

    # -- what is kept --------------------------------------------------------------

    def keep(self, page, lines):
        """Note a page's new state, with lines, in the journal (logged if the
        disk refuses: the page changes all the same, a restart may redo it)."""
        self.save(lines + [["page", page]])
        self.adopt(page)

    def store(self, page):
        """Note a page's new state; OSError if the disk refuses (nothing changes)."""
        self.journal_append([["page", page]])
        self.adopt(page)

    def adopt(self, page):
        """Make page the one of its id (under the lock)."""
        self.pages[page["id"]] = page
        self.index(page)

    def save(self, lines):
        """Append to the journal; False (logged) if the disk refuses."""
        try:
            self.journal_append(lines)
        except OSError as exc:
            log.error("cannot save %s: %s", self.journal.path, one_line(exc))
            return False
        return True

    def journal_append(self, lines):
        if lines:
            live = len(self.pages) + len(self.heard_names) + len(self.outbox)
            self.journal.append(lines, live, self.live_lines)

    def live_lines(self):
        return [
            *(["page", page] for page in self.pages.values()),
            *(["heard", name, when] for name, when in self.heard_names.items()),
            *(["send", i, *entry] for i, entry in self.outbox.items()),
            *(
                ["nonsense", number, *entry]
                for number, entries in self.nonsense.items()
                for entry in entries
            ),
        ]

    def replayed(self, line):
        """Take one line of the journal in, at start."""
        verb, value, *rest = line
        if verb == "page":
            page = valid_page(value)
            self.pages[page["id"]] = page
        elif verb == "drop":
            self.pages.pop(value)
        elif verb == "heard" and isinstance(value, str) and is_time(rest[0]):
            self.heard_names[value] = rest[0]
        elif verb == "send" and OUR_ID.fullmatch(value) and MOBILE.fullmatch(rest[0]):
            if rest[3] not in OUTBOX_HEADERS:
                raise ValueError("not a kind of message the pager sends")
            self.outbox[value] = [rest[0], str(rest[1]), str(rest[2]), rest[3]]
        elif verb == "sent" and isinstance(value, str):
            self.outbox.pop(value, None)
        elif verb == "nonsense" and MOBILE.fullmatch(value) and is_time(rest[0]):
            self.nonsense.setdefault(value, []).append([rest[0], rest[1] is True])
        else:
            raise ValueError("not a line of the pages journal")

    def index(self, page):
        """Keep the page's place in open_pages and paged (under the lock)."""
        key = page["owner"], page["key"]
        if page["status"] in OPEN_STATES:
            self.open_pages[key] = page["id"]
        elif self.open_pages.get(key) == page["id"]:
            del self.open_pages[key]
        for number in page["codes"]:
            ids = self.paged.setdefault(number, [])
            if page["id"] not in ids:
                ids.append(page["id"])
        for message_id in page["step_ids"]:
            self.step_of[message_id] = page["id"]

    def unindex(self, page):
        """Take a page that is no more out of open_pages and paged."""
        key = page["owner"], page["key"]
        if self.open_pages.get(key) == page["id"]:
            del self.open_pages[key]
        for number in page["codes"]:
            self.paged[number].remove(page["id"])
            if not self.paged[number]:
                del self.paged[number]
        self.step_of = {m: p for m, p in self.step_of.items() if p != page["id"]}

    def free_code(self, number):
        """The smallest code none of number's open pages has."""
        taken = {
            self.pages[i]["codes"][number]
            for i in self.paged.get(number, ())
            if self.pages[i]["status"] in OPEN_STATES
        }
        return next(code for code in itertools.count(1) if code not in taken)

    def forget_old(self, now):
        """Drop the pages closed PAGE_KEPT ago, and what only they needed."""
        cutoff = now - PAGE_KEPT
        for page in list(self.pages.values()):
            if page["status"] not in OPEN_STATES and page["closed_at"] < cutoff:
                self.unindex(self.pages.pop(page["id"]))
        oldest = min((p["paged_at"] for p in self.pages.values()), default=now)
        kept = min(cutoff, oldest) - 60
        self.heard_names = {n: t for n, t in self.heard_names.items() if t >= kept}
        recent = {
            n: [e for e in es if e[0] > now - 3600] for n, es in self.nonsense.items()
        }
        self.nonsense = {n: es for n, es in recent.items() if es}

    # -- what the API shows --------------------------------------------------------

    def view(self, user, now):
        """The pages open, or closed within PAGE_KEPT, that user may see, newest first."""
        with self.lock:
            pages = sorted(
                self.pages.values(), key=lambda p: p["paged_at"], reverse=True
            )
            return [
                page_view(p)
                for p in pages
                if (user.admin or p["owner"] == user.name)
                and (p["status"] in OPEN_STATES or p["closed_at"] >= now - PAGE_KEPT)
            ]

    def state(self):
        """PagerState: the pages open, acknowledged, and paged through every step
        unanswered; the silences pending; the acknowledgements and the
        escalations (by chain) since the start."""
        with self.lock:
            live = [p for p in self.pages.values() if p["status"] in OPEN_STATES]
            return PagerState(
                len(live),
                sum(p["status"] == "acknowledged" for p in live),
                sum(p["exhausted"] and p["status"] == "firing" for p in live),
                sum(p["silence"]["state"] == "wanted" and p["tries"] > 0 for p in live),
                self.acknowledgements,
                dict(self.escalations),
            )


class PagerState(
    collections.namedtuple(
        "PagerState",
        "open acknowledged exhausted pending acknowledgements escalations",
    )
):
    """The pages as /health and /metrics show them."""

    __slots__ = ()


def new_page(owner, key, group, now):
    """A page as the journal keeps it: due is when the thread asks Alertmanager
    about it next. A page paged through an escalation chain has its step
    (0-based, of round), when its round began, when its next step is due, the
    ids of the current step's messages and those of them that failed, and the
    text its later steps send (in at most max_parts)."""
    return {
        "id": base36(int(now * 1e6)) + os.urandom(3).hex(),
        "owner": owner,
        "key": key,
        "group": group,
        "title": "",
        "alerts": 0,
        "codes": {},
        "status": "firing",
        "paged_at": now,
        "acknowledged_by": None,
        "acknowledged_at": None,
        "reply": None,
        "closed_at": None,
        "tell": False,
        "silence": {"state": "none", "id": None},
        "due": None,
        "tries": 0,
        "quiet": 0,
        "chain": None,
        "step": None,
        "round": 0,
        "round_at": None,
        "next_at": None,
        "step_ids": {},
        "failed_ids": [],
        "exhausted": False,
        "text": "",
        "max_parts": 1,
    }


def valid_page(page):
    """A page read from the journal, or ValueError if it is not one."""
    fields = dict_of(page)
    silence = dict_of(fields.get("silence"))
    if not (
        set(new_page("", "", {}, 0)) <= set(fields)
        and all(isinstance(fields[k], str) for k in ("id", "owner", "key", "title"))
        and fields["status"] in (*OPEN_STATES, "resolved")
        and is_time(fields["paged_at"])
        and all(
            MOBILE.fullmatch(n) and is_count(c)
            for n, c in dict_of(fields["codes"]).items()
        )
        and silence.get("state") in SILENCE_STATES
        and all(fields[k] is None or is_time(fields[k]) for k in ("due", "next_at"))
        and isinstance(fields["step_ids"], dict)
    ):
        raise ValueError("not a page")
    return fields


def chosen_page(command, number, pages):
    """The page a reply from number means: the open one with its code (else the
    newest closed one); with no code, the newest not yet acknowledged, else
    the newest open one, else the newest."""
    if command.code is not None:
        pages = [p for p in pages if p["codes"][number] == command.code]
    for states in (("firing",), OPEN_STATES, ("resolved",)):
        candidates = [p for p in pages if p["status"] in states]
        if candidates:
            return max(candidates, key=lambda p: p["paged_at"])
    return None


def late_news(page, number):
    """The answer to a reply to a page answered before: by whom and when."""
    code, title = page["codes"][number], page["title"]
    if page["status"] == "resolved":
        at = clock_time(page["closed_at"])
        return f"#{code} {title}: resolved at {at}; nothing to acknowledge."
    by = page["acknowledged_by"]
    who = "you" if by == number else "+" + by
    return f"#{code} {title}: acknowledged by {who} at {clock_time(page['acknowledged_at'])} already."


def round_length(chain):
    """How long a round of chain lasts: its round, else its last step's delay
    and as long again as the gap before that step (MIN_ROUND_GAP at least);
    never less than the last step's delay and a second."""
    steps = chain.steps
    gap = steps[-1].delay - steps[-2].delay if len(steps) > 1 else 0
    length = chain.round or steps[-1].delay + max(gap, MIN_ROUND_GAP)
    return max(length, steps[-1].delay + 1)


def check_every(ack_for):
    """Seconds between looks at whether an acknowledged group still fires."""
    return min(60.0, ack_for / 3)


def page_view(page):
    """A page as GET /alerts and the webhooks show it."""
    return {
        "id": page["id"],
        "code": dict(page["codes"]),
        "to": list(page["codes"]),
        "status": page["status"],
        "group": dict(page["group"]),
        "title": page["title"],
        "alerts": page["alerts"],
        "paged_at": iso_time(page["paged_at"]),
        "acknowledged_by": page["acknowledged_by"],
        "acknowledged_at": page["acknowledged_at"]
        and iso_time(page["acknowledged_at"]),
        "closed_at": page["closed_at"] and iso_time(page["closed_at"]),
        "silence_id": page["silence"]["id"],
        "escalation": page["chain"],
        "step": None if page["step"] is None else page["step"] + 1,
        "round": page["round"] + 1,
        "next_step_at": page["next_at"] and iso_time(page["next_at"]),
    }


def get_pages(request, *, pager):
    """The pages of the last day: all for an admin, a user's own for others."""
    return Answer(HTTPStatus.OK, {"pages": pager.view(request.user, request.now)})


###############################################################################
# Alerts and heartbeats #######################################################
###############################################################################


def post_alertmanager(request, *, sender, heartbeats, pager):
    """An Alertmanager (or Grafana) notification: one SMS to each of ?to=, sent
    once however often the same notification is posted (an HA pair, a retry)
    within dedupe_window; with ?heartbeat=NAME, a firing Watchdog among its
    alerts is a beat, and the other alerts are sent. With [alerts] ack = yes,
    or ?escalation=NAME, a firing notification is a page: each SMS ends with
    its number's reply code, and once the page is acknowledged nothing more
    is sent for it; a chain's first step is paged with to=, its later steps
    by the pager, and its resolved SMS goes to every number paged."""
    payload = alert_payload(request.body())
    status, alerts = read_alerts(payload)
    chain = read_chain(request)
    beat = request.param("heartbeat")
    if beat is not None and any(is_watchdog(a) for a in alerts):
        answer = beat_answer(request, heartbeats, beat)
        alerts = [a for a in alerts if not is_watchdog(a)]
        if not alerts:
            return answer
        status = notification_status({}, alerts)
    mobiles = alert_recipients(request, chain)
    key, options = str(payload.get("groupKey")), request.config.alerts
    page, undo, suffixes = None, None, {}
    if status == "firing" and (options["ack"] or chain):
        acknowledged = pager.acknowledged(request.user.name, key)
        if acknowledged:
            return acknowledged_answer(request, *acknowledged)
        numbers = list(read_recipients(request, mobiles).values()) if mobiles else []
        page, undo = open_page(request, pager, payload, alerts, numbers, chain)
        suffixes = {n: page_suffix(page["codes"][n]) for n in numbers}
    elif status == "resolved":
        try:
            paged = pager.resolve(request.user.name, key, request.now)
        except OSError as exc:
            raise storage_error(exc) from exc
        if chain and paged:
            mobiles = paged  # everyone the chain paged, and nobody it did not
    after = max(suffixes.values(), key=len, default="")
    text = alert_text(payload, status, alerts, options, after)
    if not mobiles:  # a chain whose first step only rings
        pager.notified(page["id"], {}, text, options["max_parts"], request.now)
        data = {"page": page["id"], "escalation": chain.name}
        return Answer(HTTPStatus.CREATED if undo else HTTPStatus.OK, data)
    priority = request.param("priority", "high")
    fields = {"mobiles": mobiles, "text": text, "priority": priority}
    if chain:
        fields["report"] = True  # an undelivered page moves the chain on
    plan = plan_fields(request, fields)._replace(suffixes=suffixes or None)
    answer = send_alert(request, sender, plan, key, status, alerts, undo)
    if page and chain and not request.replayed:
        ids = {plan.recipients[g]: i for g, i in answer.data["message_id"].items()}
        pager.notified(page["id"], ids, text, options["max_parts"], request.now)
    return answer._replace(status=HTTPStatus.OK) if request.replayed else answer


def read_chain(request):
    """The [escalation:NAME] of ?escalation=NAME, or None; 400 for a name there
    is none of, 403 unless the caller may page every number of the chain."""
    name = request.param("escalation")
    if name is None:
        return None
    chain = request.config.escalations.get(name)
    if chain is None:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"No [escalation:{escape(name)}]")
    read_recipients(request, [r for step in chain.steps for r in step.recipients])
    return chain


def alert_recipients(request, chain):
    """Who a notification's SMS go to: to=, and the chain's first step (unless
    that step rings); 400 when there is neither."""
    to = request.param("to")
    if not to and not chain:
        raise ApiError(HTTPStatus.BAD_REQUEST, "to= must name the numbers or @groups")
    mobiles = [LEADING_SPACE.sub("+", m) for m in to.split(",")] if to else []
    if chain and not chain.steps[0].call:
        mobiles += chain.steps[0].recipients
    return mobiles


def send_alert(request, sender, plan, key, status, alerts, undo):
    """Send a notification's SMS, once per group record (a repeat of its last
    notification within dedupe_window is answered as before); a refusal
    undoes what the page took (codes) and is logged."""
    options = request.config.alerts
    # The group's record, per user: only a repeat of its last notification is one.
    group = [request.user.name, key, sorted(plan.numbers)]
    path = sender.idempotency.path(ALERTS_OWNER, json.dumps(group))
    since = request.now - options["dedupe_window"]
    try:
        answer = sender.send_once(
            request, plan, path, None, notification_digest(status, alerts), since
        )
    except ApiError as exc:
        if undo:
            undo()
        if exc.status == HTTPStatus.TOO_MANY_REQUESTS:
            said = f' text="{escape(plan.text)}"' if request.config.log_text else ""
            log.error("alert of group %s not sent: %s%s", escape(key[:80]),
                      exc.message, said)  # fmt: skip
        raise
    if request.replayed and undo:
        undo()  # the codes this call gave went to nobody
    return answer


def open_page(request, pager, payload, alerts, numbers, chain):
    """The page of a firing notification, with a code for each number: (the
    page, undo or None when nothing changed); 507 or 503 if it cannot be kept."""
    group = group_labels(payload)
    title = page_title(group, alerts)
    key = str(payload.get("groupKey"))
    try:
        return pager.open(
            request.user.name, key, group, title, len(alerts), numbers, request.now,
            chain and chain.name,
        )  # fmt: skip
    except OSError as exc:
        raise storage_error(exc) from exc


def acknowledged_answer(request, by, at):
    """The answer to a notification of a page acknowledged already: nothing sent."""
    request.log_detail = f" acknowledged by +{by}: not sent"
    data = {"acknowledged_by": by, "acknowledged_at": iso_time(at)}
    return Answer(HTTPStatus.OK, data, f"acknowledged by +{by}\n")


def alert_payload(body):
    """A notification's JSON object, with each lone surrogate (an escape no
    Alertmanager sends, but no page may be lost for one) made U+FFFD."""
    try:
        data = scrubbed(json.loads(body.decode("utf-8")))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ApiError(HTTPStatus.BAD_REQUEST, "Body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, "Body must be a JSON object")
    return data


def scrubbed(value):
    """A JSON value with the lone surrogates of its strings replaced."""
    if isinstance(value, str):
        return SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [scrubbed(item) for item in value]
    if isinstance(value, dict):
        return {scrubbed(key): scrubbed(item) for key, item in value.items()}
    return value


def read_alerts(payload):
    """(firing or resolved, the alerts) of a notification; 400 if it is not one."""
    alerts = payload.get("alerts")
    if not isinstance(alerts, list) or not alerts:
        raise ApiError(HTTPStatus.BAD_REQUEST, "alerts must be a non-empty list")
    for alert in alerts:
        if not isinstance(alert, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, "each alert must be an object")
        for key in ("labels", "annotations"):
            value = alert.get(key, {})
            if not isinstance(value, dict) or not all(
                isinstance(v, str) for v in value.values()
            ):
                raise ApiError(
                    HTTPStatus.BAD_REQUEST,
                    f"each alert's {key} must be an object of strings",
                )
    return notification_status(payload, alerts), alerts


def notification_status(payload, alerts):
    """firing or resolved: the payload's, else firing if any alert fires."""
    status = payload.get("status")
    if status not in ("firing", "resolved"):
        firing = any(a.get("status", "firing") == "firing" for a in alerts)
        status = "firing" if firing else "resolved"
    return status


def is_watchdog(alert):
    """Alertmanager's always-firing alert, firing."""
    labels = alert.get("labels", {})
    return (
        labels.get("alertname") == "Watchdog"
        and alert.get("status", "firing") == "firing"
    )


def alert_text(payload, status, alerts, options, after=""):
    """The SMS of a notification, in at most max_parts parts with after (a reply
    code) behind it: the template ($head $alerts) with as many kept alerts as
    fit, the rest as +N more; a template too long even with none is cut to fit."""
    shown = [a for a in alerts if a.get("status", status) == status] or alerts
    lines = [alert_line(a) for a in shown]
    head = f"FIRING:{len(shown)}" if status == "firing" else "RESOLVED"
    values = template_values(payload, status.upper(), len(shown), head)
    template = string_template(options["template"] or "$head $alerts")

    def text(count):
        rest = len(lines) - count
        listed = "; ".join(lines[:count]) + (f" +{rest} more" if rest else "")
        made = template.safe_substitute(values, alerts=listed.strip())
        return with_lookalikes(made)[0] if options["substitute"] else made

    def fits(count):
        return encode_text(text(count) + after).parts <= options["max_parts"]

    if fits(len(lines)):
        return text(len(lines))  # all of them (with no " +N more" after them)
    kept, past = 0, len(lines)  # text(kept) fits, or is cut to; text(past) does not
    while past - kept > 1:  # one more alert never takes fewer parts: halve the range
        middle = (kept + past) // 2
        if fits(middle):
            kept = middle
        else:
            past = middle
    return fitted(text(kept), options["max_parts"], after)


def alert_line(alert):
    """alertname, instance when there is one, and the summary (else description)."""
    labels, annotations = alert.get("labels", {}), alert.get("annotations", {})
    words = [labels.get("alertname", "alert"), labels.get("instance", "")]
    summary = annotations.get("summary") or annotations.get("description") or ""
    line = " ".join(printable(w) for w in words if w)
    summary = " ".join(printable(summary).split())
    return line + (": " + summary if summary else "")


def printable(text):
    """Text from an alert with its control characters made spaces: a NUL or an
    escape in a label must neither reach a phone nor refuse the page."""
    return ALERT_CONTROLS.sub(" ", text)


def group_labels(payload):
    """The labels that name a notification's group (its groupLabels, else its
    commonLabels): what an acknowledgement's silence matches. Strings only,
    and none empty (a silence matcher must not match the empty string)."""
    for key in ("groupLabels", "commonLabels"):
        labels = {
            name: value
            for name, value in dict_of(payload.get(key)).items()
            if isinstance(value, str) and value
        }
        if labels:
            return labels
    return {}


def page_title(group, alerts):
    """A page's few words for the SMS about it: its group's label values, else
    its first alert's name."""
    words = group.values() or [alerts[0].get("labels", {}).get("alertname", "alert")]
    return " ".join(printable(" ".join(words)).split())[:PAGE_TITLE]


def template_values(payload, status, count, head):
    """The $names an alert template may use (the README lists them)."""
    values = {"status": status, "count": count, "head": head}
    for key in ("receiver", "externalURL", "groupKey"):
        if isinstance(payload.get(key), str):
            values[key] = printable(payload[key])
    for group in ("groupLabels", "commonLabels", "commonAnnotations"):
        for name, value in dict_of(payload.get(group)).items():
            if isinstance(value, str) and name.isidentifier():
                values[f"{group}_{name}"] = printable(value)
    return values


def notification_digest(status, alerts):
    """What makes a notification the same as the last of its group: its status,
    and each alert with its start and status."""
    same = [
        status,
        sorted(
            [
                str(a.get("fingerprint") or sorted(a.get("labels", {}).items())),
                str(a.get("startsAt")),
                str(a.get("status", status)),
            ]
            for a in alerts
        ),
    ]
    return sha256(json.dumps(same).encode()).hexdigest()


class Heartbeats:
    """Dead man's switches: each [heartbeat:NAME] expects a beat every `every`.

    When none came for that long, one SMS says so; when beats come back, one
    more; at most max_per_day of them in any 24 hours, so a flapping heartbeat
    cannot flood the on-call phones (the rest are logged and counted). The
    last beat, whether it is missed and when notices went are kept in
    state_dir; after a start each heartbeat gets one full period before it can
    fire. The watcher checks them every tick; a beat comes from a request.
    """

    def __init__(self, settings, outgoing, pager, clock):
        config = settings()
        self.settings = settings
        self.path = os.path.join(config.state_dir, HEARTBEATS)
        self.outgoing, self.pager = outgoing, pager
        self.fsync = config.fsync
        self.started = clock.time()
        self.lock = threading.Lock()
        self.counts = collections.Counter()  # (name, "sent" or "suppressed") -> notices
        saved = read_json(self.path) or {}
        self.state = {}  # name -> {"last", "missed", "notices": [times], "retry"}
        for name, state in saved.items():
            state = dict_of(state)
            last = state.get("last") if is_time(state.get("last")) else None
            notices = (
                state.get("notices") if isinstance(state.get("notices"), list) else []
            )
            self.state[name] = {
                "last": last,
                "missed": state.get("missed") is True,
                "notices": [t for t in notices if is_time(t)],
            }

    def beat(self, name, now):
        """A beat of heartbeat name; the "back" SMS if it was missed."""
        with self.lock:
            state = self.of(name)
            state["last"] = now
            if state["missed"] and self.notify(
                name, f"heartbeat {name} back", now, True
            ):
                state["missed"] = False
                log.warning("heartbeat %s is back", name)
            self.save(sync=False)

    def check(self, now):
        """Tell the heartbeats' recipients of those whose beats stopped."""
        with self.lock:
            for name, heartbeat in self.settings().heartbeats.items():
                state = self.of(name)
                due = max(state["last"] or 0, self.started) + heartbeat.every
                if state["missed"] or now < max(due, state.get("retry", 0)):
                    continue
                last = iso_time(state["last"]) if state["last"] else "never"
                text = string_template(
                    heartbeat.text or "heartbeat $name missed, last beat at $last_beat"
                ).safe_substitute(name=name, last_beat=last)
                if self.notify(name, text, now):
                    state["missed"] = True
                    log.error("heartbeat %s missed: no beat since %s", name, last)
                    self.save(sync=self.fsync)
                else:
                    state["retry"] = now + 60

    def of(self, name):
        return self.state.setdefault(
            name, {"last": None, "missed": False, "notices": []}
        )

    def notify(self, name, text, now, back=False):
        """Send a notice, unless max_per_day were sent within the day (then log and
        count it); False only if it cannot be written, to be tried again."""
        state, limit = self.state[name], self.settings().heartbeats[name].max_per_day
        state["notices"] = [t for t in state["notices"] if now - 86400 < t <= now]
        if len(state["notices"]) >= limit:
            self.counts[name, "suppressed"] += 1
            log.warning(
                "heartbeat %s: %r not sent: max_per_day (%d) notices within the day",
                name,
                text,
                limit,
            )
            return True
        if not self.tell(name, text, now, back):
            return False
        state["notices"].append(now)
        self.counts[name, "sent"] += 1
        return True

    def tell(self, name, text, now, back):
        """Queue text to the heartbeat's recipients at once (with a chain: page
        it; when it is back, tell everyone paged); False if it cannot be written."""
        config = self.settings()
        heartbeat = config.heartbeats[name]
        if heartbeat.escalation and not back:
            self.pager.page_heartbeat(name, text, now)
            return True
        entries = expand_groups(config.groups, heartbeat.to or ())
        if heartbeat.escalation:
            key = (HEARTBEAT_SENDER, "heartbeat:" + name)
            entries += self.pager.resolve(*key, now) or []
        numbers = dict.fromkeys(n.removeprefix("+") for n in entries)
        encoding = encode_text(text)
        files = {
            new_message_id(HEARTBEAT_SENDER, now): render_message(
                HEARTBEAT_SENDER, number, encoding, [("Priority", "High")]
            )
            for number in numbers
        }
        try:
            self.outgoing.write(files)
        except ApiError:  # logged by the writer; tried again in a minute
            return False
        return True

    def save(self, sync):
        try:
            saved = {
                n: {"last": s["last"], "missed": s["missed"], "notices": s["notices"]}
                for n, s in self.state.items()
            }
            write_json(self.path, saved, sync)
        except OSError as exc:
            log.error("cannot save %s: %s", self.path, one_line(exc))

    def states(self, now):
        """[HeartbeatState] of each configured heartbeat, as of now."""
        with self.lock:
            return [
                HeartbeatState(
                    name,
                    state.get("last"),
                    bool(state.get("missed")),
                    self.counts[name, "sent"],
                    self.counts[name, "suppressed"],
                    sum(now - 86400 < t <= now for t in state.get("notices", ()))
                    >= heartbeat.max_per_day,
                )
                for name, heartbeat in self.settings().heartbeats.items()
                for state in [self.state.get(name, {})]
            ]


class HeartbeatState(
    collections.namedtuple("HeartbeatState", "name last missed sent suppressed capped")
):
    """A heartbeat as /health shows it: its last beat (or None), whether it is
    missed, the notices sent and kept back since the start, and whether
    max_per_day holds notices back now."""

    __slots__ = ()


def beat_answer(request, heartbeats, name):
    """Record a beat of heartbeat name, for a caller who may send to its recipients."""
    heartbeat = request.config.heartbeats.get(name)
    if heartbeat is None:
        raise ApiError(HTTPStatus.NOT_FOUND, f"No [heartbeat:{escape(name)}]")
    read_recipients(request, heartbeat_recipients(request.config, heartbeat))
    heartbeats.beat(name, request.now)
    return Answer(
        HTTPStatus.OK, {"heartbeat": name, "beat": iso_time(request.now)}, "ok\n"
    )


def heartbeat_recipients(config, heartbeat):
    """Everyone a heartbeat may tell or page: its to, and its chain's steps."""
    chain = config.escalations.get(heartbeat.escalation)
    steps = chain.steps if chain else ()
    return [*(heartbeat.to or ()), *(r for step in steps for r in step.recipients)]


def post_heartbeat(request, *, heartbeats):
    """A beat of one heartbeat (the body, if any, is not read)."""
    return beat_answer(request, heartbeats, request.args["name"])


def get_heartbeats(request, *, heartbeats):
    """Each heartbeat whose recipients the caller may all send to (admins: every
    one), with its last beat and state."""
    config, user = request.config, request.user
    listed = [
        {
            "name": state.name,
            "every": config.heartbeats[state.name].every,
            "to": list(config.heartbeats[state.name].to or ()),
            "last_beat": iso_time(state.last) if state.last else None,
            "state": "missed" if state.missed else "ok",
        }
        for state in heartbeats.states(request.now)
        if user.admin
        or all(
            user.may_send_to(n.removeprefix("+"))
            for n in expand_groups(
                config.groups,
                heartbeat_recipients(config, config.heartbeats[state.name]),
            )
        )
    ]
    return Answer(HTTPStatus.OK, {"heartbeats": listed})


###############################################################################
# Health and metrics ##########################################################
###############################################################################


class Health:
    """The checks of GET /health, made at most once every `every` seconds.

    /health, /monitoring and /metrics need no login: whatever their callers
    do, the spool is scanned once a second at the most, by one of them, and
    the others take that result.
    """

    def __init__(self, parts, every=1.0):
        self.settings, self.clock = parts.settings, parts.clock
        self.failures, self.schedule = parts.failures, parts.schedule
        self.webhooks, self.heartbeats = parts.webhooks, parts.heartbeats
        self.budgets, self.pager = parts.budgets, parts.pager
        self.every = every
        self.lock = threading.Lock()
        self.made, self.checks = -math.inf, None

    def current(self):
        """{name: {"status": pass|warn|fail, "output", ...}}, at most `every` seconds old."""
        with self.lock:
            if self.clock.monotonic() - self.made >= self.every:
                self.checks = self.make(self.settings(), self.clock.time())
                self.made = self.clock.monotonic()
            return self.checks

    def make(self, config, now):
        """Every check, made now."""
        checks = health_checks(config, self.failures.count(), now)
        checks["queue"]["scheduled"] = self.schedule.count()
        checks.update(webhook_checks(self.webhooks.states(), now))
        checks.update(budget_checks(config, self.budgets, now))
        checks.update(heartbeat_checks(self.heartbeats.states(now)))
        if config.alerts["ack"] or config.escalations:
            checks["pages"] = pages_check(self.pager.state(), config.escalations)
        return checks


def health_checks(config, failed_last_hour, now):
    """The checks of GET /health that look at the spool, smsd and the modems."""
    checks = {
        "spool": spool_check(config),
        "smsd": smsd_check(config),
        "queue": queue_check(config, now),
        "failed": failed_check(config, failed_last_hour),
    }
    checks.update(modem_checks(config))
    return checks


def heartbeat_checks(states):
    """One check per heartbeat: warn while its beats are missed, or while it flaps
    past max_per_day."""
    checks = {}
    for state in states:
        last = iso_time(state.last) if state.last else None
        output = (
            f"missed: no beat since {last or 'smsapi started'}"
            if state.missed
            else f"last beat at {last or 'none yet'}"
        )
        if state.capped:
            output += "; flapping: max_per_day notices sent within the day, no more"
        checks["heartbeat:" + state.name] = {
            "status": "warn" if state.missed or state.capped else "pass",
            "output": output,
            "heartbeat": state.name,
            "last_beat_seconds": state.last or 0,
            "notices": {"sent": state.sent, "suppressed": state.suppressed},
        }
    return checks


def pages_check(state, chains):
    """The pages: warn while an acknowledgement's silence is pending (no
    Alertmanager answers), and while a page has gone through every step and
    round of its chain and nobody acknowledged it."""
    output = f"{state.open} pages open, {state.acknowledged} of them acknowledged"
    if state.exhausted:
        output += f"; {state.exhausted} paged through every step, unacknowledged"
    if state.pending:
        output += f"; {state.pending} silences pending: no Alertmanager answers"
    return {
        "status": "warn" if state.pending or state.exhausted else "pass",
        "output": output,
        "open": state.open,
        "acknowledged": state.acknowledged,
        "unanswered": state.exhausted,
        "silences_pending": state.pending,
        "acknowledgements": state.acknowledgements,
        "escalations": {name: state.escalations.get(name, 0) for name in chains},
    }


def budget_checks(config, budgets, now):
    """One check of the users' budgets: warn while one is used up. It names no
    user: /health needs no login."""
    used = [budgets.used(user, now) for user in config.users.values()]
    used = [u for u in used if u]
    if not used:
        return {}
    full = sum(any(spent >= limit for spent, limit in u.values()) for u in used)
    check = {
        "status": "warn" if full else "pass",
        "output": f"{full} of {len(used)} budgets used up",
        "used_up": full,
    }
    return {"budgets": check}


def webhook_checks(states, now):
    """One check per webhook: warn when it is disabled (410), an event waited too
    long, or max_events dropped one within the hour."""
    checks = {}
    for name, (queued, oldest, outcomes, disabled, overflowed) in states.items():
        age = max(0.0, now - oldest) if oldest else 0.0
        full = now - overflowed < 3600
        status = "warn" if disabled or full or age >= WEBHOOK_STALE else "pass"
        output = f"{queued} events waiting, the oldest for {age:.0f}s"
        if full:
            output = "max_events dropped the oldest events within the hour; " + output
        if disabled:
            output = "disabled by a 410 Gone until a reload or restart; " + output
        checks["webhook:" + name] = {
            "status": status,
            "output": output,
            "webhook": name,
            "disabled": disabled,
            "queued": queued,
            "oldest_seconds": round(age, 3),
            "deliveries": outcomes,
        }
    return checks


def worst(statuses):
    return max(statuses, key=GRADES.index, default="pass")


def graded(value, warn, fail):
    return "fail" if value >= fail else "warn" if value >= warn else "pass"


def spool_check(config):
    problems = check_spool(config)
    if problems:
        return {"status": "fail", "output": "; ".join(problems)}
    return {"status": "pass", "output": "spool and state directories usable"}


def smsd_check(config):
    """Is smsd running? Its pid file (from smsd.conf) must name a live smsd."""
    pid = smsd_pid(config)
    if pid is None:
        return {"status": "warn", "output": "no smsd.conf read: cannot tell"}
    if not pid:
        return {
            "status": "fail",
            "output": f"smsd is not running (no pid in {config.smsd['pidfile']})",
        }
    return {"status": "pass", "output": f"smsd runs as pid {pid}", "pid": pid}


def smsd_pid(config):
    """smsd's pid if it runs, 0 if it does not, None without smsd.conf."""
    if "pidfile" not in config.smsd:
        return None
    try:
        with open(config.smsd["pidfile"], "rb") as file:
            pid = int(file.read(32).strip() or 0)
    except (OSError, ValueError):
        return 0
    return pid if pid > 1 and is_smsd(pid) else 0


def is_smsd(pid):
    """True if pid is a live smsd (or a live process we may not look at)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    try:
        with open(f"/proc/{pid}/comm", "rb") as file:
            return file.read().startswith(b"smsd")  # else the pid was reused
    except OSError:  # hidden from us (ProtectProc=invisible): trust kill()
        return True


def queue_state(config, now):
    """(files waiting in outgoing and checked, age in seconds of the oldest), in one pass.

    Names are taken as they come, so memory does not grow with the queue; our
    own ids carry their creation time, so only other tools' files cost a stat.
    """
    count, oldest, ours = 0, now, "~"  # ours: the earliest time among our ids
    for kind in ("outgoing", "checked"):
        with os.scandir(config.spool[kind]) as entries:
            for entry in entries:
                if OUR_ID.fullmatch(entry.name):
                    count, ours = count + 1, min(ours, entry.name[ID_TIME])
                elif is_message_name(entry.name):
                    try:
                        mtime = entry.stat(follow_symlinks=False).st_mtime
                    except FileNotFoundError:  # smsd moved it on meanwhile
                        continue
                    count, oldest = count + 1, min(oldest, mtime)
    if ours != "~":  # "~" sorts after every base-36 digit
        oldest = min(oldest, clamp_time(int(ours, 36) / 1e6))
    return count, max(0.0, now - oldest)


def queue_check(config, now):
    try:
        depth, age = queue_state(config, now)
    except OSError as exc:
        log.warning("health: cannot count the queue: %s", one_line(exc))
        output = "cannot count the queue in outgoing and checked; see the log"
        return {"status": "fail", "output": output}
    limits = config.health
    status = worst(
        [
            graded(depth, limits["queue_warn"], limits["queue_fail"]),
            graded(age, limits["queue_age_warn"], limits["queue_age_fail"]),
        ]
    )
    return {
        "status": status,
        "output": f"{depth} messages queued, the oldest for {age:.0f} s",
        "queued": depth,
        "oldest_seconds": round(age),
    }


def failed_check(config, failed):
    limits = config.health
    return {
        "status": graded(failed, limits["failed_warn"], limits["failed_fail"]),
        "output": f"{failed} messages failed in the last hour",
        "last_hour": failed,
    }


def modem_checks(config):
    """One check per modem in smsd's status file (in its stats directory), if any."""
    if "conf" in config.smsd and not config.smsd.get("stats"):
        output = (
            "smsd.conf sets no stats = DIR: the modems' state and signal are unknown"
        )
        return {"modems": {"status": "warn", "output": output}}
    if not config.smsd.get("stats"):
        return {}
    path = os.path.join(config.smsd["stats"], "status")
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            lines = file.read(65536).splitlines()
    except FileNotFoundError:
        output = (
            f"smsd has not written its status file yet (stats = {config.smsd['stats']})"
        )
        return {"modems": {"status": "warn", "output": output}}
    except OSError as exc:
        log.warning("cannot read smsd's status file: %s", one_line(exc))
        output = f"cannot read smsd's status file (stats = {config.smsd['stats']}); see the log"
        return {"modems": {"status": "warn", "output": output}}
    checks = {}
    for line in lines:
        name, colon, rest = line.partition(":")
        fields = [f.strip() for f in rest.split(",", 5)]
        if colon and len(fields) > 1 and name not in ("Status", "Start"):
            checks["modem:" + name] = {**modem_check(fields), "modem": name}
    return checks


def modem_check(fields):
    """A modem line of smsd's status file: time, state, three counters, signal."""
    state = fields[1]
    match = SIGNAL.search(fields[5]) if len(fields) > 5 else None
    dbm, quality = (int(match.group(1)), match.group(2)) if match else (None, None)
    status = "pass"
    if state not in MODEM_STATES:
        status = "fail" if state == "Trouble" else "warn"
    elif match is None or quality == "Marginal":
        status = "warn"
    signal = f"{dbm} dBm ({quality or 'unknown'})" if match else "signal unknown"
    check = {
        "status": status,
        "output": f"{state} since {fields[0]}, {signal}",
        "state": state,
        "since": fields[0],
        "signal_dbm": dbm,
        "signal": signal,
    }
    counted = [int(f) for f in fields[2:5] if f.isdigit()]
    if len(counted) == 3:  # smsd's counters: sent, failed, received
        check["counters"] = dict(zip(("sent", "failed", "received"), counted))
    return check


class Histogram:
    """Request durations of one route: how many fell in each bucket (the last
    one past every bound), and their sum."""

    BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
    __slots__ = ("counts", "total")

    def __init__(self, counts=None, total=0.0):
        self.counts = list(counts or [0] * (len(self.BOUNDS) + 1))
        self.total = total

    def observe(self, seconds):
        self.counts[bisect.bisect_left(self.BOUNDS, seconds)] += 1
        self.total += seconds

    def copy(self):
        return Histogram(self.counts, self.total)

    def cumulative(self):
        """[(le, observations at most le)], ending with +Inf: all of them."""
        bounds = (*self.BOUNDS, "+Inf")
        return list(zip(bounds, itertools.accumulate(self.counts)))


class Metrics:
    """What this process counts for GET /metrics."""

    def __init__(self, started):
        self.lock = threading.Lock()
        self.started = started
        self.requests = collections.Counter()  # (route, method, code) -> count
        self.durations = {}  # route -> Histogram
        self.accepted = 0  # message files written

    def count_accepted(self, files):
        with self.lock:
            self.accepted += files

    def observe(self, route, method, code, seconds):
        with self.lock:
            self.requests[route, method, code] += 1
            self.durations.setdefault(route, Histogram()).observe(seconds)

    def render(self, counts, checks):
        """The Prometheus text exposition: these counters, the watcher's counts of
        what became of the messages, then the spool, smsd and modems (checks)."""
        with self.lock:
            requests = sorted(self.requests.items())
            durations = {r: h.copy() for r, h in sorted(self.durations.items())}
            accepted = self.accepted
        out = Exposition()
        out.one(
            "smsapi_build_info",
            "gauge",
            "Version of smsapi and Python.",
            1,
            {"version": __version__, "python": sys.version.split()[0]},
        )
        out.one(
            "smsapi_start_time_seconds",
            "gauge",
            "When this process started.",
            self.started,
        )
        out.family("smsapi_requests_total", "counter", "HTTP requests answered.")
        for (route, method, code), count in requests:
            out.sample("", {"route": route, "method": method, "code": code}, count)
        out.family(
            "smsapi_request_duration_seconds", "histogram", "Time to answer a request."
        )
        for route, histogram in durations.items():
            cumulative = histogram.cumulative()
            for bound, count in cumulative:
                out.sample("_bucket", {"route": route, "le": bound}, count)
            out.sample("_sum", {"route": route}, histogram.total)
            out.sample("_count", {"route": route}, cumulative[-1][1])
        out.family(
            "smsapi_messages_total",
            "counter",
            "Message files written by smsapi (accepted), and what became of them.",
        )
        out.sample("", {"state": "accepted"}, accepted)
        for state in ("sent", "failed", "delivered", "undelivered"):
            out.sample("", {"state": state}, counts[state])
        out.family(
            "smsapi_parts_total",
            "counter",
            "SMS parts smsd sent (filed in sent/), by encoding.",
        )
        for alphabet in ("GSM", "UCS2"):
            out.sample("", {"encoding": alphabet.lower()}, counts["parts", alphabet])
        out.one(
            "smsapi_retention_removed_total",
            "counter",
            "Old spool files removed.",
            counts["removed"],
        )
        spool_gauges(out, checks)
        return out.text()


def spool_gauges(out, checks):
    """The queue, smsd and the modems as /health last saw them."""
    queue = checks["queue"]
    out.one(
        "smsapi_scheduled_messages",
        "gauge",
        "Messages held for a send_at or quiet hours.",
        queue["scheduled"],
    )
    if "queued" in queue:  # else the spool is unreadable
        out.one(
            "smsapi_queue_messages",
            "gauge",
            "Files in outgoing and checked.",
            queue["queued"],
        )
        out.one(
            "smsapi_queue_oldest_seconds",
            "gauge",
            "Age of the oldest queued file.",
            queue["oldest_seconds"],
        )
    if checks["smsd"]["status"] != "warn":  # warn: no smsd.conf, so nothing known
        out.one(
            "smsapi_smsd_up",
            "gauge",
            "1 if smsd's pid file names a live smsd.",
            int(checks["smsd"]["status"] == "pass"),
        )
    signals = [
        (check["modem"], check["signal_dbm"])
        for check in checks.values()
        if check.get("signal_dbm") is not None
    ]
    if signals:
        out.family(
            "smsapi_modem_signal_dbm", "gauge", "Signal, from smsd's status file."
        )
        for modem, dbm in signals:
            out.sample("", {"modem": modem}, dbm)
    webhook_samples(out, [c for c in checks.values() if "webhook" in c])
    heartbeat_samples(out, [c for c in checks.values() if "heartbeat" in c])
    if "pages" in checks:
        page_samples(out, checks["pages"])


def heartbeat_samples(out, beats):
    """Each heartbeat's last beat, and its notices sent and kept back."""
    if beats:
        out.family(
            "smsapi_heartbeat_last_seconds",
            "gauge",
            "When each heartbeat last beat (Unix time; 0: never).",
        )
        for check in beats:
            out.sample(
                "", {"heartbeat": check["heartbeat"]}, check["last_beat_seconds"]
            )
        out.family(
            "smsapi_heartbeat_notices_total",
            "counter",
            "Missed and back notices: sent, or kept back by max_per_day.",
        )
        for check in beats:
            for outcome, count in check["notices"].items():
                labels = {"heartbeat": check["heartbeat"], "outcome": outcome}
                out.sample("", labels, count)


def page_samples(out, check):
    """The pages open, and the acknowledgements."""
    out.one("smsapi_pages_open", "gauge", "Pages open (firing or acknowledged).",
            check["open"])  # fmt: skip
    out.one(
        "smsapi_acknowledgements_total",
        "counter",
        "Pages acknowledged by a reply since the start.",
        check["acknowledgements"],
    )
    if check["escalations"]:
        out.family(
            "smsapi_escalations_total",
            "counter",
            "Later steps (and rounds) of escalation chains paged, by chain.",
        )
        for chain, count in check["escalations"].items():
            out.sample("", {"escalation": chain}, count)


def webhook_samples(out, checks):
    """Each webhook's deliveries by outcome, and the events waiting for it."""
    if not checks:
        return
    out.family(
        "smsapi_webhook_deliveries_total",
        "counter",
        "Attempts to deliver an event, by outcome: delivered (2xx), failed (tried"
        " again later), dropped (after the last retry), gone (410).",
    )
    for check in checks:
        for outcome in WEBHOOK_OUTCOMES:
            labels = {"webhook": check["webhook"], "outcome": outcome}
            out.sample("", labels, check["deliveries"].get(outcome, 0))
    out.family(
        "smsapi_webhook_queue_events", "gauge", "Events stored, waiting for delivery."
    )
    for check in checks:
        out.sample("", {"webhook": check["webhook"]}, check["queued"])


class Exposition:
    """Prometheus text format, written by hand: families of labelled samples."""

    def __init__(self):
        self.lines = []
        self.name = ""

    def family(self, name, kind, help_text):
        self.name = name
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def sample(self, suffix, labels, value):
        text = ",".join(f'{k}="{label_value(v)}"' for k, v in labels.items())
        self.lines.append(
            f"{self.name}{suffix}{{{text}}} {value}"
            if text
            else f"{self.name}{suffix} {value}"
        )

    def one(self, name, kind, help_text, value, labels=None):
        """A family of one sample."""
        self.family(name, kind, help_text)
        self.sample("", labels or {}, value)

    def text(self):
        return "\n".join(self.lines) + "\n"


def get_monitoring(request, *, health):
    """Is the spool usable? 200 "ok" or 503 with the reason, as v0.1 said; plus each check's grade."""
    checks = health.current()
    details = {name: check["status"] for name, check in checks.items()}
    if checks["spool"]["status"] == "fail":
        error = checks["spool"]["output"]
        data = {"monitoring": "fail", "error": error, "details": details}
        return Answer(HTTPStatus.SERVICE_UNAVAILABLE, data, error + "\n")
    return Answer(HTTPStatus.OK, {"monitoring": "ok", "details": details})


def get_health(request, *, health):
    """Every check graded pass, warn or fail; 503 when one fails, for curl -f."""
    checks = health.current()
    status = worst([check["status"] for check in checks.values()])
    code = HTTPStatus.SERVICE_UNAVAILABLE if status == "fail" else HTTPStatus.OK
    text = status + "\n"
    text += "".join(
        f"{name}: {c['status']}: {c['output']}\n" for name, c in checks.items()
    )
    return Answer(code, {"status": status, "checks": checks}, text)


def get_metrics(request, *, metrics, health, counts):
    """Prometheus text format; [server] metrics says who may read it."""
    if request.config.metrics == "off":
        raise not_found()
    if request.user is not None and not (request.user.metrics or request.user.admin):
        raise ApiError(HTTPStatus.FORBIDDEN, "This user may not read metrics")
    text = metrics.render(counts, health.current())
    return Answer(HTTPStatus.OK, Raw(text.encode(), PROMETHEUS_TEXT))


def metrics_login(request):
    """Whether a /metrics request needs a login: [server] metrics says."""
    access = request.config.metrics
    return access == "users" or access == "local" and not is_local(request)


###############################################################################
# The status page ##############################################################
###############################################################################

# One read-only page for an admin on a phone: is smsd all right, does the queue
# move, what was sent and received lately, is anyone being paged. Built from
# the parts' indexes and /health's checks, never by listing sent/ or failed/.
# Everything on it is escaped here, in cell(): a received SMS is a stranger's.

STATUS_STYLE = """
body{font:15px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1240px;padding:8px 12px;
color:#1b1b1b;background:#fafafa}
h1{font-size:1.3em;margin:.3em 0}h2{font-size:1.1em;margin:1.2em 0 .4em}
p{margin:.3em 0}.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{text-align:left;vertical-align:top;padding:4px 6px;border-bottom:1px solid #ddd;
white-space:nowrap}
td.w{white-space:pre-wrap;overflow-wrap:anywhere;min-width:9em}
th{background:#eee;font-weight:600}
.b{display:inline-block;padding:0 6px;border-radius:4px;font-weight:600;white-space:nowrap}
.good{background:#d7f2dc;color:#0c5a1c}.warn{background:#fde9c4;color:#6b4400}
.bad{background:#f9d3d0;color:#8a1108}.info{background:#e3e8f0;color:#27364d}
.none{color:#666}
@media (max-width:600px){body{font-size:14px;padding:6px}th,td{padding:3px 4px}}
""".strip()
STATUS_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; style-src 'sha256-"
     + base64.b64encode(sha256(STATUS_STYLE.encode()).digest()).decode() + "'"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
)  # fmt: skip
#: The colour of each word a badge may show (any other word: info).
BADGE_COLOURS = {
    word.replace("-", " "): colour
    for colour, words in (
        (
            "good",
            "pass ok running sent delivered acknowledged resolved Idle Sending Receiving",
        ),
        ("warn", "warn queued sending scheduled firing disabled unknown"),
        ("bad", "fail failed undelivered missed not-running Trouble Blocked used-up"),
    )
    for word in words.split()
}
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class Badge(collections.namedtuple("Badge", "word")):
    """A grade or a status, shown by its word and its colour."""

    __slots__ = ()


def get_status_page(request, *, health, recent, inbox, reports, schedule,
                    heartbeats, budgets, pager):  # fmt: skip
    """The status page: read-only HTML for admins, refreshing itself."""
    if not request.user.admin:
        raise ApiError(HTTPStatus.FORBIDDEN, "The status page is for admins")
    config, now, checks = request.config, request.now, health.current()
    sections = [
        ("smsd", "smsd and modems", smsd_section(config, checks, recent.modem_times())),
        ("queues", "Queues", queue_section(checks)),
        ("health", "Health checks", checks_section(checks)),
        ("sent", f"Last {RECENT_FILED} sent", sent_section(recent.listing(), reports)),
        ("received", f"Last {RECENT_RECEIVED} received", received_section(config, inbox)),
        ("scheduled", "Scheduled", scheduled_section(config, schedule)),
        ("heartbeats", "Heartbeats", heartbeats_section(heartbeats.states(now))),
        ("budgets", "Budgets", budgets_section(config, budgets, now)),
        ("webhooks", "Webhooks", webhooks_section(checks)),
        ("pages", "Pages", pages_section(pager.view(request.user, now))),
    ]  # fmt: skip
    page = status_html(worst(c["status"] for c in checks.values()), now, sections)
    return Answer(HTTPStatus.OK, Raw(page.encode(), HTML, STATUS_HEADERS))


def status_html(grade, now, sections):
    """The whole page around its sections: (id, heading, inner HTML)."""
    body = "".join(
        f'<section id="{key}"><h2>{cell(heading)}</h2>{inner}</section>'
        for key, heading, inner in sections
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<meta http-equiv="refresh" content="{STATUS_REFRESH}">'
        f"<title>smsapi on {cell(socket.gethostname())}</title>"
        f"<style>{STATUS_STYLE}</style></head><body>"
        f"<header><h1>smsapi on {cell(socket.gethostname())} {cell(Badge(grade))}</h1>"
        f"<p>{cell(time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(now)))},"
        f" smsapi {cell(__version__)}; this page reloads"
        f" every {STATUS_REFRESH} s</p></header>{body}</body></html>\n"
    )


def cell(value):
    """A value as HTML: escaped, control characters shown as �; a Badge as its
    word in its colour; None as a dash."""
    if value is None:
        return '<span class="none">–</span>'
    if isinstance(value, Badge):
        colour = BADGE_COLOURS.get(value.word, "info")
        return f'<span class="b {colour}">{cell(value.word)}</span>'
    return html.escape(CONTROL_CHARACTERS.sub("\ufffd", str(value)), quote=True)


def table(headings, rows, empty, wrapped=()):
    """An HTML table of rows (lists of values), or a line saying empty; the
    columns named in wrapped break their lines, the others keep them whole."""
    if not rows:
        return f"<p>{cell(empty)}</p>"
    head = "".join(f"<th>{cell(h)}</th>" for h in headings)
    opening = ['<td class="w">' if h in wrapped else "<td>" for h in headings]
    body = "".join(
        "<tr>" + "".join(f"{o}{cell(v)}</td>" for o, v in zip(opening, row)) + "</tr>"
        for row in rows
    )
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def short_time(seconds):
    """A local time, as short as a phone's width wants it: MM-DD HH:MM."""
    return time.strftime("%m-%d %H:%M", time.localtime(clamp_time(seconds)))


def in_words(seconds):
    """A duration in words: 42 s, 5 min, 3 h, 2 d."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size:.0f} {unit}"
    return f"{seconds:.0f} s"


def smsd_section(config, checks, modem_times):
    """smsd: running or not, since when; each modem as smsd's status file has it."""
    smsd = checks["smsd"]
    running = smsd["status"] == "pass"
    since = None
    if running:
        with contextlib.suppress(OSError):
            since = short_time(os.stat(config.smsd["pidfile"]).st_mtime)
    word = {"pass": "running", "fail": "not running"}.get(smsd["status"], "unknown")
    lines = [f"<p>smsd {cell(Badge(word))} {cell(smsd['output'])}"
             + (f", since {cell(since)}" if since else "") + "</p>"]  # fmt: skip
    rows = []
    for name, check in sorted(checks.items()):
        if name.startswith("modem:"):
            counted = check.get("counters", {})
            last = modem_times.get(check["modem"], {})
            rows.append([
                check["modem"], Badge(check["state"]), check["signal"], check["since"],
                *(counted.get(k) for k in ("sent", "failed", "received")),
                *(short_time(last[k]) if k in last else None for k in ("sent", "received")),
            ])  # fmt: skip
    headings = ["modem", "state", "signal", "since", "sent", "failed", "received",
                "last sent", "last received"]  # fmt: skip
    return "".join(lines) + table(
        headings, rows, "smsd reports no modem (stats = DIR in smsd.conf)"
    )


def queue_section(checks):
    """The queue: outgoing and checked, its oldest, the held ones, the failed."""
    queue, failed = checks["queue"], checks["failed"]
    rows = [
        ["outgoing and checked", Badge(queue["status"]), queue.get("queued"),
         in_words(queue["oldest_seconds"]) if "oldest_seconds" in queue else None],
        ["scheduled", Badge("pass"), queue.get("scheduled"), None],
        ["failed in the last hour", Badge(failed["status"]), failed["last_hour"], None],
    ]  # fmt: skip
    return table(["queue", "grade", "messages", "oldest"], rows, "")


def checks_section(checks):
    """Every check of /health with its grade."""
    rows = [
        [name, Badge(c["status"]), c["output"]] for name, c in sorted(checks.items())
    ]
    return table(
        ["check", "grade", "what it says"], rows, "no checks", ["what it says"]
    )


def sent_section(filed, reports):
    """The messages smsd filed lately, with what their reports said."""
    rows = []
    for entry in filed:
        outcome = reports.outcome(entry.name) if entry.kind == "sent" else None
        status = outcome.status if outcome else entry.kind
        rows.append(
            [short_time(entry.at), entry.owner, entry.to, Badge(status), entry.parts]
        )
    return table(
        ["time", "user", "to", "status", "parts"],
        rows,
        "nothing sent since smsapi started",
    )


def received_section(config, inbox):
    """The newest received SMS, each read (and cut short) now."""
    rows = []
    for entry in inbox.listing(("sms",))[:RECENT_RECEIVED]:
        found = read_spool_file(
            os.path.join(config.spool["incoming"], entry.name), 4096
        )
        text = parse_message(found[0])[1] if found else None
        shown = text if text is None or len(text) <= 480 else text[:480] + "…"
        rows.append([short_time(entry.received), entry.sender, shown])
    return table(["time", "from", "text"], rows, "nothing received", ["text"])


def scheduled_section(config, schedule):
    """The messages held for later that go first."""
    rows = []
    for send_at, name in schedule.upcoming(RECENT_RECEIVED):
        found = read_spool_file(os.path.join(config.spool["scheduled"], name), 4096)
        headers = parse_message(found[0])[0] if found else {}
        held = "quiet hours" if headers.get("Held") else "send_at"
        rows.append([short_time(send_at), headers.get("From"), headers.get("To"), held])
    return table(["due", "user", "to", "why"], rows, "nothing scheduled")


def heartbeats_section(states):
    """Each heartbeat's state and last beat."""
    rows = [
        [s.name, Badge("missed" if s.missed else "ok"), s.last and short_time(s.last)]
        for s in states
    ]
    return table(["heartbeat", "state", "last beat"], rows, "no heartbeats")


def budgets_section(config, budgets, now):
    """Each user's budget windows: used, and the limit."""
    rows = []
    for name, user in sorted(config.users.items()):
        for key, (used, limit) in budgets.used(user, now).items():
            word = "used up" if used >= limit else "ok"
            rows.append(
                [name, key.replace("_", " "), Badge(word), f"{used} of {limit}"]
            )
    return table(["user", "budget", "state", "parts used"], rows, "no budgets")


def webhooks_section(checks):
    """Each webhook: its state, and the events waiting."""
    rows = [
        [c["webhook"], Badge("disabled" if c["disabled"] else c["status"]),
         c["queued"], in_words(c["oldest_seconds"]) if c["queued"] else None]
        for name, c in sorted(checks.items()) if name.startswith("webhook:")
    ]  # fmt: skip
    return table(["webhook", "state", "queued", "oldest"], rows, "no webhooks")


def pages_section(pages):
    """The pages of the last day, and who acknowledged them."""
    rows = [
        [p["title"], Badge(p["status"]), p["paged_at"][5:16].replace("T", " "),
         ", ".join(p["to"]), p["acknowledged_by"],
         p["acknowledged_at"] and p["acknowledged_at"][5:16].replace("T", " ")]
        for p in pages
    ]  # fmt: skip
    headings = ["page", "status", "paged", "to", "acknowledged by", "at"]
    return table(headings, rows, "no pages", ["page", "to"])


###############################################################################
# The watcher #################################################################
###############################################################################


class Watcher:
    """The one background thread that follows smsd: a thin loop feeding the parts.

    Each tick first moves the held messages that came due and checks the
    heartbeats; then it reads the spool's changes and hands them on: the
    report index learns what smsd filed in sent/ and attaches the reports that
    arrive, the inbox index keeps the received files, the pager hears the
    replies to its pages, the webhooks are told,
    the waiting requests are woken, the sent and failed messages are counted;
    then retention and the expiry of idempotency records get their turn. Every
    file is read once, when it arrives, and a file that cannot be read or
    parsed is logged and skipped. Between ticks it sleeps a second, or until
    the next held message is due.
    """

    def __init__(self, parts, interval=1.0):
        self.settings, self.clock = parts.settings, parts.clock
        self.interval = interval
        self.counts, self.changes = parts.counts, parts.changes
        self.reports, self.inbox = parts.reports, parts.inbox
        self.retention, self.failures = parts.retention, parts.failures
        self.waiters, self.webhooks = parts.waiters, parts.webhooks
        self.idempotency = parts.idempotency
        self.schedule, self.heartbeats = parts.schedule, parts.heartbeats
        self.pager, self.recent = parts.pager, parts.recent
        self.wake = parts.wake  # a stop, or a message held for sooner
        self.stopping = threading.Event()
        self.thread = None

    def start(self):
        self.thread = threading.Thread(
            target=self.run, name="smsapi-watcher", daemon=True
        )
        self.thread.start()
        self.webhooks.start()
        self.pager.start()

    def stop(self):
        """Stop watching; waiting requests are answered with what is known now."""
        self.stopping.set()
        self.wake.set()
        self.waiters.stop()
        self.webhooks.stop()
        self.pager.stop()
        if self.thread:
            self.thread.join(10)
        if self.changes.inotify:
            self.changes.inotify.close()

    def run(self):
        # systemd's watchdog (WatchdogSec=) hears from the watcher: if it hangs, a restart follows.
        pid = os.environ.get("WATCHDOG_PID", str(os.getpid()))
        watchdog = bool(os.environ.get("WATCHDOG_USEC")) and pid == str(os.getpid())
        while not self.stopping.is_set():
            try:
                self.tick()
            except Exception:  # a bug must not stop the watching
                log.exception("watcher tick failed")
            if watchdog:
                sd_notify("WATCHDOG=1")
            due = self.schedule.next_time() - self.clock.time()
            self.clock.wait(self.wake, max(0.0, min(self.interval, due)))
            self.wake.clear()  # the tick that follows sees what it was set for

    def tick(self):
        """One pass over what changed; every part gets its turn."""
        now = self.clock.time()
        self.isolated(self.schedule.run, now)
        self.isolated(self.heartbeats.check, now)
        changes = self.changes.read()
        for change in changes:
            self.isolated(self.follow, change, now)
        for name in self.reports.next_chunk():
            self.isolated(self.learn_sent, name)
        self.isolated(self.reports.retry_deferred)
        if now - self.reports.swept > 3600:
            self.isolated(self.reports.sweep, now)
        touched = {c.name for c in changes}  # and the messages a report came for:
        touched.update(line[1] for line in self.reports.unsaved)
        for line in self.reports.unsaved:
            if line[0] == "outcome":
                self.isolated(self.reported, line[1], Outcome(*line[2:]))
                if line[2] == "undelivered":
                    self.isolated(self.pager.failed, line[1])
        while self.pager.events:  # what the pager did, for the webhooks
            self.webhooks.offer(*self.pager.events.popleft())
        self.isolated(self.webhooks.save, now)  # before the report index moves on
        self.reports.save(now)
        rescan = any(c.event == RESCAN for c in changes)
        self.waiters.wake(None if rescan else touched)
        self.isolated(self.retention.run, now)
        self.isolated(self.idempotency.expire_hourly, now)

    def isolated(self, action, *args):
        """Run one step; an error in it is logged with what it was about, and skipped."""
        try:
            action(*args)
        except Exception:  # one odd file must not stop the others
            log.exception("watcher: skipped %s", escape(args[0] if args else action))

    def follow(self, change, now):
        """Hand one change to the parts that care about its directory."""
        kind, name = change.kind, change.name
        if kind in FINAL and change.new and OUR_ID.fullmatch(name):
            self.counts[kind] += 1
        if kind == "sent":
            if change.event == RESCAN:
                self.reports.catch_up(now)
            elif change.complete:
                self.filed(kind, name)
            elif change.event == GONE:
                self.reports.forget(name)
        elif kind == "failed":
            if change.event == RESCAN:
                self.failures.rescan()
            elif change.complete:
                self.failures.arrived(name)
                self.pager.failed(name)
                self.filed(kind, name)
            elif change.event == GONE:
                self.failures.gone(name)
        elif kind in ("incoming", "report"):
            if change.event == RESCAN:
                self.rescan_received(kind)
            elif change.complete:
                self.read_received(kind, name, fresh=True)
            elif change.event == GONE and kind == "incoming":
                self.inbox.remove(name)
        if change.event == RESCAN and kind in FINAL:
            self.list_recent(kind)
        if change.event == RESCAN and kind in ("sent", "failed", "incoming"):
            self.arrived_meanwhile(kind)

    def learn_sent(self, name):
        if is_message_name(name):
            message = read_message(self.settings(), "sent", name)
            if message is not None:
                self.reports.learn(message)

    def filed(self, kind, name):
        """smsd filed a message in sent or failed: learn it, list it, and tell
        the webhooks."""
        if not is_message_name(name):
            return
        message = read_message(self.settings(), kind, name)
        if message is None:
            return
        self.recent.add(message)
        if kind == "sent":
            self.reports.learn(message)
            if message.text is not None:
                encoding = encode_text(message.text)
                self.counts["parts", encoding.alphabet] += encoding.parts
        event_type = "sms." + kind
        if not (OUR_ID.fullmatch(name) and self.webhooks.wanted(event_type)):
            return
        data = {**status_data(message, None), "from": message.owner}
        at = smsd_time(message.headers.get(kind.capitalize())) or message.mtime
        self.webhooks.offer(event_type, name, message.owner, data, at)

    def list_recent(self, kind):
        """After a RESCAN: the newest files in sent/ or failed/, for the status page."""
        config = self.settings()
        for name in list_page(config, kind, Paging(RECENT_FILED, 0))[1]:
            message = read_message(config, kind, name)
            if message is not None:
                self.recent.add(message)

    def reported(self, message_id, outcome):
        """A report told what became of a sent message: tell the webhooks."""
        event_type = "sms." + outcome.status
        if not (OUR_ID.fullmatch(message_id) and self.webhooks.wanted(event_type)):
            return
        message = read_message(self.settings(), "sent", message_id)
        if message is not None:
            data = {**status_data(message, outcome), "from": message.owner}
            self.webhooks.offer(
                event_type, message_id, message.owner, data, self.clock.time()
            )

    def arrived_meanwhile(self, kind):
        """After a RESCAN: the files that came while nobody looked are news to the webhooks."""
        for name in self.webhooks.arrivals(self.settings().spool[kind]):
            if kind in FINAL:
                self.isolated(self.filed, kind, name)
            else:
                self.isolated(self.read_received, kind, name, True)

    def rescan_received(self, kind):
        """Read every received file not known yet (at start, or after a lost watch)."""
        names = [n for n in os.listdir(self.settings().spool[kind]) if inbox_name(n)]
        if kind == "incoming":
            names = self.inbox.keep_only(names)
        for name in names:
            self.isolated(self.read_received, kind, name, False)

    def read_received(self, kind, name, fresh):
        """Index a received file and attach it if it is a genuine status report;
        a fresh SMS (not one found again by a rescan) is news to the webhooks."""
        if not inbox_name(name):
            return
        found = read_spool_file(os.path.join(self.settings().spool[kind], name))
        if found is None:
            return
        headers, text = parse_message(found[0])
        received = smsd_time(headers.get("Received")) or found[1]
        report = None
        if filed_as_report(kind, headers, "report" in self.settings().spool):
            report = parse_report(name, headers, text, received)
        if report is not None:
            self.reports.attach(report)
        if kind == "incoming":
            sender = headers.get("From", "")[:64]
            entry = InboxEntry(received, name, sender, "report" if report else "sms")
            self.inbox.add(entry)
            if headers.get("Modem"):
                self.recent.heard(headers["Modem"], received)
            if report is None:
                call = "Call_type" in headers  # smsd's record of a missed call
                self.pager.heard(name, sender, text, received, call)
            if fresh and report is None:
                data = inbox_entry(entry, text)
                self.webhooks.offer("sms.received", name, None, data, received)


###############################################################################
# The composition root ########################################################
###############################################################################


class Parts:
    """Every long-lived part of the daemon, made once, here, from the config and
    the clock; the watcher, the handlers and /health take what they use from it
    by attribute.

    One rule for the config: a part reads what it needs from settings(), the
    config in use, when it needs it, and keeps no copy (what only a restart
    changes, such as the spool's directories, it may read once). A part that
    must act on a change (the webhooks start and stop their threads) has a
    reconfigure(config) method, and reconfigure() runs it for every part.
    """

    def __init__(
        self, config, clock=None, inotify=True, interval=1.0, health_every=1.0
    ):
        os.makedirs(config.state_dir, mode=0o750, exist_ok=True)
        self.config = config
        settings = self.settings
        self.clock = clock = clock or Clock()
        self.counts = collections.Counter()  # sent, failed, delivered, ..., removed
        self.metrics = Metrics(clock.time())
        writer = SpoolWriter(
            config.spool["outgoing"], config.fsync, config.smsd.get("gid")
        )
        self.outgoing = writer
        self.idempotency = Idempotency(settings, clock)
        self.reports = ReportIndex(settings, self.counts, clock)
        self.inbox = InboxIndex()
        self.retention = Retention(settings, self.counts)
        self.failures = RecentFailures(config.spool["failed"], clock)
        self.recent = RecentMessages()
        self.waiters = Waiters(clock)
        self.wake = (
            threading.Event()
        )  # the watcher's: a stop, or a message held for sooner
        self.schedule = Schedule(settings, self.wake, clock)
        self.budgets = Budgets(config.state_dir, config.fsync, clock)
        self.pager = Pager(settings, self.outgoing, self.budgets, clock)
        self.heartbeats = Heartbeats(settings, self.outgoing, self.pager, clock)
        self.webhooks = Webhooks(settings, clock)
        followed = {k: v for k, v in config.spool.items() if k != "scheduled"}
        self.changes = SpoolChanges(followed, clock, inotify)
        self.sender = Sender(
            self.outgoing,
            self.schedule,
            self.budgets,
            self.idempotency,
            self.waiters,
            threading.BoundedSemaphore(config.max_waiters),
            self.reports,
            self.metrics,
        )
        self.health = Health(self, health_every)
        self.watcher = Watcher(self, interval)
        self.authenticator = Authenticator()
        self.throttle = Throttle(clock)

    def settings(self):
        """The config in use: what every part reads its settings from."""
        return self.config

    def reconfigure(self, config):
        """Make config the one in use, and let every part that has a hook act on it."""
        self.config = config
        for part in list(vars(self).values()):
            if hasattr(part, "reconfigure"):
                part.reconfigure(config)


###############################################################################
# Routes ######################################################################
###############################################################################


def get_index(request):
    """Where to start: the API's base, its description, its health, the README;
    a browser is sent on to the status page."""
    if wants_html(request):
        see = Raw(b"", PLAIN_TEXT, (("Location", "status"),))
        return Answer(HTTPStatus.SEE_OTHER, see)
    data = {
        "name": "smsapi",
        "version": __version__,
        "api": API,
        "openapi": API + "/openapi.json",
        "health": API + "/health",
        "readme": README,
    }
    text = "".join(f"{key}: {value}\n" for key, value in data.items())
    return Answer(HTTPStatus.OK, data, text)


def get_openapi(request, *, document):
    """The OpenAPI document of this API (document(config) makes it)."""
    return Answer(HTTPStatus.OK, document(request.config))


class Reply(
    collections.namedtuple("Reply", "description schema plain", defaults=(False,))
):
    """An answer a route documents: what it means, the name of its schema in the
    OpenAPI components (None: text only), and whether it has a text/plain form
    (or the media type of the form it has)."""

    __slots__ = ()


def error_replies(*codes):
    """The error answers of a route, all {"error": "..."}, in JSON or one line of text."""
    return {code: Reply(HTTPStatus(code).phrase, "Error", True) for code in codes}


SEND_REPLIES = {
    200: Reply("Dry run: what a send would do", "DryRun"),
    201: Reply("Queued (or, with ?wait, sent or delivered)", "Sent", True),
    502: Reply("With ?wait: a message failed or was not delivered", "Sent", True),
    504: Reply("With ?wait: time ran out, the messages stay queued", "Sent", True),
    **error_replies(400, 403, 413, 415, 422, 507),
}


SEND_PARAMETERS = ("wait", "wait_for", "dry_run", "Idempotency-Key")


SEND_BODY = {
    "application/json": "Send",
    "application/x-www-form-urlencoded": "SendForm",
}


SAFE = ("GET", "HEAD")  # a GET that changes nothing answers HEAD too


class Route(
    collections.namedtuple(
        "Route",
        "methods path handler login summary parameters body replies dialect",
        defaults=((), None, {}, None),
    )
):
    """One route of the API, with all that the OpenAPI document says of it.

    path is a template: {kind} is one of KINDS, {message_id} one path segment
    (checked against MESSAGE_ID by the spool). login is True (Basic auth, a
    token, or a mapped account on the unix socket), False, or a function of
    the request that tells. parameters are names in openapi_parameters(); body
    maps media types to schema names; replies are {status: Reply}, beyond the
    401, 429 and 503 that any route with a login may answer; dialect, "ntfy" or
    "gotify", makes its errors those servers' JSON.
    """

    __slots__ = ()


SMS = API + "/sms"


ROUTES = [
    Route(
        SAFE, "/", get_index, False,
        "Where to start: the API, this document, health, the README",
        replies={
            200: Reply("The index", "Index", True),
            303: Reply("A browser (Accept: text/html): on to the status page", None),
        },
    ),
    Route(
        SAFE, "/status", get_status_page, True,
        "The status page, for admins: smsd, modems, queues, the last messages, pages",
        replies={200: Reply("HTML", None, "text/html"), **error_replies(403)},
    ),
    Route(
        SAFE, API + "/monitoring", get_monitoring, False, "Is the spool usable?",
        replies={
            200: Reply("Usable", "Monitoring"),
            503: Reply("Not usable, with the reason", "Monitoring", True),
        },
    ),
    Route(
        SAFE, API + "/health", get_health, False,
        "Checks of the spool, smsd, the queue and the modems",
        replies={
            200: Reply("All pass or warn", "Health", True),
            503: Reply("A check fails", "Health", True),
        },
    ),
    Route(
        SAFE, "/metrics", get_metrics, metrics_login,
        "Prometheus metrics; [server] metrics says who may read",
        replies={
            200: Reply("Prometheus text format 0.0.4", None, True),
            **error_replies(403, 404),
        },
    ),
    Route(
        SAFE, API + "/openapi.json", get_openapi, False, "This document",
        replies={200: Reply("OpenAPI 3", "OpenAPI")},
    ),
    Route(
        ("POST",), SMS + "/outgoing", send_message, True,
        "Send a text to one or more numbers", SEND_PARAMETERS, SEND_BODY, SEND_REPLIES,
    ),
    Route(
        ("GET",), SMS + "/outgoing", send_message, True,
        "Send, for scripts that can only GET", ("mobiles", "text", *SEND_PARAMETERS),
        replies=SEND_REPLIES,
    ),
    Route(
        ("POST",), API + "/alerts/alertmanager", post_alertmanager, True,
        "An Alertmanager or Grafana notification: one SMS to each of to=",
        ("to", "heartbeat", "escalation", "priority"),
        {"application/json": "AlertNotification"},
        {
            200: Reply("Sent before (the earlier ids), a beat, or acknowledged", "AlertAnswer", True),
            201: Reply("Queued: one file per number", "Sent", True),
            **error_replies(400, 403, 404, 413, 415, 429, 503, 507),
        },
    ),
    Route(
        SAFE, API + "/alerts", get_pages, True,
        "The pages open, or closed within a day: an admin's all, others' their own",
        replies={200: Reply("The pages, newest first", "Pages")},
    ),
    Route(
        SAFE, API + "/heartbeats", get_heartbeats, True,
        "Each heartbeat: its last beat and state",
        replies={200: Reply("The heartbeats", "Heartbeats")},
    ),
    Route(
        ("POST",), API + "/heartbeats/{name}", post_heartbeat, True,
        "A beat of one heartbeat", ("name",),
        replies={200: Reply("Beat", "Beat", True), **error_replies(403, 404)},
    ),
    Route(
        ("POST",), "/", post_ntfy_json, True,
        "ntfy's JSON publishing (Apprise's ntfy://): {topic, message, title, priority, tags}",
        body={"application/json": "NtfyPublish"},
        replies={200: Reply("Sent, as ntfy answers", "NtfyMessage"),
                 **error_replies(400, 403, 404, 413, 415, 429, 503, 507)},
        dialect="ntfy",
    ),
    Route(
        ("POST",), "/message", post_gotify, True,
        "Gotify's message API: to the user's default_to",
        body={"application/json": "GotifyMessage",
              "application/x-www-form-urlencoded": "GotifyMessage"},
        replies={200: Reply("Sent, as Gotify answers", "GotifyAnswer"),
                 **error_replies(400, 403, 413, 415, 429, 503, 507)},
        dialect="gotify",
    ),
    Route(
        ("POST", "PUT"), "/{topic}", post_ntfy, True,
        "ntfy's publish: the body is the message; Title, Priority, Tags headers",
        ("topic", "title", "priority_ntfy", "tags"),
        {"text/plain": "NtfyText"},
        {200: Reply("Sent, as ntfy answers", "NtfyMessage"),
         **error_replies(400, 403, 404, 413, 429, 503, 507)},
        "ntfy",
    ),
    Route(
        SAFE, API + "/groups", get_groups, True,
        "The groups ([group:NAME]) the caller may send to, as @NAME",
        replies={200: Reply("Each group's numbers", "Groups")},
    ),
    Route(
        SAFE, SMS + "/status/{message_id}", get_status, True, "Where a message is now",
        ("message_id",),
        replies={200: Reply("Status", "Status", True), **error_replies(404)},
    ),
    Route(
        SAFE, SMS + "/{kind}/", list_messages, True,
        "Messages in one spool, newest first",
        ("kind", "limit", "offset", "type", "since", "from"),
        # 403: the inbox, for a user without inbox = yes
        replies={200: Reply("A page", "List", True), **error_replies(400, 403, 404)},
    ),
    Route(
        SAFE, SMS + "/{kind}/{message_id}", get_message, True, "One message file",
        ("kind", "message_id"),
        replies={200: Reply("Headers and text", "MessageFile"), **error_replies(404)},
    ),
    Route(
        ("DELETE",), SMS + "/{kind}/{message_id}", cancel_message, True,
        "Cancel a queued message, or delete one", ("kind", "message_id"),
        replies={200: Reply("Deleted", "Deleted"), **error_replies(404, 409)},
    ),
]  # fmt: skip


KNOWN_METHODS = frozenset(m for route in ROUTES for m in route.methods)
OPEN_PATHS = frozenset(route.path for route in ROUTES if route.login is not True)


PLACEHOLDERS = {
    "kind": "|".join(KINDS),
    "message_id": "[^/]+",
    "name": "[^/]+",
    "topic": f"(?!(?:{'|'.join(ROUTE_ROOTS)})$){TOPIC_NAME.pattern}",
}


def compile_route(template):
    """A regex for a path template with {name} placeholders."""
    pattern = re.sub(
        r"\{(\w+)\}",
        lambda m: f"(?P<{m.group(1)}>{PLACEHOLDERS[m.group(1)]})",
        re.escape(template).replace(r"\{", "{").replace(r"\}", "}"),
    )
    return re.compile(pattern)


COMPILED_ROUTES = [(compile_route(route.path), route) for route in ROUTES]


def match_route(method, path):
    """(the Route, its {placeholder: value}) for the request, or 404/405."""
    allowed = set()
    for pattern, route in COMPILED_ROUTES:
        match = pattern.fullmatch(path)
        if match is None:
            continue
        if method in route.methods:
            return route, match.groupdict()
        allowed.update(route.methods)
    if not allowed:
        raise not_found()
    raise ApiError(
        HTTPStatus.METHOD_NOT_ALLOWED,
        "Method not allowed",
        [("Allow", ", ".join(sorted(allowed)))],
    )


###############################################################################
# OpenAPI document ############################################################
###############################################################################


def openapi_document(config):
    """The OpenAPI 3 description of this API, made from ROUTES and the config."""
    parameters, paths = openapi_parameters(config), {}
    for route in ROUTES:
        for method in route.methods:
            if method != "HEAD":
                operation = openapi_operation(route, parameters)
                paths.setdefault(route.path, {})[method.lower()] = operation
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "smsapi",
            "version": __version__,
            "description": "HTTP API for the SMS Server Tools 3 spool",
        },
        "components": {
            "schemas": openapi_schemas(config),
            "securitySchemes": {"basic": {"type": "http", "scheme": "basic"}},
        },
        "paths": paths,
    }


def openapi_operation(route, parameters):
    """One route's operation; a route with a login may also answer 401, 429 and 503."""
    login = [{"basic": []}]
    replies = route.replies
    if route.login:
        replies = {**error_replies(401, 429, 503), **replies}
    operation = {
        "summary": route.summary,
        "security": {True: login, False: []}.get(route.login, [{}, *login]),
        "parameters": [parameters[name] for name in route.parameters],
        "responses": {
            str(code): openapi_response(reply)
            for code, reply in sorted(replies.items())
        },
    }
    if route.body:
        content = {media: {"schema": schema_ref(s)} for media, s in route.body.items()}
        operation["requestBody"] = {"required": True, "content": content}
    return operation


def openapi_response(reply):
    """An answer: JSON by its schema, and text/plain where it has that form."""
    content = {}
    if reply.schema:
        content["application/json"] = {"schema": schema_ref(reply.schema)}
    if reply.plain:
        media = reply.plain if isinstance(reply.plain, str) else "text/plain"
        content[media] = {"schema": STRING}
    return {"description": reply.description, "content": content}


def schema_ref(name):
    return {"$ref": "#/components/schemas/" + name}


def query_parameter(name, schema, description, required=False):
    return {
        "name": name,
        "in": "query",
        "required": required,
        "schema": schema,
        "description": description,
    }


def path_parameter(name, schema):
    return {"name": name, "in": "path", "required": True, "schema": schema}


def openapi_parameters(config):
    """Every parameter a route may name, with the bounds the handlers check."""
    return {**message_parameters(config), **notification_parameters(config)}


def whole(low, high):
    """An integer schema within bounds."""
    return {"type": "integer", "minimum": low, "maximum": high}


def enum_of(words):
    """A string schema of one of words."""
    return {"type": "string", "enum": list(words)}


def message_parameters(config):
    """The parameters of the routes that send, list and read messages."""
    return {
        "kind": path_parameter("kind", enum_of(KINDS)),
        "message_id": path_parameter(
            "message_id", {"type": "string", "pattern": anchored(MESSAGE_ID)}
        ),
        "limit": query_parameter("limit", whole(1, MAX_PAGE_SIZE), "page size"),
        "offset": query_parameter("offset", whole(0, MAX_OFFSET), "page start"),
        "type": query_parameter("type", enum_of(INBOX_TYPES), "incoming only"),
        "since": query_parameter(
            "since", STRING, "incoming only: ISO 8601 time or message id"
        ),
        "from": query_parameter("from", STRING, "incoming only: sender number"),
        "mobiles": query_parameter(
            "mobiles", NUMBERS, "numbers, comma-separated", required=True
        ),
        "text": query_parameter("text", SEND_FIELDS["text"], "the text", required=True),
        "wait": query_parameter(
            "wait", whole(0, config.max_wait), "answer once sent, at most N seconds"
        ),
        "wait_for": query_parameter(
            "wait_for", enum_of(WAIT_TARGETS), "what ?wait waits for"
        ),
        "dry_run": query_parameter(
            "dry_run", enum_of(YES + NO), "say what would be sent, write nothing"
        ),
        "priority": query_parameter(
            "priority", enum_of(PRIORITIES), "normal lets quiet hours hold it"
        ),
        "Idempotency-Key": {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "pattern": anchored(IDEMPOTENCY_KEY)},
            "description": "send once per key and user",
        },
    }


def notification_parameters(config):
    """The parameters of the alert, heartbeat and ntfy routes."""
    return {
        "name": path_parameter("name", {"type": "string"}),
        "to": query_parameter("to", NUMBERS, "numbers and @groups, comma-separated"),
        "heartbeat": query_parameter(
            "heartbeat", STRING, "a firing Watchdog alert is a beat of this heartbeat"
        ),
        "escalation": query_parameter(
            "escalation",
            enum_of(config.escalations) if config.escalations else STRING,
            "page through this [escalation:NAME]: its first step now, the next ones"
            " until someone acknowledges",
        ),
        "topic": path_parameter(
            "topic", enum_of(config.topics) if config.topics else STRING
        ),
        "title": query_parameter(
            "title", STRING, "the SMS is TITLE: MESSAGE (or the Title header)"
        ),
        "priority_ntfy": query_parameter(
            "priority",
            enum_of(NTFY_PRIORITIES),
            "4-5 go past quiet hours, 1-3 wait for them (or the Priority header)",
        ),
        "tags": query_parameter("tags", STRING, "comma-separated (or the Tags header)"),
    }


def openapi_schemas(config):
    """The components' schemas; a send's queue is one of the config's queues."""
    fields = dict(
        SEND_FIELDS, queue={"type": "string", "enum": list(config.queues) or [""]}
    )
    send = {
        "type": "object",
        "required": ["mobiles", "text"],
        "additionalProperties": False,
        "properties": fields,
    }
    in_form = dict(fields, mobiles=NUMBERS, validity=fields["validity"]["oneOf"][0])
    form = dict(send, properties=in_form)
    return dict(SCHEMAS, Send=send, SendForm=form)


STRING = {"type": "string"}


NUMBERS = {
    "type": "string",
    "pattern": anchored(
        re.compile(rf"(?:{RECIPIENT.pattern})(,(?:{RECIPIENT.pattern}))*")
    ),
}


NULLABLE_STRING = {"type": "string", "nullable": True}


GRADE = {"type": "string", "enum": list(GRADES)}


MESSAGE_STATUS = {
    "type": "object",
    "required": ["message_id", "status"],
    "properties": {
        "message_id": STRING,
        "status": {
            "type": "string",
            "enum": [
                "scheduled",
                "queued",
                "sending",
                "sent",
                "failed",
                "delivered",
                "undelivered",
                "gone",
            ],
        },
        "to": NULLABLE_STRING,
        "send_at": NULLABLE_STRING,
        "held": {"type": "string", "enum": ["quiet_hours"]},
        "valid_until": STRING,
        "sent_at": NULLABLE_STRING,
        "modem": NULLABLE_STRING,
        "failed_at": NULLABLE_STRING,
        "reason": NULLABLE_STRING,
        "delivered_at": STRING,
        "undelivered_at": STRING,
        "report": STRING,
    },
}


INBOX_ENTRY = {
    "type": "object",
    "required": ["message_id", "type", "from", "received", "text"],
    "properties": {
        "message_id": STRING,
        "type": {"type": "string", "enum": ["sms", "report"]},
        "from": STRING,
        "received": STRING,
        "text": NULLABLE_STRING,
    },
}


PAGE = {
    "type": "object",
    "required": [
        "id", "code", "to", "status", "group", "alerts", "paged_at",
        "acknowledged_by", "acknowledged_at", "silence_id",
    ],
    "properties": {
        "id": STRING,
        "code": {
            "type": "object",
            "additionalProperties": {"type": "integer", "minimum": 1},
            "description": "each number paged -> its reply code for this page",
        },
        "to": {"type": "array", "items": STRING},
        "status": {"type": "string", "enum": ["firing", "acknowledged", "resolved"]},
        "group": {"type": "object", "additionalProperties": STRING},
        "title": STRING,
        "alerts": {"type": "integer", "minimum": 0},
        "paged_at": {"type": "string", "format": "date-time"},
        "acknowledged_by": NULLABLE_STRING,
        "acknowledged_at": {**NULLABLE_STRING, "format": "date-time"},
        "closed_at": {**NULLABLE_STRING, "format": "date-time"},
        "silence_id": NULLABLE_STRING,
        "escalation": NULLABLE_STRING,
        "step": {"type": "integer", "minimum": 1, "nullable": True},
        "round": {"type": "integer", "minimum": 1},
        "next_step_at": {**NULLABLE_STRING, "format": "date-time"},
        "reason": {"type": "string", "description": "alert.escalated: why"},
    },
}  # fmt: skip


WEBHOOK_EVENT = {
    "type": "object",
    "description": "The body of each webhook POST, signed as Standard Webhooks says"
    " (headers webhook-id, webhook-timestamp, webhook-signature); see the README.",
    "required": ["type", "timestamp", "data"],
    "properties": {
        "type": {"type": "string", "enum": list(EVENT_TYPES)},
        "timestamp": {"type": "string", "format": "date-time"},
        "data": {
            "description": "sms.received: the message as the inbox lists it;"
            " alert.acknowledged: the page; the others: the status answer then,"
            " plus the API user who sent it",
            "anyOf": [
                INBOX_ENTRY,
                PAGE,
                {
                    **MESSAGE_STATUS,
                    "properties": {**MESSAGE_STATUS["properties"], "from": STRING},
                },
            ],
        },
    },
}


#: What an ntfy publish holds, and its answer says again.
NTFY_PUBLISHED = {
    "topic": STRING,
    "message": STRING,
    "title": STRING,
    "priority": {"type": "integer", "minimum": 1, "maximum": 5},
    "tags": {"type": "array", "items": STRING},
}


SCHEMAS = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": STRING}},
    "OpenAPI": {"type": "object"},
    "Sent": {
        "type": "object",
        "required": ["message_id", "parts_count", "sent_text", "encoding"],
        "properties": {
            "message_id": {
                "type": "object",
                "additionalProperties": STRING,
                "description": "each number as given -> the id of its message",
            },
            "parts_count": {"type": "integer", "minimum": 1},
            "sent_text": STRING,
            "encoding": {"type": "string", "enum": ["GSM", "UCS2"]},
            "substituted": {"type": "integer", "minimum": 0},
            "truncated": {"type": "boolean"},
            "messages": {
                "type": "object",
                "additionalProperties": MESSAGE_STATUS,
                "description": "with ?wait: each message's status",
            },
            "error": {"type": "string", "description": "with ?wait, on 502 and 504"},
            "status": {"type": "string", "enum": ["scheduled"]},
            "send_at": STRING,
            "held": {"type": "string", "enum": ["quiet_hours"]},
        },
    },
    "DryRun": {
        "type": "object",
        "required": [
            "dry_run",
            "recipients",
            "encoding",
            "parts_count",
            "units",
            "non_gsm_characters",
        ],
        "properties": {
            "dry_run": {"type": "boolean"},
            "recipients": {"type": "object", "additionalProperties": STRING},
            "encoding": {"type": "string", "enum": ["GSM", "UCS2"]},
            "parts_count": {"type": "integer"},
            "units": {"type": "integer"},
            "non_gsm_characters": {"type": "array", "items": STRING},
            "headers": {"type": "object", "additionalProperties": STRING},
            "sent_text": STRING,
            "substituted": {"type": "integer", "minimum": 0},
            "truncated": {"type": "boolean"},
            "ucs2_reason": STRING,
            "send_at": STRING,
            "held": {"type": "string", "enum": ["quiet_hours"]},
        },
    },
    "Status": MESSAGE_STATUS,
    "MessageFile": {
        "type": "object",
        "required": ["message_id"],
        "description": "every header of the smsd file as a key, plus message_id and text",
        "properties": {"message_id": STRING, "text": NULLABLE_STRING},
        "additionalProperties": STRING,
    },
    "List": {
        "type": "object",
        "required": ["message_id", "total_count", "limit", "offset"],
        "properties": {
            "message_id": {"type": "array", "items": STRING},
            "total_count": {"type": "integer"},
            "limit": {"type": "integer"},
            "offset": {"type": "integer"},
            "messages": {
                "type": "array",
                "description": "incoming only: the received messages themselves",
                "items": INBOX_ENTRY,
            },
        },
    },
    "AlertNotification": {
        "type": "object",
        "description": "Alertmanager's webhook payload (version 4), or Grafana's",
        "required": ["alerts"],
        "properties": {
            "status": {"type": "string", "enum": ["firing", "resolved"]},
            "groupKey": STRING,
            "receiver": STRING,
            "externalURL": STRING,
            **{
                name: {"type": "object", "additionalProperties": STRING}
                for name in ("groupLabels", "commonLabels", "commonAnnotations")
            },
            "alerts": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "status": {"type": "string", "enum": ["firing", "resolved"]},
                        "labels": {"type": "object", "additionalProperties": STRING},
                        "annotations": {
                            "type": "object",
                            "additionalProperties": STRING,
                        },
                        "startsAt": STRING,
                        "endsAt": STRING,
                        "fingerprint": STRING,
                    },
                },
            },
        },
    },
    "NtfyText": {"type": "string", "description": "the message (empty: triggered)"},
    "NtfyPublish": {
        "type": "object",
        "required": ["topic"],
        "properties": NTFY_PUBLISHED,
    },
    "NtfyMessage": {
        "type": "object",
        "required": ["id", "time", "event", "topic", "message"],
        "properties": {
            "id": STRING,
            "time": {"type": "integer"},
            "event": {"type": "string", "enum": ["message"]},
            **NTFY_PUBLISHED,
        },
    },
    "GotifyMessage": {
        "type": "object",
        "required": ["message"],
        "properties": {
            "message": {"type": "string", "minLength": 1},
            "title": STRING,
            "priority": {"type": "integer", "minimum": 0, "maximum": 10},
        },
    },
    "GotifyAnswer": {
        "type": "object",
        "required": ["id", "appid", "message", "title", "priority", "date"],
        "properties": {
            "id": {"type": "integer"},
            "appid": {"type": "integer"},
            "message": STRING,
            "title": STRING,
            "priority": {"type": "integer"},
            "date": {"type": "string", "format": "date-time"},
            "extras": {"type": "object"},
        },
    },
    "Heartbeats": {
        "type": "object",
        "required": ["heartbeats"],
        "properties": {
            "heartbeats": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "every", "to", "last_beat", "state"],
                    "properties": {
                        "name": STRING,
                        "every": {"type": "integer", "description": "seconds"},
                        "to": {"type": "array", "items": STRING},
                        "last_beat": NULLABLE_STRING,
                        "state": {"type": "string", "enum": ["ok", "missed"]},
                    },
                },
            }
        },
    },
    "AlertAnswer": {
        "anyOf": [
            schema_ref("Sent"),
            schema_ref("Beat"),
            schema_ref("Acknowledged"),
            schema_ref("Paged"),
        ]
    },
    "Paged": {
        "type": "object",
        "description": "a chain whose first step only rings: the page, no SMS",
        "required": ["page", "escalation"],
        "properties": {"page": STRING, "escalation": STRING},
    },
    "Acknowledged": {
        "type": "object",
        "description": "the page of this group is acknowledged: nothing was sent",
        "required": ["acknowledged_by", "acknowledged_at"],
        "properties": {
            "acknowledged_by": STRING,
            "acknowledged_at": {"type": "string", "format": "date-time"},
        },
    },
    "Pages": {
        "type": "object",
        "required": ["pages"],
        "properties": {"pages": {"type": "array", "items": PAGE}},
    },
    "Beat": {
        "type": "object",
        "required": ["heartbeat", "beat"],
        "properties": {"heartbeat": STRING, "beat": STRING},
    },
    "Groups": {
        "type": "object",
        "required": ["groups"],
        "properties": {
            "groups": {
                "type": "object",
                "additionalProperties": {"type": "array", "items": STRING},
            }
        },
    },
    "Deleted": {
        "type": "object",
        "required": ["message_id", "deleted"],
        "properties": {"message_id": STRING, "deleted": {"type": "boolean"}},
    },
    "Index": {
        "type": "object",
        "required": ["name", "version", "api", "openapi", "health", "readme"],
        "properties": {
            key: STRING
            for key in ("name", "version", "api", "openapi", "health", "readme")
        },
    },
    "Monitoring": {
        "type": "object",
        "required": ["monitoring"],
        "properties": {
            "monitoring": {"type": "string", "enum": ["ok", "fail"]},
            "error": STRING,
            "details": {"type": "object", "additionalProperties": GRADE},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "checks"],
        "properties": {
            "status": GRADE,
            "checks": {
                "type": "object",
                "description": "spool, smsd, queue, failed, modem:NAME per modem,"
                " webhook:NAME per webhook",
                "additionalProperties": {
                    "type": "object",
                    "required": ["status", "output"],
                    "properties": {"status": GRADE, "output": STRING},
                },
            },
        },
    },
    "WebhookEvent": WEBHOOK_EVENT,
}


###############################################################################
# Application #################################################################
###############################################################################


class Application:
    """The WSGI application: route, authenticate, handle, answer JSON (or plain text).

    Its parts (Parts) are made once; each handler gets the ones its
    keyword-only parameters name.
    """

    def __init__(
        self, config, clock=None, inotify=True, interval=1.0, health_every=1.0
    ):
        self.parts = Parts(config, clock, inotify, interval, health_every)
        self.clock = self.parts.clock
        self.waiting = None  # what a changed config gives up, while it is not taken
        self.handlers = {r.handler: self.bind(r.handler) for r in ROUTES}

    @property
    def config(self):
        """The config in use (a reload makes a new one)."""
        return self.parts.config

    def bind(self, handler):
        """handler with the parts its keyword-only parameters name (and the OpenAPI
        document's maker, which stands below the handlers)."""
        code = handler.__code__
        wanted = code.co_varnames[
            code.co_argcount : code.co_argcount + code.co_kwonlyargcount
        ]
        found = {"document": openapi_document}
        found.update(
            (name, getattr(self.parts, name)) for name in wanted if name != "document"
        )
        return functools.partial(handler, **{name: found[name] for name in wanted})

    def start(self):
        """Start the background watcher (tests may call parts.watcher.tick() instead)."""
        self.parts.watcher.start()

    def close(self):
        """Stop the watcher: requests still waiting for smsd are answered now."""
        self.parts.watcher.stop()

    def reload(self, path, stood=None):
        """Take users, permissions and limits from the config file anew: True when
        taken, False when refused (its problems are logged; the one in use stays).

        On SIGHUP (stood None) the file is taken as it is. When the file watcher
        saw it change, it has stood unchanged for `stood` seconds: a config that
        drops sections or widens a user's rights, which is what a file caught
        half-written looks like, waits until it has stood for CONFIG_CAREFUL
        (None: not yet). What only a restart can change is kept.
        """
        try:
            new = load_config(path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused: %s", problem)
            return False
        given_up = loosened(self.config, new)
        if stood is not None and stood < CONFIG_CAREFUL and given_up:
            if self.waiting != given_up:
                self.waiting = given_up
                log.warning(
                    "%s changed: it %s; taken if it stands %d s unchanged",
                    path,
                    ", ".join(given_up),
                    CONFIG_CAREFUL,
                )
            return None
        self.waiting = None
        kept = {key: getattr(self.config, key) for key in RESTART_ONLY}
        for key, value in kept.items():
            if getattr(new, key) != value:
                log.warning("reload: %s changes only with a restart", key)
        self.parts.reconfigure(new.replace(**kept))
        log.info("reloaded %s: %d users", path, len(self.config.users))
        return True

    def __call__(self, environ, start_response):
        started = time.monotonic()
        request = Request(environ, self.config, self.clock.time())
        status, headers, body = self.respond(request)
        headers.append(("Content-Length", str(len(body))))
        start_response(STATUS_LINES[status], headers)
        self.log_request(request, status, started)
        method = request.method if request.method in KNOWN_METHODS else "other"
        self.parts.metrics.observe(
            request.route, method, status.value, time.monotonic() - started
        )
        return [b"" if request.method == "HEAD" else body]

    def respond(self, request):
        """Status, headers and body for a request; every error is answered here."""
        headers, dialect = [], None
        try:
            route, request.args = match_route(request.method, request.path)
            request.route, dialect = route.path, route.dialect
            if route.login is True or route.login and route.login(request):
                authenticate(request, self.parts.authenticator, self.parts.throttle)
            answer = self.handlers[route.handler](request)
        except ApiError as exc:
            answer = error_answer(exc.status, exc.message, dialect)
            headers = exc.headers
        except OSError as exc:  # the spool, not the request, is at fault
            log.error(
                "spool error on %s %s: %s",
                request.method,
                escape(request.path),
                one_line(exc),
            )
            answer = error_answer(
                HTTPStatus.SERVICE_UNAVAILABLE, "Spool is not readable"
            )
        except Exception:  # the one place the unexpected is caught
            log.exception(
                "internal error on %s %s", request.method, escape(request.path)
            )
            answer = error_answer(
                HTTPStatus.INTERNAL_SERVER_ERROR, "Internal server error"
            )
        return rendered(request, answer, headers)

    def log_request(self, request, status, started):
        log.info(
            "%s %s %d user=%s ids=%s%s%s %.1fms",
            request.method,
            escape(request.path),
            status,
            escape(request.user.name) if request.user else "-",
            ",".join(request.written) or "-",
            request.log_detail,
            " (replayed)" if request.replayed else "",
            (time.monotonic() - started) * 1000,
        )


def error_answer(status, message, dialect=None):
    """An error's answer: {"error": message}, or as ntfy or Gotify say it."""
    if dialect:
        return dialect_error(dialect, status, message)
    return Answer(status, {"error": message}, message + "\n")


def rendered(request, answer, headers):
    """(status, headers, body) of an Answer: raw, plain text if asked for and it has one, else JSON."""
    if isinstance(answer.data, Raw):
        content_type, body = answer.data.content_type, answer.data.body
        headers = [*answer.data.headers, *headers]
    elif answer.text is not None and wants_plain_text(request):
        content_type, body = PLAIN_TEXT, answer.text.encode()
    else:
        content_type = "application/json; charset=utf-8"
        body = (json.dumps(answer.data, ensure_ascii=False) + "\n").encode("utf-8")
    return answer.status, [("Content-Type", content_type), *headers], body


###############################################################################
# Server adapters #############################################################
###############################################################################

# waitress when it is installed, else the standard library's wsgiref: each
# behind the same small interface, serve(app, sockets, signals).


def serve(config):
    """Serve the API until SIGTERM or Ctrl-C; waitress when installed, else wsgiref."""
    path = os.path.abspath(config.path)
    log.info("smsapi %s: config %s, %d users", __version__, path, len(config.users))
    give_big_blocks_back()
    clean_temp_files(config)
    warn_if_readable(config)
    if not config.users:
        log.warning("no [user:NAME] sections: every message request will be refused")
    try:
        sockets, inherited = listening_sockets(config)
    except OSError as exc:
        log.error("cannot listen: %s", one_line(exc))
        return 1
    bound = [s.getsockname() for s in sockets if s.family == socket.AF_UNIX]
    app = Application(config)  # the adapter closes it once it takes no more requests
    app.start()
    signals = Signals()
    signal.signal(signal.SIGINT, signals.stop)  # Ctrl-C
    signal.signal(signal.SIGTERM, signals.stop)  # systemctl stop
    signal.signal(signal.SIGHUP, signals.reload)  # systemctl reload
    try:
        server = WaitressServer(config)
    except ImportError:
        log.warning("waitress is not installed; using the slower wsgiref server")
        server = WsgirefServer(config)
    try:
        return server.serve(app, sockets, signals)
    finally:
        for sock in sockets:
            sock.close()
        if not inherited:  # systemd's socket files are systemd's to remove
            for path in bound:
                remove_quietly(path)


def give_big_blocks_back():
    """Make glibc's malloc hand every block of 128 KiB or more back to the system
    when it is freed. Left to itself, each thread's arena keeps the last big
    block it freed (a login's scrypt takes 16 MiB), and the threshold grows
    with what is freed: ten users logging in once cost 60 MB for good."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 128 << 10)


def warn_if_readable(config):
    """Log a warning when every local user may read a config that holds password
    hashes or webhook secrets."""
    with contextlib.suppress(OSError):
        secrets = any(u.password for u in config.users.values()) or config.webhooks
        if secrets and os.stat(config.path).st_mode & stat.S_IROTH:
            log.warning(
                "%s is readable by every local user and holds password hashes or"
                " webhook secrets: chmod o-rwx %s",
                config.path,
                config.path,
            )


class Signals:
    """What signals ask of the main loop: plain flags, as a handler can interrupt any code."""

    def __init__(self):
        self.stopping = False
        self.reloading = False

    def stop(self, signum, frame):
        self.stopping = True

    def reload(self, signum, frame):
        self.reloading = True


def run_until_stopped(step, app, signals):
    """Call step() (one turn of a server loop) until a stop signal; reload on SIGHUP
    and when the config file changes (add-user, an editor)."""
    config_file, changed = ConfigFile(app.config.path, app.clock), False
    while not signals.stopping:
        step()
        if config_file.changed():
            log.info("%s changed: reloading it", app.config.path)
            changed = True
        if signals.reloading or changed:
            stood = None if signals.reloading else config_file.stood()
            sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
            changed = app.reload(app.config.path, stood) is None
            signals.reloading = False
            sd_notify("READY=1")
    sd_notify("STOPPING=1")
    log.info("stopping: finishing the requests in progress")


class ConfigFile:
    """Tells when the config file changed and stands still, so that a reload never
    reads it half-written: replaced whole (a new inode: add-user, most editors) at
    once, written in place once it stood unchanged for `settle` seconds (a file
    caught truncated would be a valid config with no users)."""

    def __init__(self, path, clock, settle=SETTLE):
        self.path, self.clock, self.settle = path, clock, settle
        self.stamp = config_stamp(path)
        self.pending, self.since = None, 0.0  # a stamp being written perhaps, seen when

    def changed(self):
        now = config_stamp(self.path)
        if now == self.stamp or now is None:
            self.pending = None
            return False
        if self.stamp is None or now[2] != self.stamp[2]:  # replaced whole
            self.stamp, self.pending, self.since = now, None, -math.inf
            return True
        if now != self.pending:
            self.pending, self.since = now, self.clock.monotonic()
            return False
        if self.clock.monotonic() - self.since < self.settle:
            return False
        self.stamp, self.pending = now, None
        return True

    def stood(self):
        """Seconds the file has stood unchanged, as far as this watch has seen
        (infinity: it was replaced whole, so it is whole)."""
        return self.clock.monotonic() - self.since


def config_stamp(path):
    """What tells that the config file changed: its mtime, size and inode."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size, status.st_ino


def listening_sockets(config):
    """(sockets, inherited): systemd's (socket activation), else bound from listen."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()):
        count = os.environ.get("LISTEN_FDS", "")
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
        if is_number(count) and int(count) > 0:
            log.info(
                "listening on %s sockets from systemd, not on [server] listen", count
            )
            fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count))
            for fd in fds:
                os.set_inheritable(fd, False)
            return [socket.socket(fileno=fd) for fd in fds], True
    sockets = []
    for address in config.listen:
        try:
            sockets += bind(address)
        except OSError as exc:
            for sock in sockets:  # undo the addresses bound so far
                if sock.family == socket.AF_UNIX:
                    remove_quietly(sock.getsockname())
                sock.close()
            raise OSError(exc.errno, f"{address}: {exc.strerror or exc}") from None
    return sockets, False


def bind(address):
    """The listening sockets of one listen address (a host name may stand for several)."""
    if address.startswith("unix:"):
        return [bind_unix(address[5:])]
    host, port = parse_address(address)
    found = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets = []
    try:
        for family, sockaddr in dict.fromkeys((f[0], f[4]) for f in found):
            sockets.append(
                socket.create_server(sockaddr, family=family, backlog=BACKLOG)
            )
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def bind_unix(path):
    """A unix socket any local user may connect to; unix_users then says who is who."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # left by an earlier run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def peer_uid(sock):
    """The uid of the process at the other end of a unix socket (SO_PEERCRED)."""
    size = struct.calcsize("3i")
    return struct.unpack(
        "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size)
    )[1]


def socket_url(sock):
    """http://host:port, or unix:/path, of a listening socket."""
    if sock.family == socket.AF_UNIX:
        return "unix:" + sock.getsockname()
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def announce(sockets):
    urls = [socket_url(sock) for sock in sockets]
    for url in urls:
        log.info("smsapi %s listening on %s", __version__, url)
    sd_notify("READY=1\nSTATUS=listening on " + " ".join(urls))


class WaitressServer:
    """waitress, the server for production. Every use of waitress's private API
    is in this class, as of Debian 12's 2.1.2 and PyPI's 3.0.2 (CI runs the
    tests against both): create_server(_dispatcher=), server._map,
    .active_channels, .task_dispatcher, .maintenance(); channel.request,
    .requests, .last_activity, .will_close, .total_outbufs_len; the
    dispatcher's .lock, .queue and .queue_cv; wasyncore.loop(count=1)."""

    def __init__(self, config):
        import waitress  # noqa: F401 (ImportError when it is not installed)

        self.config = (
            config  # what it reads (threads, limits, timeouts) needs a restart
        )

    def serve(self, app, sockets, signals):
        """Serve app on the sockets until a stop signal, then finish what is in hand."""
        import waitress.server
        from waitress import wasyncore

        config = self.config

        channels = {}  # every socket waitress serves, listening or connected
        unix = [sock for sock in sockets if sock.family == socket.AF_UNIX]
        tcp = [sock for sock in sockets if sock.family != socket.AF_UNIX]
        servers = [
            waitress.server.create_server(
                app,
                map=channels,
                sockets=group,  # waitress takes unix and TCP sockets only apart
                threads=config.threads,
                ident="smsapi",
                # waitress answers absurd bodies itself; up to this much, the app
                # gives the JSON 413 after looking at Content-Length.
                max_request_body_size=config.max_body * 16,
                # the unix socket has room of its own: TCP clients cannot take it
                connection_limit=config.connection_limit
                + (UNIX_RESERVE if group is unix else 0),
                channel_timeout=config.channel_timeout,
                cleanup_interval=1,  # how often maintain() looks at the connections
                asyncore_use_poll=True,  # select() stops at 1024 descriptors
                _dispatcher=self.dispatcher(app),
            )
            for group in (tcp, unix)
            if group
        ]
        listeners = [
            c
            for c in channels.values()
            if isinstance(c, waitress.server.BaseWSGIServer)
        ]
        for listener in listeners:
            unix_socket = listener.socket.family == socket.AF_UNIX
            listener.channel_class = self.channel_class(unix_socket)
            listener.maintenance = functools.partial(
                self.maintain, listener, listener.maintenance, config.request_timeout
            )
        announce(sockets)

        def turn(timeout=1.0):
            wasyncore.loop(timeout=timeout, use_poll=True, map=channels, count=1)

        run_until_stopped(turn, app, signals)
        self.finish(app, listeners, channels, turn)
        for server in servers:
            server.task_dispatcher.shutdown()
        wasyncore.close_all(channels)
        return 0

    def finish(self, app, listeners, channels, turn):
        """Accept no more, and answer what is in hand (within STOP_GRACE)."""
        from waitress import wasyncore

        for listener in listeners:  # without closing waitress's trigger
            wasyncore.dispatcher.close(listener)
            listener.task_dispatcher.release_held(everything=True)
            listener.task_dispatcher.release_waiting(everything=True)
        app.close()  # requests that wait for smsd answer now
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline and any(map(self.is_busy, channels.values())):
            turn(0.05)

    def channel_class(self, unix):
        """waitress's connection class, knowing when its request began, on the unix
        socket the caller's uid, and which request has its user's slow-lane turn."""
        import waitress.channel
        import waitress.task

        class Task(waitress.task.WSGITask):
            def get_environment(self):
                environ = super().get_environment()
                if self.channel.peer_uid is not None:
                    environ[PEER_UID] = self.channel.peer_uid
                if self.channel.turn is self.request:
                    environ[TURN] = True
                return environ

        class Channel(waitress.channel.HTTPChannel):
            task_class = Task

            def __init__(self, server, sock, addr, adj, map=None):
                self.peer_uid = peer_uid(sock) if unix else None
                self.turn = None  # the request the dispatcher let go in its user's turn
                # when the request now arriving began: at accept, or at the first byte
                # after an idle spell; None between requests (kept alive, idle)
                self.began = time.monotonic()
                super().__init__(server, sock, addr, adj, map)

            def received(self, data):
                before = self.request
                result = super().received(data)
                if self.request is None and self.requests:
                    self.began = None  # whole: now it is the app's turn
                elif self.began is None or self.request not in (before, None):
                    self.began = time.monotonic()  # after an idle spell, or pipelined
                return result

        return Channel

    def dispatcher(self, app):
        """waitress's worker threads, taking requests for the routes that need no login
        after all others, and at most OPEN_ROUTE_RATE of them a second; and a
        request for a user in the throttle's slow lane when it is its turn.

        A flood of /health can then neither keep a send waiting nor busy the
        server: a request past the rate is held, with no thread, until maintain()
        lets it go (waitress reads nothing more from its connection meanwhile).
        So is a request for a guessed user from an address it never logged in
        from, until its turn (TurnLanes).
        """
        import waitress.task

        urgent = self.urgent

        def caller(channel):
            return self.caller(channel, app.config.trusted_proxies)

        class Dispatcher(waitress.task.ThreadedTaskDispatcher):
            def __init__(self):
                super().__init__()
                self.held = collections.deque()  # open-route requests past the rate
                self.rate = TokenBucket(OPEN_ROUTE_RATE)
                self.lanes = TurnLanes(app.parts.throttle, caller)

            def add_task(self, task):  # a channel with a request in hand
                with self.lock:
                    if urgent(task) and self.lanes.hold(task):
                        return
                    if urgent(task):  # behind the other urgent ones, ahead of the rest
                        ahead = 0
                        while ahead < len(self.queue) and urgent(self.queue[ahead]):
                            ahead += 1
                        self.queue.insert(ahead, task)
                    elif self.rate.take():
                        self.queue.append(task)
                    else:
                        self.held.append(task)
                        return
                    self.queue_cv.notify()

            def release_held(self, everything=False):
                """Queue the held requests the rate allows now (all of them on the way out)."""
                with self.lock:
                    while self.held and (everything or self.rate.take()):
                        self.queue.append(self.held.popleft())
                        self.queue_cv.notify()

            def release_waiting(self, everything=False):
                """Queue each request whose turn came (all of them on the way out)."""
                with self.lock:
                    for channel in self.lanes.due(everything):
                        channel.turn = channel.requests[0] if channel.requests else None
                        self.queue.append(channel)
                        self.queue_cv.notify()

        dispatcher = Dispatcher()
        dispatcher.set_thread_count(self.config.threads)
        return dispatcher

    @staticmethod
    def urgent(channel):
        """True for a request on a route that needs a login."""
        return bool(channel.requests) and channel.requests[0].path not in OPEN_PATHS

    @staticmethod
    def caller(channel, trusted_proxies):
        """(address, user name) of the request a channel has in hand, as the
        throttle keys them."""
        request = channel.requests[0]
        name = basic_credentials(request.headers.get("AUTHORIZATION", ""))[0]
        if channel.peer_uid is not None:
            return f"uid:{channel.peer_uid}", name
        forwarded = request.headers.get("X_FORWARDED_FOR", "")
        return forwarded_for(channel.addr[0], forwarded, trusted_proxies), name

    @staticmethod
    def maintain(listener, waitress_maintenance, request_timeout, now):
        """Every second: waitress's own clean-up, then close what holds connections for nothing.

        A request that has not arrived whole within request_timeout is closed,
        however it dribbles (waitress's channel_timeout restarts at every byte).
        Past 90% of the connection limit, the keep-alive connections idle longest
        are closed to make room.
        """
        waitress_maintenance(now)
        listener.task_dispatcher.release_held()
        listener.task_dispatcher.release_waiting()
        late = time.monotonic() - request_timeout
        channels = list(listener.active_channels.values())
        for channel in channels:
            if (
                channel.began is not None
                and channel.began < late
                and not channel.requests
            ):
                channel.will_close = True
        room = len(listener._map) - listener.adj.connection_limit * 9 // 10
        if room > 0:
            quiet = time.time() - 1.0  # answered a second ago at least: read by now
            idle = [
                c
                for c in channels
                if c.began is None
                and not WaitressServer.is_busy(c)
                and c.last_activity < quiet
            ]
            for channel in sorted(idle, key=lambda c: c.last_activity)[:room]:
                channel.will_close = True

    @staticmethod
    def is_busy(channel):
        """True for a waitress connection with a request in hand or an answer unsent."""
        return bool(getattr(channel, "requests", None)) or bool(
            getattr(channel, "total_outbufs_len", 0)
        )


class TokenBucket:
    """At most rate takes a second, on average; as many at once after a quiet spell."""

    def __init__(self, rate):
        self.rate, self.tokens, self.filled = rate, float(rate), time.monotonic()

    def take(self):
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.filled) * self.rate)
        self.filled = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class TurnLanes:
    """Requests for users in the throttle's slow lane, held until their turn: one
    held per address (another from it goes on at once, to its 429), addresses in
    the order they came, one a second for each user. caller(request) says who
    asks for whom: (address, user name)."""

    def __init__(self, throttle, caller):
        self.throttle, self.caller = throttle, caller
        self.waiting = {}  # user name -> {address: request}, oldest first

    def hold(self, request):
        """True if request waits its turn (and is kept here until due() gives it)."""
        address, name = self.caller(request)
        if name is None or not self.throttle.slow(address, name):
            return False
        lane = self.waiting.setdefault(name, {})
        if address in lane:
            return False
        lane[address] = request
        return True

    def due(self, everything=False):
        """The requests whose turn it is now: the next of each user (all of them)."""
        found = []
        for name, lane in list(self.waiting.items()):
            while lane and (everything or self.throttle.turn(name)):
                found.append(lane.pop(next(iter(lane))))
                if not everything:
                    break
            if not lane:
                del self.waiting[name]
        return found


class WsgirefServer:
    """The fallback, without waitress: the standard library's WSGI server, with
    a fixed pool of threads per socket."""

    def __init__(self, config):
        self.config = (
            config  # what it reads (threads, limits, timeouts) needs a restart
        )

    def serve(self, app, sockets, signals):
        """Serve app on the sockets until a stop signal, then finish what is in hand."""
        from wsgiref import simple_server

        config = self.config

        class Handler(simple_server.WSGIRequestHandler):
            timeout = config.channel_timeout

            def setup(self):
                super().setup()
                deadline = time.monotonic() + config.request_timeout
                self.rfile.close()  # read through one that keeps the request's deadline
                self.rfile = io.BufferedReader(
                    DeadlineReader(self.connection, deadline)
                )
                self.peer_uid = None
                if self.connection.family == socket.AF_UNIX:
                    self.client_address = ("localhost", 0)
                    self.peer_uid = peer_uid(self.connection)

            def get_environ(self):
                environ = super().get_environ()
                if self.peer_uid is not None:
                    environ[PEER_UID] = self.peer_uid
                return environ

            def log_message(self, *args):  # the app logs each request itself
                pass

        workers = config.threads + config.max_waiters
        servers = [
            wsgiref_server(
                sock,
                app,
                Handler,
                workers,
                UNIX_RESERVE
                if sock.family == socket.AF_UNIX
                else config.connection_limit,
            )
            for sock in sockets
        ]
        for server in servers:
            threading.Thread(
                target=server.serve_forever, args=(0.5,), daemon=True
            ).start()
        announce(sockets)
        run_until_stopped(lambda: time.sleep(0.5), app, signals)
        for server in servers:
            server.shutdown()  # accept no more
        app.close()  # requests that wait for smsd answer now
        deadline = time.monotonic() + STOP_GRACE
        for server in servers:
            server.finish(deadline)  # the requests in progress and those accepted
        return 0


class DeadlineReader(io.RawIOBase):
    """A socket read until one deadline, however slowly its bytes come.

    wsgiref's timeout counts per read, so a client sending a byte at a time
    would hold a worker for ever; this one counts for the whole request.
    """

    def __init__(self, sock, deadline):
        super().__init__()
        self.sock, self.deadline = sock, deadline

    def readable(self):
        return True

    def readinto(self, buffer):
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request_timeout passed")
        self.sock.settimeout(remaining)
        return self.sock.recv_into(buffer)


def wsgiref_server(sock, app, handler, workers, waiting):
    """A wsgiref server on a socket that is already listening, with a fixed pool.

    workers threads serve the accepted connections; at most `waiting` more
    wait for one, and a connection past that is closed at once.
    """
    import queue
    import socketserver
    from wsgiref import simple_server

    class Server(simple_server.WSGIServer):
        def __init__(self):
            socketserver.BaseServer.__init__(self, sock.getsockname(), handler)
            self.socket = sock
            self.server_name, self.server_port = "localhost", 0  # unix: no port
            if sock.family != socket.AF_UNIX:
                self.server_port = self.server_address[1]
            self.setup_environ()
            self.set_app(app)
            self.accepted = queue.Queue(waiting)
            self.workers = [
                threading.Thread(target=pool_worker, args=(self,), daemon=True)
                for _ in range(workers)
            ]
            for worker in self.workers:
                worker.start()

        def process_request(self, request, client_address):
            try:
                self.accepted.put_nowait((request, client_address))
            except queue.Full:  # past connection_limit
                self.shutdown_request(request)

        def finish(self, deadline):
            """Serve what was accepted, then stop the workers (by deadline at the latest)."""
            for _ in self.workers:
                with contextlib.suppress(queue.Full):
                    self.accepted.put(
                        None, timeout=max(0.01, deadline - time.monotonic())
                    )
            for worker in self.workers:
                worker.join(max(0.0, deadline - time.monotonic()))
            self.server_close()

    return Server()


def pool_worker(server):
    """One of wsgiref_server's workers: serve what it accepted until told to stop (None)."""
    while True:
        accepted = server.accepted.get()
        if accepted is None:
            return
        try:
            server.finish_request(*accepted)
        except (TimeoutError, ConnectionError) as exc:  # a slow or gone client
            log.info("closed %s: %s", accepted[1] or "a unix client", one_line(exc))
        except Exception:  # noqa: BLE001 (as socketserver does: ends one connection)
            server.handle_error(*accepted)
        finally:
            server.shutdown_request(accepted[0])


###############################################################################
# Command line ################################################################
###############################################################################


def main(argv=None):
    """Run what the command line asks for; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # The server's own command line is read by hand: argparse, and all it
    # imports, would stay in memory for as long as the server runs.
    if not argv or len(argv) == 2 and argv[0] == "--config":
        return run_server(find_config(argv[-1] if argv else None))
    args = parse_arguments(argv)
    if args.command == "hash-password":
        return hash_password_command()
    if args.command == "new-webhook-secret":
        print("whsec_" + base64.b64encode(os.urandom(32)).decode())
        return 0
    if args.command == "add-user":
        return add_user_command(
            args.name, args.admin, find_config(args.user_config or args.config)
        )
    if args.command in ("add-token", "remove-token"):
        path = find_config(args.token_config or args.config)
        if args.command == "add-token":
            return add_token_command(args.name, path)
        return remove_token_command(args.name, args.token, path)
    if args.command == "check-smsd":
        return check_smsd_command(find_config(args.smsd_config or args.config))
    if args.command == "check-config":
        path = find_config(args.check_config or args.config)
        config = config_or_problems(path)
        if config is None:
            return EX_CONFIG
        print(
            f"{path}: ok ({len(config.users)} users, {len(config.webhooks)} webhooks)"
        )
        return 0
    return run_server(find_config(args.config))


def parse_arguments(argv):
    import argparse

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
    commands.add_parser(
        "new-webhook-secret",
        help="print a fresh secret for a [webhook:NAME] section (32 random bytes)",
    )
    add = commands.add_parser(
        "add-user",
        help="add a user (or give one a new password) in the config the server uses",
    )
    add.add_argument("name", help="the API user name")
    add.add_argument(
        "--admin", action="store_true", help="may see and cancel everything"
    )
    add.add_argument("--config", dest="user_config", help="INI file to change")
    token = commands.add_parser(
        "add-token",
        help="print a new access token of a user (its digest goes in the config)",
    )
    token.add_argument("name", help="the API user name")
    token.add_argument("--config", dest="token_config", help="INI file to change")
    untoken = commands.add_parser("remove-token", help="remove one token of a user")
    untoken.add_argument("name", help="the API user name")
    untoken.add_argument("token", help="the token, or its first characters (tk_xxxx)")
    untoken.add_argument("--config", dest="token_config", help="INI file to change")
    check = commands.add_parser(
        "check-config", help="validate the config and spool, exit 0 or 78"
    )
    check.add_argument("--config", dest="check_config", help="INI file to check")
    smsd = commands.add_parser(
        "check-smsd",
        help="read the smsd.conf smsapi uses, name what is missing or disagrees; exit 0 or 1",
    )
    smsd.add_argument("--config", dest="smsd_config", help="smsapi's INI file")
    return parser.parse_args(argv)


def config_or_problems(path):
    """The config at path; or None, with every problem printed on stderr."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def check_smsd_command(path):
    """Print each setting of smsd.conf that smsapi misses; 1 if one is a problem."""
    config = config_or_problems(path)
    if config is None:
        return EX_CONFIG
    if "conf" not in config.smsd:
        print(
            f"{path}: [spool] smsd_conf names no smsd.conf that could be read",
            file=sys.stderr,
        )
        return 1
    try:
        advice = smsd_advice(config)
    except OSError as exc:
        print(f"{config.smsd['conf']}: cannot read: {one_line(exc)}", file=sys.stderr)
        return 1
    for grade, setting, what in advice:
        print(f"{config.smsd['conf']}: {grade}: {setting}: {what}")
    if not advice:
        print(f"{config.smsd['conf']}: ok")
    return 1 if any(grade == "problem" for grade, _, _ in advice) else 0


def run_server(path):
    """Serve with the config at path, or exit 78 when it has problems."""
    config = config_or_problems(path)
    if config is None:
        return EX_CONFIG
    setup_logging()
    return serve(config)


def hash_password_command():
    """Read one password line (no echo on a terminal), print its hash."""
    password = read_password(confirm=False)
    if not password:
        print("hash-password: empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def read_password(confirm):
    """A password: asked (twice if confirm) on a terminal, else stdin's first line."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    import getpass

    password = getpass.getpass("Password: ")
    if confirm and password and getpass.getpass("Again: ") != password:
        print("the two passwords differ", file=sys.stderr)
        return ""
    return password


def add_user_command(name, admin, path):
    """Add [user:NAME] to the config at path, or give it a new password; comments stay.

    Through a symlink it writes the file the link points to; add-users run at
    once take turns; a config every local user could read is made 0640 (it
    holds a password hash now). The running server reads the changed file
    within two seconds.
    """
    if not USER_NAME.fullmatch(name):
        print(
            f"add-user: {name!r} is not a user name ({USER_NAME.pattern})",
            file=sys.stderr,
        )
        return 2
    password = read_password(confirm=True)
    if not password:
        print("add-user: no password given", file=sys.stderr)
        return 1
    path = os.path.realpath(path)
    try:
        with locked_directory(path):
            with open(path, encoding="utf-8") as file:
                text = file.read()
            changed, existed = with_user(text, name, hash_password(password), admin)
            replace_keeping_mode(path, changed.encode(), private=True)
    except OSError as exc:
        print(
            f"add-user: cannot change {path}: {one_line(exc)} (sudo?)", file=sys.stderr
        )
        return EX_CONFIG if exc.errno in (errno.ENOENT, errno.EISDIR) else 1
    print(f"{path}: user {name} {'updated' if existed else 'added'}")
    return 0


@contextlib.contextmanager
def locked_directory(path):
    """Hold the lock of the directory of path: one add-user at a time in it."""
    import fcntl

    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def find_section(lines, header):
    """(first line, end) of the section [header] among lines, or None. A header
    may carry a comment; a commented-out section is not one."""
    headers = [i for i, line in enumerate(lines) if SECTION_HEADER.fullmatch(line)]
    start = next(
        (i for i in headers if SECTION_HEADER.fullmatch(lines[i]).group(1) == header),
        None,
    )
    if start is None:
        return None
    return start, next((i for i in headers if i > start), len(lines))


def with_user(text, name, password_hash, admin):
    """(the config text with [user:NAME]'s password, and admin, set, all else as it
    was; whether the section was there)."""
    lines, header = text.splitlines(), f"user:{name}"
    found = find_section(lines, header)
    if found is None:
        settings = [f"[{header}]", "password = " + password_hash] + (
            ["admin = yes"] if admin else []
        )
        return text.rstrip("\n") + "\n\n" + "\n".join(settings) + "\n", False
    start, end = found
    section = [
        line for line in lines[start + 1 : end] if not setting_of(line, "password")
    ]
    if admin:
        section = [line for line in section if not setting_of(line, "admin")] + [
            "admin = yes"
        ]
    lines[start + 1 : end] = ["password = " + password_hash, *section]
    return "\n".join(lines) + "\n", True


def with_tokens(text, name, change):
    """(the config text with [user:NAME] tokens = change(the tokens it had), all
    else as it was (the section is made if there is none); what change made)."""
    lines, header = text.splitlines(), f"user:{name}"
    found = find_section(lines, header)
    if found is None:
        lines += ["", f"[{header}]"]
        found = (len(lines) - 1, len(lines))
    start, end = found
    at = next(
        (i for i in range(start + 1, end) if setting_of(lines[i], "tokens")), None
    )
    before = lines[at].partition("=")[2].split() if at is not None else []
    tokens = change(before)
    if tokens == before:
        return text, tokens
    setting = ["tokens = " + " ".join(tokens)] if tokens else []
    if at is None:
        lines[start + 1 : start + 1] = setting
    else:
        lines[at : at + 1] = setting
    return "\n".join(lines) + "\n", tokens


def token_entry(token):
    """What the config keeps of a token: its first characters, and its digest."""
    digest = sha256(token.encode("utf-8", "replace")).hexdigest()
    return f"{token[:TOKEN_SHOWN]}:{digest}"


def add_token_command(name, path):
    """Make a token for user NAME (the section too, if there is none), keep its
    digest in the config, and print the token: the one time it is shown."""
    import secrets

    if not USER_NAME.fullmatch(name):
        print(f"add-token: {name!r} is not a user name", file=sys.stderr)
        return 2
    letters = string.ascii_letters + string.digits
    token = "tk_" + "".join(secrets.choice(letters) for _ in range(29))
    code = edit_tokens(path, name, lambda tokens: [*tokens, token_entry(token)])
    if code == 0:
        print(token)
        print(f"token {token[:TOKEN_SHOWN]}... added for user {name}", file=sys.stderr)
    return code


def remove_token_command(name, given, path):
    """Remove one of user NAME's tokens, named by itself or its first characters."""
    removed = []

    def without(tokens):
        if TOKEN.fullmatch(given):
            chosen = [t for t in tokens if t == token_entry(given)]
        else:
            named = given.startswith("tk_") and len(given) >= TOKEN_SHOWN
            chosen = [t for t in tokens if named and t.startswith(given)]
        if len(chosen) == 1:
            removed.append(chosen[0])
            return [t for t in tokens if t != chosen[0]]
        return tokens

    code = edit_tokens(path, name, without)
    if code == 0 and not removed:
        print(f"remove-token: user {name} has no one token {given[:TOKEN_SHOWN]}...",
              file=sys.stderr)  # fmt: skip
        return 1
    if code == 0:
        print(f"token {removed[0].partition(':')[0]}... of user {name} removed")
    return code


def edit_tokens(path, name, change):
    """Rewrite [user:NAME] tokens of the config at path as add-user rewrites it."""
    path = os.path.realpath(path)
    try:
        with locked_directory(path):
            with open(path, encoding="utf-8") as file:
                text = file.read()
            changed, _ = with_tokens(text, name, change)
            if changed != text:
                replace_keeping_mode(path, changed.encode(), private=True)
    except OSError as exc:
        print(f"cannot change {path}: {one_line(exc)} (sudo?)", file=sys.stderr)
        return EX_CONFIG if exc.errno in (errno.ENOENT, errno.EISDIR) else 1
    return 0


def setting_of(line, key):
    """True if an INI line sets key."""
    name, separator, _ = line.partition("=")
    return bool(separator) and name.strip().lower() == key


def replace_keeping_mode(path, data, private=False):
    """Write data over path durably (write_files), with the file's owner, group
    and mode kept; private: without what the mode gave every other user."""
    status = os.stat(path)
    mode = stat.S_IMODE(status.st_mode) & (~0o007 if private else 0o7777)
    directory, name = os.path.split(path)
    owner = (status.st_uid, status.st_gid)
    write_files(directory or ".", {name: data}, True, mode, owner=owner)


if __name__ == "__main__":
    sys.exit(main())
