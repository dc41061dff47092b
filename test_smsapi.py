"""Tests for smsapi.py, in the module's order, then live servers and the real smsd.

Unit tests call the WSGI app through wsgiref.validate with a real temporary
spool. Live tests start the daemon on an ephemeral loopback port. The
end-to-end tests run Debian's smsd against a GSM modem emulated on loopback.
"""

import ast
import base64
import collections
import concurrent.futures
import contextlib
import errno
import grp
import hashlib
import html.parser
import http.client
import io
import itertools
import json
import math
import os
import pathlib
import pwd
import random
import re
import shutil
import signal
import socket
import stat
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

import hypothesis
import hypothesis.strategies as st
import pytest

import fakemodem
import smsapi
from fakemodem import ModemEmulator, deliver_parts, deliver_pdu, on_air_text

pytestmark = pytest.mark.filterwarnings("error")

HERE = os.path.dirname(os.path.abspath(__file__))
PASSWORDS = {
    "quiet": "quiet-pass",
    "lvv": "SecretPAss",
    "ann": "ann-pass",
    "root": "r00t-pass",
    "inbox": "in-pass",
    "night": "night-pass",
}
#: Hashes of the lowest cost (N = 2^10): a login costs a millisecond, not 50.
HASHES = {name: smsapi.hash_password(pw, ln=10) for name, pw in PASSWORDS.items()}


###############################################################################
# Helpers ######################################################################
###############################################################################


def make_spool(root):
    """Create smsd's five spool directories under root; return {kind: path}."""
    kinds = [kind for kind in smsapi.KINDS if kind != "scheduled"]  # smsapi's own
    spool = {kind: os.path.join(str(root), "spool", kind) for kind in kinds}
    for path in spool.values():
        os.makedirs(path, exist_ok=True)
    return spool


def write_ini(root, spool, listen="127.0.0.1:0", extra="", smsd_conf=""):
    """An INI file with the test users over spool; returns its path.

    smsd_conf is empty unless given, so this machine's /etc/smsd.conf stays out.
    """
    state = os.path.join(str(root), "state")
    lines = ["[server]", "listen = " + listen, "state_dir = " + state, extra]
    lines += ["[spool]", "smsd_conf = " + smsd_conf]
    lines += [f"{kind} = {path}" for kind, path in spool.items()]
    lines += [
        "[user:lvv]",
        "password = " + HASHES["lvv"],
        "mobiles = 7968* 79160000000",
        "[user:ann]",
        "password = " + HASHES["ann"],
        "[user:root]",
        "password = " + HASHES["root"],
        "admin = yes",
        "[user:inbox]",
        "password = " + HASHES["inbox"],
        "inbox = yes",
    ]
    path = os.path.join(str(root), "smsapi.ini")
    with open(path, "w") as file:
        file.write("\n".join(lines) + "\n")
    return path


@pytest.fixture
def spool(tmp_path):
    return make_spool(tmp_path)


@pytest.fixture
def config(tmp_path, spool):
    return smsapi.load_config(write_ini(tmp_path, spool, extra="queues = fast slow"))


@pytest.fixture
def app(config):
    app = smsapi.Application(config)
    yield app
    app.close()


def auth(user):
    token = base64.b64encode((f"{user}:{PASSWORDS[user]}").encode()).decode()
    return "Basic " + token


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body.decode("utf-8"))


def call(
    app,
    method,
    path,
    body=None,
    user=None,
    headers=None,
    query="",
    remote_addr="127.0.0.1",
    environ=None,
):
    """Run one request through the app, checked by wsgiref's validator."""
    environ = {
        **(environ or {}),
        "REMOTE_ADDR": remote_addr,
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": query,
    }
    headers = dict(headers or {})
    if user:
        headers.setdefault("Authorization", auth(user))
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    body = body or b""
    if body or method in ("POST", "PUT"):
        environ["CONTENT_LENGTH"] = str(len(body))
    for name, value in headers.items():
        key = name.upper().replace("-", "_")
        environ[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key] = (
            value
        )
    environ["wsgi.input"] = io.BytesIO(body)
    setup_testing_defaults(environ)
    captured = {}

    def start_response(status, response_headers, exc_info=None):
        captured["status"] = int(status.split()[0])
        captured["headers"] = dict(response_headers)

    result = validator(app)(environ, start_response)
    try:
        data = b"".join(result)
    finally:
        result.close()
    return Response(captured["status"], captured["headers"], data)


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def post_send(app, body=None, user=None, headers=None, query=""):
    """POST to the send route; body, user, headers and query as for call()."""
    return call(app, "POST", "/api/v1.0/sms/outgoing", body, user, headers, query)


def send(app, mobiles, text="Hi, Jack!", user="lvv", **fields):
    return post_send(app, {"mobiles": mobiles, "text": text, **fields}, user)


def wait_until(predicate, timeout=20, what="a condition"):
    """predicate()'s first true value within timeout seconds; else the test fails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


class ManualClock(smsapi.Clock):
    """Time that moves only when the test says so. A wait longer than a second
    lasts until what it waits on is set (or notified), or until advance() has
    moved the time past its end: a thread nobody wakes sleeps its whole time,
    as it would. A shorter one (a loop that looks again soon, as the
    watcher's tick) ends after a real moment, or when woken."""

    def __init__(self):
        self.now = time.time()
        self.lock = threading.Lock()
        self.sleepers = {}  # thread ident -> what it waits on, in a long wait

    def time(self):
        return self.now

    def monotonic(self):
        return self.now

    def wait(self, waitable, seconds):
        if seconds is not None and seconds <= 1:
            return waitable.wait(0.05 if seconds > 0 else 0)
        deadline = math.inf if seconds is None else self.now + seconds
        with self.lock:
            self.sleepers[threading.get_ident()] = waitable
        try:  # looks again every 20 ms of real time: at the waitable, and the time
            while self.now < deadline:
                if waitable.wait(0.02):
                    return True
            return False
        finally:
            with self.lock:
                self.sleepers.pop(threading.get_ident(), None)

    def advance(self, seconds):
        with self.lock:
            self.now += seconds

    def asleep(self, threads):
        """Whether each of threads is in a long wait: time advanced before it
        began would not count for it."""
        with self.lock:
            return {t.ident for t in threads} <= self.sleepers.keys()


@pytest.fixture
def clock():
    return ManualClock()


def spool_snapshot(spool):
    """Every file name and content under the spool, to prove nothing changed."""
    snapshot = {}
    for kind, path in spool.items():
        for name in os.listdir(path):
            with open(os.path.join(path, name), "rb") as file:
                snapshot[kind, name] = file.read()
    return snapshot


def put_file(spool, kind, name, headers, text="hello", alphabet=None):
    """Write a spool file as smsd would leave it."""
    lines = ["{}: {}".format(*item) for item in headers.items()]
    body = text.encode("utf-16-be") if alphabet == "UCS2" else text.encode("utf-8")
    if alphabet:
        lines.append("Alphabet: " + alphabet)
    path = os.path.join(spool[kind], name)
    with open(path, "wb") as file:
        file.write(("\n".join(lines) + "\n\n").encode() + body)
    return path


def module_sections():
    """[(banner title, first line)] of smsapi.py, and its syntax tree."""
    with open(smsapi.__file__, encoding="utf-8") as file:
        source = file.read()
    lines = source.splitlines()
    sections = [
        (re.sub(r" #+$", "", lines[n][2:]), n + 1)
        for n in range(1, len(lines) - 1)
        if lines[n - 1] == lines[n + 1] == "#" * 79 and lines[n].startswith("# ")
    ]
    return sections, ast.parse(source)


def test_module_sections_use_only_what_stands_above_them():
    sections, tree = module_sections()
    assert [title for title, _ in sections] == [
        "Imports", "Constants", "Errors", "Logging helpers", "The clock", "Passwords",
        "Options", "Loading the config", "Spool files", "Durable writes and journals", "HTTP helpers",
        "Authentication", "GSM and UCS2 encoding", "Spool changes", "Delivery reports",
        "The inbox", "Retention", "Recent messages", "Waiters", "Scheduled messages",
        "Budgets", "Reading messages", "Sending", "ntfy and Gotify", "Webhooks",
            "Pages and replies",
            "Alerts and heartbeats",
        "Health and metrics", "The status page", "The watcher", "The composition root", "Routes",
        "OpenAPI document", "Application", "Server adapters", "Command line",
    ]  # fmt: skip

    def section_of(node):
        return sum(1 for _, start in sections if start <= node.lineno)

    defined = {}
    for node in tree.body:
        targets = [node] if hasattr(node, "name") else getattr(node, "targets", [])
        for target in targets:
            for name in (
                [target.name]
                if hasattr(target, "name")
                else [n.id for n in ast.walk(target) if isinstance(n, ast.Name)]
            ):
                defined.setdefault(name, section_of(node))
    ahead = {
        (getattr(node, "name", node.lineno), used.id)
        for node in tree.body
        for used in ast.walk(node)
        if isinstance(used, ast.Name) and defined.get(used.id, 0) > section_of(node)
    }
    assert not ahead, f"used before the section that defines it: {sorted(ahead)}"
    longest = max(
        (node.end_lineno - node.lineno + 1, node.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef)
    )
    assert longest[0] < 60, longest


###############################################################################
# Configuration ################################################################
###############################################################################


def shipped_config():
    """smsapi.ini as this checkout shipped it: a user's own edits (add-user) left out."""
    shown = subprocess.run(
        ["git", "-C", HERE, "show", "HEAD:smsapi.ini"],
        capture_output=True,
        text=True,
        check=False,
    )
    if shown.returncode == 0:
        return shown.stdout
    with open(os.path.join(HERE, "smsapi.ini")) as file:  # not a git checkout
        return file.read()


def test_config_shipped_file_is_loopback_with_no_users(tmp_path, spool):
    smsd_conf = tmp_path / "smsd.conf"  # the spool comes from smsd's config
    smsd_conf.write_text("".join(f"{k} = {path}\n" for k, path in spool.items()))
    text = shipped_config().replace(
        ";smsd_conf = /etc/smsd.conf", f"smsd_conf = {smsd_conf}"
    )
    text = text.replace("/var/lib/smsapi", str(tmp_path / "state"))
    path = tmp_path / "shipped.ini"
    path.write_text(text)
    config = smsapi.load_config(str(path))
    assert config.users == {}
    assert config.listen == ("127.0.0.1:5000",)
    assert config.spool == dict(spool, scheduled=str(tmp_path / "state" / "scheduled"))


SHIPPED_LIKE = """; smsapi configuration
[server]
listen = 127.0.0.1:5000   ; loopback only

[user:lvv]
; the on-call phone
password = old-hash
mobiles = 7968*

[spool]
smsd_conf =
"""


def test_config_with_user_keeps_comments_and_other_settings():
    added, existed = smsapi.with_user(SHIPPED_LIKE, "cron", "new-hash", admin=False)
    assert added.startswith(SHIPPED_LIKE.rstrip("\n")) and not existed
    assert added.endswith("\n[user:cron]\npassword = new-hash\n")
    changed, existed = smsapi.with_user(SHIPPED_LIKE, "lvv", "new-hash", admin=True)
    assert existed
    assert "; the on-call phone" in changed and "mobiles = 7968*" in changed
    assert "old-hash" not in changed and changed.count("password = new-hash") == 1
    section = changed.split("[user:lvv]")[1].split("[spool]")[0]
    assert "admin = yes" in section
    assert changed.split("[spool]")[1] == SHIPPED_LIKE.split("[spool]")[1]


def add_user(path, name, password, *options):
    return subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "smsapi.py"),
            "add-user",
            name,
            "--config",
            str(path),
            *options,
        ],
        input=password + "\n",
        capture_output=True,
        text=True,
        check=False,
    )


def test_add_user_command_writes_a_hash_the_server_accepts(tmp_path, spool):
    path = write_ini(tmp_path, spool)
    os.chmod(path, 0o640)
    result = add_user(path, "newbie", "first-password", "--admin")
    assert result.returncode == 0 and "user newbie added" in result.stdout
    assert "first-password" not in pathlib.Path(path).read_text()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640  # kept
    config = smsapi.load_config(path)
    assert config.users["newbie"].admin
    assert add_user(path, "newbie", "second-password").returncode == 0  # a new password
    app = smsapi.Application(smsapi.load_config(path))
    good = basic("newbie", "second-password")
    assert call(app, "GET", "/api/v1.0/sms/sent/", headers=good).status == 200
    assert add_user(path, "bad name!", "x").returncode == 2
    assert add_user(path, "empty", "").returncode == 1
    assert "[user:empty]" not in pathlib.Path(path).read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_add_user_keeps_the_files_owner_group_and_mode(tmp_path, spool):
    path = write_ini(tmp_path, spool)
    nobody = pwd.getpwnam("nobody")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    os.chmod(path, 0o640)
    assert add_user(path, "newbie", "first-password").returncode == 0
    status = os.stat(path)
    assert (status.st_uid, status.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert stat.S_IMODE(status.st_mode) == 0o640
    assert "[user:newbie]" in pathlib.Path(path).read_text()


def test_live_a_user_added_while_the_server_runs_can_send_at_once(
    live, tmp_path, spool
):
    server = live()
    assert (
        f"config {tmp_path / 'smsapi.ini'}, 4 users" in server.output().splitlines()[0]
    )
    path = tmp_path / "smsapi.ini"
    assert add_user(path, "newbie", "its-password").returncode == 0
    added = time.monotonic()

    def sent():
        req = urllib.request.Request(
            server.url + "/api/v1.0/sms/outgoing",
            data=json.dumps({"mobiles": ["79680000000"], "text": "hello"}).encode(),
            headers={
                "Content-Type": "application/json",
                **basic("newbie", "its-password"),
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return response.status == 201
        except urllib.error.HTTPError:
            return False

    wait_until(sent, 5, "the new user to be let in")
    assert time.monotonic() - added < 2.5
    assert len(os.listdir(spool["outgoing"])) == 1


def test_config_file_change_is_told_once_whole(tmp_path, clock):
    path = tmp_path / "smsapi.ini"
    path.write_text("[server]\n[user:lvv]\n")
    watch = smsapi.ConfigFile(str(path), clock, settle=0.3)
    assert not watch.changed()
    with open(path, "w") as file:  # written in place: caught truncated, say
        assert not watch.changed()
        clock.advance(0.2)
        assert not watch.changed()  # still the same, but not for long enough
        file.write("[server]\n[user:lvv]\n[user:ann]\n")
    assert not watch.changed()  # it moved: its time starts again
    clock.advance(0.2)
    assert not watch.changed()
    clock.advance(0.2)
    assert watch.changed()  # stood still long enough: whole now
    assert watch.stood() >= 0.3
    assert not watch.changed()
    replacement = tmp_path / "new.ini"
    replacement.write_text("[server]\n[user:ann]\n")
    os.replace(replacement, path)  # replaced whole (add-user): told at once
    assert watch.changed() and not watch.changed()


def reload_after(app, path, text, stood):
    """Write text over the config in place, and reload it as the file watcher
    would once it stood that long: True, False (refused), or None (not yet)."""
    with open(path, "w") as file:
        file.write(text)
    return app.reload(path, stood=stood)


def test_config_reload_that_drops_or_widens_waits_for_a_file_that_stood(
    tmp_path, spool, caplog
):
    path = write_ini(tmp_path, spool)
    app = smsapi.Application(smsapi.load_config(path))
    whole = pathlib.Path(path).read_text()
    half = whole[: whole.index("mobiles = 7968*")]  # a writer paused before the line
    assert reload_after(app, path, half, stood=2) is None
    assert app.config.users["lvv"].mobiles == ("7968*", "79160000000")
    assert "drops [user:ann]" in caplog.text and "lets [user:lvv] send to" in caplog.text
    assert send(app, ["79001234567"]).status == 403  # lvv's rights have not widened
    assert reload_after(app, path, whole.replace("7968* ", ""), stood=2)  # narrows
    assert app.config.users["lvv"].mobiles == ("79160000000",)
    assert reload_after(app, path, half, stood=10) is True  # it stood: meant so
    assert "ann" not in app.config.users
    assert app.reload(path) is True  # SIGHUP: the operator says it is whole


@pytest.mark.parametrize("value", ["", "  "])
def test_config_an_empty_allow_list_is_an_error_and_star_means_any(
    tmp_path, spool, value
):
    extra = f"\n[user:wide]\npassword = {HASHES['lvv']}\nmobiles ="
    problems = config_problems(write_ini(tmp_path, spool), extra + value)
    assert any("[user:wide] mobiles: empty: write `mobiles = *`" in p for p in problems)
    path = write_ini(tmp_path, spool, extra=extra + " *")
    app = smsapi.Application(smsapi.load_config(path))
    body = {"mobiles": ["79001234567"], "text": "any number"}
    assert post_send(app, body, headers=basic("wide", PASSWORDS["lvv"])).status == 201


def test_add_user_finds_a_section_whose_header_has_a_comment(tmp_path, spool):
    path = write_ini(tmp_path, spool)
    with open(path, "a") as file:
        file.write("[user:ops]   ; the on-call scripts\npassword = " + HASHES["ann"] + "\n")
    result = add_user(path, "ops", "new-pass")
    assert result.returncode == 0 and "user ops updated" in result.stdout
    assert pathlib.Path(path).read_text().count("[user:ops]") == 1
    config = smsapi.load_config(path)
    assert smsapi.Authenticator().check(config.users, "ops", "new-pass")


def test_add_user_says_added_and_leaves_a_commented_example_alone(tmp_path, spool):
    path = write_ini(tmp_path, spool)
    with open(path, "a") as file:
        file.write(";[user:newbie]\n;password = $scrypt$...\n")
    result = add_user(path, "newbie", "pass")
    assert result.returncode == 0 and "user newbie added" in result.stdout
    text = pathlib.Path(path).read_text()
    assert ";[user:newbie]\n;password = $scrypt$...\n" in text
    assert "newbie" in smsapi.load_config(path).users


def test_add_user_through_a_symlink_writes_the_file_it_points_to(tmp_path, spool):
    real = write_ini(tmp_path, spool)
    link = tmp_path / "link.ini"
    link.symlink_to(real)
    assert add_user(str(link), "newbie", "pass").returncode == 0
    assert link.is_symlink() and "[user:newbie]" in pathlib.Path(real).read_text()


def test_add_user_eight_at_once_keep_all_eight(tmp_path, spool):
    path = write_ini(tmp_path, spool)
    command = [sys.executable, os.path.join(HERE, "smsapi.py"), "add-user"]
    runs = [
        subprocess.Popen(
            [*command, f"user{n}", "--config", path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(8)
    ]
    for run in runs:  # all of them read, hash and write at once
        run.stdin.write("pass\n")
        run.stdin.close()
    for run in runs:
        assert run.wait(60) == 0
        run.stdout.close()
    users = smsapi.load_config(path).users
    assert {f"user{n}" for n in range(8)} <= set(users)


def test_config_readable_by_everyone_is_warned_of_and_add_user_closes_it(
    tmp_path, spool
):
    path = write_ini(tmp_path, spool)
    os.chmod(path, 0o644)
    server = Server(path, tmp_path)
    try:
        wait_until(lambda: "listening on" in server.output(), what="the start")
        assert f"{path} is readable by every local user" in server.output()
    finally:
        server.stop()
    assert add_user(path, "newbie", "pass").returncode == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_unit_runs_nothing_but_python_and_the_shell():
    """Every command of the unit is in every Debian root, a minimal one too: no
    /bin/kill (procps), which systemd-analyze verify wants to find."""
    with open(os.path.join(HERE, "smsapi.service")) as file:
        commands = re.findall(r"^Exec\w+=(\S+)", file.read(), re.MULTILINE)
    assert commands and set(commands) <= {"/usr/bin/python3", "/bin/sh"}, commands


def test_install_script_places_files_and_keeps_the_config(tmp_path):
    root = tmp_path / "root"

    def install():
        return subprocess.run(
            ["sh", os.path.join(HERE, "install.sh")],
            env={**os.environ, "DESTDIR": str(root)},
            capture_output=True,
            text=True,
            check=False,
        )

    run = install()
    if os.geteuid() != 0:
        assert run.returncode == 1 and "run it as root" in run.stderr
        return
    assert run.returncode == 0, run.stderr
    ini = root / "etc/smsapi/smsapi.ini"
    modes = {
        "usr/local/lib/smsapi/smsapi.py": 0o644,
        "usr/local/share/doc/smsapi/README.md": 0o644,
        "etc/systemd/system/smsapi.service": 0o644,
        "etc/smsapi": 0o750,
        "etc/smsapi/smsapi.ini": 0o640,
    }
    assert {p: stat.S_IMODE(os.stat(root / p).st_mode) for p in modes} == modes
    # compiled for the unit's python3 -m smsapi, current with the source
    lib = root / "usr/local/lib/smsapi"
    cached = subprocess.run(
        ["/usr/bin/python3", "-B", "-c", "import smsapi; print(smsapi.__cached__)"],
        cwd=lib,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with open(cached, "rb") as pyc:  # header: magic, flags, source mtime and size
        header = pyc.read(16)
    source = os.stat(lib / "smsapi.py")
    assert header[8:16] == struct.pack("<II", int(source.st_mtime), source.st_size)
    with open(os.path.join(HERE, "smsapi.service")) as file:
        assert (root / "etc/systemd/system/smsapi.service").read_text() == file.read()
    ini.write_text(ini.read_text() + "[user:cron]\nunix_users = root\n")
    again = install()
    assert again.returncode == 0 and f"kept {ini}" in again.stdout
    assert ini.read_text().endswith("[user:cron]\nunix_users = root\n")


def test_config_reads_every_option(config, spool):
    assert config.spool == dict(spool, scheduled=config.state_dir + "/scheduled")
    assert config.queues == ("fast", "slow")
    assert config.users["lvv"].mobiles == ("7968*", "79160000000")
    assert config.users["root"].admin and not config.users["lvv"].admin
    assert config.users["inbox"].inbox


def ini_settings(text):
    """{(section, key): value} of every setting of an INI text, commented out or
    not; keys of the example [user:NAME] sections count as section "user"."""
    settings, section = {}, None
    for line in text.splitlines():
        if line.startswith("; "):
            continue  # a comment; ";key = value" is a setting commented out
        line = line.lstrip(";")
        header = re.fullmatch(r"\[(\w+)(?::[\w.-]+)?\]", line)
        if header:
            section = header.group(1)
        elif section and re.fullmatch(r"[a-z_]+ = .*", line):
            key, _, value = line.partition(" = ")
            settings.setdefault((section, key), value)
    return settings


def test_options_shipped_ini_shows_each_option_with_its_default():
    shown = ini_settings(shipped_config())
    options = {(o.section, o.key): o for o in smsapi.OPTIONS}
    assert set(shown) == set(options)
    for place, option in options.items():
        if option.default:  # else the file shows an example value
            assert shown[place] == option.default, place
            option.convert(option.default)  # the default reads as it is written


def options_table():
    """The README's option table, as the tests expect it from smsapi.OPTIONS."""
    rows = ["| section | key | default | meaning |", "| --- | --- | --- | --- |"]
    section = None
    for option in smsapi.OPTIONS:
        named = option.section in smsapi.NAMED_SECTIONS
        name = f"{option.section}:NAME" if named else option.section
        shown = f"`[{name}]`" if option.section != section else ""
        section = option.section
        default = {None: "(unset)", "": "(none)"}.get(option.default)
        meaning = option.help + (" *(restart)*" if option.restart else "")
        rows.append(
            f"| {shown} | `{option.key}` | {default or f'`{option.default}`'} | {meaning} |"
        )
    return "\n".join(rows) + "\n"


def test_options_readme_table_is_the_options_table():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as file:
        readme = file.read()
    assert options_table() in readme, "README's table should read:\n" + options_table()


def readme_outside_code():
    """README.md's lines, without those in fenced code blocks."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as file:
        lines, fenced = [], False
        for line in file.read().splitlines():
            fenced ^= line.startswith("```")
            if not fenced and not line.startswith("```"):
                lines.append(line)
    return lines


def anchor(heading):
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.lower().strip()).replace(" ", "-")


def test_readme_size_figures_for_operators_are_smsapis_own_limits():
    """Every size the README gives those who run smsapi is one of its limits,
    checked here; measurements belong to For contributors."""
    lines = readme_outside_code()
    operators = "\n".join(lines[: lines.index("## For contributors")])
    figures = set(re.findall(r"\b(\d[\d,.]*) ?(KB|KiB|MB|MiB|kB|GB)\b", operators))
    limits = {(str(smsapi.MAX_SPOOL_FILE >> 10), "KiB"), (str(smsapi.MAX_PAGE_READ >> 20), "MiB")}
    assert figures <= limits, sorted(figures - limits)


def test_readme_contents_list_every_section_and_every_link_lands():
    lines = readme_outside_code()
    sections = [line[3:] for line in lines if line.startswith("## ")]
    contents = [
        m.groups() for m in map(re.compile(r"- \[(.+)\]\(#(.+)\)").fullmatch, lines) if m
    ]
    assert [title for title, _ in contents] == sections
    assert all(link == anchor(title) for title, link in contents)
    headings = {anchor(line.lstrip("#")) for line in lines if line.startswith("#")}
    links = set(re.findall(r"\]\(#([^)]+)\)", "\n".join(lines)))
    assert links <= headings, sorted(links - headings)


def config_problems(path, appended=""):
    """What load_config says is wrong with the INI at path, once appended is added."""
    with open(path, "a") as file:
        file.write(appended)
    with pytest.raises(smsapi.ConfigError) as info:
        smsapi.load_config(path)
    return info.value.problems


def test_config_reports_every_problem_with_file_section_and_key(tmp_path, spool):
    spool = dict(spool, sent=str(tmp_path / "missing"))
    path = write_ini(tmp_path, spool, extra="fsync = maybe\nthreads = 0\ncolour = blue")
    found = config_problems(
        path,
        "[user:eve]\npassword = hunter2\n[user:bob]\nadmin = yes\n"
        "[user:amy]\npassword = $scrypt$ln=14,r=8,p=1$abc$def\nmobiles = 79x\n[extra]\n",
    )
    problems = "\n".join(found)
    expected = [
        "[server] fsync: expected yes or no",
        "[server] threads: expected a number of at least 1",
        "[server] colour: unknown option",
        "[user:eve] password: must be a hash from 'smsapi.py hash-password'",
        "[user:bob] password: missing",
        "[user:amy] password: malformed password hash",
        "[user:amy] mobiles: bad number pattern",
        "[extra]: unknown section",
        "[spool] sent: {} is not a directory".format(spool["sent"]),
    ]
    for line in expected:
        assert path + ": " + line in problems
    assert len(found) == len(expected)
    assert "hunter2" not in problems


def test_config_listen_forms():
    assert smsapi.as_listen("127.0.0.1:5000 [::1]:5000") == (
        "127.0.0.1:5000",
        "[::1]:5000",
    )
    for bad in ("5000", "::1:5000", "host:port", "127.0.0.1:70000", ""):
        with pytest.raises(ValueError):
            smsapi.as_listen(bad)


def test_config_unix_socket_listen():
    assert smsapi.as_listen("unix:/run/smsapi/smsapi.sock 127.0.0.1:5000") == (
        "unix:/run/smsapi/smsapi.sock",
        "127.0.0.1:5000",
    )
    for bad in ("unix:relative.sock", "unix:/" + "x" * 107):
        with pytest.raises(ValueError):
            smsapi.as_listen(bad)


def test_config_spool_defaults_come_from_smsd_conf(tmp_path, spool):
    conf = tmp_path / "smsd.conf"
    conf.write_text(
        "devices = GSM1\n# sent = /commented/out\n"
        f"outgoing = {spool['outgoing']}\nsent={spool['sent']}\n"
        f"failed = {spool['failed']}\nreport = {spool['incoming']}\n"
        "pidfile = /run/smstools/smsd.pid\nstats = /var/log/smstools/smsd_stats\n"
        "[GSM1]\nincoming = /a/modem/setting\n"
    )
    given = {kind: spool[kind] for kind in ("checked", "incoming")}
    config = smsapi.load_config(write_ini(tmp_path, given, smsd_conf=str(conf)))
    scheduled = os.path.join(str(tmp_path), "state", "scheduled")
    assert config.spool == dict(spool, report=spool["incoming"], scheduled=scheduled)
    assert config.smsd == {
        "conf": str(conf),
        "pidfile": "/run/smstools/smsd.pid",
        "stats": "/var/log/smstools/smsd_stats",
        "gid": config.smsd["gid"],  # Debian's GROUP=, else outgoing's group
    }
    assert config.smsd["gid"] in (
        grp.getgrnam(smsapi.smstools_group() or "root").gr_gid,
        os.stat(spool["outgoing"]).st_gid,
    )


def test_config_named_smsd_conf_must_be_readable(tmp_path, spool):
    path = write_ini(tmp_path, spool, smsd_conf=str(tmp_path / "none.conf"))
    assert config_problems(path)[0].startswith(f"{path}: [spool] smsd_conf: ")


def test_config_unix_users_name_one_api_user_each(tmp_path, spool):
    path = write_ini(tmp_path, spool)
    with open(path, "a") as file:
        file.write("[user:cron]\nunix_users = root nagios\n")
    config = smsapi.load_config(path)
    cron = config.users["cron"]
    assert config.unix_users == {"root": cron, "nagios": cron}
    assert cron.password is None  # no password: it can only come over the socket
    assert config_problems(path, "[user:ops]\nunix_users = nagios\n") == [
        f"{path}: [user:ops] unix_users: nagios is already [user:cron]"
    ]


def test_config_health_and_retention_are_checked(tmp_path, spool):
    path = write_ini(tmp_path, spool)
    assert config_problems(
        path,
        "[health]\nqueue_warn = 10\nqueue_fail = 5\nqueue_age_warn = 2hour\n"
        "[retention]\nsent = 30day\nfailed = 30s\noutgoing = 1day\n",
    ) == [
        f"{path}: [retention] failed: expected at least 1min, got '30s'",
        f"{path}: [retention] outgoing: unknown option",
        f"{path}: [health] queue_warn: must not be above queue_fail",
        f"{path}: [health] queue_age_warn: must not be above queue_age_fail",
    ]


def test_config_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(smsapi.ConfigError) as info:
        smsapi.load_config(str(tmp_path / "nope.ini"))
    assert info.value.problems[0].startswith(
        str(tmp_path / "nope.ini") + ": cannot read"
    )


def test_config_unwritable_outgoing_is_an_error(tmp_path, spool):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes through permission bits: use a read-only mount
        if subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
            stderr=subprocess.DEVNULL,
            check=False,
        ).returncode:
            pytest.skip("cannot mount a read-only tmpfs here")
    else:
        ro.chmod(0o555)
    try:
        path = write_ini(tmp_path, dict(spool, outgoing=str(ro)))
        assert config_problems(path) == [
            f"{path}: [spool] outgoing: {ro} is not writable by this process"
        ]
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=True)


def run_cli(*args, stdin=""):
    return subprocess.run(
        [sys.executable, os.path.join(HERE, "smsapi.py"), *args],
        check=False,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_check_config_exit_codes(tmp_path, spool):
    good = write_ini(tmp_path, spool)
    result = run_cli("check-config", "--config", good)
    assert result.returncode == 0, result.stderr
    bad = tmp_path / "bad.ini"
    bad.write_text("[server]\nlisten = nowhere\n[user:x]\npassword = plain\n")
    result = run_cli("check-config", "--config", str(bad))
    assert result.returncode == 78
    lines = result.stderr.splitlines()
    assert (
        f"{bad}: [server] listen: expected host:port or [ipv6]:port, got 'nowhere'"
        in lines
    )
    assert any(
        line.startswith(f"{bad}: [user:x] password: must be a hash") for line in lines
    )


def test_cli_server_refuses_bad_config_with_the_same_messages(tmp_path):
    bad = tmp_path / "bad.ini"
    bad.write_text("[server]\nthreads = many\n")
    served = run_cli("--config", str(bad))
    checked = run_cli("check-config", "--config", str(bad))
    assert served.returncode == checked.returncode == 78
    assert served.stderr == checked.stderr
    assert "[server] threads" in served.stderr


def test_cli_hash_password_output_verifies(tmp_path):
    result = run_cli("hash-password", stdin="correct horse\n")
    assert result.returncode == 0
    hashed = result.stdout.strip()
    assert "correct horse" not in hashed
    users = {"u": smsapi.User("u", password=hashed)}
    checker = smsapi.Authenticator()
    assert checker.check(users, "u", "correct horse") is users["u"]
    assert checker.check(users, "u", "correct horsE") is None
    assert run_cli("hash-password", stdin="\n").returncode == 1


def test_cli_check_smsd_names_each_missing_or_disagreeing_setting(tmp_path, spool):
    conf = tmp_path / "smsd.conf"
    conf.write_text(
        f"devices = GSM1, GSM2\noutgoing = {tmp_path}/elsewhere\nautosplit = 0\n"
        "incoming_utf8 = no\n[GSM1]\ndevice = /dev/ttyUSB0\nincoming = yes\n[GSM2]\n"
    )
    path = write_ini(tmp_path, spool, smsd_conf=str(conf))
    result = run_cli("check-smsd", "--config", path)
    assert result.returncode == 1
    said = [line.split(": ", 3)[1:3] for line in result.stdout.splitlines()]
    assert said == [
        ["problem", "outgoing"], ["problem", "autosplit"], ["problem", "[GSM2] device"],
        ["advice", "[GSM2] incoming"], ["advice", "report"], ["advice", "stats"],
        ["advice", "incoming_utf8"],
    ]  # fmt: skip
    good = tmp_path / "good.conf"  # fakemodem's, with a report directory
    text = fakemodem.SMSD_CONF.format(port=5055).replace("/var/spool/sms", str(tmp_path / "spool"))
    good.write_text(text.replace("[GSM1]", f"report = {spool['incoming']}\n[GSM1]"))
    result = run_cli("check-smsd", "--config", write_ini(tmp_path, spool, smsd_conf=str(good)))
    assert result.returncode == 0 and result.stdout.strip() == f"{good}: ok"


def test_cli_check_smsd_wants_missed_calls_in_incoming_for_ack_by_call(tmp_path, spool):
    conf = tmp_path / "smsd.conf"
    base = fakemodem.SMSD_CONF.format(port=5055).replace("/var/spool/sms", str(tmp_path / "spool"))
    base = base.replace("[GSM1]", f"report = {spool['incoming']}\n[GSM1]")
    conf.write_text(base.replace("[GSM1]", f"phonecalls = {tmp_path}\n[GSM1]"))
    path = write_ini(tmp_path, spool, extra="[alerts]\nack_by_call = yes", smsd_conf=str(conf))
    said = [line.split(": ", 3)[1:3] for line in run_cli("check-smsd", "--config", path).stdout.splitlines()]
    assert said == [["problem", "[GSM1] phonecalls"], ["problem", "phonecalls"]]
    conf.write_text(base + "phonecalls = clip\n")
    assert run_cli("check-smsd", "--config", path).returncode == 0


def test_health_says_when_smsd_conf_sets_no_stats(tmp_path, spool):
    conf = tmp_path / "smsd.conf"
    conf.write_text("devices = GSM1\n[GSM1]\ndevice = /dev/ttyUSB0\n")
    app = smsapi.Application(smsapi.load_config(write_ini(tmp_path, spool, smsd_conf=str(conf))))
    check = call(app, "GET", "/api/v1.0/health").json()["checks"]["modems"]
    assert check["status"] == "warn" and "sets no stats" in check["output"]


def test_cli_help_on_each_command():
    for args in ([], ["check-config"], ["check-smsd"], ["hash-password"]):
        result = run_cli(*args, "--help")
        assert result.returncode == 0 and "usage:" in result.stdout


###############################################################################
# GSM and UCS2 encoding ########################################################
###############################################################################


@pytest.mark.parametrize(
    "text, alphabet, parts, units",
    [
        ("A", "GSM", 1, 1),
        ("a" * 160, "GSM", 1, 160),
        ("a" * 161, "GSM", 2, 161),
        ("a" * 306, "GSM", 2, 306),
        ("a" * 307, "GSM", 3, 307),
        ("€" * 80, "GSM", 1, 160),
        ("[]{}~^\\|€\f", "GSM", 1, 20),
        ("ΔΦΓΛΩΠΨΣΘΞ éàùÑÜß", "GSM", 1, 17),
        ("x" * 151 + "€" + "y" * 20, "GSM", 2, 173),
        ("x" * 152 + "€" + "y" * 20, "UCS2", 3, 173),  # escape pair would straddle
        ("€" * 81, "UCS2", 2, 81),
        ("ç", "UCS2", 1, 1),
        ("¤", "UCS2", 1, 1),  # smsd would turn it into €
        ("back`tick", "UCS2", 1, 9),
        ("Ж" * 70, "UCS2", 1, 70),
        ("Ж" * 71, "UCS2", 2, 71),
        ("Ж" * 134, "UCS2", 2, 134),
        ("Ж" * 135, "UCS2", 3, 135),
        ("😀", "UCS2", 1, 2),
        ("u" * 69 + "😀", "UCS2", 2, 71),
    ],
)
def test_encode_text_alphabet_and_parts(text, alphabet, parts, units):
    encoding = smsapi.encode_text(text)
    assert (encoding.alphabet, encoding.parts, encoding.units) == (
        alphabet,
        parts,
        units,
    )
    if alphabet == "GSM":
        assert encoding.header == "UTF-8" and encoding.body == text.encode("utf-8")
    else:
        assert encoding.header == "UCS2" and encoding.body == text.encode("utf-16-be")


def test_encode_non_gsm_chars_names_the_culprits():
    assert smsapi.non_gsm_chars("ça va? `ok` €") == ["`", "ç"]


###############################################################################
# Spool ########################################################################
###############################################################################


def test_new_message_id_form_and_uniqueness():
    ids = [smsapi.new_message_id("lvv", time.time()) for _ in range(1000)]
    assert len(set(ids)) == 1000
    for message_id in ids:
        assert smsapi.MESSAGE_ID.fullmatch(message_id) and smsapi.OUR_ID.fullmatch(
            message_id
        )
        assert message_id.startswith("smsapi." + smsapi.owner_tag("lvv") + ".")
    assert smsapi.owner_tag("lvv") != smsapi.owner_tag("ann")
    assert smsapi.new_message_id("lvv", 1.0) < smsapi.new_message_id("lvv", 2.0)


def test_write_messages_durable_group_writable_no_leftovers(config, spool):
    smsapi.SpoolWriter(spool["outgoing"]).write(
        {"smsapi.a": b"To: 1\n\nx", "smsapi.b": b"To: 2\n\ny"}
    )
    assert sorted(os.listdir(spool["outgoing"])) == ["smsapi.a", "smsapi.b"]
    mode = os.stat(os.path.join(spool["outgoing"], "smsapi.a")).st_mode
    assert stat.S_IMODE(mode) == 0o660
    with open(os.path.join(spool["outgoing"], "smsapi.b"), "rb") as file:
        assert file.read() == b"To: 2\n\ny"


def test_write_messages_failure_leaves_nothing(config, spool):
    # The second file's temporary name lies in a directory that is not there.
    with pytest.raises(smsapi.ApiError) as info:
        smsapi.SpoolWriter(spool["outgoing"]).write(
            {"smsapi.a": b"To: 1\n\nx", "gone/smsapi.b": b"To: 2\n\ny"}
        )
    assert info.value.status == 503
    assert os.listdir(spool["outgoing"]) == []


@pytest.mark.parametrize("umask", [0o007, 0o022, 0o077])
def test_write_messages_are_0660_whatever_the_umask(spool, umask):
    old = os.umask(umask)
    smsapi.process_umask.cache_clear()  # read once per process: ours changes it here
    try:
        assert smsapi.process_umask() == umask
        smsapi.SpoolWriter(spool["outgoing"]).write({"smsapi.a": b"To: 1\n\nx"})
    finally:
        os.umask(old)
        smsapi.process_umask.cache_clear()
    mode = os.stat(os.path.join(spool["outgoing"], "smsapi.a")).st_mode
    assert stat.S_IMODE(mode) == 0o660


def test_spool_files_get_the_group_smsd_runs_as(tmp_path, spool):
    dialout = grp.getgrnam("dialout").gr_gid  # what Debian runs smsd as
    path = write_ini(tmp_path, spool)
    text = pathlib.Path(path).read_text()
    pathlib.Path(path).write_text(text.replace("[spool]\n", "[spool]\nsmsd_group = dialout\n"))
    app = smsapi.Application(smsapi.load_config(path))
    queued, held = sent_id(app), sent_id(app, send_at="+1hour")
    assert os.stat(os.path.join(spool["outgoing"], queued)).st_gid == dialout
    scheduled = app.config.spool["scheduled"]
    assert os.stat(os.path.join(scheduled, held)).st_gid == dialout  # moved as it is


def test_spool_smsd_group_comes_from_debians_smstools_defaults(tmp_path):
    defaults = tmp_path / "smstools"
    defaults.write_text('# /etc/default/smstools\nUSER="smsd"\nGROUP="dialout"\n')
    assert smsapi.smstools_group(str(defaults)) == "dialout"
    assert smsapi.smstools_group(str(tmp_path / "none")) is None
    problems = smsapi.check_smsd_group(grp.getgrnam("dialout").gr_gid, 1000, [1000])
    said = "[spool] smsd_group: this process is not in dialout, the group smsd runs as:"
    assert problems == [said + " it could not read the messages (usermod -a -G dialout smsapi)"]
    assert smsapi.check_smsd_group(20, 1000, [20, 1000]) == []


def test_clean_temp_files_removes_only_temporaries(config, spool):
    for name in (smsapi.TEMP_PREFIX + "smsapi.x", "smsapi.y"):
        open(os.path.join(spool["outgoing"], name), "w").close()
    smsapi.clean_temp_files(config)
    assert os.listdir(spool["outgoing"]) == ["smsapi.y"]


class Fsyncs:
    """Every fsync this process makes, by the path of what it synced."""

    def __init__(self, monkeypatch):
        self.paths = []
        real = os.fsync

        def fsync(fd):
            self.paths.append(os.readlink(f"/proc/self/fd/{fd}"))
            return real(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    def synced(self, path):
        """Where path, or a temporary file of it, was fsynced: the indexes."""
        directory, name = os.path.split(str(path))
        temp = smsapi.TEMP_PREFIX + name + "."
        return [
            i
            for i, p in enumerate(self.paths)
            if p == str(path)
            or os.path.dirname(p) == directory and os.path.basename(p).startswith(temp)
        ]

    def durable(self, path):
        """True when path (or its temporary file) was fsynced, then its directory."""
        found = self.synced(path)
        return bool(found) and os.path.dirname(str(path)) in self.paths[found[0] + 1 :]


def test_durable_every_piece_of_state_syncs_its_file_and_directory(
    tmp_path, spool, monkeypatch
):
    extra = GROUPS + webhook_ini("http://127.0.0.1:9/hook")  # nobody answers there
    extra += "\n[heartbeat:beat]\nevery = 1min\nto = @oncall"
    extra += f"\n[user:night]\npassword = {HASHES['night']}\nmax_per_day = 50"
    path = write_ini(tmp_path, spool, extra=extra)
    app = smsapi.Application(smsapi.load_config(path))
    state, fsyncs = tmp_path / "state", Fsyncs(monkeypatch)
    message_id = sent_id(app, report=True)
    assert fsyncs.durable(os.path.join(spool["outgoing"], message_id))
    keyed = {"mobiles": ["79680000001"], "text": "once"}
    assert post_send(app, keyed, "lvv", {"Idempotency-Key": "k"}).status == 201
    assert fsyncs.durable(app.parts.idempotency.path("lvv", "k"))
    held = sent_id(app, "79680000002", send_at="+1hour")
    assert fsyncs.durable(os.path.join(app.config.spool["scheduled"], held))
    app.parts.schedule.expire(held, time.time())
    assert fsyncs.durable(os.path.join(spool["failed"], held))
    assert send(app, ["79680000000"], user="night").status == 201
    assert fsyncs.durable(state / "budgets.journal")
    app.parts.heartbeats.check(time.time() + 120)  # missed: an SMS, and the state
    assert fsyncs.durable(state / "heartbeats.json")
    smsd_sends(spool, message_id, 7)
    app.parts.watcher.tick()
    assert fsyncs.durable(state / "reports.journal")
    assert fsyncs.durable(state / "events.journal")
    queue = app.parts.webhooks.queues["hook"]
    event = queue.messages[message_id][0]  # sms.sent (and the expiry's sms.failed)
    assert fsyncs.durable(state / "webhooks" / "hook" / event.file_name)
    fsyncs.paths.clear()
    queue.retry(event, None, "refused")  # the attempts, written anew
    assert fsyncs.durable(state / "webhooks" / "hook" / event.file_name)
    smsd_reports(spool, "79680000000", 7)
    app.parts.watcher.tick()  # an append to the journal syncs the file
    assert fsyncs.synced(state / "reports.journal")
    monkeypatch.setattr(sys, "stdin", io.StringIO("new-pass\n"))
    assert smsapi.add_user_command("newbie", False, path) == 0
    assert fsyncs.durable(path)


@pytest.mark.parametrize(
    "data, headers, text",
    [
        (
            b"To: 1\nAlphabet: UTF-8\n\nh\xc3\xa9\n",
            {"To": "1", "Alphabet": "UTF-8"},
            "hé\n",
        ),
        (
            b"To: 1\nAlphabet: UCS2\n\n\x04\x16\xd8\x3d\xde\x00",
            {"To": "1", "Alphabet": "UCS2"},
            "Ж😀",
        ),
        (b"To: 1\nAlphabet: ISO\n\n\xa4", {"To": "1", "Alphabet": "ISO"}, "€"),
        (b"Alphabet: binary\n\n\x00\xff", {"Alphabet": "binary"}, None),
        (
            b"From: 7\r\nSent: 26-01-01 10:00:00\r\n\r\nhi",
            {"From": "7", "Sent": "26-01-01 10:00:00"},
            "hi",
        ),
        (b"\xff\xfe garbage without headers", {}, ""),
        (b"", {}, ""),
    ],
)
def test_parse_message_headers_and_text(data, headers, text):
    assert smsapi.parse_message(data) == (headers, text)


###############################################################################
# Sending ######################################################################
###############################################################################


def read_spool_file(spool, kind, message_id):
    with open(os.path.join(spool[kind], message_id), "rb") as file:
        return file.read()


def test_send_old_client_example_201(app, spool):
    response = send(app, ["79680000000", "79160000000"])
    assert response.status == 201
    assert response.headers["Content-Type"].startswith("application/json")
    data = response.json()
    assert set(data["message_id"]) == {"79680000000", "79160000000"}
    assert data["parts_count"] == 1 and data["sent_text"] == "Hi, Jack!"
    for mobile, message_id in data["message_id"].items():
        assert (
            read_spool_file(spool, "outgoing", message_id)
            == (f"From: lvv\nTo: {mobile}\nAlphabet: UTF-8\n\nHi, Jack!").encode()
        )


def test_send_plus_is_stripped_and_key_is_as_given(app, spool):
    data = send(app, ["+7 968 000-00-01"]).json()
    (message_id,) = data["message_id"].values()
    assert list(data["message_id"]) == ["+7 968 000-00-01"]
    assert b"\nTo: 79680000001\n" in read_spool_file(spool, "outgoing", message_id)


def test_send_ucs2_body(app, spool):
    data = send(app, ["79680000000"], text="Привет 😀").json()
    assert data["encoding"] == "UCS2" and data["parts_count"] == 1
    content = read_spool_file(spool, "outgoing", data["message_id"]["79680000000"])
    assert (
        content
        == b"From: lvv\nTo: 79680000000\nAlphabet: UCS2\n\n"
        + "Привет 😀".encode("utf-16-be")
    )


def test_send_form_body_comma_and_repeated(app, spool):
    body = b"mobiles=79680000001,79680000002&mobiles=%2B79680000003&text=caf%C3%A9"
    response = post_send(
        app,
        body,
        "lvv",
        FORM,
    )
    assert response.status == 201
    assert sorted(response.json()["message_id"]) == [
        "+79680000003",
        "79680000001",
        "79680000002",
    ]
    assert len(os.listdir(spool["outgoing"])) == 3


def test_send_query_string_plus_read_as_plus(app, spool):
    response = call(
        app,
        "GET",
        "/api/v1.0/sms/outgoing",
        user="lvv",
        query="mobiles=+79680000001,79680000002&text=Disk+full",
    )
    assert response.status == 201
    data = response.json()
    assert sorted(data["message_id"]) == ["+79680000001", "79680000002"]
    assert data["sent_text"] == "Disk full"


def test_send_duplicates_are_sent_once(app, spool):
    data = send(app, ["79680000000", "+79680000000", "79680000000"]).json()
    assert len(set(data["message_id"].values())) == 1
    assert len(os.listdir(spool["outgoing"])) == 1


def test_send_options_become_smsd_headers(app, spool):
    data = send(
        app,
        ["79680000000"],
        queue="fast",
        flash=True,
        report=False,
        priority="high",
        validity="2hour",
        retries=3,
        **{"class": 1},
    ).json()
    content = read_spool_file(spool, "outgoing", data["message_id"]["79680000000"])
    head = content.split(b"\n\n")[0].decode().splitlines()
    assert head == [
        "From: lvv",
        "To: 79680000000",
        "Alphabet: UTF-8",
        "Queue: fast",
        "Flash: yes",
        "Report: no",
        "Priority: High",
        "Validity: 2hour",
        "Retries: 3",
        "Class: 1",
    ]


@pytest.mark.parametrize(
    "fields, status, message",
    [
        ({"mobiles": ["79680000000", "12ab", "+"], "text": "x"}, 400, '"12ab", "+"'),
        (
            {"mobiles": ["79680000000", "0079680000000"], "text": "x"},
            400,
            '"0079680000000"',
        ),
        (
            {"mobiles": ["79680000000", "79990000000", "79160000001"], "text": "x"},
            403,
            '"79990000000", "79160000001"',
        ),
        (
            {"mobiles": ["７９６８０００００００"], "text": "x"},
            400,
            "Malformed",
        ),  # fullwidth digits
        (
            {"mobiles": ["٧٩٦٨٠٠٠٠٠٠٠"], "text": "x"},
            400,
            "Malformed",
        ),  # Arabic-Indic digits
        ({"mobiles": [], "text": "x"}, 400, "mobiles"),
        (
            {"mobiles": "79680000000\nInclude: /etc/shadow", "text": "x"},
            400,
            "Malformed",
        ),
        ({"mobiles": [79680000000], "text": "x"}, 400, "mobiles"),
        ({"text": "x"}, 400, "mobiles"),
        ({"mobiles": ["79680000000"]}, 400, "text"),
        ({"mobiles": ["79680000000"], "text": ""}, 400, "text"),
        ({"mobiles": ["79680000000"], "text": 5}, 400, "text"),
        ({"mobiles": ["79680000000"], "text": "a\0b"}, 400, "NUL"),
        ({"mobiles": ["79680000000"], "text": "a" * 1531}, 400, "11 parts"),
        ({"mobiles": ["79680000000"], "text": "x", "queue": "nope"}, 400, "queue"),
        (
            {"mobiles": ["79680000000"], "text": "x", "queue": "fast\nInclude: /x"},
            400,
            "queue",
        ),
        ({"mobiles": ["79680000000"], "text": "x", "flash": "yes"}, 400, "flash"),
        (
            {"mobiles": ["79680000000"], "text": "x", "priority": "urgent"},
            400,
            "priority",
        ),
        (
            {"mobiles": ["79680000000"], "text": "x", "validity": "1 fortnight"},
            400,
            "validity",
        ),
        ({"mobiles": ["79680000000"], "text": "x", "validity": "999"}, 400, "validity"),
        ({"mobiles": ["79680000000"], "text": "x", "retries": -1}, 400, "retries"),
        ({"mobiles": ["79680000000"], "text": "x", "class": 4}, 400, "class"),
        ({"mobiles": ["79680000000"], "text": "x", "class": True}, 400, "class"),
        (
            {"mobiles": ["79680000000"], "text": "x", "colour": "red"},
            400,
            "Unknown field(s): colour",
        ),
    ],
)
def test_send_bad_fields_are_refused_and_write_nothing(
    app, spool, fields, status, message
):
    response = post_send(app, fields, "lvv")
    assert response.status == status
    assert message in response.json()["error"]
    assert spool_snapshot(spool) == {}


@pytest.mark.parametrize(
    "query", ["limit=%C2%B2", "offset=%D9%A3", "limit=1%C2%B2", "offset=٣"]
)
def test_unicode_digits_in_numbers_are_400_not_500(app, query):
    assert (
        call(app, "GET", "/api/v1.0/sms/sent/", user="lvv", query=query).status == 400
    )


def test_unicode_digits_in_form_numbers_are_400_not_500(app, spool):
    body = "mobiles=79680000000&text=x&retries=²".encode()
    response = post_send(
        app,
        body,
        "lvv",
        FORM,
    )
    assert response.status == 400 and spool_snapshot(spool) == {}
    assert (
        call(
            app,
            "GET",
            "/api/v1.0/sms/outgoing",
            user="lvv",
            query="mobiles=79680000000&text=x&wait=%C2%B2",
        ).status
        == 400
    )


def test_send_surrogate_text_is_refused(app, spool):
    body = b'{"mobiles": ["79680000000"], "text": "\\ud800"}'
    response = post_send(
        app,
        body,
        "lvv",
        {"Content-Type": "application/json"},
    )
    assert response.status == 400 and "Unicode" in response.json()["error"]
    assert spool_snapshot(spool) == {}


def test_send_at_max_parts_is_accepted(app, spool):
    assert send(app, ["79680000000"], text="a" * 1530).json()["parts_count"] == 10


@pytest.mark.parametrize(
    "body, content_type, status",
    [
        (b"{not json", "application/json", 400),
        (b"[1, 2]", "application/json", 400),
        (b'"text"', "application/json", 400),
        (b"\xff\xfe{}", "application/json", 400),
        (b"[" * 100000 + b"]" * 100000, "application/json", 413),
        (b"[" * 30000 + b"]" * 30000, "application/json", 400),
        (b"mobiles=1&text=x", "text/plain", 415),
        (b"mobiles=79680000000&text=%FF", "application/x-www-form-urlencoded", 400),
        (b"", "application/json", 400),
    ],
)
def test_send_bad_bodies(app, spool, body, content_type, status):
    response = post_send(
        app,
        body,
        "lvv",
        {"Content-Type": content_type},
    )
    assert response.status == status
    assert response.json()["error"]
    assert spool_snapshot(spool) == {}


def test_send_oversized_body_is_refused_without_reading_it(app, spool):
    class Endless(io.RawIOBase):
        def read(self, size=-1):
            raise AssertionError("the body must not be read")

    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/api/v1.0/sms/outgoing",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(10**9),
        "HTTP_AUTHORIZATION": auth("lvv"),
        "wsgi.input": Endless(),
    }
    setup_testing_defaults(environ)
    statuses = []
    body = b"".join(app(environ, lambda status, headers: statuses.append(status)))
    assert statuses == ["413 Request Entity Too Large"]
    assert b"65536" in body
    assert spool_snapshot(spool) == {}


def test_send_body_without_length_is_bounded(app, spool):
    # A server that ends the stream itself (chunked) may give no Content-Length.
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/api/v1.0/sms/outgoing",
        "CONTENT_TYPE": "application/json",
        "HTTP_AUTHORIZATION": auth("lvv"),
        "wsgi.input": io.BytesIO(b" " * 70000 + b"{}"),
        "wsgi.input_terminated": True,
    }
    setup_testing_defaults(environ)
    statuses = []
    b"".join(app(environ, lambda status, headers: statuses.append(status)))
    assert statuses == ["413 Request Entity Too Large"]
    ok = dict(environ)
    ok["wsgi.input"] = io.BytesIO(
        json.dumps({"mobiles": ["79680000000"], "text": "x"}).encode()
    )
    b"".join(app(ok, lambda status, headers: statuses.append(status)))
    assert statuses[-1] == "201 Created"


def test_send_disk_error_is_503_and_writes_nothing(app, spool):
    shutil.rmtree(spool["outgoing"])
    response = send(app, ["79680000000"])
    assert response.status == 503
    assert "not stored" in response.json()["error"]


###############################################################################
# Reading, status, listing, cancelling ##########################################
###############################################################################


def test_get_sent_message_has_every_header_and_text(app, spool):
    put_file(
        spool,
        "sent",
        "smsapi.s1",
        {
            "From": "lvv",
            "To": "79680000000",
            "Modem": "GSM1",
            "Sent": "26-11-24 10:00:00",
            "IMSI": "2440",
        },
        "héllo",
        "UTF-8",
    )
    response = call(app, "GET", "/api/v1.0/sms/sent/smsapi.s1", user="lvv")
    assert response.status == 200
    assert response.json() == {
        "From": "lvv",
        "To": "79680000000",
        "Modem": "GSM1",
        "Sent": "26-11-24 10:00:00",
        "IMSI": "2440",
        "Alphabet": "UTF-8",
        "message_id": "smsapi.s1",
        "text": "héllo",
    }


@pytest.mark.parametrize("kind", ["outgoing", "checked", "sent", "failed"])
def test_get_message_in_each_kind_ucs2_decoded(app, spool, kind):
    put_file(spool, kind, "m1", {"From": "lvv", "To": "1"}, "Жук 😀", "UCS2")
    assert (
        call(app, "GET", f"/api/v1.0/sms/{kind}/m1", user="lvv").json()["text"]
        == "Жук 😀"
    )
    other = next(k for k in smsapi.KINDS if k != kind)
    assert call(app, "GET", f"/api/v1.0/sms/{other}/m1", user="lvv").status == 404


def test_get_message_isolation_is_the_same_404_as_missing(app, spool):
    put_file(spool, "sent", "smsapi.s1", {"From": "lvv", "To": "79680000000"})
    missing = call(app, "GET", "/api/v1.0/sms/sent/smsapi.zz", user="ann")
    hidden = call(app, "GET", "/api/v1.0/sms/sent/smsapi.s1", user="ann")
    assert (
        (hidden.status, hidden.body)
        == (missing.status, missing.body)
        == (404, missing.body)
    )
    assert "Not found" in hidden.json()["error"]
    assert call(app, "GET", "/api/v1.0/sms/sent/smsapi.s1", user="root").status == 200
    assert call(app, "GET", "/api/v1.0/sms/status/smsapi.s1", user="ann").status == 404
    assert call(app, "DELETE", "/api/v1.0/sms/sent/smsapi.s1", user="ann").status == 404


def test_incoming_only_for_admins_and_inbox_users(app, spool):
    put_file(
        spool,
        "incoming",
        "GSM1.AbC123",
        {"From": "79680000000", "Received": "26-11-24 10:00:00"},
        "hi",
    )
    for user, status in (("lvv", 404), ("ann", 404), ("root", 200), ("inbox", 200)):
        assert (
            call(app, "GET", "/api/v1.0/sms/incoming/GSM1.AbC123", user=user).status
            == status
        )
    app.parts.watcher.tick()
    listing = call(app, "GET", "/api/v1.0/sms/incoming/", user="lvv")
    assert listing.status == 403 and "inbox = yes" in listing.json()["error"]
    assert call(app, "GET", "/api/v1.0/sms/incoming/", user="inbox").json()[
        "message_id"
    ] == ["GSM1.AbC123"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1.0/sms/sent/..",
        "/api/v1.0/sms/sent/../outgoing/x",
        "/api/v1.0/sms/sent/.hidden",
        "/api/v1.0/sms/sent/%2e%2e",
        "/api/v1.0/sms/sent//etc/passwd",
        "/api/v1.0/sms/sent/a\0b",
        "/api/v1.0/sms/sent/" + "a" * 129,
        "/api/v1.0/sms/status/..",
        "/api/v1.0/sms/status/a b",
        "/api/v1.0/sms/secret/x",
    ],
)
def test_bad_ids_are_404(app, spool, path):
    put_file(spool, "sent", ".hidden", {"From": "lvv"})
    before = spool_snapshot(spool)
    for method in ("GET",) if "/status/" in path else ("GET", "DELETE"):
        response = call(app, method, path, user="root")
        assert response.status == 404 and "Not found" in response.json()["error"]
    assert spool_snapshot(spool) == before


def test_status_follows_the_file_through_the_spool(app, spool):
    message_id = send(app, ["79680000000"]).json()["message_id"]["79680000000"]
    status = lambda: call(
        app, "GET", "/api/v1.0/sms/status/" + message_id, user="lvv"
    ).json()
    assert status() == {
        "message_id": message_id,
        "status": "queued",
        "to": "79680000000",
    }
    os.rename(
        os.path.join(spool["outgoing"], message_id),
        os.path.join(spool["checked"], message_id),
    )
    assert status()["status"] == "sending"
    os.remove(os.path.join(spool["checked"], message_id))
    put_file(
        spool,
        "sent",
        message_id,
        {
            "From": "lvv",
            "To": "79680000000",
            "Modem": "GSM1",
            "Sent": "26-11-24 10:00:05",
        },
    )
    assert status() == {
        "message_id": message_id,
        "status": "sent",
        "to": "79680000000",
        "sent_at": "26-11-24 10:00:05",
        "modem": "GSM1",
    }
    os.rename(
        os.path.join(spool["sent"], message_id),
        os.path.join(spool["failed"], message_id),
    )
    put_file(
        spool,
        "failed",
        message_id,
        {
            "From": "lvv",
            "To": "79680000000",
            "Failed": "26-11-24 10:01:00",
            "Fail_reason": "+CMS ERROR: 500 (Unknown error)",
        },
    )
    assert status() == {
        "message_id": message_id,
        "status": "failed",
        "to": "79680000000",
        "failed_at": "26-11-24 10:01:00",
        "reason": "+CMS ERROR: 500 (Unknown error)",
    }


def test_list_newest_first_paginated_and_filtered(app, spool):
    now = time.time()
    owners = ["lvv", "lvv", "ann", "lvv", "lvv"]
    ids = [
        smsapi.new_message_id(owner, now - 100 + i) for i, owner in enumerate(owners)
    ]
    for message_id, owner in zip(ids, owners):
        put_file(spool, "sent", message_id, {"From": owner})
    foreign = put_file(
        spool, "sent", "GSM1.other", {"From": "lvv"}
    )  # not written by smsapi
    os.utime(foreign, (now - 97.5, now - 97.5))  # between ids[2] and ids[3]
    open(os.path.join(spool["sent"], ids[4] + ".LOCK"), "w").close()
    response = call(
        app, "GET", "/api/v1.0/sms/sent/", user="lvv", query="limit=2&offset=1"
    )
    assert response.json() == {
        "message_id": [ids[3], ids[1]],
        "total_count": 4,
        "limit": 2,
        "offset": 1,
    }
    everything = call(app, "GET", "/api/v1.0/sms/sent/", user="root").json()
    assert everything["message_id"] == [
        ids[4],
        ids[3],
        "GSM1.other",
        ids[2],
        ids[1],
        ids[0],
    ]
    assert everything["limit"] == 100
    assert call(app, "GET", "/api/v1.0/sms/sent/", user="ann").json()["message_id"] == [
        ids[2]
    ]
    for query in ("limit=0", "limit=1001", "offset=-1", "limit=x"):
        assert (
            call(app, "GET", "/api/v1.0/sms/sent/", user="lvv", query=query).status
            == 400
        )


def test_list_confirms_the_owner_of_what_it_shows(app, spool):
    # A file whose name carries lvv's tag but that lvv did not send is not shown.
    forged = smsapi.new_message_id("lvv", time.time())
    put_file(spool, "sent", forged, {"From": "ann"})
    assert (
        call(app, "GET", "/api/v1.0/sms/sent/", user="lvv").json()["message_id"] == []
    )


def test_cancel_own_queued_message(app, spool):
    message_id = send(app, ["79680000000"]).json()["message_id"]["79680000000"]
    assert (
        call(app, "DELETE", "/api/v1.0/sms/outgoing/" + message_id, user="ann").status
        == 404
    )
    response = call(app, "DELETE", "/api/v1.0/sms/outgoing/" + message_id, user="lvv")
    assert response.status == 200 and response.json() == {
        "message_id": message_id,
        "deleted": True,
    }
    assert spool_snapshot(spool) == {}
    assert (
        call(app, "DELETE", "/api/v1.0/sms/outgoing/" + message_id, user="lvv").status
        == 404
    )


def test_cancel_refuses_what_smsd_is_sending_or_has_sent(app, spool):
    put_file(spool, "checked", "smsapi.c1", {"From": "lvv"})
    put_file(spool, "sent", "smsapi.c2", {"From": "lvv"})
    before = spool_snapshot(spool)
    for user in ("lvv", "root"):
        response = call(app, "DELETE", "/api/v1.0/sms/checked/smsapi.c1", user=user)
        assert response.status == 409 and "sending" in response.json()["error"]
    assert call(app, "DELETE", "/api/v1.0/sms/sent/smsapi.c2", user="lvv").status == 409
    assert spool_snapshot(spool) == before
    assert (
        call(app, "DELETE", "/api/v1.0/sms/sent/smsapi.c2", user="root").status == 200
    )
    assert ("sent", "smsapi.c2") not in spool_snapshot(spool)


def test_cancel_loses_the_race_to_smsd_with_409(config, spool):
    # smsd took the file between our read and our rename: the rename fails.
    with pytest.raises(smsapi.ApiError) as info:
        smsapi.take_from_smsd(config, "smsapi.gone")
    assert info.value.status == 409


###############################################################################
# Lifecycle: delivery reports, waiting, idempotency, inbox, dry run ############
###############################################################################

SMSD_TIME = "%y-%m-%d %H:%M:%S"


def smsd_moves(spool, message_id, kind, extra):
    """Move a file from outgoing to kind, adding header lines, as smsd does.

    The new file is complete before the old one goes: at no moment is the
    message nowhere.
    """
    source = os.path.join(spool["outgoing"], message_id)
    with open(source, "rb") as file:
        head, _, body = file.read().partition(b"\n\n")
    lines = "".join(f"\n{name}: {value}" for name, value in extra.items())
    temp = os.path.join(spool[kind], "." + message_id)
    with open(temp, "wb") as file:
        file.write(head + lines.encode() + b"\n\n" + body)
    os.rename(temp, os.path.join(spool[kind], message_id))
    os.remove(source)


def smsd_sends(spool, message_id, ref, when=None, modem="GSM1"):
    """Do what smsd does on success: move the file to sent/ and add its headers."""
    sent = time.strftime(
        SMSD_TIME, time.localtime(time.time() if when is None else when)
    )
    smsd_moves(
        spool, message_id, "sent", {"Modem": modem, "Sent": sent, "Message_id": ref}
    )


def smsd_fails(spool, message_id, reason="+CMS ERROR: 500 (Unknown error)"):
    smsd_moves(
        spool,
        message_id,
        "failed",
        {"Failed": time.strftime(SMSD_TIME), "Fail_reason": reason},
    )


def smsd_reports(
    spool, to, ref, code=0, received=None, submitted=None, modem="GSM1", kind="incoming"
):
    """Write a status report file as smsd 3.1.21 files it (GSM1.xxxxxx in incoming)."""
    received = time.time() if received is None else received
    submitted = received if submitted is None else submitted
    text = {
        0: "0,Ok,short message received by the SME",
        70: "70,Error,SM validity period expired",
        48: "48,Temporary error,congestion",
    }[code]
    name = "GSM1." + base64.b32encode(os.urandom(5)).decode()[:6]
    headers = {
        "From": to,
        "Sent": time.strftime(SMSD_TIME, time.localtime(submitted)),
        "Received": time.strftime(SMSD_TIME, time.localtime(received)),
        "Modem": modem,
        "UDH": "no",  # smsd writes it for a status report, never for an SMS
    }
    body = f"SMS STATUS REPORT\nMessage_id: {ref}\nDischarge_timestamp: 26-11-24 10:00:00\nStatus: {text}"
    put_file(spool, kind, name, headers, body, "UTF-8")
    return name


def status_of(app, message_id, user="lvv"):
    return call(app, "GET", "/api/v1.0/sms/status/" + message_id, user=user).json()


def sent_id(app, number="79680000000", **fields):
    response = send(app, [number], **fields)
    assert response.status == 201, response.body
    return response.json()["message_id"][number]


def test_report_option_defaults_from_user_then_server(tmp_path, spool):
    path = write_ini(tmp_path, spool, extra="report = yes")
    with open(path, "a") as file:
        file.write(f"[user:quiet]\npassword = {HASHES['quiet']}\nreport = no\n")
    app = smsapi.Application(smsapi.load_config(path))
    for user, field, header in (
        ("lvv", None, b"Report: yes"),
        ("quiet", None, b"Report: no"),
        ("lvv", False, b"Report: no"),
        ("quiet", True, b"Report: yes"),
    ):
        fields = {} if field is None else {"report": field}
        message_id = sent_id(app, user=user, **fields)
        assert header in read_spool_file(spool, "outgoing", message_id)


def test_delivery_report_attaches_to_its_message(app, spool):
    delivered, undelivered = (
        sent_id(app, report=True),
        sent_id(app, "79680000001", report=True),
    )
    app.parts.watcher.tick()
    assert status_of(app, delivered) == {
        "message_id": delivered,
        "status": "queued",
        "to": "79680000000",
    }
    smsd_sends(spool, delivered, 7)
    smsd_sends(spool, undelivered, 8)
    app.parts.watcher.tick()
    assert status_of(app, delivered)["report"] == "pending"
    smsd_reports(spool, "79680000000", 7)
    smsd_reports(spool, "79680000001", 8, code=70)
    app.parts.watcher.tick()
    status = status_of(app, delivered)
    assert (
        status["status"] == "delivered"
        and status["delivered_at"] == "26-11-24 10:00:00"
    )
    status = status_of(app, undelivered)
    assert (
        status["status"] == "undelivered"
        and status["reason"] == "SM validity period expired"
    )


def test_delivery_report_never_attached_on_reference_alone(app, spool):
    message_id = sent_id(app, report=True)
    app.parts.watcher.tick()
    smsd_sends(spool, message_id, 9)
    app.parts.watcher.tick()
    smsd_reports(spool, "79680000099", 9)  # another recipient
    smsd_reports(spool, "79680000000", 9, modem="GSM2")  # another modem
    smsd_reports(spool, "79680000000", 10)  # another reference
    smsd_reports(
        spool, "79680000000", 9, received=time.time() - 3600
    )  # before it was sent
    smsd_reports(spool, "79680000000", 9, code=48)  # the SMSC is still trying
    app.parts.watcher.tick()
    assert status_of(app, message_id)["status"] == "sent"


def test_delivery_reports_with_references_colliding_modulo_256(app, spool):
    first, second = sent_id(app, report=True), sent_id(app, report=True)
    app.parts.watcher.tick()
    now = time.time()
    smsd_sends(spool, first, 42, when=now - 600)
    smsd_sends(spool, second, 42, when=now - 5)
    app.parts.watcher.tick()
    smsd_reports(spool, "79680000000", 42, code=70, received=now, submitted=now - 5)
    app.parts.watcher.tick()
    assert status_of(app, second)["status"] == "undelivered"
    assert status_of(app, first)["status"] == "sent"
    smsd_reports(spool, "79680000000", 42, received=now, submitted=now - 600)
    app.parts.watcher.tick()
    assert status_of(app, first)["status"] == "delivered"


def test_delivery_index_survives_restart_and_is_rebuilt_when_lost(config, spool):
    app = smsapi.Application(config)
    kept, rebuilt = sent_id(app, report=True), sent_id(app, "79680000001", report=True)
    app.parts.watcher.tick()
    smsd_sends(spool, kept, 1)
    smsd_sends(spool, rebuilt, 2)
    app.parts.watcher.tick()
    smsd_reports(spool, "79680000000", 1)
    app.parts.watcher.tick()
    restarted = smsapi.Application(config)
    assert (
        status_of(restarted, kept)["status"] == "delivered"
    )  # before any tick: from the saved index
    os.remove(os.path.join(config.state_dir, smsapi.JOURNAL))
    smsd_reports(spool, "79680000001", 2)
    lost = smsapi.Application(config)
    lost.parts.watcher.tick()
    assert status_of(lost, rebuilt)["status"] == "delivered"
    assert status_of(lost, kept)["status"] == "delivered"


def test_delivery_index_a_clock_stepped_back_reads_what_came_meanwhile(config, spool):
    app = smsapi.Application(config)
    message_id = sent_id(app, report=True)
    app.parts.watcher.tick()
    app.close()
    journal = os.path.join(config.state_dir, smsapi.JOURNAL)
    with open(journal, "a") as file:  # its last clock an hour ahead of the box's now
        file.write(json.dumps(["clock", time.time() + 3600]) + "\n")
    smsd_sends(spool, message_id, 9)  # while smsapi is down
    again = smsapi.Application(config)
    try:
        again.parts.watcher.tick()
        smsd_reports(spool, "79680000000", 9)
        again.parts.watcher.tick()
        assert status_of(again, message_id)["status"] == "delivered"
    finally:
        again.close()


def test_delivery_index_rebuild_reads_sent_a_chunk_a_tick(config, spool):
    sent = time.strftime(SMSD_TIME)
    count = smsapi.REBUILD_CHUNK + 10
    for n in range(count):
        headers = {
            "From": "lvv",
            "To": "79680000000",
            "Report": "yes",
            "Modem": "GSM1",
            "Sent": sent,
            "Message_id": str(n % 256),
        }
        put_file(
            spool, "sent", smsapi.new_message_id("lvv", time.time() + n / 1e3), headers
        )
    app = smsapi.Application(config)
    app.parts.watcher.tick()
    reports = app.parts.reports
    assert reports.to_read and len(reports.awaiting) == smsapi.REBUILD_CHUNK
    app.parts.watcher.tick()
    assert not reports.to_read and len(reports.awaiting) == count


def test_reports_in_smsds_own_report_directory(tmp_path, spool):
    spool = dict(
        spool, report=os.path.join(os.path.dirname(spool["incoming"]), "report")
    )
    os.mkdir(spool["report"])
    app = smsapi.Application(smsapi.load_config(write_ini(tmp_path, spool)))
    message_id = sent_id(app, report=True)
    app.parts.watcher.tick()
    smsd_sends(spool, message_id, 3)
    app.parts.watcher.tick()
    smsd_reports(spool, "79680000000", 3, kind="report")
    app.parts.watcher.tick()
    assert status_of(app, message_id)["status"] == "delivered"


@pytest.fixture
def running(config, clock):
    """An app whose watcher really runs, ticking fast, on the test's clock."""
    app = smsapi.Application(config, clock=clock, interval=0.05)
    app.start()
    yield app
    app.close()


@contextlib.contextmanager
def time_passes(clock, speed=1.0):
    """Meanwhile the manual clock moves on by itself, speed times as fast as real
    time: a wait that nothing ends runs out, and the test fails instead of
    hanging, however late the wait began."""
    done = threading.Event()

    def move():
        while not done.wait(0.05):
            clock.advance(0.05 * speed)

    mover = threading.Thread(target=move, daemon=True)
    mover.start()
    try:
        yield
    finally:
        done.set()
        mover.join()


def later(delay, action, *args, **kwargs):
    """Do what smsd would do, after delay, in another thread."""
    timer = threading.Timer(delay, action, args, kwargs)
    timer.start()
    return timer


def wait_send(app, numbers, query="wait=5", user="lvv", **fields):
    body = {"mobiles": numbers, "text": "wait for me", **fields}
    return post_send(app, body, user, query=query)


def queued_ids(spool, count, timeout=5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = [n for n in os.listdir(spool["outgoing"]) if not n.startswith(".")]
        if len(names) >= count:
            return names
        time.sleep(0.01)
    raise AssertionError("nothing queued")


def test_send_and_wait_answers_when_sent(running, spool, clock):
    later(0.3, lambda: smsd_sends(spool, queued_ids(spool, 1)[0], 1))
    started = time.monotonic()
    with time_passes(clock):
        response = wait_send(running, ["79680000000"])
    assert response.status == 201 and time.monotonic() - started < 3
    (message_id,) = response.json()["message_id"].values()
    assert response.json()["messages"][message_id]["status"] == "sent"


def test_send_and_wait_answers_when_smsd_removes_the_queued_file_after_the_wake(
    config, spool, clock
):
    # smsd writes the sent file before it removes the queued one, and a poll (no
    # inotify) does not list the queue: the one wake may come while it is in both.
    app = smsapi.Application(config, clock=clock, inotify=False)
    app.parts.watcher.tick()  # the poll knows the spool
    answers = []
    request = threading.Thread(
        target=lambda: answers.append(wait_send(app, ["79680000000"], query="wait=30"))
    )
    request.start()
    wait_until(lambda: clock.asleep([request]), 5, "the request to wait")
    (message_id,) = queued_ids(spool, 1)
    queued = os.path.join(spool["outgoing"], message_id)
    shutil.copy(queued, os.path.join(spool["sent"], message_id))
    app.parts.watcher.tick()  # the wake, the only one: the queue is not polled
    request.join(2)
    answered = not request.is_alive()
    os.remove(queued)
    clock.advance(30)  # else it would wait out its time: ended either way
    request.join(5)
    assert answered and answers[0].status == 201
    assert status_of(app, message_id)["status"] == "sent"


@pytest.mark.parametrize(
    ("before", "after", "status"),
    [("outgoing", "sent", "sent"), ("checked", "failed", "failed"),
     ("scheduled", "outgoing", "queued"), ("outgoing", "checked", "sending")],
)  # fmt: skip
def test_status_of_a_message_in_two_places_is_the_later(app, spool, before, after, status):
    message_id = sent_id(app)  # smsd writes where a message goes before it removes it
    queued = os.path.join(spool["outgoing"], message_id)
    for kind in (before, after):
        os.makedirs(app.config.spool[kind], exist_ok=True)
        if kind != "outgoing":
            shutil.copy(queued, os.path.join(app.config.spool[kind], message_id))
    if "outgoing" not in (before, after):
        os.remove(queued)
    assert status_of(app, message_id)["status"] == status


def test_send_and_wait_502_when_any_failed(running, spool, clock):
    def smsd():
        first, second = queued_ids(spool, 2)
        smsd_sends(spool, first, 1)
        smsd_fails(spool, second)

    later(0.3, smsd)
    with time_passes(clock):
        response = wait_send(running, ["79680000000", "79680000001"])
    assert response.status == 502
    data = response.json()
    assert "CMS ERROR: 500" in data["error"]
    assert sorted(m["status"] for m in data["messages"].values()) == ["failed", "sent"]


def test_send_and_wait_504_leaves_messages_queued(running, spool, clock):
    with time_passes(clock, speed=5):
        response = wait_send(running, ["79680000000"], query="wait=1")
    assert response.status == 504
    (message_id,) = response.json()["message_id"].values()
    assert "stay queued" in response.json()["error"]
    assert os.path.exists(os.path.join(spool["outgoing"], message_id))


def test_send_and_wait_for_delivery(running, spool, clock):
    def smsd():
        message_id = queued_ids(spool, 1)[0]
        smsd_sends(spool, message_id, 5)
        time.sleep(0.3)
        smsd_reports(spool, "79680000000", 5)

    later(0.2, smsd)
    with time_passes(clock):
        response = wait_send(
            running, ["79680000000"], query="wait=5&wait_for=delivered", report=True
        )
    assert response.status == 201
    assert [m["status"] for m in response.json()["messages"].values()] == ["delivered"]


@pytest.mark.parametrize(
    "query, message",
    [
        ("wait=61", "wait"),
        ("wait=x", "wait"),
        ("wait=5&wait_for=delivered", "report"),
        ("wait=5&wait_for=read", "wait_for"),
    ],
)
def test_send_and_wait_bad_parameters(app, spool, query, message):
    response = wait_send(app, ["79680000000"], query=query)
    assert response.status == 400 and message in response.json()["error"]
    assert spool_snapshot(spool) == {}


def test_send_and_wait_can_be_turned_off(tmp_path, spool):
    app = smsapi.Application(
        smsapi.load_config(write_ini(tmp_path, spool, extra="max_wait = 0"))
    )
    response = wait_send(app, ["79680000000"], query="wait=1")
    assert response.status == 400 and "from 0 to 0" in response.json()["error"]
    assert wait_send(app, ["79680000000"], query="wait=0").status == 201


def test_send_and_wait_bounds_the_waiters(running, spool, clock):
    results = []
    waiters = [
        threading.Thread(
            target=lambda: results.append(
                wait_send(running, ["79680000000"], query="wait=2")
            )
        )
        for _ in range(2)
    ]
    for thread in waiters:
        thread.start()
    wait_until(lambda: clock.asleep(waiters), 5, "both waiters to wait")
    refused = wait_send(running, ["79680000001"], query="wait=2")
    assert refused.status == 503 and refused.headers["Retry-After"]
    assert send(running, ["79680000002"]).status == 201  # a plain send is never blocked
    clock.advance(2)
    for thread in waiters:
        thread.join()
    assert [r.status for r in results] == [504, 504]
    assert len(queued_ids(spool, 3)) == 3  # the refused one wrote nothing


def idempotent(
    app, key, text="once", user="lvv", numbers=("79680000000", "79680000001")
):
    body = {"mobiles": list(numbers), "text": text}
    return post_send(app, body, user, {"Idempotency-Key": key})


def test_idempotency_key_repeat_returns_the_first_answer(app, spool):
    first = idempotent(app, "job-42")
    files = spool_snapshot(spool)
    again = idempotent(app, "job-42")
    assert (
        (again.status, again.json())
        == (first.status, first.json())
        == (201, first.json())
    )
    assert spool_snapshot(spool) == files and len(files) == 2
    assert (
        idempotent(app, "job-42", user="ann").json() != first.json()
    )  # keys are per user
    different = idempotent(app, "job-42", text="other")
    assert different.status == 422
    assert len(spool_snapshot(spool)) == 4


def test_idempotency_key_holds_across_restart(config, spool):
    first = idempotent(smsapi.Application(config), "nightly backup")
    again = idempotent(smsapi.Application(config), "nightly backup")
    assert again.json() == first.json() and len(spool_snapshot(spool)) == 2


def test_idempotency_key_racing_requests_write_one_set(app, spool):
    answers = []
    threads = [
        threading.Thread(target=lambda: answers.append(idempotent(app, "race").json()))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(spool_snapshot(spool)) == 2
    assert all(a == answers[0] for a in answers)


def test_idempotency_key_retry_after_crash_finishes_the_same_files(app, config, spool):
    # The crash came after the record and the first file, before the second.
    store = app.parts.idempotency
    first = idempotent(app, "warm-up", numbers=["79680000000", "79680000001"])
    record = smsapi.read_json(store.path("lvv", "warm-up"))
    del record["response"], record["status"]
    store.save(store.path("lvv", "crashed"), record)
    survivor, lost = record["ids"]["79680000000"], record["ids"]["79680000001"]
    os.remove(os.path.join(spool["outgoing"], lost))
    smsd_sends(spool, survivor, 1)
    retry = idempotent(app, "crashed", numbers=["79680000000", "79680000001"])
    assert retry.status == 201 and retry.json() == first.json()
    assert os.path.exists(os.path.join(spool["outgoing"], lost))
    assert not os.path.exists(os.path.join(spool["outgoing"], survivor))


def test_idempotency_key_expires_after_a_day(app, spool):
    idempotent(app, "daily")
    path = app.parts.idempotency.path("lvv", "daily")
    record = smsapi.read_json(path)
    record["created"] -= 25 * 3600
    smsapi.write_json(path, record, True)
    assert idempotent(app, "daily").status == 201
    assert len(spool_snapshot(spool)) == 4
    app.parts.idempotency.expire(time.time())
    assert os.path.exists(path)  # written just now
    aged = time.time() - 25 * 3600
    os.utime(path, (aged, aged))  # expiry reads mtimes, never the records
    app.parts.idempotency.expire(time.time())
    assert not os.path.exists(path)


@pytest.mark.parametrize("key", [" lead", "trail ", "x" * 256, "tab\tkey", "ключ"])
def test_idempotency_key_must_be_printable(app, spool, key):
    # A WSGI server hands header bytes over as latin-1 text.
    response = idempotent(app, key.encode("utf-8").decode("latin-1"))
    assert response.status == 400 and "Idempotency-Key" in response.json()["error"]
    assert spool_snapshot(spool) == {}


def test_inbox_lists_sender_time_text_without_reports(app, spool):
    now = time.time()
    for i, (sender, text) in enumerate(
        [
            ("358401111111", "first"),
            ("358402222222", "second"),
            ("358401111111", "third"),
        ]
    ):
        path = put_file(
            spool,
            "incoming",
            f"GSM1.m{i}",
            {
                "From": sender,
                "Received": time.strftime(
                    SMSD_TIME, time.localtime(now - 300 + 100 * i)
                ),
            },
            text,
            "UTF-8",
        )
        os.utime(path, (now, now))
    smsd_reports(spool, "79680000000", 1)
    app.parts.watcher.tick()
    data = call(app, "GET", "/api/v1.0/sms/incoming/", user="inbox").json()
    assert (
        data["message_id"] == ["GSM1.m2", "GSM1.m1", "GSM1.m0"]
        and data["total_count"] == 3
    )
    assert data["messages"][0] == {
        "message_id": "GSM1.m2",
        "type": "sms",
        "from": "358401111111",
        "received": smsapi.iso_time(
            smsapi.smsd_time(time.strftime(SMSD_TIME, time.localtime(now - 100)))
        ),
        "text": "third",
    }
    page = call(
        app,
        "GET",
        "/api/v1.0/sms/incoming/",
        user="inbox",
        query="since=GSM1.m0&limit=1",
    ).json()
    assert page["message_id"] == ["GSM1.m2"] and page["total_count"] == 2
    since = smsapi.iso_time(now - 150)
    query = "since=" + urllib.parse.quote(since) + "&from=%2B358401111111"
    assert call(
        app, "GET", "/api/v1.0/sms/incoming/", user="inbox", query=query
    ).json()["message_id"] == ["GSM1.m2"]
    reports = call(
        app, "GET", "/api/v1.0/sms/incoming/", user="inbox", query="type=report"
    ).json()
    assert [m["type"] for m in reports["messages"]] == ["report"]
    assert (
        call(
            app, "GET", "/api/v1.0/sms/incoming/", user="inbox", query="type=all"
        ).json()["total_count"]
        == 4
    )
    assert (
        call(
            app, "GET", "/api/v1.0/sms/incoming/", user="inbox", query="since=yesterday"
        ).status
        == 400
    )


@pytest.mark.parametrize(
    "since, status",
    [
        ("0001-01-01T00:00:00", 400),
        ("9999-12-31T23:59:59", 200),
        ("2026-13-01", 400),
        ("x" * 200, 400),
    ],
)
def test_inbox_since_at_the_edges_of_time(app, since, status):
    query = "since=" + urllib.parse.quote(since)
    response = call(app, "GET", "/api/v1.0/sms/incoming/", user="inbox", query=query)
    assert response.status == status
    assert (
        "since" in response.json()["error"]
        if status == 400
        else response.json()["message_id"] == []
    )


def test_inbox_user_may_delete_received_messages(app, spool):
    put_file(spool, "incoming", "GSM1.del", {"From": "358401111111"})
    assert (
        call(app, "DELETE", "/api/v1.0/sms/incoming/GSM1.del", user="lvv").status == 404
    )
    assert (
        call(app, "DELETE", "/api/v1.0/sms/incoming/GSM1.del", user="inbox").status
        == 200
    )
    assert spool_snapshot(spool) == {}


def test_dry_run_describes_and_writes_nothing(app, spool):
    body = {"mobiles": ["+7 968 000 00 00"], "text": "Voilà ça `x`", "flash": True}
    response = post_send(app, body, "lvv", query="dry_run=1")
    assert response.status == 200
    assert response.json() == {
        "dry_run": True,
        "recipients": {"+7 968 000 00 00": "79680000000"},
        "encoding": "UCS2",
        "parts_count": 1,
        "units": 12,
        "non_gsm_characters": ["`", "ç"],
        "headers": {"Flash": "yes"},
        "sent_text": "Voilà ça `x`",
        "substituted": 0,
        "truncated": False,
    }
    straddle = post_send(
        app,
        {"mobiles": ["79680000000"], "text": "x" * 152 + "€" * 5},
        "lvv",
        query="dry_run=1",
    ).json()
    assert (
        straddle["encoding"] == "UCS2"
        and straddle["non_gsm_characters"] == []
        and straddle["ucs2_reason"]
    )
    forbidden = post_send(
        app,
        {"mobiles": ["1234567"], "text": "x"},
        "lvv",
        query="dry_run=1",
    )
    assert forbidden.status == 403
    assert spool_snapshot(spool) == {}


def test_plain_text_answers_for_shell_scripts(app):
    plain = {"Accept": "text/plain"}
    response = post_send(
        app,
        {"mobiles": ["79680000000", "79680000001"], "text": "x"},
        "lvv",
        plain,
    )
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    ids = response.body.decode().splitlines()
    assert len(ids) == 2 and all(i.startswith("smsapi.") for i in ids)
    status = call(
        app, "GET", "/api/v1.0/sms/status/" + ids[0], user="lvv", headers=plain
    )
    assert status.body == b"queued\n"
    missing = call(
        app, "GET", "/api/v1.0/sms/status/smsapi.none", user="lvv", headers=plain
    )
    assert (missing.status, missing.body) == (404, b"Not found\n")
    query = "mobiles=79680000002&text=cron"
    assert call(
        app, "GET", "/api/v1.0/sms/outgoing", user="lvv", headers=plain, query=query
    ).body.startswith(b"smsapi.")


###############################################################################
# Watcher parts and hostile spool files ########################################
###############################################################################

SPOOL_OPENS = []  # paths opened while a test counts them (see counting_opens)


def _count_open(event, args):
    listed = event in ("open", "os.scandir", "os.listdir")
    if listed and SPOOL_OPENS and isinstance(args[0], str):
        SPOOL_OPENS[0].append(args[0])


sys.addaudithook(_count_open)


class counting_opens:
    """Collect the paths under root that this process opens or lists meanwhile (audit events)."""

    def __init__(self, root):
        self.root, self.paths = str(root), []

    def __enter__(self):
        SPOOL_OPENS.append([])
        return self

    def __exit__(self, *exc):
        self.paths = [p for p in SPOOL_OPENS.pop() if p.startswith(self.root)]


def in_time(action, timeout=5):
    """action()'s result, or the test fails if it takes longer than timeout (a hang)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(action()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{action} hung"
    return result[0]


def inbox(app, query="type=all"):
    return call(app, "GET", "/api/v1.0/sms/incoming/", user="inbox", query=query)


def test_watcher_poison_report_stops_no_other_file(app, spool):
    message_id = sent_id(app, report=True)
    smsd_sends(spool, message_id, 5)
    poison = "SMS STATUS REPORT\nMessage_id: " + "9" * 4400 + "\nStatus: 0,Ok"
    put_file(spool, "incoming", "GSM1.poison", {"From": "1", "UDH": "no"}, poison)
    for n in range(10):
        put_file(spool, "incoming", f"GSM1.sms{n}", {"From": "3584011"}, f"sms {n}")
    smsd_reports(spool, "79680000000", 5)
    app.parts.watcher.tick()
    listed = inbox(app).json()["messages"]
    assert {m["message_id"] for m in listed if m["type"] == "sms"} == {
        "GSM1.poison",
        *(f"GSM1.sms{n}" for n in range(10)),
    }
    assert status_of(app, message_id)["status"] == "delivered"
    restarted = smsapi.Application(app.config)  # and so it stays after a restart
    restarted.parts.watcher.tick()
    assert status_of(restarted, message_id)["status"] == "delivered"
    assert inbox(restarted).json()["total_count"] == 12


def forged_report(spool, to, ref, kind="incoming", udh=None):
    """An SMS whose text reads like a status report, as smsd files an SMS-DELIVER."""
    headers = {"From": to, "Received": time.strftime(SMSD_TIME), "Modem": "GSM1"}
    if udh:
        headers["UDH"] = udh
    text = f"SMS STATUS REPORT\nMessage_id: {ref}\nStatus: 0,Ok,short message received by the SME"
    name = "GSM1." + base64.b32encode(os.urandom(5)).decode()[:6]
    put_file(spool, kind, name, headers, text, "UTF-8")
    return name


def test_watcher_sms_that_reads_like_a_report_is_not_one(app, spool):
    message_id = sent_id(app, report=True)
    smsd_sends(spool, message_id, 1)
    forged = forged_report(spool, "79680000000", 1)
    app.parts.watcher.tick()
    assert status_of(app, message_id)["status"] == "sent"
    assert [m["type"] for m in inbox(app).json()["messages"]] == ["sms"]
    smsd_reports(spool, "79680000000", 1, code=70)
    app.parts.watcher.tick()
    assert status_of(app, message_id)["status"] == "undelivered"
    types = {m["message_id"]: m["type"] for m in inbox(app).json()["messages"]}
    assert types.pop(forged) == "sms" and list(types.values()) == ["report"]


def test_watcher_with_a_report_directory_takes_reports_only_from_there(tmp_path, spool):
    spool = dict(spool, report=str(tmp_path / "spool" / "report"))
    os.mkdir(spool["report"])
    app = smsapi.Application(smsapi.load_config(write_ini(tmp_path, spool)))
    message_id = sent_id(app, report=True)
    smsd_sends(spool, message_id, 3)
    forged_report(spool, "79680000000", 3, udh="no")  # even with the header
    app.parts.watcher.tick()
    assert status_of(app, message_id)["status"] == "sent"
    smsd_reports(spool, "79680000000", 3, kind="report")
    app.parts.watcher.tick()
    assert status_of(app, message_id)["status"] == "delivered"


def test_watcher_attaches_a_report_file_once_however_often_it_is_written(app, spool):
    first, second = sent_id(app, report=True), sent_id(app, report=True)
    smsd_sends(spool, first, 100, when=time.time() - 5)
    smsd_sends(spool, second, 100)
    report = smsd_reports(spool, "79680000000", 100, code=70)
    app.parts.watcher.tick()
    assert status_of(app, second)["status"] == "undelivered"
    path = os.path.join(spool["incoming"], report)
    with open(path, "ab") as file:  # written again: one more close event
        file.write(b"\n")
    app.parts.watcher.tick()
    assert status_of(app, first)["status"] == "sent"
    restarted = smsapi.Application(app.config)
    restarted.parts.watcher.tick()  # re-reads incoming: the file is known as used
    assert status_of(restarted, first)["status"] == "sent"


def release_fifos(spool):
    """Open every FIFO in the spool for writing, so a reader stuck in open() goes on."""
    for path in spool.values():
        for name in os.listdir(path):
            full = os.path.join(path, name)
            if stat.S_ISFIFO(os.lstat(full).st_mode):
                with contextlib.suppress(OSError):
                    os.close(os.open(full, os.O_WRONLY | os.O_NONBLOCK))


def test_spool_fifos_block_nothing(app, spool):
    for kind in ("incoming", "sent"):
        os.mkfifo(os.path.join(spool[kind], "GSM1.fifo"))
    try:
        in_time(app.parts.watcher.tick)
        assert inbox(app).json()["total_count"] == 0
        for kind in ("incoming", "sent"):
            path = f"/api/v1.0/sms/{kind}/GSM1.fifo"
            assert (
                in_time(lambda p=path: call(app, "GET", p, user="root").status) == 404
            )
        listing = in_time(lambda: call(app, "GET", "/api/v1.0/sms/sent/", user="root"))
        assert listing.json()["message_id"] == ["GSM1.fifo"]  # a name, never opened
    finally:
        release_fifos(spool)


def test_spool_times_before_1970_and_far_ahead_are_clamped(app, spool):
    old = put_file(spool, "sent", "GSM1.old", {"From": "lvv", "To": "1"})
    os.utime(old, (-365 * 86400, -365 * 86400))
    listing = in_time(lambda: call(app, "GET", "/api/v1.0/sms/sent/", user="root"))
    assert listing.status == 200 and listing.json()["message_id"] == ["GSM1.old"]
    ahead = put_file(spool, "incoming", "GSM1.ahead", {"From": "1"}, "from the future")
    try:
        os.utime(ahead, (1e12, 1e12))  # the year 33658, where the file system allows
    except (OSError, OverflowError):
        os.utime(ahead, (2**33, 2**33))
    app.parts.watcher.tick()
    received = inbox(app).json()["messages"][0]["received"]
    assert int(received[:4]) > 2200, received  # ext4 itself stops at 2446
    assert (
        call(app, "GET", "/api/v1.0/sms/incoming/GSM1.ahead", user="root").status == 200
    )


def test_spool_symlinks_are_never_followed(app, spool, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("From: lvv\nTo: 79680000000\n\nthe config's password hashes")
    os.symlink(secret, os.path.join(spool["incoming"], "GSM1.link"))
    os.symlink(secret, os.path.join(spool["sent"], "smsapi.link"))
    app.parts.watcher.tick()
    assert inbox(app).json()["total_count"] == 0
    for kind, name in (("incoming", "GSM1.link"), ("sent", "smsapi.link")):
        for user in ("root", "lvv"):
            response = call(app, "GET", f"/api/v1.0/sms/{kind}/{name}", user=user)
            assert response.status == 404 and b"password" not in response.body
    assert (
        call(app, "GET", "/api/v1.0/sms/status/smsapi.link", user="lvv").status == 404
    )


def test_inbox_page_reads_a_bounded_amount_of_files(app, spool):
    for n in range(100):  # sparse files of 1 MiB each: cheap to make, costly to serve
        path = put_file(spool, "incoming", f"GSM1.big{n:03d}", {"From": "1"}, "x")
        os.truncate(path, 1 << 20)
    app.parts.watcher.tick()
    response = inbox(app, "limit=100")
    messages = response.json()["messages"]
    assert response.status == 200 and len(messages) == 100
    assert len(response.body) < 8 * smsapi.MAX_PAGE_READ  # escaped NULs are 6 bytes
    assert messages[-1]["text"] is None  # past the budget: GET it on its own
    single = call(app, "GET", "/api/v1.0/sms/incoming/GSM1.big000", user="root")
    assert len(single.json()["text"]) <= smsapi.MAX_SPOOL_FILE


def test_state_damaged_report_journal_lines_are_skipped(config, spool, caplog):
    app = smsapi.Application(config)
    kept = sent_id(app, report=True)
    smsd_sends(spool, kept, 1)
    smsd_reports(spool, "79680000000", 1)
    app.parts.watcher.tick()
    other = sent_id(app)
    smsd_sends(spool, other, 2)
    journal = os.path.join(config.state_dir, smsapi.JOURNAL)
    with open(journal, "a") as file:
        file.writelines(
            line + "\n"
            for line in (
                '{"awaiting": "x"}',
                '["await", "' + other + '", "GSM1", "x", "1", 0]',
                '["outcome", "' + other + '", "delivered", 5, "", ""]',
                '["outcome", "../../etc/passwd", "delivered", "", "", ""]',
                '["forget"]',
                '["clock", "yesterday"]',
                "[" * 100000,
                '["outcome", "' + other + '", "deliv',  # torn by a crash
            )
        )
    restarted = smsapi.Application(config)
    assert "8 damaged lines skipped" in caplog.text
    restarted.parts.watcher.tick()
    assert status_of(restarted, kept)["status"] == "delivered"
    assert status_of(restarted, other)["status"] == "sent"


def test_state_damaged_idempotency_record_is_ignored_not_a_500(app, spool):
    assert idempotent(app, "daily").status == 201
    path = app.parts.idempotency.path("lvv", "daily")
    for damaged in (
        {"created": "yesterday", "fingerprint": "x", "ids": {}},
        {"created": time.time(), "fingerprint": None, "ids": []},
        "status 299",  # the first record, with a status no send answers
        ["not", "an", "object"],
    ):
        if damaged == "status 299":
            damaged = dict(smsapi.read_json(path), status=299)
        with open(path, "w") as file:
            json.dump(damaged, file)
        response = idempotent(app, "daily")
        assert response.status == 201, response.body


def test_send_with_report_writes_no_state(app, spool, config):
    sent_id(app, report=True)
    app.parts.watcher.tick()
    before = {
        n: os.stat(os.path.join(config.state_dir, n)).st_size
        for n in os.listdir(config.state_dir)
    }
    for _ in range(20):
        sent_id(app, report=True)
    after = {
        n: os.stat(os.path.join(config.state_dir, n)).st_size
        for n in os.listdir(config.state_dir)
    }
    assert after == before  # the index learns from sent/, not from the send


def test_watcher_tick_reads_only_what_changed(app, spool):
    queued = [sent_id(app, report=True) for _ in range(50)]
    for n, message_id in enumerate(queued[:40]):
        smsd_sends(spool, message_id, n)
    app.parts.watcher.tick()
    with counting_opens(os.path.dirname(spool["sent"])) as quiet:
        app.parts.watcher.tick()
    assert quiet.paths == []  # 10 queued and 40 awaiting reports cost no file read
    smsd_sends(spool, queued[40], 40)
    report = smsd_reports(spool, "79680000000", 0)
    with counting_opens(os.path.dirname(spool["sent"])) as busy:
        app.parts.watcher.tick()
    assert sorted(busy.paths) == [  # the two files that came, each read once
        os.path.join(spool["incoming"], report),
        os.path.join(spool["sent"], queued[40]),
    ]
    assert status_of(app, queued[0])["status"] == "delivered"


def test_watcher_saves_a_ticks_progress_when_one_file_fails(
    app, spool, monkeypatch, caplog
):
    good, bad = sent_id(app, report=True), sent_id(app, "79680000001", report=True)
    smsd_sends(spool, good, 1)
    smsd_sends(spool, bad, 2)
    app.parts.watcher.tick()
    real = smsapi.parse_report

    def planted_bug(name, headers, text, received):
        if headers.get("From") == "79680000001":
            raise RuntimeError("a bug planted by the test")
        return real(name, headers, text, received)

    monkeypatch.setattr(smsapi, "parse_report", planted_bug)
    smsd_reports(spool, "79680000001", 2)
    smsd_reports(spool, "79680000000", 1)
    app.parts.watcher.tick()
    assert caplog.text.count("RuntimeError: a bug planted") == 1  # logged once
    app.parts.watcher.tick()
    assert caplog.text.count("RuntimeError: a bug planted") == 1  # not retried
    restarted = smsapi.Application(app.config)
    assert status_of(restarted, good)["status"] == "delivered"  # saved


def test_watcher_counts_go_on_after_sent_is_made_anew(app, spool):
    app.parts.watcher.tick()
    shutil.rmtree(spool["sent"])
    app.parts.watcher.tick()
    os.mkdir(spool["sent"])
    app.parts.watcher.tick()
    for _ in range(2):
        smsd_sends(spool, sent_id(app), 1)
    app.parts.watcher.tick()
    assert app.parts.counts["sent"] == 2


def test_inbox_leaves_out_smsds_store_of_parts(app, spool):
    put_file(spool, "incoming", "GSM1-concatenated", {}, "parts of a long SMS")
    put_file(spool, "incoming", "GSM1.whole", {"From": "1"}, "a whole SMS")
    app.parts.watcher.tick()
    assert inbox(app).json()["message_id"] == ["GSM1.whole"]


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(
    data=st.binary(max_size=400),
    mtime=st.floats(min_value=-(2**40), max_value=2**40, allow_nan=False),
    kind=st.sampled_from(["incoming", "report"]),
)
def test_fuzz_received_file_with_any_bytes_and_time(data, mtime, kind):
    headers, text = smsapi.parse_message(data)
    received = smsapi.smsd_time(headers.get("Received")) or smsapi.clamp_time(mtime)
    report = None
    if smsapi.filed_as_report(kind, headers, report_dir=kind == "report"):
        report = smsapi.parse_report("GSM1.x", headers, text, received)
    assert report is None or 0 <= report.message_ref <= 255
    assert smsapi.iso_time(received)  # printable, whatever the file said


def changes_of(stream):
    """The stream's changes as (kind, name, event), RESCANs left out."""
    return [tuple(c) for c in stream.read() if c.event != smsapi.RESCAN]


def test_spool_changes_from_inotify_name_what_came_and_went(spool):
    stream = smsapi.SpoolChanges(spool, smsapi.Clock())
    assert {c.kind for c in stream.read() if c.event == smsapi.RESCAN} == set(spool)
    path = put_file(spool, "incoming", "GSM1.a", {"From": "1"})
    os.rename(path, os.path.join(spool["sent"], "GSM1.a"))
    os.remove(os.path.join(spool["sent"], "GSM1.a"))
    assert changes_of(stream) == [
        ("incoming", "GSM1.a", smsapi.CREATED),
        ("incoming", "GSM1.a", smsapi.WRITTEN),
        ("incoming", "GSM1.a", smsapi.GONE),
        ("sent", "GSM1.a", smsapi.MOVED_IN),
        ("sent", "GSM1.a", smsapi.GONE),
    ]
    assert stream.read() == []


def test_spool_changes_in_the_queue_are_only_what_leaves_it(spool):
    stream = smsapi.SpoolChanges(spool, smsapi.Clock())
    stream.read()
    smsapi.SpoolWriter(spool["outgoing"]).write({"smsapi.x": b"To: 1\n\nx"})  # a send
    os.rename(  # smsd takes it
        os.path.join(spool["outgoing"], "smsapi.x"),
        os.path.join(spool["checked"], "smsapi.x"),
    )
    os.remove(os.path.join(spool["checked"], "smsapi.x"))  # a cancel, say
    temp, *rest = changes_of(stream)
    assert temp[0] == "outgoing" and temp[2] == smsapi.GONE  # renamed into place
    assert temp[1].startswith(smsapi.TEMP_PREFIX + "smsapi.x.")
    assert rest == [
        ("outgoing", "smsapi.x", smsapi.GONE),
        ("checked", "smsapi.x", smsapi.GONE),
    ]


def test_spool_changes_watch_a_directory_made_anew(spool, caplog):
    stream = smsapi.SpoolChanges(spool, smsapi.Clock())
    stream.read()
    shutil.rmtree(spool["failed"])
    assert stream.read() == []
    assert stream.read() == []  # still gone: said once in the log
    assert caplog.text.count("cannot watch the failed spool") == 1
    os.mkdir(spool["failed"])
    assert stream.read() == [smsapi.Change("failed", "", smsapi.RESCAN)]
    put_file(spool, "failed", "m1", {})
    assert [c.name for c in stream.read()] == ["m1", "m1"]


def test_spool_changes_by_polling_without_inotify(spool):
    stream = smsapi.SpoolChanges(spool, smsapi.Clock(), inotify=False)
    assert {c.kind for c in stream.read()} == {"sent", "failed", "incoming"}
    settled_file = put_file(spool, "sent", "m1", {})
    age_file(settled_file, 5)
    age_file(spool["sent"], 1)  # the listing's stamp moved
    put_file(spool, "incoming", "GSM1.new", {})  # being written: not yet
    assert changes_of(stream) == [("sent", "m1", smsapi.MOVED_IN)]
    age_file(os.path.join(spool["incoming"], "GSM1.new"), 5)
    assert changes_of(stream) == [("incoming", "GSM1.new", smsapi.MOVED_IN)]
    os.remove(settled_file)
    age_file(spool["sent"], 3)
    assert changes_of(stream) == [("sent", "m1", smsapi.GONE)]


def test_spool_changes_by_polling_take_a_file_dated_ahead(spool):
    stream = smsapi.SpoolChanges(spool, smsapi.Clock(), inotify=False)
    stream.read()
    ahead = put_file(spool, "incoming", "GSM1.ahead", {})
    os.utime(ahead, (2**33, 2**33))  # the year 2242: not a file being written
    age_file(spool["incoming"], 1)
    assert changes_of(stream) == [("incoming", "GSM1.ahead", smsapi.MOVED_IN)]
    assert "incoming" not in stream.unsettled  # not listed again every tick


@pytest.fixture(params=[True, False], ids=["inotify", "polling"])
def watching(request, config):
    """An app whose watcher hears of changes from inotify, or from polling."""
    return smsapi.Application(config, inotify=request.param)


def settle(spool):
    """Age every spool file past the polling fallback's settling time."""
    for path in spool.values():
        for name in os.listdir(path):
            age_file(os.path.join(path, name), 2)
        age_file(path, 2)  # the directory's mtime tells a poll to list it


def test_watcher_reports_inbox_and_counts_by_inotify_and_by_polling(watching, spool):
    app = watching
    message_id = sent_id(app, report=True)
    app.parts.watcher.tick()
    smsd_sends(spool, message_id, 7)
    settle(spool)
    app.parts.watcher.tick()
    smsd_reports(spool, "79680000000", 7)
    put_file(spool, "incoming", "GSM1.hello", {"From": "358401"}, "hello")
    settle(spool)
    app.parts.watcher.tick()
    assert status_of(app, message_id)["status"] == "delivered"
    assert inbox(app, "type=sms").json()["message_id"] == ["GSM1.hello"]
    assert app.parts.counts["sent"] == 1
    os.remove(os.path.join(spool["incoming"], "GSM1.hello"))
    settle(spool)
    app.parts.watcher.tick()
    assert inbox(app, "type=sms").json()["message_id"] == []


def test_report_index_journal_grows_by_the_change_and_is_compacted(config, spool):
    os.makedirs(config.state_dir)
    counts = collections.Counter()
    index = smsapi.ReportIndex(lambda: config, counts, smsapi.Clock())
    index.save(time.time())  # the first clock
    path = os.path.join(config.state_dir, smsapi.JOURNAL)
    sent = time.time()
    for n in range(600):
        message = smsapi.Message(
            f"m{n}",
            "sent",
            {
                "Report": "yes",
                "Message_id": str(n % 256),
                "To": "1",
                "Modem": "GSM1",
                "Sent": time.strftime(SMSD_TIME, time.localtime(sent)),
            },
        )
        index.learn(message)
        if n:
            index.forget(f"m{n - 1}")
        before = os.path.getsize(path)
        index.save(time.time())
        grown = os.path.getsize(path) - before
        assert grown < 400 or index.journal.lines < 10  # two lines and a clock; or compacted
    assert list(index.awaiting) == ["m599"]
    assert index.journal.lines < 1000  # rewritten when mostly stale
    reloaded = smsapi.ReportIndex(lambda: config, counts, smsapi.Clock())
    assert reloaded.awaiting == index.awaiting and reloaded.seen == index.seen


def test_report_index_takes_over_the_index_of_smsapi_1_0(config, spool):
    os.makedirs(config.state_dir)
    delivered = sent_id(smsapi.Application(config), report=True)
    smsd_sends(spool, delivered, 4)
    legacy = {
        "version": 1,
        "pending": {},
        "awaiting": {"smsapi.other": ["GSM1", 5, "79680000000", time.time()], "x/y": 1},
        "outcomes": {
            delivered: {
                "status": "delivered",
                "at": "26-11-24 10:00:00",
                "detail": "ok",
            }
        },
    }
    smsapi.write_json(os.path.join(config.state_dir, "reports.json"), legacy, True)
    app = smsapi.Application(config)
    assert status_of(app, delivered)["status"] == "delivered"
    assert list(app.parts.reports.awaiting) == ["smsapi.other"]
    assert not os.path.exists(os.path.join(config.state_dir, "reports.json"))
    assert status_of(smsapi.Application(config), delivered)["status"] == "delivered"


@pytest.mark.parametrize(
    "ref, status",
    [("256", "0,Ok"), ("1", "256,Ok"), ("-1", "0,Ok"), ("1", "x,Ok"), ("0x1", "0,Ok")],
)
def test_report_numbers_are_one_octet_or_no_report(ref, status):
    text = f"SMS STATUS REPORT\nMessage_id: {ref}\nStatus: {status}"
    assert smsapi.parse_report("GSM1.x", {}, text, 0.0) is None
    good = smsapi.parse_report(
        "GSM1.x", {}, "SMS STATUS REPORT\nMessage_id: 255\nStatus: 255,x", 0.0
    )
    assert (good.message_ref, good.code) == (255, 255)


def test_retention_cutoff_is_exact_and_covers_the_report_directory(tmp_path, spool):
    spool = dict(spool, report=str(tmp_path / "spool" / "report"))
    os.mkdir(spool["report"])
    path = write_ini(tmp_path, spool)
    with open(path, "a") as file:
        file.write("[retention]\nincoming = 1hour\n")
    counts = collections.Counter()
    config = smsapi.load_config(path)
    retention = smsapi.Retention(lambda: config, counts)
    for kind in ("incoming", "report"):
        for name, age in (("older", 3600 + 30), ("younger", 3600 - 30)):
            age_file(put_file(spool, kind, f"GSM1.{name}", {}), age)
    retention.run(time.time())
    for kind in ("incoming", "report"):
        assert os.listdir(spool[kind]) == ["GSM1.younger"]
    assert counts["removed"] == 2


def test_retention_goes_on_next_tick_when_a_chunk_was_not_enough(tmp_path, spool):
    path = write_ini(tmp_path, spool)
    with open(path, "a") as file:
        file.write("[retention]\nsent = 1day\n")
    config = smsapi.load_config(path)
    retention = smsapi.Retention(lambda: config, collections.Counter(), chunk=3)
    for n in range(5):
        age_file(put_file(spool, "sent", f"m{n}", {}), 2 * 86400)
    now = time.time()
    retention.run(now)
    assert len(os.listdir(spool["sent"])) == 2
    retention.run(now + 1)  # not five minutes later: the pass was cut short
    assert os.listdir(spool["sent"]) == []
    age_file(put_file(spool, "sent", "late", {}), 2 * 86400)
    retention.run(now + 2)  # done: the next pass waits its five minutes
    assert os.listdir(spool["sent"]) == ["late"]


def test_recent_failures_leave_out_files_dated_ahead(spool):
    failures = smsapi.RecentFailures(spool["failed"], smsapi.Clock())
    now = put_file(spool, "failed", "now", {})
    ahead = put_file(spool, "failed", "ahead", {})
    os.utime(ahead, (time.time() + 86400, time.time() + 86400))
    failures.rescan()
    assert failures.count() == 1
    failures.arrived("ahead")
    assert failures.count() == 1
    failures.gone(os.path.basename(now))
    assert failures.count() == 0


def test_waiters_wake_only_for_their_names_and_leave_nothing_behind():
    waiters = smsapi.Waiters(smsapi.Clock())
    looks = []

    def look():
        looks.append(time.monotonic())
        return len(looks)

    done = threading.Event()
    thread = threading.Thread(
        target=lambda: (
            done.set()
            or waiters.wait(["a", "b"], look, lambda n: n >= 2, time.monotonic() + 10)
        )
    )
    thread.start()
    wait_until(lambda: waiters.watched, what="the waiter to register")
    waiters.wake({"c"})  # another request's message
    time.sleep(0.2)
    assert len(looks) == 1
    waiters.wake({"b"})
    thread.join(5)
    assert not thread.is_alive() and len(looks) == 2
    assert not waiters.watched  # nothing left behind


def test_metrics_histogram_buckets_hold_what_is_at_most_their_bound():
    histogram = smsapi.Histogram()
    for seconds in (0.005, 0.0051, 10.0, 11.0):
        histogram.observe(seconds)
    counts = dict(histogram.cumulative())
    assert counts[0.005] == 1 and counts[0.01] == 2 and counts[5.0] == 2
    assert counts[10.0] == 3 and counts["+Inf"] == 4
    assert histogram.total == pytest.approx(21.0101)


def test_metrics_label_values_are_escaped_for_the_text_format():
    from prometheus_client.parser import text_string_to_metric_families

    out = smsapi.Exposition()
    hostile = 'GSM"1\\\nx'
    out.one("smsapi_modem_signal_dbm", "gauge", "Signal.", -70, {"modem": hostile})
    (family,) = text_string_to_metric_families(out.text())
    assert family.samples[0].labels == {"modem": hostile}


def test_error_messages_quote_client_input_escaped(app, spool):
    response = send(app, ['7968\x07"\\', "79680000000"])
    assert response.status == 400
    assert response.json()["error"].endswith('"7968\\\\x07\\"\\\\x5c"')
    assert spool_snapshot(spool) == {}


###############################################################################
# Reliability and security #####################################################
###############################################################################


def login(app, address, user, password=None):
    """GET a listing from address as user (with its real password unless given)."""
    password = PASSWORDS.get(user, "") if password is None else password
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    headers = {"Authorization": "Basic " + token}
    return call(app, "GET", "/api/v1.0/sms/sent/", headers=headers, remote_addr=address)


def test_throttle_blocks_a_guessing_address_but_not_the_real_user_elsewhere(app):
    for _ in range(10):
        assert login(app, "192.0.2.7", "lvv", "guess").status == 401
    blocked = login(app, "192.0.2.7", "lvv")
    assert blocked.status == 429 and int(blocked.headers["Retry-After"]) >= 1
    assert login(app, "198.51.100.1", "lvv").status == 200
    assert login(app, "192.0.2.7", "ann").status == 429


def test_throttle_failures_for_a_user_spread_over_addresses_block_nobody(app):
    for i in range(10):
        login(app, f"192.0.2.{i}", "lvv", "guess")
    assert login(app, "192.0.2.3", "lvv").status == 200  # one mistake there is no block
    assert login(app, "203.0.113.9", "lvv").status == 200


def test_throttle_delay_grows_and_costs_no_scrypt(app):
    for _ in range(10):
        login(app, "192.0.2.7", "nobody", "x")
    checked = app.parts.authenticator.hashes_checked
    delays = [
        int(login(app, "192.0.2.7", "nobody", "x").headers["Retry-After"])
        for _ in range(4)
    ]
    assert delays == sorted(delays) and delays[-1] >= 4 * delays[0]
    assert app.parts.authenticator.hashes_checked == checked


def test_throttle_trusts_forwarded_address_only_from_a_trusted_proxy(tmp_path, spool):
    app = smsapi.Application(
        smsapi.load_config(
            write_ini(tmp_path, spool, extra="trusted_proxies = 127.0.0.1")
        )
    )
    bad = {"Authorization": "Basic " + base64.b64encode(b"lvv:guess").decode()}
    for _ in range(10):
        call(
            app,
            "GET",
            "/api/v1.0/sms/sent/",
            headers=dict(bad, **{"X-Forwarded-For": "192.0.2.7"}),
        )
    good = {"Authorization": auth("lvv")}
    assert (
        call(
            app,
            "GET",
            "/api/v1.0/sms/sent/",
            headers=dict(good, **{"X-Forwarded-For": "192.0.2.7"}),
        ).status
        == 429
    )
    assert (
        call(
            app,
            "GET",
            "/api/v1.0/sms/sent/",
            headers=dict(good, **{"X-Forwarded-For": "192.0.2.8"}),
        ).status
        == 200
    )
    # an untrusted client cannot pick its address
    spoofed = dict(good, **{"X-Forwarded-For": "192.0.2.8"})
    for _ in range(10):
        login(app, "198.51.100.5", "lvv", "guess")
    assert (
        call(
            app,
            "GET",
            "/api/v1.0/sms/sent/",
            headers=spoofed,
            remote_addr="198.51.100.5",
        ).status
        == 429
    )


def test_auth_every_failure_costs_the_same_one_scrypt(config):
    checker = smsapi.Authenticator()
    password = PASSWORDS["lvv"]
    checker.check(config.users, "lvv", password)
    for name, attempt in (
        ("lvv", "X" + password[1:]),
        ("lvv", password[:-1] + "X"),
        ("nobody", password),
        ("lvv", ""),
        ("lvv", password * 50),
    ):
        before = checker.hashes_checked
        assert checker.check(config.users, name, attempt) is None
        assert checker.hashes_checked == before + 1
    before = checker.hashes_checked
    assert checker.check(config.users, "lvv", password) is config.users["lvv"]
    assert (
        checker.hashes_checked == before
    )  # a known good credential costs one fast hash


def test_isolation_a_user_cannot_reach_another_users_message(app, spool):
    message_id = sent_id(app)
    for method, path in (
        ("GET", "/api/v1.0/sms/outgoing/"),
        ("GET", "/api/v1.0/sms/status/"),
        ("DELETE", "/api/v1.0/sms/outgoing/"),
    ):
        response = call(app, method, path + message_id, user="ann")
        assert (response.status, response.json()) == (404, {"error": "Not found"})
    assert (
        message_id
        not in call(app, "GET", "/api/v1.0/sms/outgoing/", user="ann").json()[
            "message_id"
        ]
    )
    assert os.path.exists(os.path.join(spool["outgoing"], message_id))


@pytest.mark.parametrize(
    "spelling",
    [
        "+79990000000",
        "7 999 000 00 00",
        "007968000000",
        "0079680000000",
        "+7968０000000",
        "٧٩٦٨٠٠٠٠٠٠٠",
        "79680000000\u200b",
        "+ 7968000000x",
    ],
)
def test_isolation_allow_list_holds_for_every_spelling(app, spool, spelling):
    response = send(app, [spelling])
    assert response.status in (400, 403)
    assert spool_snapshot(spool) == {}


def test_hostile_ten_thousand_recipients(app, spool):
    numbers = [f"7968{i:07d}" for i in range(10000)]
    assert send(app, numbers).status == 413  # 170 kB: over max_body
    big = smsapi.Application(app.config.replace(max_body=1 << 20))
    response = send(big, numbers)
    assert response.status == 400 and "Too many recipients" in response.json()["error"]
    assert spool_snapshot(spool) == {}


def test_hostile_header_injection_through_every_field(app, spool):
    for fields in (
        {"mobiles": ["79680000000\nInclude: /etc/shadow"], "text": "x"},
        {
            "mobiles": ["79680000000"],
            "text": "x",
            "queue": "fast\nInclude: /etc/shadow",
        },
        {
            "mobiles": ["79680000000"],
            "text": "x",
            "validity": "1day\nInclude: /etc/shadow",
        },
        {
            "mobiles": ["79680000000"],
            "text": "x",
            "priority": "high\nInclude: /etc/shadow",
        },
    ):
        assert post_send(app, fields, "lvv").status == 400
    assert spool_snapshot(spool) == {}
    message_id = sent_id(app, text="line\n\nInclude: /etc/shadow\nTo: 1")
    head = read_spool_file(spool, "outgoing", message_id).split(b"\n\n")[0]
    assert head == b"From: lvv\nTo: 79680000000\nAlphabet: UTF-8"


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    """One app and spool for every hypothesis example."""
    root = tmp_path_factory.mktemp("fuzz")
    spool = make_spool(root)
    app = smsapi.Application(smsapi.load_config(write_ini(root, spool)))
    yield app, spool
    app.close()


@hypothesis.settings(
    max_examples=300, deadline=None, suppress_health_check=list(hypothesis.HealthCheck)
)
@hypothesis.given(
    body=st.one_of(
        st.binary(max_size=300),
        st.text(max_size=200).map(str.encode),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(
                    st.sampled_from([*sorted(smsapi.SEND_FIELDS), "x"]),
                    inner,
                    max_size=5,
                )
            ),
            max_leaves=12,
        ).map(lambda v: json.dumps(v).encode()),
    ),
    content_type=st.sampled_from(
        [
            "application/json",
            "application/x-www-form-urlencoded",
            "text/plain",
            "",
            "application/json; charset=latin-1",
            "multipart/form-data",
        ]
    ),
    query=st.text(max_size=60),
    accept=st.sampled_from(["", "text/plain", "application/json", "*/*"]),
)
def test_fuzz_request_parser_never_fails_and_rejects_write_nothing(
    fuzz_app, body, content_type, query, accept
):
    app, spool = fuzz_app
    headers = {"Content-Type": content_type, "Accept": accept}
    query = urllib.parse.quote(query, safe="=&+%,")
    for method in ("POST", "GET"):
        response = call(
            app,
            method,
            "/api/v1.0/sms/outgoing",
            body if method == "POST" else b"",
            "lvv",
            headers,
            query=query,
        )
        assert response.status < 500
        assert b"Traceback" not in response.body
        if response.status != 201:
            assert spool_snapshot(spool) == {}
        for name in os.listdir(spool["outgoing"]):
            os.remove(os.path.join(spool["outgoing"], name))


@hypothesis.settings(max_examples=500, deadline=None)
@hypothesis.given(data=st.binary(max_size=400))
def test_fuzz_spool_file_parser_takes_any_bytes(data):
    headers, text = smsapi.parse_message(data)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
    assert text is None or isinstance(text, str)
    smsapi.parse_report("GSM1.x", headers, text, 0.0)


@hypothesis.settings(max_examples=500, deadline=None)
@hypothesis.given(
    text=st.text(min_size=1, max_size=400).filter(lambda t: "\0" not in t)
)
def test_fuzz_rendered_file_reads_back_the_exact_text(text):
    encoding = smsapi.encode_text(text)
    headers, body_text = smsapi.parse_message(
        smsapi.render_message("lvv", "79680000000", encoding, [])
    )
    assert headers == {"From": "lvv", "To": "79680000000", "Alphabet": encoding.header}
    assert body_text == text


def mount_tmpfs(path, options):
    """Mount a tmpfs on path; False where that is not allowed (not root)."""
    if os.geteuid() != 0:
        return False
    command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]
    return (
        subprocess.run(command, stderr=subprocess.DEVNULL, check=False).returncode == 0
    )


@pytest.fixture
def small_outgoing(tmp_path, spool):
    """outgoing on a 64 kB tmpfs (root), else skip."""
    if not mount_tmpfs(spool["outgoing"], "size=64k,mode=0770"):
        pytest.skip("needs root to mount a small tmpfs")
    yield spool["outgoing"]
    subprocess.run(["umount", "-l", spool["outgoing"]], check=True)


def test_disk_full_is_507_leaves_nothing_and_recovers(config, small_outgoing):
    app = smsapi.Application(config)
    filler = os.path.join(small_outgoing, ".filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"x" * 4096):
            pass
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    response = send(app, ["79680000000", "79680000001"], text="Ж" * 300)
    assert response.status == 507 and "full" in response.json()["error"]
    assert os.listdir(small_outgoing) == [".filler"]
    os.remove(filler)
    assert send(app, ["79680000000"]).status == 201


def test_read_only_or_missing_outgoing_makes_monitoring_503(config, small_outgoing):
    app = smsapi.Application(config, health_every=0)  # checks made anew each time
    assert call(app, "GET", "/api/v1.0/monitoring").status == 200
    subprocess.run(["mount", "-o", "remount,ro", small_outgoing], check=True)
    response = call(app, "GET", "/api/v1.0/monitoring")
    assert response.status == 503 and "not writable" in response.json()["error"]
    assert send(app, ["79680000000"]).status == 503


def blast(server, keys, until=None):
    """POST one message per Idempotency-Key from 8 clients; {key: id} of the 201s.

    Stops early once `until` messages were accepted and the server is killed.
    """
    accepted, lock, todo = {}, threading.Lock(), list(keys)

    def client():
        while True:
            with lock:
                if not todo:
                    return
                key = todo.pop()
            body = {"mobiles": ["79680000000"], "text": f"{key} " + "Ж" * 80}
            try:
                status, _, data = server.request(
                    "POST",
                    "/api/v1.0/sms/outgoing",
                    body,
                    "lvv",
                    timeout=10,
                    headers={"Idempotency-Key": key},
                )
            except (OSError, ValueError, http.client.HTTPException):
                return  # the server is gone
            if status == 201:
                with lock:
                    accepted[key] = data["message_id"]["79680000000"]
                    if until is not None and len(accepted) == until:
                        server.process.kill()  # SIGKILL, with requests in flight

    clients = [threading.Thread(target=client) for _ in range(8)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    return accepted


def test_live_crash_kill_9_loses_no_accepted_message(live, spool):
    keys = [f"k{n:04d}" for n in range(2400)]
    server = live()
    accepted = blast(server, keys, until=1200)
    server.process.wait()
    assert len(accepted) >= 1200
    for name in os.listdir(spool["outgoing"]):  # everything smsd could take is whole
        if not name.startswith("."):
            headers, text = smsapi.parse_message(
                read_spool_file(spool, "outgoing", name)
            )
            assert headers["To"] == "79680000000" and headers["Alphabet"] == "UCS2"
            assert re.fullmatch(r"k\d{4} Ж{80}", text), name
    for key, message_id in accepted.items():  # every 201 is on disk
        assert smsapi.parse_message(read_spool_file(spool, "outgoing", message_id))[
            1
        ].startswith(key + " ")
    restarted = live()
    assert not [
        n for n in os.listdir(spool["outgoing"]) if n.startswith(smsapi.TEMP_PREFIX)
    ]
    # Retrying every key, the ones cut off by the crash included, sends each exactly once.
    again = blast(restarted, keys)
    assert len(again) == len(keys) >= 2000
    assert all(again[key] == message_id for key, message_id in accepted.items())
    names = [n for n in os.listdir(spool["outgoing"]) if not n.startswith(".")]
    assert sorted(names) == sorted(again.values())


def raw_http(server, request_line, headers=(), body=b"", user="root"):
    """Send one hand-made request to the live server; return the whole answer."""
    lines = [
        request_line,
        b"Host: x",
        b"Connection: close",
        b"Authorization: " + auth(user).encode(),
    ]
    payload = b"\r\n".join([*lines, *headers, b"", b""]) + body
    host, port = server.url[len("http://") :].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def chunked(body):
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


def test_live_hostile_paths_and_bodies(live, spool):
    server = live()
    paths = [
        b"%2e%2e",
        b"..%2f..%2fetc%2fpasswd",
        b"%00",
        b"%2Fetc%2Fpasswd",
        b"a" * 300,
        b"..%5c..%5cx",
    ]
    for path in paths:
        for kind in (b"sent/", b"status/"):
            answer = raw_http(
                server, b"GET /api/v1.0/sms/" + kind + path + b" HTTP/1.1"
            )
            assert answer.startswith(b"HTTP/1.1 404"), (path, answer[:60])
    post = b"POST /api/v1.0/sms/outgoing HTTP/1.1"
    as_json = b"Content-Type: application/json"
    body = json.dumps({"mobiles": ["79680000000"], "text": "chunked"}).encode()
    te = b"Transfer-Encoding: chunked"
    assert raw_http(server, post, [as_json, te], chunked(body)).startswith(
        b"HTTP/1.1 201"
    )
    answer = raw_http(server, post, [as_json, te], chunked(b"[" * 70000))
    assert answer.startswith(b"HTTP/1.1 413") and b'"error"' in answer
    bad_utf8 = b'{"text":"\xff"}'
    answer = raw_http(
        server, post, [as_json, b"Content-Length: %d" % len(bad_utf8)], bad_utf8
    )
    assert answer.startswith(b"HTTP/1.1 400")
    assert len(os.listdir(spool["outgoing"])) == 1


def test_live_slow_and_idle_clients_do_not_block_others(live):
    server = live()
    host, port = server.url[len("http://") :].rsplit(":", 1)
    slow = socket.create_connection((host, int(port)))
    stop = threading.Event()

    def dribble():  # the request headers, one byte a second
        for byte in b"GET /api/v1.0/monitoring HTTP/1.1\r\nHost: x\r\n":
            if stop.wait(1.0):
                return
            slow.send(bytes([byte]))

    dribbler = threading.Thread(target=dribble)
    dribbler.start()
    idle = []
    try:
        for _ in range(500):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(b"GET /api/v1.0/monitoring HTTP/1.1\r\nHost: x\r\n\r\n")
            idle.append(sock)
        for sock in idle[::50]:
            assert sock.recv(20).startswith(b"HTTP/1.1 200")  # kept alive, now idle
        time.sleep(2)  # the slow client is well into its headers
        for n in range(5):
            started = time.monotonic()
            body = {"mobiles": ["79680000000"], "text": f"still here {n}"}
            status, _, _ = server.request(
                "POST", "/api/v1.0/sms/outgoing", body, "lvv", timeout=10
            )
            assert status == 201 and time.monotonic() - started < 2
        assert dribbler.is_alive()  # it was dribbling all along
    finally:
        stop.set()
        dribbler.join()
        slow.close()
        for sock in idle:
            sock.close()


###############################################################################
# Monitoring, authentication, routing ##########################################
###############################################################################


def test_monitoring_ok_without_auth(app):
    response = call(app, "GET", "/api/v1.0/monitoring")
    assert response.status == 200
    assert response.json()["monitoring"] == "ok"  # what v0.1 clients read
    assert response.json()["details"] == {
        "spool": "pass",
        "smsd": "warn",  # this config names no smsd.conf
        "queue": "pass",
        "failed": "pass",
    }


def test_monitoring_503_when_the_spool_is_gone(app, spool):
    os.rmdir(spool["outgoing"])
    response = call(app, "GET", "/api/v1.0/monitoring")
    assert response.status == 503
    assert response.json()["monitoring"] == "fail"
    assert spool["outgoing"] + " is not a directory" in response.json()["error"]


#: smsd 3.1.21's status file, as it wrote it in its stats directory (tabs and all).
SMSD_STATUS = (
    "Status:\t26-11-24 22:46:21,\ti------------\n"
    "GSM1:\t26-11-24 22:46:20,\tIdle,\t\t0,\t0,\t0,\tssi: -73 dBm (Excellent), ber: ??\n"
    "GSM2:\t26-11-24 22:46:20,\tSending,\t\t3,\t0,\t1,\tssi: -109 dBm (Marginal), ber: ??\n"
)


class FakeSmsd:
    """A process named smsd (a copy of sleep), its pid file and stats directory."""

    def __init__(self, root):
        self.root = str(root)
        os.makedirs(self.root)
        binary = os.path.join(self.root, "smsd")
        shutil.copy(shutil.which("sleep"), binary)
        self.process = subprocess.Popen([binary, "600"])
        comm = pathlib.Path(f"/proc/{self.process.pid}/comm")
        # a forked child is "python3" until its exec is done
        wait_until(lambda: comm.read_text() == "smsd\n", what="the exec of smsd")
        self.pidfile = os.path.join(self.root, "smsd.pid")
        with open(self.pidfile, "w") as file:
            file.write(f"{self.process.pid}\n")
        self.stats = os.path.join(self.root, "stats")
        os.mkdir(self.stats)
        self.write_status(SMSD_STATUS)
        self.conf = os.path.join(self.root, "smsd.conf")
        with open(self.conf, "w") as file:
            file.write(f"pidfile = {self.pidfile}\nstats = {self.stats}\n")

    def write_status(self, text):
        with open(os.path.join(self.stats, "status"), "w") as file:
            file.write(text)

    def stop(self):
        self.process.kill()
        self.process.wait()


@pytest.fixture
def fake_smsd(tmp_path):
    smsd = FakeSmsd(tmp_path / "smsd")
    yield smsd
    smsd.stop()


def app_config(tmp_path, spool, smsd, extra=""):
    path = write_ini(tmp_path, spool, smsd_conf=smsd.conf)
    with open(path, "a") as file:
        file.write("[health]\nqueue_warn = 2\nqueue_fail = 4\n" + extra)
    return smsapi.load_config(path)


def health_app(tmp_path, spool, smsd, extra=""):
    """An app whose health checks are made anew on each call."""
    return smsapi.Application(app_config(tmp_path, spool, smsd, extra), health_every=0)


def age_file(path, seconds):
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_health_grades_smsd_queue_failures_and_modems(tmp_path, spool, fake_smsd):
    app = health_app(tmp_path, spool, fake_smsd)
    response = call(app, "GET", "/api/v1.0/health")
    assert response.status == 200
    checks = response.json()["checks"]
    assert {name: check["status"] for name, check in checks.items()} == {
        "spool": "pass",
        "smsd": "pass",
        "queue": "pass",
        "failed": "pass",
        "modem:GSM1": "pass",
        "modem:GSM2": "warn",  # a marginal signal
    }
    assert checks["smsd"]["pid"] == fake_smsd.process.pid
    assert checks["modem:GSM1"]["signal_dbm"] == -73
    assert checks["modem:GSM2"]["state"] == "Sending"
    for name in ("a", "b"):
        with open(os.path.join(spool["outgoing"], name), "w") as file:
            file.write("To: 79680000000\n\nhi\n")
    age_file(os.path.join(spool["outgoing"], "a"), 700)
    with open(os.path.join(spool["failed"], "f"), "w") as file:
        file.write("To: 79680000000\nFail_reason: +CMS ERROR: 500\n\nhi\n")
    old = os.path.join(spool["failed"], "old")
    shutil.copy(os.path.join(spool["failed"], "f"), old)
    age_file(old, 7200)  # failed before the last hour
    app.parts.watcher.tick()  # the watcher tells /health what failed, when
    checks = call(app, "GET", "/api/v1.0/health").json()["checks"]
    assert checks["queue"]["status"] == "warn"
    assert (checks["queue"]["queued"], checks["queue"]["oldest_seconds"]) == (2, 700)
    assert (checks["failed"]["status"], checks["failed"]["last_hour"]) == ("warn", 1)


def test_health_is_made_once_a_second_whatever_its_callers_do(
    tmp_path, spool, fake_smsd, clock
):
    app = smsapi.Application(app_config(tmp_path, spool, fake_smsd), clock=clock)
    for n in range(50):
        put_file(spool, "failed", f"f{n}", {"To": "1"})
    app.parts.watcher.tick()
    with counting_opens(os.path.dirname(spool["failed"])) as opens:
        answers = [
            call(app, "GET", route)
            for route in ("/api/v1.0/health", "/api/v1.0/monitoring", "/metrics") * 5
        ]
    assert {a.status for a in answers} == {200, 503}  # 50 failures fail /health
    assert opens.paths == [spool["outgoing"], spool["checked"]]  # once; failed/ never
    assert answers[0].json()["checks"]["failed"]["last_hour"] == 50
    os.remove(os.path.join(spool["failed"], "f0"))
    app.parts.watcher.tick()
    assert call(app, "GET", "/api/v1.0/health").json() == answers[0].json()  # cached
    clock.advance(1)
    assert (
        call(app, "GET", "/api/v1.0/health").json()["checks"]["failed"]["last_hour"]
        == 49
    )


def test_health_fails_with_503_when_smsd_is_gone(tmp_path, spool, fake_smsd):
    app = health_app(tmp_path, spool, fake_smsd)
    fake_smsd.stop()
    fake_smsd.write_status(SMSD_STATUS.replace("Idle", "Trouble"))
    response = call(app, "GET", "/api/v1.0/health", headers={"Accept": "text/plain"})
    assert response.status == 503
    lines = response.body.decode().splitlines()
    assert lines[0] == "fail"
    assert f"smsd: fail: smsd is not running (no pid in {fake_smsd.pidfile})" in lines
    assert any(line.startswith("modem:GSM1: fail: Trouble since") for line in lines)
    # the v0.1 monitoring answer looks at the spool only, as it always did
    response = call(app, "GET", "/api/v1.0/monitoring")
    assert response.status == 200
    assert response.json()["details"]["smsd"] == "fail"


def test_health_sees_a_reused_pid_as_no_smsd(tmp_path, spool, fake_smsd):
    with open(fake_smsd.pidfile, "w") as file:
        file.write(str(os.getpid()))  # alive, but python, not smsd
    app = health_app(tmp_path, spool, fake_smsd)
    check = call(app, "GET", "/api/v1.0/health").json()["checks"]["smsd"]
    assert check["status"] == "fail"


def test_health_queue_fails_past_the_limits(tmp_path, spool, fake_smsd):
    app = health_app(tmp_path, spool, fake_smsd, extra="queue_age_fail = 30min\n")
    path = os.path.join(spool["checked"], "x")
    with open(path, "w") as file:
        file.write("To: 79680000000\n\nhi\n")
    age_file(path, 3600)
    response = call(app, "GET", "/api/v1.0/health")
    assert response.status == 503
    assert response.json()["checks"]["queue"]["status"] == "fail"


def test_health_queue_age_of_our_messages_comes_from_their_ids(
    tmp_path, spool, fake_smsd
):
    app = health_app(tmp_path, spool, fake_smsd)
    ours = smsapi.new_message_id("lvv", time.time() - 1200)  # accepted 20 min ago
    put_file(spool, "outgoing", ours, {"From": "lvv", "To": "79680000000"})
    age_file(put_file(spool, "checked", "GSM1.other", {"To": "1"}), 300)  # a stat
    age_file(os.path.join(spool["outgoing"], ours), 0)  # its mtime does not count
    queue = call(app, "GET", "/api/v1.0/health").json()["checks"]["queue"]
    assert queue["queued"] == 2 and 1195 <= queue["oldest_seconds"] <= 1205
    assert queue["status"] == "warn"  # past queue_age_warn (10min)
    os.unlink(os.path.join(spool["outgoing"], ours))
    queue = call(app, "GET", "/api/v1.0/health").json()["checks"]["queue"]
    assert queue["queued"] == 1 and 295 <= queue["oldest_seconds"] <= 305


def test_reload_takes_limits_and_keeps_what_needs_a_restart(tmp_path, spool, caplog):
    path = write_ini(tmp_path, spool)
    app = smsapi.Application(smsapi.load_config(path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with open(path) as file:
        text = file.read().replace("listen = 127.0.0.1:0", "listen = 127.0.0.1:9")
    with open(path, "w") as file:
        text = text.replace(f"sent = {spool['sent']}", f"sent = {elsewhere}")
        file.write(text + "[retention]\nstate = 2hour\n")
    assert app.reload(path)
    assert app.config.retention == {"state": 7200}
    assert app.parts.idempotency.ttl == 7200  # the records' lifetime, at once
    assert app.config.listen == ("127.0.0.1:0",)
    assert app.config.spool == dict(
        spool, scheduled=app.config.state_dir + "/scheduled"
    )
    assert "reload: listen changes only with a restart" in caplog.text
    assert "reload: spool changes only with a restart" in caplog.text


def config_objects(value, depth=2):
    """Every Config reachable from value's attributes, depth levels down."""
    if isinstance(value, smsapi.Config):
        return [value]
    if depth == 0 or not hasattr(value, "__dict__"):
        return []
    return [c for v in vars(value).values() for c in config_objects(v, depth - 1)]


def test_reload_reaches_every_part_none_keeps_the_old_config(tmp_path, spool):
    extra = GROUPS + "\n[heartbeat:beat]\nevery = 1min\nto = @oncall"
    path = write_ini(tmp_path, spool, extra=extra)
    app = smsapi.Application(smsapi.load_config(path))
    old = app.config
    with open(path, "a") as file:
        file.write("[retention]\nsent = 1hour\nstate = 2hour\n")
    assert app.reload(path)
    parts = dict(vars(app.parts))
    assert parts.pop("config") is app.config is not old
    for name, part in parts.items():  # a part reads settings(), it keeps no config
        assert config_objects(part) == [], name
    age_file(put_file(spool, "sent", "GSM1.old", {}), 3600 + 60)
    app.parts.retention.run(time.time())
    assert os.listdir(spool["sent"]) == []  # [retention] sent, as reloaded


def test_retention_removes_old_files_but_never_queued_ones(tmp_path, spool):
    path = write_ini(tmp_path, spool)
    with open(path, "a") as file:
        file.write("[retention]\nsent = 30day\nincoming = 2hour\n")
    app = smsapi.Application(smsapi.load_config(path))
    ages = {"outgoing": 90, "checked": 90, "sent": 40, "failed": 90, "incoming": 1}
    for kind, days in ages.items():
        for name, age in (("old", days * 86400), ("new", 3600)):
            with open(os.path.join(spool[kind], name), "w") as file:
                file.write("To: 79680000000\n\nhi\n")
            age_file(os.path.join(spool[kind], name), age)
    app.parts.watcher.tick()
    assert {kind: sorted(os.listdir(spool[kind])) for kind in ages} == {
        "outgoing": ["new", "old"],
        "checked": ["new", "old"],
        "sent": ["new"],
        "failed": ["new", "old"],  # no retention set for failed
        "incoming": ["new"],
    }
    assert app.parts.counts["removed"] == 2
    shutil.copy(
        os.path.join(spool["outgoing"], "old"), os.path.join(spool["sent"], "x")
    )
    age_file(os.path.join(spool["sent"], "x"), 40 * 86400)
    app.parts.watcher.tick()  # the next pass is due in a few minutes, not now
    assert sorted(os.listdir(spool["sent"])) == ["new", "x"]


def scrape(app, **kwargs):
    """GET /metrics, parsed by the Prometheus client's own text-format parser."""
    from prometheus_client.parser import text_string_to_metric_families

    response = call(app, "GET", "/metrics", **kwargs)
    assert response.status == 200, response.body
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def metric(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def test_metrics_count_requests_messages_and_what_smsd_did(tmp_path, spool, fake_smsd):
    app = health_app(tmp_path, spool, fake_smsd)
    sent = send(app, ["79680000000", "79680000001"])
    assert sent.status == 201
    assert post_send(app, {"mobiles": ["79680000000"], "text": "x"}).status == 401
    first, second = sent.json()["message_id"].values()
    send_route = {"route": "/api/v1.0/sms/outgoing", "method": "POST"}
    samples = scrape(app)
    assert metric(samples, "smsapi_requests_total", code="201", **send_route) == 1
    assert metric(samples, "smsapi_requests_total", code="401", **send_route) == 1
    duration = "smsapi_request_duration_seconds"
    assert metric(samples, duration + "_count", route=send_route["route"]) == 2
    assert (
        metric(samples, duration + "_bucket", route=send_route["route"], le="+Inf") == 2
    )
    assert metric(samples, "smsapi_messages_total", state="accepted") == 2
    assert metric(samples, "smsapi_messages_total", state="sent") == 0
    assert metric(samples, "smsapi_queue_messages") == 2
    assert metric(samples, "smsapi_smsd_up") == 1
    assert metric(samples, "smsapi_modem_signal_dbm", modem="GSM2") == -109
    # smsd files one message in sent/, the other in failed/
    os.rename(
        os.path.join(spool["outgoing"], first), os.path.join(spool["sent"], first)
    )
    os.rename(
        os.path.join(spool["outgoing"], second), os.path.join(spool["failed"], second)
    )
    app.parts.watcher.tick()
    samples = scrape(app)
    assert metric(samples, "smsapi_messages_total", state="sent") == 1
    assert metric(samples, "smsapi_messages_total", state="failed") == 1
    assert metric(samples, "smsapi_queue_messages") == 0
    metrics_route = {"route": "/metrics", "method": "GET", "code": "200"}
    assert metric(samples, "smsapi_requests_total", **metrics_route) == 1


def test_metrics_need_a_user_from_afar(tmp_path, spool, fake_smsd):
    app = health_app(tmp_path, spool, fake_smsd)
    far = {"remote_addr": "192.0.2.7"}
    assert call(app, "GET", "/metrics", **far).status == 401
    assert call(app, "GET", "/metrics", user="lvv", **far).status == 403
    assert metric(scrape(app, user="root", **far), "smsapi_smsd_up") == 1
    assert metric(scrape(app, remote_addr="::1"), "smsapi_smsd_up") == 1
    app.parts.config = app.config.replace(metrics="users")  # a login even from loopback
    assert call(app, "GET", "/metrics").status == 401
    assert metric(scrape(app, user="root"), "smsapi_smsd_up") == 1
    app.parts.config = app.config.replace(metrics="open")
    assert metric(scrape(app, **far), "smsapi_smsd_up") == 1
    app.parts.config = app.config.replace(metrics="off")
    assert call(app, "GET", "/metrics").status == 404


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Bearer abc",
        "Basic",
        "Basic !!!",
        "Basic " + base64.b64encode(b"lvv").decode(),
        "Basic " + base64.b64encode(b"lvv:wrong").decode(),
        "Basic " + base64.b64encode(b"nobody:x").decode(),
        "Basic " + base64.b64encode(b"lvv:\xff").decode(),
    ],
)
def test_auth_refusals_are_401_with_challenge(app, spool, header):
    headers = {"Authorization": header} if header else {}
    response = post_send(
        app,
        {"mobiles": ["79680000000"], "text": "x"},
        headers=headers,
    )
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Basic realm="smsapi"'
    assert "Unauthorized access" in response.json()["error"]
    assert spool_snapshot(spool) == {}


def test_auth_unknown_user_and_wrong_password_look_the_same(app):
    unknown = call(
        app,
        "GET",
        "/api/v1.0/sms/sent/",
        headers={"Authorization": "Basic " + base64.b64encode(b"zed:x").decode()},
    )
    wrong = call(
        app,
        "GET",
        "/api/v1.0/sms/sent/",
        headers={"Authorization": "Basic " + base64.b64encode(b"lvv:x").decode()},
    )
    assert (unknown.status, unknown.headers, unknown.body) == (
        wrong.status,
        wrong.headers,
        wrong.body,
    )


def test_auth_unknown_users_cost_what_known_ones_do(config):
    checker = smsapi.Authenticator()
    cost = smsapi.parse_password_hash(config.users["lvv"].password)[:3]
    assert smsapi.parse_password_hash(checker.dummy(config.users))[:3] == cost
    assert cost == (10, 8, 1)  # the tests' hashes; production hashes use ln=14
    assert checker.check(config.users, "nobody", "guess") is None
    assert checker.check(config.users, "lvv", "guess") is None
    assert checker.hashes_checked == 2
    lone = {"x": smsapi.User("x", unix_users=("root",))}  # no hash to take after
    assert smsapi.parse_password_hash(checker.dummy(lone))[:3] == (14, 8, 1)


def test_auth_cache_holds_no_password_and_follows_the_config(config):
    checker = smsapi.Authenticator()
    assert checker.check(config.users, "lvv", PASSWORDS["lvv"]) is config.users["lvv"]
    assert (
        checker.check(config.users, "lvv", PASSWORDS["lvv"]) is config.users["lvv"]
    )  # from the cache
    assert checker.check(config.users, "lvv", "nope") is None
    (cached,) = checker.verified.values()
    assert PASSWORDS["lvv"].encode() not in cached and len(cached) == 32
    changed = {"lvv": smsapi.User("lvv", password=smsapi.hash_password("new", ln=10))}
    assert checker.check(changed, "lvv", PASSWORDS["lvv"]) is None
    assert checker.check(changed, "lvv", "new") is changed["lvv"]


def test_logs_hold_neither_password_nor_text(app, caplog):
    caplog.set_level("DEBUG", logger="smsapi")
    send(app, ["79680000000"], text="TOPSECRETTEXT")
    call(
        app,
        "GET",
        "/api/v1.0/sms/sent/",
        headers={"Authorization": auth("lvv").replace("U", "u")},
    )
    call(app, "GET", "/api/v1.0/sms/sent/\x1b[31mred", user="lvv")
    logged = caplog.text
    (line,) = [line for line in logged.splitlines() if "/sms/outgoing" in line]
    assert re.search(  # one line per send: who, which ids, to whom, how long
        r"POST /api/v1\.0/sms/outgoing 201 user=lvv ids=smsapi\.\S+"
        r" to=79680000000 parts=1 [\d.]+ms$",
        line,
    )
    assert "TOPSECRETTEXT" not in logged and PASSWORDS["lvv"] not in logged
    assert "\x1b" not in logged and "\\x1b[31mred" in logged


def test_logs_hold_the_text_when_log_text_says_so(tmp_path, spool, caplog):
    path = write_ini(tmp_path, spool, extra="log_text = yes")
    app = smsapi.Application(smsapi.load_config(path))
    caplog.set_level("INFO", logger="smsapi")
    message_id = send(app, ["79680000000"], text="Disk\nfull").json()["message_id"]
    assert (
        f"ids={message_id['79680000000']} to=79680000000 parts=1"
        ' text="Disk\\x0afull" ' in caplog.text
    )


def test_unknown_path_404_wrong_method_405_with_allow(app):
    assert call(app, "GET", "/api/v2/whatever").status == 404
    response = call(app, "PUT", "/api/v1.0/sms/outgoing", user="lvv")
    assert response.status == 405 and response.headers["Allow"] == "GET, POST"
    response = call(app, "POST", "/api/v1.0/sms/sent/x", user="lvv")
    assert response.status == 405 and response.headers["Allow"] == "DELETE, GET, HEAD"
    assert response.json() == {"error": "Method not allowed"}


def example_path(template):
    """A path the route template matches."""
    path = template.replace("{kind}", "sent").replace("{message_id}", "smsapi.x")
    return path.replace("{name}", "monitoring").replace("{topic}", "oncall")


def test_routes_and_the_openapi_document_describe_the_same_api(app):
    document = call(app, "GET", "/api/v1.0/openapi.json").json()
    documented = {
        (path, method.upper())
        for path, operations in document["paths"].items()
        for method in operations
    }
    routed = {(r.path, m) for r in smsapi.ROUTES for m in r.methods if m != "HEAD"}
    assert documented == routed
    for path, method in documented:  # each path is matched by its own route
        route, _ = smsapi.match_route(method, example_path(path))
        assert route.path == path
        operation = document["paths"][path][method.lower()]
        assert (operation["security"] != []) == bool(route.login)
        assert {str(code) for code in route.replies} <= set(operation["responses"])


def schema_accepts(schema, value):
    """True when a JSON schema of the document (a string with a pattern, an
    integer with bounds, or oneOf those) takes value."""
    if "oneOf" in schema:
        return any(schema_accepts(s, value) for s in schema["oneOf"])
    if schema["type"] == "integer":
        return type(value) is int and schema["minimum"] <= value <= schema["maximum"]
    return isinstance(value, str) and bool(re.search(schema["pattern"], value))


@pytest.mark.parametrize(
    "validity",
    ["30min", "2 hour", "1day", "0", "007", "199", "255", "256", "300", "99week",
     "1000min", "2hours", "", "-1", 0, 255, 256, -1, True, 1.5],
)  # fmt: skip
def test_openapi_validity_schema_takes_what_the_send_takes(app, spool, validity):
    document = call(app, "GET", "/api/v1.0/openapi.json").json()
    schema = document["components"]["schemas"]["Send"]["properties"]["validity"]
    sent = send(app, ["79680000000"], validity=validity)
    assert sent.status in (201, 400)
    assert schema_accepts(schema, validity) == (sent.status == 201)


@pytest.mark.parametrize(
    "number", ["79680000000", "+79680000000", "100", "99", "0123", "1" * 15, "1" * 16]
)
def test_openapi_number_schema_takes_what_the_send_takes(app, spool, number):
    document = call(app, "GET", "/api/v1.0/openapi.json").json()
    schema = document["components"]["schemas"]["Send"]["properties"]["mobiles"]
    sent = send(app, [number], user="root")
    assert schema_accepts(schema["items"], number) == (sent.status == 201)


def test_head_has_headers_and_no_body(app):
    response = call(app, "HEAD", "/api/v1.0/monitoring")
    assert response.status == 200 and response.body == b""
    assert int(response.headers["Content-Length"]) > 0


def test_head_on_the_send_route_sends_nothing(app, spool):
    query = "mobiles=79680000000&text=hello"
    response = call(app, "HEAD", "/api/v1.0/sms/outgoing", user="lvv", query=query)
    assert response.status == 405 and "HEAD" not in response.headers["Allow"]
    assert spool_snapshot(spool) == {}
    assert call(app, "HEAD", "/api/v1.0/sms/sent/", user="lvv").status == 200


def test_lone_surrogate_in_a_json_key_is_400(app, spool, caplog):
    caplog.set_level("INFO", logger="smsapi")
    for body in (
        b'{"\\ud800": 1}',
        b'{"mobiles": ["79680000000"], "text": "x", "\\udfff": 1}',
    ):
        response = post_send(app, body, "lvv", {"Content-Type": "application/json"})
        assert response.status == 400 and "surrogate" in response.json()["error"]
    assert caplog.text.count("POST /api/v1.0/sms/outgoing 400") == 2  # logged, counted
    assert spool_snapshot(spool) == {}


@pytest.mark.parametrize("name", ["limit", "offset", "wait"])
def test_number_parameters_of_4301_digits_are_400(app, spool, name):
    digits = "9" * 4301
    route = "/api/v1.0/sms/outgoing" if name == "wait" else "/api/v1.0/sms/sent/"
    method = "POST" if name == "wait" else "GET"
    body = {"mobiles": ["79680000000"], "text": "x"} if name == "wait" else None
    response = call(app, method, route, body, "lvv", query=f"{name}={digits}")
    assert response.status == 400 and name in response.json()["error"]
    assert spool_snapshot(spool) == {}


@pytest.mark.parametrize("field", ["retries", "class"])
def test_form_numbers_of_4301_digits_are_400(app, spool, field):
    body = f"mobiles=79680000000&text=x&{field}={'9' * 4301}".encode()
    response = post_send(app, body, "lvv", FORM)
    assert response.status == 400 and field in response.json()["error"]
    json_body = b'{"mobiles": ["79680000000"], "text": "x", "%s": %s}' % (
        field.encode(),
        b"9" * 4301,
    )
    response = post_send(app, json_body, "lvv", {"Content-Type": "application/json"})
    assert response.status == 400
    assert spool_snapshot(spool) == {}


def test_credential_without_colon_is_never_logged(app, caplog):
    secret = "S3cretPassw0rd"
    header = "Basic " + base64.b64encode(secret.encode()).decode()
    response = call(
        app, "GET", "/api/v1.0/sms/sent/", headers={"Authorization": header}
    )
    assert response.status == 401
    assert secret not in caplog.text and "malformed credentials" in caplog.text
    long_name = "n" * 150_000
    header = "Basic " + base64.b64encode(f"{long_name}:x".encode()).decode()
    call(app, "GET", "/api/v1.0/sms/sent/", headers={"Authorization": header})
    assert len(caplog.text) < 2000  # the name is cut short in the log


def state_files(config):
    """Every file under the state directory but the report journal."""
    found = []
    for root, _, names in os.walk(config.state_dir):
        found += [os.path.join(root, n) for n in names if n != smsapi.JOURNAL]
    return found


def test_rejected_keyed_requests_write_no_record(app, spool, config):
    slots = [
        app.parts.sender.wait_slots.acquire(blocking=False)
        for _ in range(config.max_waiters)
    ]
    assert all(slots)
    try:
        for n in range(3):
            response = post_send(
                app,
                {"mobiles": ["79680000000"], "text": "x"},
                "lvv",
                {"Idempotency-Key": f"key-{n}"},
                query="wait=5",
            )
            assert response.status == 503
    finally:
        for _ in slots:
            app.parts.sender.wait_slots.release()
    assert state_files(config) == [] and spool_snapshot(spool) == {}
    os.rename(spool["outgoing"], spool["outgoing"] + ".away")  # the write fails
    try:
        assert idempotent(app, "lost").status == 503
    finally:
        os.rename(spool["outgoing"] + ".away", spool["outgoing"])
    assert state_files(config) == []


def test_unwritable_state_refuses_a_keyed_send_before_any_file(app, spool, config):
    os.makedirs(config.state_dir, exist_ok=True)
    with open(os.path.join(config.state_dir, "idempotency"), "w"):
        pass  # where the records' directory should be
    response = idempotent(app, "daily")
    assert response.status in (503, 507) and "not stored" in response.json()["error"]
    assert spool_snapshot(spool) == {}


def test_requests_blocked_on_one_key_count_as_waiters(app, spool, config):
    store = app.parts.idempotency
    answers = []

    def keyed():
        answers.append(idempotent(app, "shared").status)

    with store.held(store.path("lvv", "shared")):  # as if a first request waited long
        threads = [threading.Thread(target=keyed) for _ in range(config.max_waiters)]
        for thread in threads:
            thread.start()
        wait_until(
            lambda: app.parts.sender.wait_slots._value == 0,
            what="the waiter slots to fill",
        )
        assert idempotent(app, "shared").status == 503  # no thread more is held
        plain = post_send(
            app, {"mobiles": ["79680000000"], "text": "x"}, "lvv", query="wait=1"
        )
        assert plain.status == 503
    for thread in threads:
        thread.join(10)
    assert sorted(answers) == [201] * config.max_waiters
    assert len(os.listdir(spool["outgoing"])) == 2  # one send, two numbers


ANY_CHARACTER = st.integers(0, 0x10FFFF).map(chr)  # lone surrogates too


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(
    body=st.dictionaries(
        st.text(ANY_CHARACTER, max_size=8),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.text(ANY_CHARACTER, max_size=8),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(ANY_CHARACTER, max_size=4), inner, max_size=3)
            ),
            max_leaves=8,
        ),
        max_size=6,
    )
)
def test_fuzz_send_with_any_json_object(fuzz_app, body):
    app, spool = fuzz_app
    before = spool_snapshot(spool)
    encoded = json.dumps(body).encode()  # surrogates as \\ud800 escapes
    response = post_send(app, encoded, "lvv", {"Content-Type": "application/json"})
    assert response.status < 500, response.body
    if response.status != 201:
        assert spool_snapshot(spool) == before


NUMBER_FIELDS = [
    ("query", "limit"),
    ("query", "offset"),
    ("query", "wait"),
    ("form", "retries"),
    ("form", "class"),
    ("form", "validity"),
]


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    where=st.sampled_from(NUMBER_FIELDS),
    digits=st.integers(3, 6000),  # 777 is past max_wait: no example waits
    lead=st.sampled_from(["", "+", "-", " ", "0"]),
)
def test_fuzz_long_digit_strings_in_every_number_field(fuzz_app, where, digits, lead):
    app, _ = fuzz_app
    kind, name = where
    value = urllib.parse.quote(lead + "7" * digits)
    if kind == "query":
        route = "/api/v1.0/sms/sent/" if name != "wait" else "/api/v1.0/sms/outgoing"
        body = {"mobiles": ["79680000000"], "text": "x"} if name == "wait" else None
        response = call(
            app, "POST" if body else "GET", route, body, "lvv", query=f"{name}={value}"
        )
    else:
        form = f"mobiles=79680000000&text=x&{name}={value}".encode()
        response = post_send(app, form, "lvv", FORM)
    assert response.status < 500, response.body


def basic(user, password):
    return {
        "Authorization": "Basic "
        + base64.b64encode(f"{user}:{password}".encode()).decode()
    }


def test_throttle_keys_unix_callers_by_uid_and_spares_mapped_accounts(tmp_path, spool):
    path = write_ini(tmp_path, spool)
    with open(path, "a") as file:
        file.write("[user:cron]\nunix_users = root\n")
    app = smsapi.Application(smsapi.load_config(path))
    nobody = {smsapi.PEER_UID: pwd.getpwnam("nobody").pw_uid}
    statuses = [
        call(
            app,
            "GET",
            "/api/v1.0/sms/sent/",
            headers=basic("lvv", "guess"),
            environ=nobody,
        ).status
        for _ in range(11)
    ]
    assert statuses[-1] == 429
    root = {smsapi.PEER_UID: 0}
    assert call(app, "GET", "/api/v1.0/sms/sent/", environ=root).status == 200
    assert (
        call(app, "GET", "/api/v1.0/sms/sent/", user="lvv", environ=root).status == 200
    )


def test_throttle_guessing_one_user_from_many_addresses(config, clock):
    app = smsapi.Application(config, clock=clock)
    own = "10.9.9.9"  # the real user's own address

    def attempt(address, user="lvv", password=None):
        password = password or PASSWORDS[user]
        return call(app, "GET", "/api/v1.0/sms/sent/", headers=basic(user, password),
                    remote_addr=address)  # fmt: skip

    assert attempt(own).status == 200
    statuses = [attempt(f"127.1.0.{n + 1}", password=f"guess{n}").status for n in range(40)]
    budget = smsapi.Throttle.USER_BUDGET
    assert statuses[:budget] == [401] * budget  # then the slow lane:
    assert statuses[budget:] == [401] + [429] * (40 - budget - 1)  # a check a second
    assert attempt(own).status == 200  # its own address: no lane at all
    assert attempt("127.1.0.99", user="ann").status == 200  # another user: none either
    assert attempt("127.2.0.1").status == 429  # the real user, new address: its turn...
    clock.advance(1)
    assert attempt("127.2.0.1").status == 200  # ...comes, a second later
    checked = app.parts.authenticator.hashes_checked
    clock.advance(1)
    for second in range(5):  # a guesser keeps at one guess a second
        for n in range(20):
            attempt(f"127.3.{second}.{n}", password="again")
        clock.advance(1)
    assert app.parts.authenticator.hashes_checked - checked == 5


def test_throttle_a_long_attack_costs_at_most_the_longest_lockout(app, caplog):
    trusted, guesser, stranger = "10.9.9.9", "192.0.2.7", "198.51.100.9"
    assert login(app, trusted, "lvv").status == 200
    for n in range(2100):  # blocked after ten: each further attempt counts too
        assert login(app, guesser, "lvv", f"guess{n}").status in (401, 429)
    assert app.parts.throttle.counters[("address", guesser)].count > 2000
    refused = login(app, guesser, "lvv")
    assert refused.status == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= smsapi.MAX_LOCKOUT
    assert login(app, trusted, "lvv").status == 200
    assert login(app, stranger, "lvv", "wrong").status == 401  # checked, not blocked
    assert "Traceback" not in caplog.text and "internal error" not in caplog.text


@hypothesis.given(st.integers(min_value=0, max_value=10**9))
def test_throttle_lockout_is_capped_for_any_count(count):
    throttle = smsapi.Throttle(smsapi.Clock())
    key = ("address", "192.0.2.1")
    throttle.counters[key] = smsapi.Failures(100.0)
    throttle.counters[key].count = count
    throttle.count(key, 100.0)
    until = throttle.counters[key].until
    assert until == 0.0 if count + 1 < smsapi.FAILURE_LIMIT else until > 100.0
    assert until - 100.0 <= smsapi.MAX_LOCKOUT


def test_throttle_memory_is_bounded_whatever_the_names():
    throttle = smsapi.Throttle(smsapi.Clock())
    for n in range(3 * smsapi.Throttle.MAX_ENTRIES):
        throttle.failed(
            f"127.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", "x" * 1000 + str(n)
        )
    assert len(throttle.counters) <= smsapi.Throttle.MAX_ENTRIES + 3
    assert all(len(k[1]) <= 64 for k in throttle.counters)  # digests, not names
    assert throttle.retry_after("127.0.0.9", "y") == 0  # an address never seen
    throttle.failed("10.0.0.1", "z")
    assert ("address", "10.0.0.1") in throttle.counters  # the newest is kept


def test_throttle_behind_a_proxy_takes_only_an_address_it_forwarded(tmp_path, spool):
    app = smsapi.Application(
        smsapi.load_config(
            write_ini(tmp_path, spool, extra="trusted_proxies = 127.0.0.1")
        )
    )
    for forwarded in ("not-an-address", "x" * 10000):
        for _ in range(10):
            call(
                app,
                "GET",
                "/api/v1.0/sms/sent/",
                headers={**basic("lvv", "guess"), "X-Forwarded-For": forwarded},
            )
    assert ("address", "127.0.0.1") in app.parts.throttle.counters
    assert all(len(str(k[-1])) < 64 for k in app.parts.throttle.counters)


def test_index_points_to_the_api_its_document_health_and_readme(app):
    data = call(app, "GET", "/").json()
    assert data["api"] == "/api/v1.0" and data["readme"].endswith("README.md")
    for route in ("openapi", "health"):
        assert call(app, "GET", data[route]).status in (200, 503)
    text = call(app, "GET", "/", headers={"Accept": "text/plain"})
    assert text.headers["Content-Type"].startswith("text/plain")
    assert "openapi: /api/v1.0/openapi.json" in text.body.decode()


def test_send_json_with_curls_form_content_type_is_taken_as_json(app, spool):
    body = b'{"text": "Hi!", "mobiles": ["79680000000"]}'  # curl -d, no -H
    assert post_send(app, body, "lvv", FORM).status == 201
    other = post_send(app, b"mobiles=1", "lvv", {"Content-Type": "text/csv"})
    assert (
        other.status == 415
        and "curl -H 'Content-Type: application/json'" in other.json()["error"]
    )


def test_health_says_when_smsd_has_written_no_status_file_yet(
    tmp_path, spool, fake_smsd
):
    os.remove(os.path.join(fake_smsd.stats, "status"))
    app = health_app(tmp_path, spool, fake_smsd)
    modems = call(app, "GET", "/api/v1.0/health").json()["checks"]["modems"]
    assert modems == {
        "status": "warn",
        "output": f"smsd has not written its status file yet (stats = {fake_smsd.stats})",
    }


def test_health_words_an_unreadable_queue_for_a_person(
    tmp_path, spool, fake_smsd, caplog
):
    app = health_app(tmp_path, spool, fake_smsd)
    os.rmdir(spool["checked"])
    queue = call(app, "GET", "/api/v1.0/health").json()["checks"]["queue"]
    assert queue == {
        "status": "fail",
        "output": "cannot count the queue in outgoing and checked; see the log",
        "scheduled": 0,
    }
    assert "No such file or directory" in caplog.text  # the raw error: in the log only


def test_no_request_imports_anything(app, spool):
    # Everything a request needs is imported at start: no first-request stall.
    send(app, ["79680000000"])  # warm up once: code paths, not modules, differ
    before = set(sys.modules)
    message_id = send(app, ["79680000001"], text="Ж€😀", report=True).json()[
        "message_id"
    ]["79680000001"]
    post_send(
        app,
        {"mobiles": ["79680000002"], "text": "x"},
        "lvv",
        {"Idempotency-Key": "k"},
        query="dry_run=1",
    )
    post_send(
        app,
        {"mobiles": ["79680000002"], "text": "x"},
        "lvv",
        {"Idempotency-Key": "k"},
    )
    call(
        app,
        "GET",
        "/api/v1.0/sms/status/" + message_id,
        user="lvv",
        headers={"Accept": "text/plain"},
    )
    call(app, "GET", "/api/v1.0/sms/outgoing/", user="lvv")
    call(
        app,
        "GET",
        "/api/v1.0/sms/incoming/",
        user="inbox",
        query="since=2026-01-01T00:00:00Z",
    )
    put_file(spool, "sent", "GSM1.iso", {"From": "lvv", "Alphabet": "ISO"})
    call(app, "GET", "/api/v1.0/sms/sent/GSM1.iso", user="root")
    call(app, "GET", "/api/v1.0/openapi.json")
    call(app, "GET", "/api/v1.0/monitoring")
    app.parts.watcher.tick()
    assert set(sys.modules) - before == set()


#: Modules smsapi must not load to serve: OpenSSL (hashlib, hmac, secrets) waits
#: for the first password check, the rest only other commands or wsgiref use.
NOT_AT_START = {
    "hashlib", "_hashlib", "hmac", "secrets", "random", "argparse", "getpass",
    "_strptime", "locale", "dataclasses", "inspect", "typing", "wsgiref", "queue",
}  # fmt: skip


def test_start_imports_only_what_serving_needs(tmp_path, spool):
    put_file(spool, "outgoing", "GSM1.x", {"From": "lvv", "Report": "yes"})
    smsd_sends(spool, "GSM1.x", 7)  # the tick reads its smsd times
    script = (
        "import sys, smsapi; app = smsapi.Application(smsapi.load_config(sys.argv[1]));"
        " app.parts.watcher.tick(); print(smsapi.smsd_time('26-11-29 10:00:00'));"
        " print(*sorted(sys.modules))"
    )
    ini = write_ini(tmp_path, spool)
    shown = subprocess.run(
        [sys.executable, "-S", "-c", script, ini],  # -S: what site would load, not
        cwd=HERE,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert float(shown[0]) == time.mktime((2026, 11, 29, 10, 0, 0, 0, 0, -1))
    assert NOT_AT_START & set(shown[1].split()) == set()


def test_spool_read_error_is_503_not_500(tmp_path, spool):
    broken = dict(spool, sent=str(tmp_path / "spool" / "sent-file"))
    open(broken["sent"], "w").close()
    config = smsapi.load_config(write_ini(tmp_path, spool))
    app = smsapi.Application(config.replace(spool=broken))
    response = call(app, "GET", "/api/v1.0/sms/sent/", user="lvv")
    assert response.status == 503 and "Traceback" not in response.body.decode()


###############################################################################
# Groups, budgets, alerts, heartbeats ##########################################
###############################################################################

GROUPS = """
[group:oncall]
mobiles = 79680000000 +79680000001
[group:ops]
mobiles = 79680000001, 79160000000
[group:abroad]
mobiles = 79680000002 4915112345678"""


@pytest.fixture
def group_app(tmp_path, spool):
    app = smsapi.Application(
        smsapi.load_config(write_ini(tmp_path, spool, extra=GROUPS))
    )
    yield app
    app.close()


def test_groups_stand_for_their_numbers_each_sent_once(group_app, spool):
    response = send(group_app, ["@oncall", "@ops", "+79680000000"])
    assert response.status == 201, response.body
    ids = response.json()["message_id"]
    assert set(ids) == {"79680000000", "79680000001", "79160000000", "+79680000000"}
    assert ids["+79680000000"] == ids["79680000000"]
    assert sorted(os.listdir(spool["outgoing"])) == sorted(set(ids.values()))
    form = call(
        group_app,
        "POST",
        "/api/v1.0/sms/outgoing",
        b"mobiles=@oncall,79680000005&text=hi",
        "lvv",
        FORM,
    )
    assert form.status == 201 and set(form.json()["message_id"]) == {
        "79680000000",
        "79680000001",
        "79680000005",
    }
    query = call(
        group_app,
        "GET",
        "/api/v1.0/sms/outgoing",
        user="lvv",
        query="mobiles=@ops&text=hi",
    )
    assert query.status == 201 and len(query.json()["message_id"]) == 2


def test_groups_unknown_or_not_allowed_write_nothing(group_app, spool):
    unknown = send(group_app, ["@oncall", "@nobody"])
    assert unknown.status == 400 and '"@nobody"' in unknown.json()["error"]
    abroad = send(group_app, ["@abroad"])  # lvv may not send to 4915112345678
    assert abroad.status == 403 and "4915112345678" in abroad.json()["error"]
    assert spool_snapshot(spool) == {}
    assert send(group_app, ["@abroad"], user="ann").status == 201


def test_groups_count_for_max_recipients_once_expanded(tmp_path, spool):
    path = write_ini(tmp_path, spool, extra="max_recipients = 2\n" + GROUPS)
    app = smsapi.Application(smsapi.load_config(path))
    assert send(app, ["@oncall"], user="ann").status == 201  # two numbers
    refused = send(app, ["@oncall", "79680000009"], user="ann")  # one name, three numbers
    assert refused.status == 400 and "Too many recipients: 3" in refused.json()["error"]
    assert len(os.listdir(spool["outgoing"])) == 2


def test_groups_listed_are_those_the_caller_may_send_to(group_app):
    listed = call(group_app, "GET", "/api/v1.0/groups", user="lvv").json()
    assert listed == {
        "groups": {
            "oncall": ["79680000000", "79680000001"],
            "ops": ["79680000001", "79160000000"],
        }
    }
    everything = call(group_app, "GET", "/api/v1.0/groups", user="ann").json()["groups"]
    assert set(everything) == {"oncall", "ops", "abroad"}
    assert call(group_app, "GET", "/api/v1.0/groups").status == 401


@pytest.mark.parametrize("mobiles", ["", "0791234", "79680000000 abc"])
def test_groups_config_is_checked(tmp_path, spool, mobiles):
    extra = "\n[group:bad]" + (f"\nmobiles = {mobiles}" if mobiles else "")
    with pytest.raises(smsapi.ConfigError) as caught:
        smsapi.load_config(write_ini(tmp_path, spool, extra=extra))
    assert "[group:bad] mobiles:" in caught.value.problems[0]


def budget_app(tmp_path, spool, hour=5, day=8):
    extra = f"\n[user:night]\npassword = {HASHES['night']}"
    extra += f"\nmax_per_hour = {hour}\nmax_per_day = {day}"
    return smsapi.Application(
        smsapi.load_config(write_ini(tmp_path, spool, extra=extra))
    )


def test_budget_counts_parts_times_recipients_and_refuses_with_429(tmp_path, spool):
    app = budget_app(tmp_path, spool)
    three_parts = "x" * 400
    assert send(app, ["79680000000"], three_parts, user="night").status == 201
    before = spool_snapshot(spool)
    refused = send(app, ["79680000001", "79680000002"], "t" * 200, user="night")
    assert refused.status == 429 and "5 per hour" in refused.json()["error"]
    assert 3590 <= int(refused.headers["Retry-After"]) <= 3600
    assert spool_snapshot(spool) == before  # nothing written, nothing used
    assert send(app, ["79680000001"], "t" * 200, user="night").status == 201  # 5 now
    assert send(app, ["79680000003"], "one", user="night").status == 429
    assert send(app, ["79680000003"], "one", user="lvv").status == 201  # no budget
    assert (
        send(app, ["79680000003"], "one", user="night", send_at="+1hour").status == 429
    )
    answer = call(app, "GET", "/api/v1.0/health")
    assert answer.json()["checks"]["budgets"]["status"] == "warn"
    assert answer.json()["checks"]["budgets"]["output"] == "1 of 1 budgets used up"
    monitoring = call(app, "GET", "/api/v1.0/monitoring")
    for open_answer in (answer, monitoring):  # no user's name without a login
        assert b"night" not in open_answer.body and b"lvv" not in open_answer.body
    again = budget_app(tmp_path, spool)  # a restart: the budget is still used up
    assert send(again, ["79680000003"], "one", user="night").status == 429


def test_budget_slides_by_the_hour_and_the_day(tmp_path, spool):
    state = tmp_path / "state"
    state.mkdir()
    now = time.time()
    (state / "budgets.journal").write_text(
        f'["night", {now - 3500}, 2]\n["night", {now - 7200}, 4]\n'
        f'["night", {now - 90000}, 8]\n["night", "then", 1]\n["night", {now}, true]\n'
    )
    app = budget_app(tmp_path, spool)  # 2 in the last hour, 6 in the last day
    assert send(app, ["79680000000"], "a", user="night").status == 201  # hour 3, day 7
    refused = send(app, ["79680000000"], "b" * 200, user="night")  # 2 more: day 9 > 8
    assert refused.status == 429 and "8 per day" in refused.json()["error"]
    assert (
        79100 <= int(refused.headers["Retry-After"]) <= 79200
    )  # when the 4 from 2 h ago free
    refused = send(
        app, ["79680000000", "79680000001", "79680000002"], "c", user="night"
    )
    assert refused.status == 429 and "5 per hour" in refused.json()["error"]
    assert 90 <= int(refused.headers["Retry-After"]) <= 100  # the 2 from 3,500 s ago


def test_budget_racing_threads_take_exactly_the_limit(tmp_path, spool):
    app = budget_app(tmp_path, spool, hour=10, day=10)
    user, budgets, now = app.config.users["night"], app.parts.budgets, time.time()
    start = threading.Barrier(16)

    def take(_):
        start.wait()
        taken = 0
        for _ in range(3):
            with contextlib.suppress(smsapi.ApiError):
                budgets.take(user, 1, now)
                taken += 1
        return taken

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads trade the interpreter as often as it lets them
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            assert sum(pool.map(take, range(16))) == 10
    finally:
        sys.setswitchinterval(interval)
    with budgets.lock:  # a take waits while another one holds the budget
        waiting = threading.Thread(target=budgets.take, args=(user, 0, now))
        waiting.start()
        waiting.join(0.2)
        assert waiting.is_alive()
    waiting.join(5)


def test_budget_windows_slide_over_many_sends(tmp_path, spool):
    app = budget_app(tmp_path, spool, hour=100000, day=100000)
    user, budgets, now = app.config.users["night"], app.parts.budgets, time.time()
    times = [now - 7200 + n * 0.36 for n in range(20000)]  # the last two hours
    for when in times:
        budgets.take(user, 1, when)
    in_the_hour = sum(1 for when in times if when > now - 3600)
    assert budgets.used(user, now) == {
        "max_per_hour": (in_the_hour, 100000),
        "max_per_day": (20000, 100000),
    }
    assert budgets.used(user, now + 3600)["max_per_hour"] == (0, 100000)


def test_budget_is_given_back_when_the_write_fails(tmp_path, spool):
    app = budget_app(tmp_path, spool, hour=2)
    sender = app.parts.sender
    sender.outgoing.directory = str(tmp_path / "gone")  # as if outgoing vanished
    assert send(app, ["79680000000", "79680000001"], "x", user="night").status == 503
    sender.outgoing.directory = spool["outgoing"]
    assert send(app, ["79680000000", "79680000001"], "x", user="night").status == 201


def notification(alerts, status="firing", group='{}:{alertname="HighCPU"}', **extra):
    """An Alertmanager webhook payload (version 4) with these alerts."""
    return {
        "version": "4",
        "groupKey": group,
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "sms",
        "groupLabels": {"alertname": alerts[0]["labels"]["alertname"]},
        "commonLabels": {"severity": "critical"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": alerts,
        **extra,
    }


def alert(name, instance=None, summary=None, status="firing", n=0, **annotations):
    labels = {"alertname": name, "severity": "critical"}
    if instance:
        labels["instance"] = instance
    if summary:
        annotations["summary"] = summary
    return {
        "status": status,
        "labels": labels,
        "annotations": annotations,
        "startsAt": "2026-11-29T10:00:00Z",
        "endsAt": "0001-01-01T00:00:00Z"
        if status == "firing"
        else "2026-11-29T10:05:00Z",
        "generatorURL": "http://prometheus:9090/graph",
        "fingerprint": f"{n:016x}",
    }


ALERTING = (
    GROUPS
    + """
[heartbeat:monitoring]
every = 5min
to = @oncall
[heartbeat:abroad]
every = 1min
to = @abroad"""
)


@pytest.fixture
def alert_app(tmp_path, spool):
    app = smsapi.Application(
        smsapi.load_config(write_ini(tmp_path, spool, extra=ALERTING))
    )
    yield app
    app.close()


def post_alert(app, payload, query="to=@oncall", user="lvv"):
    return call(
        app, "POST", "/api/v1.0/alerts/alertmanager", payload, user, query=query
    )


def texts_in(spool, kind="outgoing"):
    """{number: text} of the files in one spool directory."""
    found = {}
    for name in os.listdir(spool[kind]):
        headers, text = smsapi.parse_message(read_spool_file(spool, kind, name))
        found[headers["To"]] = text
    return found


def test_alert_one_sms_per_recipient_with_status_names_and_summaries(alert_app, spool):
    payload = notification(
        [
            alert("HighCPU", "db1:9100", "CPU at 95%", n=1),
            alert("DiskFull", None, None, n=2, description="/var\n99% full"),
        ]
    )
    response = post_alert(alert_app, payload, "to=@oncall,+79160000000")
    assert response.status == 201, response.body
    assert set(response.json()["message_id"]) == {
        "79680000000",
        "79680000001",
        "+79160000000",
    }
    text = "FIRING:2 HighCPU db1:9100: CPU at 95%; DiskFull: /var 99% full"
    assert texts_in(spool) == dict.fromkeys(
        ["79680000000", "79680000001", "79160000000"], text
    )
    heads = [
        read_spool_file(spool, "outgoing", i)
        for i in response.json()["message_id"].values()
    ]
    assert all(
        b"Priority: High" in head for head in heads
    )  # alerts go before other messages


def test_alert_resolved_and_grafana(alert_app, spool):
    payload = notification(
        [alert("HighCPU", "db1", "CPU back at 20%", "resolved")], "resolved"
    )
    assert post_alert(alert_app, payload, "to=79680000005").status == 201
    assert texts_in(spool) == {"79680000005": "RESOLVED HighCPU db1: CPU back at 20%"}
    grafana = {  # Grafana's webhook contact point, as its documentation shows it
        "receiver": "My Super Webhook",
        "status": "firing",
        "orgId": 1,
        "alerts": [
            {
                "status": "firing",
                "labels": {
                    "alertname": "High memory usage",
                    "team": "blue",
                    "zone": "us-1",
                },
                "annotations": {
                    "description": "The system has high memory usage",
                    "runbook_url": "https://myrunbook.com/runbook/1234",
                    "summary": "This alert was triggered for zone us-1",
                },
                "startsAt": "2021-10-12T09:51:03.157076+02:00",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "https://play.grafana.org/alerting/1afz29v7z/edit",
                "fingerprint": "c6eadffa33fcdf37",
                "silenceURL": "https://play.grafana.org/alerting/silence/new",
                "dashboardURL": "",
                "panelURL": "",
                "values": {"B": 44.23943737541908, "C": 1},
                "valueString": "[ var='B' labels={} value=44.23943737541908 ]",
            }
        ],
        "groupLabels": {},
        "commonLabels": {
            "alertname": "High memory usage",
            "team": "blue",
            "zone": "us-1",
        },
        "commonAnnotations": {},
        "externalURL": "https://play.grafana.org/",
        "version": "1",
        "groupKey": '{}:{alertname="High memory usage"}',
        "truncatedAlerts": 0,
        "title": "[FIRING:1]  (High memory usage blue us-1)",
        "state": "alerting",
        "message": "**Firing**\n\nLabels:\n - alertname = High memory usage",
    }
    response = post_alert(alert_app, grafana, "to=79680000006")
    assert response.status == 201, response.body
    assert texts_in(spool)["79680000006"] == (
        "FIRING:1 High memory usage: This alert was triggered for zone us-1"
    )


def test_alert_storm_is_one_sms_ending_in_more(alert_app, spool):
    alerts = [
        alert("InstanceDown", f"node{n:02d}:9100", "target is down", n=n)
        for n in range(50)
    ]
    response = post_alert(alert_app, notification(alerts), "to=79680000007")
    assert response.status == 201 and response.json()["parts_count"] == 1
    text = texts_in(spool)["79680000007"]
    shown = text.split(" +")[0].removeprefix("FIRING:50 ").split("; ")
    assert text.startswith("FIRING:50 InstanceDown node00:9100: target is down; ")
    assert text.endswith(f" +{50 - len(shown)} more") and len(text) <= 160
    assert all(line.endswith(": target is down") for line in shown)  # never cut
    one_more = "FIRING:50 " + "; ".join(
        shown + ["InstanceDown node99:9100: target is down"]
    )
    assert len(one_more + f" +{49 - len(shown)} more") > 160  # as many as fit


def test_alert_template_and_max_parts(tmp_path, spool):
    extra = (
        ALERTING
        + "\n[alerts]\nmax_parts = 2\ntemplate = [$groupLabels_alertname] $head/$count $alerts ($receiver)"
    )
    app = smsapi.Application(
        smsapi.load_config(write_ini(tmp_path, spool, extra=extra))
    )
    alerts = [alert("InstanceDown", f"node{n:02d}", "down", n=n) for n in range(50)]
    response = post_alert(app, notification(alerts), "to=79680000008")
    assert response.status == 201 and response.json()["parts_count"] == 2
    text = texts_in(spool)["79680000008"]
    assert text.startswith("[InstanceDown] FIRING:50/50 InstanceDown node00: down; ")
    assert text.endswith(" more (sms)") and 160 < len(text) <= 306


def test_alert_duplicates_within_the_window_send_once(alert_app, spool, caplog):
    payload = notification([alert("HighCPU", "db1", "CPU at 95%", n=1)])
    first = post_alert(alert_app, payload)
    twin = post_alert(  # the other Alertmanager of an HA pair
        alert_app, dict(payload, externalURL="http://alertmanager-2:9093")
    )
    assert (first.status, twin.status) == (201, 200)
    assert twin.json()["message_id"] == first.json()["message_id"]
    assert len(os.listdir(spool["outgoing"])) == 2
    elsewhere = post_alert(alert_app, payload, "to=79680000009")  # other recipients
    later = post_alert(
        alert_app,
        notification(
            [
                alert("HighCPU", "db1", "CPU at 95%", n=1)
                | {"startsAt": "2026-11-29T11:00:00Z"}
            ]
        ),
    )
    assert elsewhere.status == later.status == 201
    assert post_alert(alert_app, payload).status == 201  # not the last one: sent
    assert post_alert(alert_app, payload).status == 200  # the last one again
    assert len(os.listdir(spool["outgoing"])) == 7
    assert "damaged" not in caplog.text


def test_alert_another_users_copy_never_suppresses_a_page(alert_app, spool):
    real = notification([alert("DatabaseDown", "db1", "db1 is down", n=7)])
    harmless = notification([alert("DatabaseDown", "db1", "all is fine", n=7)])
    assert post_alert(alert_app, harmless, user="ann").status == 201
    page = post_alert(alert_app, real, user="lvv")
    assert page.status == 201
    texts = [smsapi.parse_message(read_spool_file(spool, "outgoing", i))[1]
             for i in page.json()["message_id"].values()]  # fmt: skip
    assert texts == ["FIRING:1 DatabaseDown db1: db1 is down"] * 2


def test_alert_a_refire_is_sent_however_soon_it_comes(alert_app, spool):
    a, b = alert("HighCPU", "db1", n=1), alert("DiskFull", "db2", n=2)
    resolved_a = alert("HighCPU", "db1", status="resolved", n=1)
    rounds = [
        notification([a, b]),
        notification([resolved_a, b]),  # A resolved, B still firing: news
        notification([a, b]),  # A fires again after a resend gap: news
        notification([resolved_a], status="resolved"),
        notification([a]),
    ]
    assert [post_alert(alert_app, p).status for p in rounds] == [201] * 5
    assert post_alert(alert_app, rounds[-1]).status == 200  # a repeat of the last
    assert len(os.listdir(spool["outgoing"])) == 10


def test_alert_real_alerts_grouped_with_the_watchdog_are_sent(alert_app, spool):
    grouped = notification(
        [alert("Watchdog", n=9), alert("DatabaseDown", "db1", "db1 is down", n=7)],
        group="{}:{}",
    )
    answer = post_alert(alert_app, grouped, "to=@oncall&heartbeat=monitoring")
    assert answer.status == 201
    assert set(texts_in(spool).values()) == {"FIRING:1 DatabaseDown db1: db1 is down"}
    assert alert_app.parts.heartbeats.states(time.time())[0].last is not None  # and a beat
    refused = post_alert(alert_app, grouped, "heartbeat=monitoring")  # nowhere to send
    assert refused.status == 400 and "to=" in refused.json()["error"]


def test_alert_control_characters_are_cleaned_never_refused(alert_app, spool):
    body = json.dumps(
        notification([alert("Disk\u0000Full", "db\x071", "full\x1b[31m now", n=3)])
    ).replace("db\\u00071", "db\\ud8001")  # a lone surrogate too
    answer = post_alert(alert_app, body.encode(), query="to=79680000000")
    assert answer.status == 201, answer.body
    (text,) = texts_in(spool).values()
    assert text == "FIRING:1 Disk Full db\ufffd1: full [31m now"


def test_alert_text_past_max_parts_whatever_the_template_is_cut(tmp_path, spool):
    extra = ALERTING + "\n[alerts]\ntemplate = $head $commonLabels_severity " + "x" * 300
    app = smsapi.Application(smsapi.load_config(write_ini(tmp_path, spool, extra=extra)))
    assert post_alert(app, notification([alert("HighCPU", n=1)])).status == 201
    (text,) = set(texts_in(spool).values())
    assert text.startswith("FIRING:1 critical xxx") and text.endswith("..")
    assert smsapi.encode_text(text).parts == 1


def test_alert_text_costs_a_few_fittings_however_many_alerts(alert_app, monkeypatch):
    fittings = []
    counted = smsapi.encode_text
    monkeypatch.setattr(smsapi, "encode_text", lambda t: fittings.append(1) or counted(t))
    for template in ("$head $alerts", "$head"):  # with no $alerts, every count is one text
        options = {"max_parts": 1, "template": template, "substitute": True}
        alerts = [alert("A", n=n) for n in range(20000)]
        fittings.clear()
        smsapi.alert_text(notification(alerts), "firing", alerts, options)
        assert len(fittings) <= 40


def test_lookalikes_leave_the_gsm_alphabet_for_it():
    gsm = smsapi.GSM_BASIC | smsapi.GSM_EXTENSION
    assert not set(smsapi.LOOKALIKES) & gsm
    assert set("".join(smsapi.LOOKALIKES.values())) <= smsapi.GSM_BASIC | {"^"}


def test_send_substitute_replaces_lookalikes_only_when_that_keeps_it_gsm(app, spool):
    typographic = "Disk “full” – 95 % … on db1\u00a0now"
    sent = send(app, ["79680000000"], typographic, substitute=True)
    data = sent.json()
    assert sent.status == 201 and data["substituted"] == 5 and data["encoding"] == "GSM"
    assert data["sent_text"] == 'Disk "full" - 95 % ... on db1 now'
    assert texts_in(spool) == {"79680000000": data["sent_text"]}
    posted = send(app, ["79680000001"], typographic).json()  # not asked: as posted
    assert posted["sent_text"] == typographic and posted["encoding"] == "UCS2"
    assert "substituted" not in posted
    cyrillic = send(app, ["79680000002"], "Диск “полон”", substitute=True).json()
    assert cyrillic["sent_text"] == "Диск “полон”" and cyrillic["substituted"] == 0
    form = call(app, "POST", "/api/v1.0/sms/outgoing", "mobiles=79680000003&text=a…b&substitute=yes".encode(),
                "lvv", FORM)  # fmt: skip
    assert form.status == 201 and form.json()["sent_text"] == "a...b"
    bad = send(app, ["79680000004"], "x", substitute="yes")
    assert bad.status == 400 and bad.json()["error"] == "substitute must be yes/no (a boolean)"


def test_send_max_parts_refuses_or_truncates_and_writes_nothing_on_refusal(app, spool):
    three = "word " * 80  # 400 septets: three parts
    refused = send(app, ["79680000000"], three, max_parts=2)
    assert refused.status == 400 and refused.json()["error"] == "Text needs 3 parts; the limit is 2"
    for wrong in (0, app.config.max_parts + 1, "2", True):
        answer = send(app, ["79680000000"], three, max_parts=wrong)
        assert answer.status == 400, wrong
    assert send(app, ["79680000000"], three, max_parts=2, truncate="yes").status == 400
    assert os.listdir(spool["outgoing"]) == []
    cut = send(app, ["79680000000"], three, max_parts=2, truncate=True).json()
    assert cut["truncated"] is True and cut["parts_count"] == 2
    assert cut["sent_text"].endswith("..") and three.startswith(cut["sent_text"][:-2])
    assert smsapi.encode_text(cut["sent_text"] + "x").parts == 3  # nothing more fits
    whole = send(app, ["79680000001"], three, max_parts=3, truncate=True).json()
    assert whole["sent_text"] == three and "truncated" not in whole
    endless = "x" * 160 * (app.config.max_parts + 1)
    capped = send(app, ["79680000002"], endless, truncate=True).json()
    assert capped["parts_count"] == app.config.max_parts and capped["truncated"]
    dry = post_send(app, {"mobiles": ["79680000003"], "text": three, "max_parts": 1,
                          "truncate": True, "substitute": True}, "lvv", query="dry_run=1")  # fmt: skip
    assert (dry.json()["truncated"], dry.json()["substituted"], dry.json()["parts_count"]) == (True, 0, 1)


def test_alert_text_takes_lookalikes_unless_told_not_to(tmp_path, spool):
    payload = notification([alert("DiskFull", "db1", "disk “/var” is 99% full…", n=1)])
    for setting, expected in (("yes", "GSM"), ("no", "UCS2")):
        for name in os.listdir(spool["outgoing"]):
            os.unlink(os.path.join(spool["outgoing"], name))
        extra = ALERTING + f"\n[alerts]\nsubstitute = {setting}\n"
        root = tmp_path / setting  # a state of its own: not a repeat of the other
        root.mkdir()
        app = smsapi.Application(smsapi.load_config(write_ini(root, spool, extra=extra)))
        answer = post_alert(app, payload, "to=79680000000", "lvv")
        app.close()
        assert answer.status == 201 and answer.json()["encoding"] == expected, setting
        plain = '"/var" is 99% full...' in answer.json()["sent_text"]
        assert plain == (setting == "yes")


def test_metrics_count_the_parts_smsd_sent_by_encoding(app, spool):
    app.parts.watcher.tick()
    gsm = sent_id(app, text="word " * 40)  # two parts
    ucs2 = sent_id(app, "79680000001", text="Привет")
    for message_id, ref in ((gsm, 1), (ucs2, 2)):
        smsd_sends(spool, message_id, ref)
    app.parts.watcher.tick()
    samples = scrape(app, user="root")
    assert metric(samples, "smsapi_parts_total", encoding="gsm") == 2
    assert metric(samples, "smsapi_parts_total", encoding="ucs2") == 1


def test_alert_duplicate_after_the_window_is_sent_again(tmp_path, spool, clock):
    extra = ALERTING + "\n[alerts]\ndedupe_window = 1"
    config = smsapi.load_config(write_ini(tmp_path, spool, extra=extra))
    app = smsapi.Application(config, clock=clock)
    payload = notification([alert("HighCPU", "db1", "CPU at 95%", n=1)])
    assert post_alert(app, payload).status == 201
    clock.advance(0.9)
    assert post_alert(app, payload).status == 200  # within the window: the same
    clock.advance(0.2)
    assert post_alert(app, payload).status == 201
    assert len(os.listdir(spool["outgoing"])) == 4


@pytest.mark.parametrize(
    "body",
    [b"[1, 2]", b"not json", {"alerts": []}, {"alerts": "many"}, {"status": "firing"},
     {"alerts": [1]}, {"alerts": [{"labels": {"alertname": 1}}]},
     {"alerts": [{"labels": {}, "annotations": ["summary"]}]}],
)  # fmt: skip
def test_alert_malformed_notifications_are_400_and_write_nothing(
    alert_app, spool, body
):
    headers = {"Content-Type": "application/json"}
    response = call(
        alert_app,
        "POST",
        "/api/v1.0/alerts/alertmanager",
        body,
        "lvv",
        headers,
        query="to=@oncall",
    )
    assert response.status == 400, response.body
    assert spool_snapshot(spool) == {}


def test_alert_recipients_are_checked_like_a_send(alert_app, spool):
    payload = notification([alert("HighCPU", n=1)])
    assert post_alert(alert_app, payload, "").status == 400
    assert post_alert(alert_app, payload, "to=@nobody").status == 400
    assert post_alert(alert_app, payload, "to=@abroad").status == 403
    assert post_alert(alert_app, payload, "to=79680000000", user=None).status == 401
    assert spool_snapshot(spool) == {}


def test_alert_budget_and_a_broken_spool_are_errors_alertmanager_retries(
    tmp_path, spool, caplog
):
    extra = ALERTING + f"\n[user:night]\npassword = {HASHES['night']}\nmax_per_hour = 2"
    app = smsapi.Application(
        smsapi.load_config(write_ini(tmp_path, spool, extra=extra))
    )
    payload = notification([alert("HighCPU", n=1)])
    refused = post_alert(
        app, payload, "to=79680000000,79680000001,79680000002", "night"
    )
    assert refused.status == 429 and refused.headers["Retry-After"]
    assert "ERROR" in caplog.text and "not sent: Budget used up" in caplog.text
    assert 'alert of group {}:{alertname="HighCPU"} not sent' in caplog.text
    assert "FIRING" not in caplog.text  # log_text = no: the text stays out
    app.parts.sender.outgoing.directory = str(tmp_path / "gone")
    assert post_alert(app, payload, "to=79680000000", "night").status == 503
    app.parts.sender.outgoing.directory = spool["outgoing"]
    assert (
        post_alert(app, payload, "to=79680000000", "night").status == 201
    )  # not a duplicate


def test_alert_quiet_hours_hold_only_what_says_priority_normal(tmp_path, spool):
    extra = ALERTING + quiet_ini(window_around_now())
    app = smsapi.Application(
        smsapi.load_config(write_ini(tmp_path, spool, extra=extra))
    )
    payload = notification([alert("HighCPU", n=1)])
    urgent = post_alert(app, payload, "to=79680000000", "night")
    held = post_alert(app, payload, "to=79680000001&priority=normal", "night")
    assert urgent.status == held.status == 201
    assert "held" not in urgent.json() and held.json()["held"] == "quiet_hours"


def test_heartbeat_beats_listing_and_permissions(alert_app, spool):
    assert (
        call(alert_app, "POST", "/api/v1.0/heartbeats/monitoring", user="lvv").status
        == 200
    )
    assert (
        call(alert_app, "POST", "/api/v1.0/heartbeats/nothing", user="lvv").status
        == 404
    )
    assert (
        call(alert_app, "POST", "/api/v1.0/heartbeats/abroad", user="lvv").status == 403
    )
    assert (
        call(
            alert_app,
            "POST",
            "/api/v1.0/heartbeats/abroad",
            b"{}",
            "ann",
            {"Content-Type": "text/x"},
        ).status
        == 200
    )
    listed = call(alert_app, "GET", "/api/v1.0/heartbeats", user="lvv").json()[
        "heartbeats"
    ]
    assert [h["name"] for h in listed] == ["monitoring"]  # not abroad: lvv may not
    assert listed[0]["every"] == 300 and listed[0]["to"] == ["@oncall"]
    assert listed[0]["state"] == "ok" and datetime_with_offset(listed[0]["last_beat"])
    everything = call(alert_app, "GET", "/api/v1.0/heartbeats", user="root").json()
    assert [h["name"] for h in everything["heartbeats"]] == ["monitoring", "abroad"]
    assert spool_snapshot(spool) == {}


def test_heartbeat_messages_belong_to_no_user_whatever_its_name(tmp_path, spool):
    extra = ALERTING + f"\n[user:heartbeat]\npassword = {HASHES['lvv']}\nadmin = no"
    app = smsapi.Application(smsapi.load_config(write_ini(tmp_path, spool, extra=extra)))
    app.parts.heartbeats.check(time.time() + 3600)
    ids = os.listdir(spool["outgoing"])
    assert ids and all(
        smsapi.parse_message(read_spool_file(spool, "outgoing", i))[0]["From"]
        == "smsapi:heartbeat"
        for i in ids
    )
    headers = basic("heartbeat", PASSWORDS["lvv"])
    listing = call(app, "GET", "/api/v1.0/sms/outgoing/", headers=headers).json()
    assert listing["message_id"] == []
    for message_id in ids:
        path = f"/api/v1.0/sms/outgoing/{message_id}"
        assert call(app, "GET", path, headers=headers).status == 404
        assert call(app, "DELETE", path, headers=headers).status == 404


def test_heartbeat_flapping_is_capped_and_counted(tmp_path, spool, caplog, clock):
    extra = GROUPS + "\n[heartbeat:flaky]\nevery = 1min\nto = @oncall\nmax_per_day = 4"
    app = smsapi.Application(
        smsapi.load_config(write_ini(tmp_path, spool, extra=extra)), clock=clock
    )
    beats = app.parts.heartbeats
    for _ in range(5):  # missed, back: ten changes
        clock.advance(61)
        beats.check(clock.now)
        clock.advance(1)
        assert call(app, "POST", "/api/v1.0/heartbeats/flaky", user="lvv").status == 200
    assert len(os.listdir(spool["outgoing"])) == 4 * 2  # four notices, to two numbers
    assert caplog.text.count("not sent: max_per_day") == 6
    text = call(app, "GET", "/metrics").body.decode()
    assert 'smsapi_heartbeat_notices_total{heartbeat="flaky",outcome="sent"} 4' in text
    assert 'smsapi_heartbeat_notices_total{heartbeat="flaky",outcome="suppressed"} 6' in text
    check = call(app, "GET", "/api/v1.0/health").json()["checks"]["heartbeat:flaky"]
    assert check["status"] == "warn" and "flapping" in check["output"]


def test_heartbeat_missed_then_back_once_each_across_a_restart(
    tmp_path, spool, caplog, clock
):
    extra = GROUPS + "\n[heartbeat:monitoring]\nevery = 1min\nto = @oncall 79160000000"
    path = write_ini(tmp_path, spool, extra=extra)
    app = smsapi.Application(smsapi.load_config(path), clock=clock)
    beats = app.parts.heartbeats
    now = clock.now
    beats.check(now + 59)
    assert spool_snapshot(spool) == {}  # a full period after the start first
    beats.check(now + 61)
    missed = texts_in(spool)
    assert set(missed) == {"79680000000", "79680000001", "79160000000"}
    assert set(missed.values()) == {"heartbeat monitoring missed, last beat at never"}
    beats.check(now + 200)
    assert len(os.listdir(spool["outgoing"])) == 3  # once
    assert (
        call(app, "GET", "/api/v1.0/health").json()["checks"]["heartbeat:monitoring"][
            "status"
        ]
        == "warn"
    )
    app.close()
    for name in os.listdir(spool["outgoing"]):
        os.remove(os.path.join(spool["outgoing"], name))
    clock.advance(3600)
    again = smsapi.Application(smsapi.load_config(path), clock=clock)  # still missed
    again.parts.heartbeats.check(clock.now + 3600)
    assert spool_snapshot(spool) == {}
    assert (
        call(again, "POST", "/api/v1.0/heartbeats/monitoring", user="lvv").status == 200
    )
    assert set(texts_in(spool).values()) == {"heartbeat monitoring back"}
    assert (
        call(again, "POST", "/api/v1.0/heartbeats/monitoring", user="lvv").status == 200
    )
    assert len(os.listdir(spool["outgoing"])) == 3  # back once
    text = call(again, "GET", "/metrics").body.decode()
    last = float(
        re.search(
            r'smsapi_heartbeat_last_seconds\{heartbeat="monitoring"\} (\S+)', text
        ).group(1)
    )
    assert last == clock.now
    for name in os.listdir(spool["outgoing"]):
        os.remove(os.path.join(spool["outgoing"], name))
    last_beat = again.parts.heartbeats.states(time.time())[0].last
    again.parts.heartbeats.check(last_beat + 61)
    assert texts_in(spool)["79160000000"].startswith(
        "heartbeat monitoring missed, last beat at 20"
    )
    again.close()


def test_heartbeat_from_alertmanagers_watchdog_sends_nothing(alert_app, spool):
    watchdog = notification(
        [alert("Watchdog", summary="always firing", n=9)], group="{}:{}"
    )
    for _ in range(2):  # byte-identical: a beat each time, never a duplicate
        response = post_alert(alert_app, watchdog, "heartbeat=monitoring")
        assert response.status == 200 and response.json()["heartbeat"] == "monitoring"
    assert spool_snapshot(spool) == {}
    first = alert_app.parts.heartbeats.states(time.time())[0].last
    assert first and time.time() - first < 5
    resolved = notification([alert("Watchdog", status="resolved", n=9)], "resolved")
    assert (
        post_alert(alert_app, resolved, "heartbeat=monitoring").status == 400
    )  # no to=
    assert post_alert(alert_app, watchdog, "heartbeat=nothing").status == 404
    assert post_alert(alert_app, watchdog, "heartbeat=abroad").status == 403


###############################################################################
# Pages and replies ############################################################
###############################################################################

PAGING = GROUPS + "\n[alerts]\nack = yes\n"


@pytest.fixture
def paging(tmp_path, spool, clock):
    """Makes apps whose firing notifications are pages, over one state and
    spool, on the test's clock (a second one is the first restarted)."""
    made = []

    def make(extra=""):
        path = write_ini(tmp_path, spool, extra=PAGING + extra)
        made.append(smsapi.Application(smsapi.load_config(path), clock=clock))
        return made[-1]

    yield make
    for app in made:
        app.close()


def smsd_stamp(seconds):
    """A time as smsd writes it in a Received: header."""
    return time.strftime("%y-%m-%d %H:%M:%S", time.localtime(seconds))


def reply(app, spool, number, text, when=None):
    """smsd files an SMS from number in incoming; the watcher reads it."""
    name = "GSM1." + base64.b32encode(os.urandom(5)).decode()
    when = app.clock.time() if when is None else when
    put_file(spool, "incoming", name, {"From": number, "Received": smsd_stamp(when)}, text)
    app.parts.watcher.tick()
    return name


def sms_to(spool, number, sender=None):
    """The texts of the files in outgoing for number, oldest first (of sender's, if given)."""
    found = []
    for name in os.listdir(spool["outgoing"]):
        headers, text = smsapi.parse_message(read_spool_file(spool, "outgoing", name))
        if headers["To"] == number and sender in (None, headers["From"]):
            found.append((name[smsapi.ID_TIME], text))
    return [text for _, text in sorted(found)]


def pages_of(app, user="lvv"):
    response = call(app, "GET", "/api/v1.0/alerts", user=user)
    assert response.status == 200, response.body
    return response.json()["pages"]


def fire(app, name="HighCPU", to="@oncall", n=1, user="lvv", **extra):
    """A firing notification of group alertname=name, as Alertmanager posts it."""
    payload = notification(
        [alert(name, f"db{n}:9100", "CPU at 95%", n=n)],
        group=f'{{}}:{{alertname="{name}"}}',
        **extra,
    )
    return post_alert(app, payload, "to=" + to, user)


def resolve(app, name="HighCPU", to="@oncall", user="lvv"):
    payload = notification(
        [alert(name, "db1:9100", "CPU at 20%", "resolved", n=1)],
        "resolved",
        group=f'{{}}:{{alertname="{name}"}}',
    )
    return post_alert(app, payload, "to=" + to, user)


ONCALL = ["79680000000", "79680000001"]


@pytest.mark.parametrize(
    ("text", "command"),
    [
        ("3a", ("ack", 3)), ("3A", ("ack", 3)), ("  3a \n", ("ack", 3)), ('"3a"', ("ack", 3)),
        ("3a.", ("ack", 3)), ("\u201c3a.\u201d", ("ack", 3)), ("3 a", ("ack", 3)),
        ("ack 3", ("ack", 3)), ("ACK  12", ("ack", 12)), ("a 3", ("ack", 3)), ("3ack", ("ack", 3)),
        ("a", ("ack", None)), ("Ack.", ("ack", None)), ("'ack'", ("ack", None)),
        ("999a", ("ack", 999)), ("3e", ("escalate", 3)), ("esc 3", ("escalate", 3)),
    ],
)  # fmt: skip
def test_reply_parser_reads_each_form_of_a_code(text, command):
    assert smsapi.read_reply(text) == command


@pytest.mark.parametrize(
    "text",
    [
        "", "3", "0a", "03a", "1000a", "-3a", "3a!", "3aa", "a3b", "3 a a", "yes", "ok thanks",
        "e", "esc", "\u0663a", "\uff13a", "3\u0430", "3a" + " " * 40, "3a..", "3a" + "\0",
        "ack 3 now", "\u00b3a",
    ],
)  # fmt: skip
def test_reply_parser_takes_nothing_else_for_a_code(text):
    assert smsapi.read_reply(text) is None


@hypothesis.settings(max_examples=2000, deadline=None)
@hypothesis.given(st.text(max_size=60))
def test_reply_parser_never_raises_nor_reads_a_code_from_other_text(text):
    command = smsapi.read_reply(text)
    if command is not None:  # then the text is made only of a reply's characters
        assert set(text.lower()) <= set("0123456789 acekqs.\"'`\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000\u201c\u201d\u2018\u2019\u00ab\u00bb\u201e")
        assert command.code is None or 1 <= command.code <= 999
        assert len(text) <= smsapi.MAX_REPLY


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    st.lists(st.text(min_size=1, max_size=200), min_size=1, max_size=30),
    st.integers(1, 3),
    st.integers(1, 999),
)
def test_page_text_and_its_reply_code_fit_max_parts(summaries, max_parts, code):
    alerts = [alert("Alert", f"host{n}", s, n=n) for n, s in enumerate(summaries)]
    options = {"max_parts": max_parts, "template": None, "substitute": True}
    after = smsapi.page_suffix(code)
    text = smsapi.alert_text(notification(alerts), "firing", alerts, options, after)
    assert smsapi.encode_text(text + after).parts <= max_parts
    assert (text + after).endswith(f"Reply {code}a to ack")


def test_page_each_sms_ends_with_its_numbers_code(paging, spool, clock):
    app = paging()
    response = fire(app, summary="x")
    assert response.status == 201, response.body
    for number in ONCALL:
        assert sms_to(spool, number) == ["FIRING:1 HighCPU db1:9100: CPU at 95% Reply 1a to ack"]
    long = fire(app, "Storm", n=2, commonAnnotations={})  # another group: code 2
    assert long.status == 201
    payload = notification(
        [alert("Flood", f"node{n}", "disk " * 30, n=n) for n in range(20)],
        group='{}:{alertname="Flood"}',
    )
    assert post_alert(app, payload).status == 201
    texts = sms_to(spool, ONCALL[0])
    assert texts[1].endswith(" Reply 2a to ack")
    assert texts[2].endswith(" more Reply 3a to ack")
    assert smsapi.encode_text(texts[2]).parts == 1  # max_parts counts the code too
    [flood] = [p for p in pages_of(app) if p["group"] == {"alertname": "Flood"}]
    assert flood["code"] == dict.fromkeys(ONCALL, 3) and flood["alerts"] == 20


def test_page_codes_are_the_smallest_free_per_number_and_kept_while_open(paging, spool, clock):
    app = paging()
    assert fire(app, "HighCPU").status == 201  # to 79680000000 and 79680000001
    assert fire(app, "DiskFull", "@ops").status == 201  # 79680000001 and 79160000000
    codes = {p["group"]["alertname"]: p["code"] for p in pages_of(app)}
    assert codes == {
        "HighCPU": {"79680000000": 1, "79680000001": 1},
        "DiskFull": {"79680000001": 2, "79160000000": 1},
    }
    clock.advance(600)  # past dedupe_window: HighCPU again, a new alert in it
    assert fire(app, "HighCPU", n=2).status == 201
    assert sms_to(spool, "79680000000")[-1].endswith("Reply 1a to ack")  # the same page
    assert resolve(app, "HighCPU").status == 201
    assert fire(app, "Other").status == 201
    codes = {p["group"]["alertname"]: p["code"] for p in pages_of(app) if p["status"] == "firing"}
    assert codes["Other"] == {"79680000000": 1, "79680000001": 1}  # 1 is free again
    clock.advance(1)
    assert fire(app, "HighCPU", n=3).status == 201  # a new incident of the group
    assert next(p["code"] for p in pages_of(app)) == {"79680000000": 2, "79680000001": 3}
    assert sorted(p["status"] for p in pages_of(app)) == ["firing"] * 3 + ["resolved"]
    assert pages_of(app, "ann") == []  # others' pages are not ann's
    assert len(pages_of(app, "root")) == 4  # an admin sees all


@pytest.mark.parametrize("answer", ["1a", "ack 1", "A 1.", "a", " ACK "])
def test_page_acknowledged_by_reply_tells_everyone_and_stops_paging(
    paging, spool, clock, answer
):
    app = paging()
    assert fire(app).status == 201
    clock.advance(60)
    reply(app, spool, "+79680000001", answer)
    [page] = pages_of(app)
    assert page["status"] == "acknowledged"
    assert page["acknowledged_by"] == "79680000001" and page["silence_id"] is None
    assert page["acknowledged_at"] == smsapi.iso_time(int(clock.now))
    replier = sms_to(spool, "79680000001", "smsapi:pager")
    other = sms_to(spool, "79680000000", "smsapi:pager")
    assert replier == ["#1 HighCPU: acknowledged."]
    at = time.strftime("%H:%M", time.localtime(int(clock.now)))
    assert other == [f"#1 HighCPU: acknowledged by +79680000001 at {at}."]
    files = set(os.listdir(spool["outgoing"]))
    clock.advance(3600)  # Alertmanager's repeat_interval: the group again
    again = fire(app, n=2)
    assert again.status == 200 and again.json()["acknowledged_by"] == "79680000001"
    assert set(os.listdir(spool["outgoing"])) == files  # nothing more sent
    assert call(app, "GET", "/api/v1.0/sms/incoming/", user="inbox").json()[
        "total_count"
    ] == 1  # the reply stays in the inbox


def test_page_bare_a_takes_the_newest_page_not_yet_acknowledged(paging, spool, clock):
    app = paging()
    assert fire(app).status == 201
    clock.advance(1)
    assert fire(app, "DiskFull").status == 201
    reply(app, spool, "79680000000", "a")  # the newest: DiskFull, code 2
    clock.advance(1)
    reply(app, spool, "79680000000", "a")  # then HighCPU, though DiskFull is newer
    status = {p["group"]["alertname"]: p["status"] for p in pages_of(app)}
    assert status == {"HighCPU": "acknowledged", "DiskFull": "acknowledged"}
    clock.advance(1)
    reply(app, spool, "79680000000", "a")  # none left: the newest open one says so
    assert sms_to(spool, "79680000000", "smsapi:pager")[-1].startswith(
        "#2 DiskFull: acknowledged by you at "
    )


def test_page_twice_late_unknown_and_nonsense_replies(paging, spool, clock, caplog):
    app = paging()
    assert fire(app).status == 201
    reply(app, spool, "79680000000", "1a")
    at = time.strftime("%H:%M", time.localtime(int(clock.now)))
    clock.advance(60)
    reply(app, spool, "79680000001", "1a")  # the other, too late
    reply(app, spool, "79680000000", "a")  # the same again
    assert sms_to(spool, "79680000001", "smsapi:pager")[-1] == (
        f"#1 HighCPU: acknowledged by +79680000000 at {at} already."
    )
    assert sms_to(spool, "79680000000", "smsapi:pager")[-1] == (
        f"#1 HighCPU: acknowledged by you at {at} already."
    )
    assert resolve(app).status == 201
    closed = time.strftime("%H:%M", time.localtime(clock.now))
    clock.advance(60)
    reply(app, spool, "79680000001", "1a")  # after the group resolved
    assert sms_to(spool, "79680000001", "smsapi:pager")[-1] == (
        f"#1 HighCPU: resolved at {closed}; nothing to acknowledge."
    )
    files = set(os.listdir(spool["outgoing"]))
    caplog.set_level("INFO", logger="smsapi")
    caplog.clear()
    reply(app, spool, "79160000000", "1a")  # never paged
    reply(app, spool, "79680000000", "thanks")  # no open page
    assert set(os.listdir(spool["outgoing"])) == files
    assert [r.getMessage() for r in caplog.records] == [
        "reply 1a from +79160000000, who was not paged: ignored",
        "SMS from +79680000000, who has no open page: thanks",
    ]
    assert [p["status"] for p in pages_of(app)] == ["resolved"]


def test_page_nonsense_reply_says_what_to_send_once_in_5min_and_not_past_5_an_hour(paging, spool, clock):
    app = paging()
    assert fire(app).status == 201
    clock.advance(1)
    assert fire(app, "DiskFull").status == 201
    for text in ["what?", "7a", "ok"]:  # 7: no page of this number has it
        reply(app, spool, "79680000000", text)
    assert sms_to(spool, "79680000000", "smsapi:pager") == [
        "Reply 2a to ack #2 DiskFull, 1a to ack #1 HighCPU"
    ]
    clock.advance(120)
    reply(app, spool, "79680000000", "hm")  # the 4th, 2 minutes on: not
    assert len(sms_to(spool, "79680000000", "smsapi:pager")) == 1
    clock.advance(181)
    reply(app, spool, "79680000000", "hm")  # the 5th, 5 minutes on: answered
    assert len(sms_to(spool, "79680000000", "smsapi:pager")) == 2
    clock.advance(301)
    reply(app, spool, "79680000000", "hm")  # the 6th within the hour: not
    assert len(sms_to(spool, "79680000000", "smsapi:pager")) == 2
    clock.advance(3600)
    reply(app, spool, "79680000000", "hm")  # an hour on: answered again
    assert len(sms_to(spool, "79680000000", "smsapi:pager")) == 3
    assert [p["status"] for p in pages_of(app)] == ["firing", "firing"]


def test_page_state_outlives_a_restart_and_each_reply_is_heard_once(paging, spool, clock):
    app = paging()
    assert fire(app).status == 201
    reply(app, spool, "79680000000", "maybe")  # a help SMS
    reply(app, spool, "79680000001", "1a")
    sent = sorted(os.listdir(spool["outgoing"]))
    again = paging()  # reads the same state, rescans incoming
    again.parts.watcher.tick()
    assert sorted(os.listdir(spool["outgoing"])) == sent  # no reply handled twice
    [page] = pages_of(again)
    assert page["status"] == "acknowledged" and page["code"] == dict.fromkeys(ONCALL, 1)
    assert fire(again, n=3).status == 200  # still acknowledged
    clock.advance(1)
    assert fire(again, "DiskFull").json()["message_id"]
    assert next(p["code"] for p in pages_of(again)) == dict.fromkeys(ONCALL, 2)


def test_page_reply_while_smsapi_was_down_is_heard_at_start(paging, spool, clock):
    app = paging()
    assert fire(app).status == 201
    put_file(spool, "incoming", "GSM1.old", {"From": "79680000000",
             "Received": smsd_stamp(clock.now - 3600)}, "1a")  # fmt: skip
    again = paging()  # a restart: the rescan finds a reply older than the page
    again.parts.watcher.tick()
    assert pages_of(again)[0]["status"] == "firing"
    assert sms_to(spool, "79680000000", "smsapi:pager") == []
    put_file(spool, "incoming", "GSM1.late", {"From": "79680000001",
             "Received": smsd_stamp(clock.now + 5)}, "1a")  # fmt: skip
    third = paging()
    third.parts.watcher.tick()
    assert pages_of(third)[0]["acknowledged_by"] == "79680000001"


def test_page_sms_written_just_before_a_kill_are_not_written_again(paging, spool):
    app = paging()
    assert fire(app).status == 201
    reply(app, spool, "79680000001", "1a")
    for n, message_id in enumerate(os.listdir(spool["outgoing"])):
        smsd_sends(spool, message_id, n)  # smsd sent the page and the news
    journal = os.path.join(app.config.state_dir, smsapi.PAGES_JOURNAL)
    with open(journal) as file:  # as if killed after writing, before noting it
        lines = [line for line in file if not line.startswith('["sent"')]
    with open(journal, "w") as file:
        file.writelines(lines)
    again = paging()
    again.parts.pager.step(again.clock.time())
    assert os.listdir(spool["outgoing"]) == []  # not sent again


def test_page_sms_the_pager_could_not_write_go_once_it_can(paging, spool, clock):
    app = paging()
    assert fire(app).status == 201
    app.parts.outgoing.directory = spool["outgoing"] + "-gone"  # as if it vanished
    reply(app, spool, "79680000001", "1a")
    assert sms_to(spool, "79680000001", "smsapi:pager") == []
    again = paging()  # the outbox is in the journal
    again.parts.pager.step(clock.now)
    assert sms_to(spool, "79680000001", "smsapi:pager") == ["#1 HighCPU: acknowledged."]
    again.parts.pager.step(clock.now)
    third = paging()
    third.parts.pager.step(clock.now)
    assert len(sms_to(spool, "79680000001", "smsapi:pager")) == 1  # once


def test_page_refused_by_the_budget_leaves_no_page(paging, spool):
    app = paging("[user:night]\npassword = "
                   + HASHES["night"] + "\nmax_per_hour = 1\n")  # fmt: skip
    assert fire(app, user="night").status == 429  # two SMS, one allowed
    assert pages_of(app, "night") == []
    reply(app, spool, "79680000000", "1a")
    assert os.listdir(spool["outgoing"]) == []


def test_page_acknowledgement_counted_in_metrics_health_and_a_webhook(
    paging, spool, receiver
):
    hook = receiver()
    app = paging(f"[webhook:ops]\nurl = {hook.url}\nsecret = {SECRET}\n"
                 "events = alert.acknowledged\n")  # fmt: skip
    app.parts.webhooks.start()
    assert fire(app).status == 201
    reply(app, spool, "79680000001", "1a")
    metrics = call(app, "GET", "/metrics").body.decode()
    assert "smsapi_acknowledgements_total 1" in metrics
    assert "smsapi_pages_open 1" in metrics
    check = call(app, "GET", "/api/v1.0/health").json()["checks"]["pages"]
    assert check["status"] == "pass" and check["acknowledged"] == 1
    [(_, event)] = hook.wait_for(1)
    assert event["type"] == "alert.acknowledged"
    assert event["data"]["acknowledged_by"] == "79680000001"
    assert event["data"]["code"] == dict.fromkeys(ONCALL, 1)


###############################################################################
# Escalation ###################################################################
###############################################################################

CHAINS = """
[group:primary]
mobiles = 79680000000
[group:backup]
mobiles = 79680000001
[escalation:night]
steps = @primary, 5min @backup, 10min call @primary, 15min @manager 79160000000
[escalation:twice]
steps = @primary, 1min @backup
repeat = 1
"""


def chain_app(paging, extra=""):
    """An app with the escalation chains above (and [alerts] ack = yes)."""
    return paging(extra + "\n" + CHAINS.replace("@manager ", "@backup "))


def escalate(app, chain="night", name="HighCPU", status="firing", to=None, n=1, user="lvv"):
    """A notification of group alertname=name posted with ?escalation=chain."""
    payload = notification(
        [alert(name, f"db{n}:9100", "CPU at 95%", status, n=n)], status,
        group=f'{{}}:{{alertname="{name}"}}',
    )  # fmt: skip
    query = f"escalation={chain}" + (f"&to={to}" if to else "")
    return call(app, "POST", "/api/v1.0/alerts/alertmanager", payload, user, query=query)


def files_to(spool, number, kind="outgoing"):
    """(headers, text) of each file for number in one spool directory, oldest first."""
    found = []
    for name in os.listdir(spool[kind]):
        headers, text = smsapi.parse_message(read_spool_file(spool, kind, name))
        if headers["To"] == number:
            found.append((name[smsapi.ID_TIME], headers, text))
    return [(headers, text) for _, headers, text in sorted(found, key=lambda f: f[0])]


def test_config_escalation_steps_are_read_and_checked(tmp_path, spool):
    steps = smsapi.as_steps("@primary, 5min @backup, 10min call @primary 79161234567, 1h @x")
    assert steps == (
        smsapi.Step(0, False, ("@primary",)),
        smsapi.Step(300, False, ("@backup",)),
        smsapi.Step(600, True, ("@primary", "79161234567")),
        smsapi.Step(3600, False, ("@x",)),
    )
    assert smsapi.as_steps("0 @a, @b, 2m call +79161234567") == (
        smsapi.Step(0, False, ("@a",)), smsapi.Step(0, False, ("@b",)),
        smsapi.Step(120, True, ("+79161234567",)),
    )  # fmt: skip
    for bad in ["", "5min @a", "@a, 10min @b, 5min @c", "@a,", "call", "@a, 5min",
                "@a, 5min call", "@a 12", "@a, soon @b"]:  # fmt: skip
        with pytest.raises(ValueError):
            smsapi.as_steps(bad)
    path = write_ini(tmp_path, spool, extra=CHAINS + "[heartbeat:beat]\nevery = 1min\nescalation = nope\n")
    with pytest.raises(smsapi.ConfigError) as raised:
        smsapi.load_config(path)
    assert [p.split(": ", 1)[1] for p in raised.value.problems] == [
        "[escalation:night] steps: no [group:manager]",
        "[heartbeat:beat] escalation: no [escalation:nope]",
    ]


def test_escalation_steps_page_on_time_with_codes_until_acknowledged(paging, spool, clock):
    app = chain_app(paging)
    response = escalate(app)
    assert response.status == 201, response.body
    assert [t for _, t in files_to(spool, "79680000000")] == [
        "FIRING:1 HighCPU db1:9100: CPU at 95% Reply 1a to ack"
    ]
    assert files_to(spool, "79680000001") == []
    [page] = pages_of(app)
    assert (page["escalation"], page["step"]) == ("night", 1)
    assert page["next_step_at"] == smsapi.iso_time(clock.now + 300)
    clock.advance(299)
    app.parts.pager.step(clock.now)
    assert files_to(spool, "79680000001") == []  # not before its time
    clock.advance(1)
    app.parts.pager.step(clock.now)
    [(headers, text)] = files_to(spool, "79680000001")
    assert text == "FIRING:1 HighCPU db1:9100: CPU at 95% Reply 1a to ack"
    assert headers["From"] == "lvv" and headers["Priority"] == "High"
    clock.advance(300)
    app.parts.pager.step(clock.now)  # step 3 rings the primary
    headers, text = files_to(spool, "79680000000")[-1]
    assert (headers["Voicecall"], text) == ("yes", smsapi.VOICE_CALL)
    assert pages_of(app)[0]["step"] == 3
    written = sorted(os.listdir(spool["outgoing"]))
    reply(app, spool, "79680000001", "1a")  # the backup acknowledges
    [page] = pages_of(app)
    assert page["status"] == "acknowledged" and page["next_step_at"] is None
    clock.advance(3600)
    app.parts.pager.step(clock.now)
    new = set(os.listdir(spool["outgoing"])) - set(written)
    assert all(smsapi.parse_message(read_spool_file(spool, "outgoing", n))[0]["From"]
               == "smsapi:pager" for n in new)  # fmt: skip
    assert len(new) == 2  # the news of the acknowledgement, and nothing else
    metrics = call(app, "GET", "/metrics").body.decode()
    assert 'smsapi_escalations_total{escalation="night"} 2' in metrics


def test_escalation_failed_or_undelivered_step_moves_on_at_once(paging, spool, clock):
    app = chain_app(paging)
    assert escalate(app).status == 201
    [message_id] = os.listdir(spool["outgoing"])
    smsd_fails(spool, message_id)
    app.parts.watcher.tick()
    app.parts.pager.step(clock.now)
    assert [t for _, t in files_to(spool, "79680000001")] == [
        "FIRING:1 HighCPU db1:9100: CPU at 95% Reply 1a to ack"
    ]  # step 2 at once
    [step_two] = [n for n in os.listdir(spool["outgoing"]) if n != message_id]
    smsd_sends(spool, step_two, 42)
    app.parts.watcher.tick()
    smsd_reports(spool, "79680000001", 42, code=70)  # undelivered
    app.parts.watcher.tick()
    app.parts.pager.step(clock.now)
    assert files_to(spool, "79680000000")[-1][0]["Voicecall"] == "yes"  # step 3 at once
    assert pages_of(app)[0]["step"] == 3


def test_escalation_on_request_pages_the_next_step_and_says_who(paging, spool, clock):
    app = chain_app(paging)
    assert escalate(app).status == 201
    reply(app, spool, "79680000000", "1e")
    assert len(files_to(spool, "79680000001")) == 1
    assert sms_to(spool, "79680000000", "smsapi:pager") == [
        "#1 HighCPU: escalated; paged +79680000001."
    ]
    assert pages_of(app)[0]["step"] == 2
    plain = paging_without_chain = fire(app, "DiskFull")
    assert plain.status == 201 and paging_without_chain
    reply(app, spool, "79680000000", "esc 2")
    assert sms_to(spool, "79680000000", "smsapi:pager")[-1] == (
        "#2 DiskFull: no escalation chain to escalate."
    )


def test_escalation_repeats_rounds_then_health_warns(paging, spool, clock):
    app = chain_app(paging)
    assert escalate(app, "twice").status == 201
    for seconds in (60, 60, 60):  # step 2; after a gap as long, round 2: step 1, 2
        clock.advance(seconds)
        app.parts.pager.step(clock.now)
    assert len(files_to(spool, "79680000000")) == 2
    assert len(files_to(spool, "79680000001")) == 2
    assert pages_of(app)[0]["round"] == 2
    check = call(app, "GET", "/api/v1.0/health").json()["checks"]["pages"]
    assert check["status"] == "pass"
    clock.advance(60)
    app.parts.pager.step(clock.now)
    check = call(app, "GET", "/api/v1.0/health").json()["checks"]["pages"]
    assert check["status"] == "warn" and check["unanswered"] == 1
    assert len(os.listdir(spool["outgoing"])) == 4  # every step of both rounds, once


def test_escalation_a_new_page_wakes_the_pager_for_its_next_step(paging, spool, clock):
    app = chain_app(paging, "[escalation:fast]\nsteps = @primary, 6s @backup\n")
    app.start()  # the pager's thread sleeps a minute: it has no page
    wait_until(lambda: clock.sleepers, 5, "the threads to sleep")
    assert escalate(app, "fast").status == 201
    clock.advance(6)
    wait_until(lambda: files_to(spool, "79680000001"), 5, "step 2 on time")


def test_escalation_round_lasts_as_long_as_it_says(paging, spool, clock):
    app = chain_app(paging, "[escalation:paced]\nsteps = @primary, 1min @backup\n"
                    "repeat = 1\nround = 10min\n")  # fmt: skip
    assert escalate(app, "paced").status == 201
    clock.advance(60)
    app.parts.pager.step(clock.now)
    assert pages_of(app)[0]["next_step_at"] == smsapi.iso_time(clock.now + 540)
    clock.advance(539)
    app.parts.pager.step(clock.now)
    assert len(files_to(spool, "79680000000")) == 1
    clock.advance(1)
    app.parts.pager.step(clock.now)
    assert len(files_to(spool, "79680000000")) == 2  # round 2, ten minutes on
    assert pages_of(app)[0]["round"] == 2


def test_escalation_resolved_reaches_exactly_the_numbers_paged(paging, spool, clock):
    app = chain_app(paging)
    assert escalate(app, to="79160000000").status == 201  # to= with the first step
    clock.advance(300)
    app.parts.pager.step(clock.now)  # step 2: the backup
    clock.advance(1)
    assert escalate(app, status="resolved").status == 201
    for number in ("79680000000", "79680000001", "79160000000"):
        assert files_to(spool, number)[-1][1] == "RESOLVED HighCPU db1:9100: CPU at 95%"
    before = sorted(os.listdir(spool["outgoing"]))
    again = escalate(app, status="resolved")  # a twin's: sent before
    assert again.status == 200 and sorted(os.listdir(spool["outgoing"])) == before
    clock.advance(3600)
    app.parts.pager.step(clock.now)
    assert sorted(os.listdir(spool["outgoing"])) == before  # the chain stopped


def test_escalation_unknown_or_forbidden_chain_writes_nothing(paging, spool):
    app = chain_app(paging, "[escalation:abroad]\nsteps = 4915112345678\n")
    before = spool_snapshot(spool)
    assert escalate(app, "nope").status == 400
    assert escalate(app, "abroad").status == 403  # lvv may not text 49...
    assert spool_snapshot(spool) == before and pages_of(app, "root") == []


def test_escalation_step_the_budget_refuses_is_logged_and_skipped(paging, spool, clock, caplog):
    app = chain_app(paging, f"[user:night]\npassword = {HASHES['night']}\nmax_per_hour = 1\n")
    assert escalate(app, user="night").status == 201  # the one SMS of the hour
    clock.advance(300)
    app.parts.pager.step(clock.now)
    assert files_to(spool, "79680000001") == []
    assert "step not sent: Budget used up" in caplog.text
    assert pages_of(app, "night")[0]["step"] == 2
    clock.advance(300)
    app.parts.pager.step(clock.now)  # the call costs no SMS: it goes
    assert files_to(spool, "79680000000")[-1][0]["Voicecall"] == "yes"


def test_escalation_step_due_while_stopped_is_paged_once_at_start(paging, spool, clock):
    app = chain_app(paging)
    assert escalate(app).status == 201
    clock.advance(400)  # smsapi was down when step 2 was due
    again = chain_app(paging)
    again.parts.pager.step(clock.now)
    again.parts.pager.step(clock.now)
    third = chain_app(paging)  # and killed right after
    third.parts.pager.step(clock.now)
    assert len(files_to(spool, "79680000001")) == 1  # once
    assert pages_of(third)[0]["next_step_at"] == smsapi.iso_time(clock.now - 400 + 600)


def test_escalation_overlapping_steps_page_a_number_once_with_its_code(paging, spool, clock):
    app = chain_app(paging, "[escalation:overlap]\nsteps = @oncall, 1min @ops 79680000000\n")
    assert escalate(app, "overlap").status == 201
    clock.advance(60)
    app.parts.pager.step(clock.now)
    assert len(files_to(spool, "79680000001")) == 2  # once in each step
    assert files_to(spool, "79160000000")[0][1].endswith("Reply 1a to ack")
    assert pages_of(app)[0]["code"] == {"79680000000": 1, "79680000001": 1, "79160000000": 1}


@pytest.mark.parametrize("by_call", [True, False])
def test_escalation_missed_call_acknowledges_only_when_asked(paging, spool, clock, by_call):
    app = chain_app(paging, f"ack_by_call = {by_call}\n")
    assert escalate(app).status == 201
    put_file(spool, "incoming", "GSM1.call", {"From": "79680000000", "Call_type": "missed",
             "Received": smsd_stamp(clock.now)}, "CALL MISSED")  # fmt: skip
    app.parts.watcher.tick()
    status = pages_of(app)[0]["status"]
    assert status == ("acknowledged" if by_call else "firing")
    told = sms_to(spool, "79680000000", "smsapi:pager")
    assert told == (["#1 HighCPU: acknowledged."] if by_call else [])  # never a help SMS


def test_escalation_missed_heartbeat_paged_through_a_chain(paging, spool, clock):
    app = chain_app(paging, "[heartbeat:backup]\nevery = 1min\nescalation = night\n")
    clock.advance(61)
    app.parts.watcher.tick()  # missed: step 1
    [(_, text)] = files_to(spool, "79680000000")
    assert text == "heartbeat backup missed, last beat at never Reply 1a to ack"
    clock.advance(300)
    app.parts.watcher.tick()
    app.parts.pager.step(clock.now)  # step 2
    assert files_to(spool, "79680000001")[0][1].endswith(" Reply 1a to ack")
    reply(app, spool, "79680000001", "1a")
    page = pages_of(app, "root")[0]
    assert page["status"] == "acknowledged" and page["title"] == "heartbeat backup"
    clock.advance(1)
    assert call(app, "POST", "/api/v1.0/heartbeats/backup", user="root").status == 200
    assert pages_of(app, "root")[0]["status"] == "resolved"
    for number in ("79680000000", "79680000001"):
        assert files_to(spool, number)[-1][1] == "heartbeat backup back"


###############################################################################
# Scheduled sends, quiet hours, expiry #########################################
###############################################################################


def scheduled_app(tmp_path, spool, extra="", clock=None):
    config = smsapi.load_config(write_ini(tmp_path, spool, extra=extra))
    return smsapi.Application(config, clock=clock)


def iso_seconds(text):
    """Seconds since the epoch of an ISO 8601 time with its offset."""
    import datetime

    return datetime.datetime.fromisoformat(text).timestamp()


def held_dir(app):
    return app.config.spool["scheduled"]


def iso_in(seconds, offset_hours=2):
    """An ISO 8601 time that many seconds from now, written in a zone of its own."""
    import datetime

    zone = datetime.timezone(datetime.timedelta(hours=offset_hours))
    return datetime.datetime.fromtimestamp(time.time() + seconds, zone).isoformat()


@pytest.mark.parametrize(
    ("given", "seconds"),
    [("+90s", 90), ("+90", None), ("+5min", 300), ("+2hour", 7200), ("+1day", 86400),
     ("+2week", 14 * 86400), ("+ 3 hour", None), (" 90s", 90), ("+0s", None), ("90s", None),
     ("+36day", None), ("+5 min", 300)],
)  # fmt: skip
def test_schedule_delays_are_rounded_up_to_whole_seconds(app, given, seconds):
    before = time.time()
    response = post_send(
        app,
        {"mobiles": ["79680000000"], "text": "x", "send_at": given},
        "lvv",
        query="dry_run=1",
    )
    if seconds is None:
        assert response.status == 400 and "send_at" in response.json()["error"]
        return
    import datetime

    moment = datetime.datetime.fromisoformat(response.json()["send_at"]).timestamp()
    assert moment == int(moment)  # whole seconds
    assert before + seconds <= moment <= math.ceil(time.time() + seconds)


def test_schedule_iso_times_need_an_offset_and_the_limits(app):
    def dry(value, name="send_at"):
        return post_send(
            app,
            {"mobiles": ["79680000000"], "text": "x", name: value},
            "lvv",
            query="dry_run=1",
        )

    assert dry(iso_in(3600)).status == 200
    assert dry(iso_in(3600, 0).replace("+00:00", "Z")).status == 200
    assert dry(iso_in(3600, -5)).status == 200
    naive = iso_in(3600)[:-6]
    for bad in (
        naive,
        iso_in(-60),
        iso_in(36 * 86400),
        "tomorrow",
        "",
        1795942664,
        None,
        ["+1s"],
    ):
        if bad is None:
            continue
        response = dry(bad)
        assert response.status == 400, bad
        assert response.json()["error"].startswith("send_at "), response.json()
    past = dry(iso_in(-60)).json()["error"]
    assert "send_at is before the server's time, 20" in past
    far = dry(iso_in(36 * 86400)).json()["error"]
    assert "more than max_schedule (35 days) after the server's time, 20" in far
    exact = dry(iso_in(3600.0 - time.time() % 1 + 0.25)).json()["send_at"]  # rounded up
    import datetime

    assert datetime.datetime.fromisoformat(exact).timestamp() % 1 == 0


def test_schedule_valid_until_needs_send_at_and_comes_after_it(app, spool):
    def dry(**fields):
        return post_send(
            app, {"mobiles": ["79680000000"], "text": "x", **fields}, "lvv",
            query="dry_run=1",
        )  # fmt: skip

    alone = dry(valid_until="+1hour")
    assert alone.status == 400 and "valid_until needs send_at" in alone.json()["error"]
    before = dry(send_at="+2hour", valid_until="+1hour")
    assert before.status == 400
    assert "valid_until must come after send_at" in before.json()["error"]
    assert dry(send_at="+1hour", valid_until="+1hour").status == 400
    assert dry(send_at="+1hour", valid_until="+2hour").status == 200
    assert spool_snapshot(spool) == {}


def test_schedule_in_a_form_or_query_reads_plus_as_plus(app, spool):
    at = iso_in(7200)
    query = "mobiles=79680000000&text=hi&send_at=" + at + "&valid_until=+3hour"
    response = call(app, "GET", "/api/v1.0/sms/outgoing", user="lvv", query=query)
    assert response.status == 201, response.body
    import datetime

    answered = datetime.datetime.fromisoformat(response.json()["send_at"]).timestamp()
    assert answered == datetime.datetime.fromisoformat(at).timestamp() // 1 + (
        1 if datetime.datetime.fromisoformat(at).timestamp() % 1 else 0
    )


def test_schedule_holds_the_file_until_its_time(app, spool):
    response = send(app, ["79680000000"], send_at="+1hour", valid_until="+2hour")
    assert response.status == 201
    data = response.json()
    message_id = data["message_id"]["79680000000"]
    assert data["status"] == "scheduled" and data["send_at"]
    assert os.listdir(spool["outgoing"]) == []
    assert os.listdir(held_dir(app)) == [message_id]
    status = status_of(app, message_id)
    assert status == {
        "message_id": message_id,
        "status": "scheduled",
        "to": "79680000000",
        "send_at": data["send_at"],
        "valid_until": status["valid_until"],
    }
    app.parts.schedule.run(time.time() + 3599)
    assert os.listdir(spool["outgoing"]) == []
    app.parts.schedule.run(time.time() + 3601)
    assert os.listdir(spool["outgoing"]) == [message_id]
    assert os.listdir(held_dir(app)) == []
    assert status_of(app, message_id)["status"] == "queued"
    with open(os.path.join(spool["outgoing"], message_id), "rb") as file:
        head = file.read().partition(b"\n\n")[0].decode()
    assert "To: 79680000000" in head and "Send_at: " + data["send_at"] in head


def test_schedule_expired_message_is_filed_as_failed_with_why(app, spool):
    data = send(app, ["79680000000"], send_at="+1hour", valid_until="+2hour").json()
    message_id = data["message_id"]["79680000000"]
    app.parts.schedule.run(time.time() + 7201)  # smsapi was down from send_at on
    assert os.listdir(spool["outgoing"]) == [] and os.listdir(held_dir(app)) == []
    status = status_of(app, message_id)
    valid_until = read_spool_file(spool, "failed", message_id).decode()
    assert status["status"] == "failed"
    assert status["reason"].startswith("expired before it was sent (valid_until 20")
    assert status["reason"] in valid_until and status["failed_at"]
    app.parts.schedule.run(time.time() + 7200)
    assert os.listdir(spool["outgoing"]) == []  # never sent after all


def test_schedule_a_message_still_held_when_valid_until_comes_expires(
    tmp_path, spool, clock
):
    app = scheduled_app(tmp_path, spool, clock=clock)
    data = send(app, ["79680000000"], send_at="+1hour", valid_until="+2hour").json()
    message_id = data["message_id"]["79680000000"]
    valid_until = math.ceil(clock.now + 7200)
    app.parts.schedule.run(valid_until)  # the first look since send_at: smsapi was down
    assert os.listdir(spool["outgoing"]) == []
    assert status_of(app, message_id)["status"] == "failed"


def test_schedule_cancelled_messages_leave_nothing_behind(app, spool):
    schedule = app.parts.schedule
    for _ in range(300):  # each held a month ahead, and cancelled
        message_id = sent_id(app, send_at="+30day")
        path = f"/api/v1.0/sms/scheduled/{message_id}"
        assert call(app, "DELETE", path, user="lvv").status == 200
    assert schedule.count() == 0 and len(schedule.heap) <= 64


def test_schedule_cancel_gives_the_budget_back(tmp_path, spool):
    app = budget_app(tmp_path, spool, hour=5, day=8)
    text = "t" * 200  # two parts
    held = send(app, ["79680000000", "79680000001"], text, user="night", send_at="+1hour")
    assert held.status == 201
    for message_id in held.json()["message_id"].values():
        path = f"/api/v1.0/sms/scheduled/{message_id}"
        assert call(app, "DELETE", path, user="night").status == 200
    user = app.config.users["night"]
    assert app.parts.budgets.used(user, time.time())["max_per_hour"] == (0, 5)
    queued = sent_id(app, text=text, user="night")  # from outgoing too
    assert call(app, "DELETE", f"/api/v1.0/sms/outgoing/{queued}", user="night").status == 200
    again = budget_app(tmp_path, spool, hour=5, day=8)  # and it is so after a restart
    assert again.parts.budgets.used(user, time.time())["max_per_hour"] == (0, 5)


def test_schedule_listing_reading_and_cancelling(app, spool):
    mine = send(app, ["79680000000"], send_at="+1hour").json()["message_id"][
        "79680000000"
    ]
    theirs = send(app, ["79680000001"], user="ann", send_at="+1hour").json()[
        "message_id"
    ]["79680000001"]
    later = send(app, ["79680000002"], send_at="+2hour").json()["message_id"][
        "79680000002"
    ]
    listed = call(app, "GET", "/api/v1.0/sms/scheduled/", user="lvv").json()
    assert listed["message_id"] == [later, mine] and listed["total_count"] == 2
    everything = call(
        app, "GET", "/api/v1.0/sms/scheduled/", user="root", query="limit=2"
    ).json()
    assert (
        everything["message_id"] == [later, theirs] and everything["total_count"] == 3
    )
    assert (
        call(app, "GET", "/api/v1.0/sms/scheduled/" + theirs, user="lvv").status == 404
    )
    assert call(app, "GET", "/api/v1.0/sms/scheduled/" + mine, user="lvv").json()[
        "Send_at"
    ]
    assert (
        call(app, "DELETE", "/api/v1.0/sms/scheduled/" + theirs, user="lvv").status
        == 404
    )
    deleted = call(app, "DELETE", "/api/v1.0/sms/scheduled/" + mine, user="lvv")
    assert deleted.status == 200 and deleted.json() == {
        "message_id": mine,
        "deleted": True,
    }
    by_outgoing = call(app, "DELETE", "/api/v1.0/sms/outgoing/" + later, user="lvv")
    assert by_outgoing.status == 200
    for message_id in (mine, later):
        assert (
            call(app, "GET", "/api/v1.0/sms/status/" + message_id, user="lvv").status
            == 404
        )
    assert os.listdir(held_dir(app)) == [theirs]
    app.parts.schedule.run(time.time() + 7201)
    assert os.listdir(spool["outgoing"]) == [theirs]
    assert app.parts.schedule.count() == 0


def test_schedule_cancel_of_one_just_due_takes_it_from_outgoing(app, spool):
    message_id = send(app, ["79680000000"], send_at="+1s").json()["message_id"][
        "79680000000"
    ]
    os.rename(
        os.path.join(held_dir(app), message_id),
        os.path.join(spool["outgoing"], message_id),
    )
    response = call(app, "DELETE", "/api/v1.0/sms/scheduled/" + message_id, user="lvv")
    assert response.status == 404  # it is no longer scheduled: the listing said so
    response = call(app, "DELETE", "/api/v1.0/sms/outgoing/" + message_id, user="lvv")
    assert response.status == 200 and os.listdir(spool["outgoing"]) == []


def quiet_ini(hours="", days=""):
    lines = ["[user:night]", "password = " + HASHES["night"]]
    lines += [f"quiet_hours = {hours}"] if hours else []
    lines += [f"quiet_days = {days}"] if days else []
    return "\n" + "\n".join(lines)


def window_around_now():
    """Quiet hours that cover now, an hour either side (local time)."""
    now = time.localtime()
    start, end = (now.tm_hour - 1) % 24, (now.tm_hour + 2) % 24
    return f"{start:02d}:00-{end:02d}:00"


def test_quiet_hours_hold_a_normal_message_and_let_high_priority_through(
    tmp_path, spool
):
    app = scheduled_app(tmp_path, spool, quiet_ini(window_around_now()))
    held = post_send(app, {"mobiles": ["79680000000"], "text": "later"}, "night")
    urgent = post_send(
        app, {"mobiles": ["79680000001"], "text": "now", "priority": "high"}, "night"
    )
    data = held.json()
    assert held.status == 201 and data["status"] == "scheduled"
    assert data["held"] == "quiet_hours"
    import datetime

    end = datetime.datetime.fromisoformat(data["send_at"])
    assert end.astimezone().hour == (time.localtime().tm_hour + 2) % 24
    assert (end.minute, end.second) == (0, 0)
    assert "status" not in urgent.json()
    assert os.listdir(spool["outgoing"]) == [urgent.json()["message_id"]["79680000001"]]
    status = status_of(app, data["message_id"]["79680000000"], "root")
    assert status["held"] == "quiet_hours" and status["send_at"] == data["send_at"]


def local_time(*fields):
    return time.mktime((*fields, 0, 0, -1))


@pytest.fixture
def berlin():
    """The box's zone is Europe/Berlin for this test (its DST changes: 2026-03-29, 2026-10-25)."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "Europe/Berlin"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


def test_quiet_end_windows_days_and_dst(berlin):
    night, weekend = smsapi.as_quiet_hours("22:00-07:00"), smsapi.as_weekdays("sat sun")
    day = smsapi.as_quiet_hours("09:00-17:30")
    quiet_end = smsapi.quiet_end
    friday_late = local_time(2026, 11, 27, 23, 15, 0)
    assert quiet_end(night, (), friday_late) == local_time(2026, 11, 28, 7, 0, 0)
    assert quiet_end(night, weekend, friday_late) == local_time(2026, 11, 30, 7, 0, 0)
    assert quiet_end(None, weekend, friday_late) is None
    assert quiet_end(night, (), local_time(2026, 11, 27, 21, 59, 59)) is None
    assert quiet_end(night, (), local_time(2026, 11, 27, 22, 0, 0)) == local_time(
        2026, 11, 28, 7, 0, 0
    )  # from its first minute
    assert quiet_end(day, (), local_time(2026, 11, 27, 9, 0, 0)) == local_time(
        2026, 11, 27, 17, 30, 0
    )
    assert quiet_end(night, (), local_time(2026, 11, 27, 7, 0, 0)) is None
    assert quiet_end(night, (), local_time(2026, 11, 27, 6, 59, 0)) == local_time(
        2026, 11, 27, 7, 0, 0
    )
    assert quiet_end(day, (), local_time(2026, 11, 27, 12, 0, 0)) == local_time(
        2026, 11, 27, 17, 30, 0
    )
    assert quiet_end(day, weekend, local_time(2026, 11, 27, 12, 0, 0)) == local_time(
        2026, 11, 27, 17, 30, 0
    )
    assert quiet_end(day, weekend, local_time(2026, 11, 28, 18, 0, 0)) == local_time(
        2026, 11, 30, 0, 0, 0
    )
    # Spring forward: 23:00 CET to 07:00 CEST is seven hours; fall back: nine.
    spring = quiet_end(night, (), local_time(2026, 3, 28, 23, 0, 0))
    assert spring - local_time(2026, 3, 28, 23, 0, 0) == 7 * 3600
    assert time.localtime(spring)[3:5] == (7, 0)
    autumn = quiet_end(night, (), local_time(2026, 10, 24, 23, 0, 0))
    assert autumn - local_time(2026, 10, 24, 23, 0, 0) == 9 * 3600
    assert time.localtime(autumn)[3:5] == (7, 0)
    # A window ending at 02:30 on the night the clock skips from 02:00 to 03:00
    # ends at 03:00, the first moment after it, not an hour later.
    gap = quiet_end(smsapi.as_quiet_hours("22:00-02:30"), (), local_time(2026, 3, 28, 23, 0, 0))
    assert time.localtime(gap)[3:5] == (3, 0)
    assert gap - local_time(2026, 3, 28, 23, 0, 0) == 3 * 3600


@pytest.mark.parametrize(
    ("option", "value"),
    [("quiet_hours", "22:00"), ("quiet_hours", "25:00-07:00"), ("quiet_hours", "07:00-07:00"),
     ("quiet_days", "someday"), ("quiet_days", "mon tue wed thu fri sat sun")],
)  # fmt: skip
def test_quiet_hours_config_is_checked(tmp_path, spool, option, value):
    extra = "\n[user:night]\npassword = " + HASHES["night"] + f"\n{option} = {value}"
    with pytest.raises(smsapi.ConfigError) as caught:
        smsapi.load_config(write_ini(tmp_path, spool, extra=extra))
    assert f"[user:night] {option}:" in caught.value.problems[0]


def test_schedule_with_an_idempotency_key_answers_the_first_send_at(
    tmp_path, spool, clock
):
    app = scheduled_app(tmp_path, spool, clock=clock)
    key = {"Idempotency-Key": "maintenance-notice"}
    body = {"mobiles": ["79680000000"], "text": "at six", "send_at": "+1hour"}
    first = post_send(app, body, "lvv", key)
    clock.advance(60)  # "+1hour" is a minute later now
    again = post_send(app, body, "lvv", key)
    assert first.status == again.status == 201
    assert again.json() == first.json()
    assert os.listdir(held_dir(app)) == [first.json()["message_id"]["79680000000"]]
    assert post_send(app, dict(body, send_at="+2hour"), "lvv", key).status == 422


def test_schedule_dry_run_says_when_and_writes_nothing(tmp_path, spool):
    app = scheduled_app(tmp_path, spool, quiet_ini(window_around_now()))
    held = post_send(
        app, {"mobiles": ["79680000000"], "text": "x"}, "night", query="dry_run=1"
    )
    timed = post_send(
        app,
        {"mobiles": ["79680000000"], "text": "x", "send_at": "+1day"},
        "lvv",
        query="dry_run=1",
    )
    assert held.status == timed.status == 200
    assert held.json()["held"] == "quiet_hours" and held.json()["send_at"]
    assert timed.json()["send_at"] and "held" not in timed.json()
    assert os.listdir(held_dir(app)) == [] and spool_snapshot(spool) == {}


def test_schedule_survives_a_restart_and_a_time_passed_meanwhile(
    tmp_path, spool, clock
):
    app = scheduled_app(tmp_path, spool, clock=clock)
    message_id = send(app, ["79680000000"], send_at="+1s").json()["message_id"][
        "79680000000"
    ]
    app.close()
    clock.advance(2.1)  # send_at is the next whole second after a second from now
    again = scheduled_app(tmp_path, spool, clock=clock)
    try:
        assert again.parts.schedule.count() == 1
        again.parts.watcher.tick()
        assert os.listdir(spool["outgoing"]) == [message_id]
    finally:
        again.close()


def test_schedule_finishes_the_moves_a_crash_cut_short(tmp_path, spool, caplog):
    app = scheduled_app(tmp_path, spool)
    ids = [
        send(app, [f"7968000000{n}"], send_at="+1hour").json()["message_id"][
            f"7968000000{n}"
        ]
        for n in range(4)
    ]
    app.close()
    held = held_dir(app)
    os.rename(os.path.join(held, ids[0]), os.path.join(held, ".release-" + ids[0]))
    shutil.copy(os.path.join(held, ids[1]), os.path.join(spool["sent"], ids[1]))
    os.rename(os.path.join(held, ids[1]), os.path.join(held, ".release-" + ids[1]))
    os.rename(os.path.join(held, ids[2]), os.path.join(held, ".expire-" + ids[2]))
    with open(os.path.join(held, ".smsapi-" + ids[3]), "wb") as file:
        file.write(b"To: 7968")  # a write the crash cut short
    put_file({"scheduled": held}, "scheduled", "stray", {"To": "79680000009"})
    os.mkfifo(os.path.join(held, "fifo"))
    os.mkdir(os.path.join(held, ".a-directory"))
    again = scheduled_app(tmp_path, spool)
    try:
        assert os.listdir(spool["outgoing"]) == [ids[0]]  # ids[1] is sent already
        assert os.listdir(spool["failed"]) == [ids[2]]
        assert sorted(os.listdir(held)) == sorted(
            ["fifo", "stray", ids[3], ".a-directory"]
        )
        assert again.parts.schedule.count() == 1
        assert "skipped stray: no Send_at header" in caplog.text
    finally:
        again.close()


def test_schedule_two_processes_racing_move_each_message_once(tmp_path, spool):
    first, second = scheduled_app(tmp_path, spool), scheduled_app(tmp_path, spool)
    ids = [
        send(first, [f"796800000{n:02d}"], send_at="+1s").json()["message_id"][
            f"796800000{n:02d}"
        ]
        for n in range(50)
    ]
    second.parts.schedule.load()  # as a process started after the sends
    later = time.time() + 2
    threads = [
        threading.Thread(target=a.parts.schedule.run, args=(later,))
        for a in (first, second)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(os.listdir(spool["outgoing"])) == sorted(ids)
    assert os.listdir(held_dir(first)) == []
    first.close()
    second.close()


def test_schedule_across_filesystems_copies_then_removes(tmp_path, spool, caplog):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if not mount_tmpfs(elsewhere, "size=1m"):
        pytest.skip("needs root to mount a tmpfs")
    try:
        path = write_ini(tmp_path, dict(spool, scheduled=str(elsewhere)))
        app = smsapi.Application(smsapi.load_config(path))
        assert "is not on the filesystem of" in caplog.text
        message_id = send(app, ["79680000000"], send_at="+1s").json()["message_id"][
            "79680000000"
        ]
        assert os.listdir(elsewhere) == [message_id]
        app.parts.schedule.run(time.time() + 3)
        assert os.listdir(spool["outgoing"]) == [message_id]
        assert os.listdir(elsewhere) == []
        app.close()
    finally:
        subprocess.run(["umount", "-l", str(elsewhere)], check=True)


def test_schedule_into_a_bind_mounted_outgoing_copies(tmp_path, spool, caplog):
    # systemd's ReadWritePaths= bind-mounts outgoing: one filesystem, and yet
    # rename() from the state directory into it fails with EXDEV.
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "--bind", spool["outgoing"], spool["outgoing"]], check=False
        ).returncode
    ):
        pytest.skip("needs root to bind-mount")
    try:
        app = scheduled_app(tmp_path, spool)
        assert "is not on the filesystem of" in caplog.text
        message_id = send(app, ["79680000000"], send_at="+1s").json()["message_id"][
            "79680000000"
        ]
        app.parts.schedule.run(time.time() + 3)
        assert os.listdir(spool["outgoing"]) == [message_id]
        assert os.listdir(held_dir(app)) == []
        app.close()
    finally:
        subprocess.run(["umount", "-l", spool["outgoing"]], check=True)


def test_schedule_the_watcher_moves_a_message_at_its_time(tmp_path, spool, clock):
    app = scheduled_app(tmp_path, spool, clock=clock)
    app.start()
    try:
        data = send(app, ["79680000000"], send_at="+2s").json()
        target = os.path.join(spool["outgoing"], data["message_id"]["79680000000"])
        due = iso_seconds(data["send_at"])
        clock.advance(due - clock.now - 0.01)
        time.sleep(0.2)  # the watcher looks, and leaves it: not due yet
        assert not os.path.exists(target)
        clock.advance(0.01)  # its time: the watcher wakes and moves it
        wait_until(lambda: os.path.exists(target), 5, "the move")
    finally:
        app.close()


def test_schedule_metrics_count_the_held(tmp_path, spool, clock):
    app = scheduled_app(tmp_path, spool, clock=clock)
    call(app, "GET", "/metrics")  # /health's cache, made now
    send(app, ["79680000000", "79680000001"], send_at="+1hour")
    clock.advance(1)
    text = call(app, "GET", "/metrics").body.decode()
    assert "smsapi_scheduled_messages 2" in text


###############################################################################
# Webhooks #####################################################################
###############################################################################

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
try:
    import standardwebhooks
except ImportError:  # Debian 12 has no package of it; CI's second run installs it
    if os.environ.get("SMSAPI_REQUIRE_STANDARDWEBHOOKS"):
        raise
    standardwebhooks = None


def verified_by_hand(secret, headers, body):
    """The Standard Webhooks check, written out: HMAC-SHA256 of id.timestamp.body."""
    import hashlib
    import hmac

    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
    return any(
        hmac.compare_digest(expected, given.partition(",")[2].encode())
        for given in headers["webhook-signature"].split()
        if given.startswith("v1,")
    )


class Receiver:
    """A webhook receiver on loopback: verifies every signature (by hand, and with
    the standardwebhooks package when it is installed), records each delivery,
    and answers what it is told to: answers[i] for the i-th request (a status,
    or "hang" to say nothing until it is closed), then 204."""

    def __init__(self, secret=SECRET, answers=()):
        import http.server

        self.secret = secret
        self.answers = list(answers)
        self.deliveries = []  # (headers, body bytes, the status answered)
        self.rejected = []  # headers of deliveries whose signature did not verify
        self.lock = threading.Lock()
        self.closing = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers["Content-Length"])
                body = self.rfile.read(length)
                if len(body) < length:  # cut off by the sender's stop: no delivery
                    return
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver.lock:
                    answer = receiver.answers.pop(0) if receiver.answers else 204
                if not receiver.verified(headers, body):
                    receiver.rejected.append(headers)
                    answer = 401
                if answer == "hang":
                    receiver.closing.wait(30)
                    return
                with receiver.lock:
                    receiver.deliveries.append((headers, body, answer))
                self.send_response(answer)
                if answer == 503:
                    self.send_header("Retry-After", "2")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.1,))
        self.thread.start()

    def verified(self, headers, body):
        """True when the signature holds, checked by hand and by the package."""
        if not verified_by_hand(self.secret, headers, body):
            return False
        if standardwebhooks is not None:
            try:
                standardwebhooks.Webhook(self.secret).verify(body, headers)
            except standardwebhooks.WebhookVerificationError:
                return False
        return True

    def events(self, delivered_only=True):
        """[(webhook-id, payload)] of the deliveries (answered 2xx, unless told)."""
        with self.lock:
            return [
                (headers["webhook-id"], json.loads(body))
                for headers, body, answer in self.deliveries
                if not delivered_only or 200 <= answer < 300
            ]

    def wait_for(self, count, timeout=20):
        return wait_until(
            lambda: len(self.events()) >= count and self.events(),
            timeout,
            f"{count} events delivered",
        )

    def close(self):
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def receiver():
    receivers = []

    def start(**options):
        receivers.append(Receiver(**options))
        return receivers[-1]

    yield start
    for started in receivers:
        started.close()
        assert started.rejected == [], "deliveries with a bad signature"


def webhook_ini(url, name="hook", **options):
    """A [webhook:NAME] section for write_ini's extra."""
    lines = [f"[webhook:{name}]", "url = " + url, "secret = " + SECRET]
    lines += [f"{key} = {value}" for key, value in options.items()]
    return "\n" + "\n".join(lines)  # write_ini's [spool] follows


def webhook_app(tmp_path, spool, url, clock=None, **options):
    config = smsapi.load_config(
        write_ini(tmp_path, spool, extra=webhook_ini(url, **options))
    )
    app = smsapi.Application(config, clock=clock)
    app.start()
    return app


@pytest.mark.parametrize(
    "secret",
    [
        "whsec_" + base64.b64encode(b"k" * 23).decode(),  # too short
        "whsec_" + base64.b64encode(b"k" * 65).decode(),  # too long
        base64.b64encode(b"k" * 32).decode(),  # no prefix
        "whsec_" + "!" * 44,  # not base64
        "whsec_",
    ],
)
def test_webhook_secret_must_be_standard_webhooks_format(tmp_path, spool, secret):
    path = write_ini(tmp_path, spool, extra=webhook_ini("http://127.0.0.1:9/"))
    text = pathlib.Path(path).read_text().replace(SECRET, secret)
    pathlib.Path(path).write_text(text)
    with pytest.raises(smsapi.ConfigError) as caught:
        smsapi.load_config(path)
    (problem,) = caught.value.problems
    assert "[webhook:hook] secret: expected whsec_" in problem
    assert secret[6:] not in problem or secret == "whsec_"  # never echoed


def test_webhook_config_names_every_problem(tmp_path, spool):
    extra = webhook_ini(
        "ftp://example.org/", events="sms.sent sms.lost", users="lvv nobody"
    )
    extra += "\n[webhook:bare]"
    path = write_ini(tmp_path, spool, extra=extra)
    with pytest.raises(smsapi.ConfigError) as caught:
        smsapi.load_config(path)
    problems = "\n".join(caught.value.problems)
    assert "[webhook:hook] url: expected an http:// or https:// URL" in problems
    assert "[webhook:hook] events: expected some of sms.received" in problems
    assert "[webhook:hook] users: no [user:nobody]" in problems
    assert "[webhook:bare] url: missing" in problems
    assert "[webhook:bare] secret: missing" in problems


def test_webhook_config_defaults_and_an_unpadded_secret(tmp_path, spool):
    unpadded = "whsec_" + base64.b64encode(b"u" * 25).decode().rstrip("=")
    path = write_ini(tmp_path, spool, extra=webhook_ini("https://[::1]:8443/x"))
    pathlib.Path(path).write_text(
        pathlib.Path(path).read_text().replace(SECRET, unpadded)
    )
    webhook = smsapi.load_config(path).webhooks["hook"]
    assert webhook.events == smsapi.EVENT_TYPES and webhook.users == ()
    assert webhook.retry_schedule == (
        5,
        300,
        1800,
        7200,
        18000,
        36000,
        50400,
        72000,
        86400,
    )
    assert smsapi.webhook_key(webhook.secret) == b"u" * 25


def test_new_webhook_secret_prints_a_fresh_valid_secret():
    printed = [
        subprocess.run(
            [sys.executable, os.path.join(HERE, "smsapi.py"), "new-webhook-secret"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for _ in range(2)
    ]
    assert printed[0] != printed[1]
    for secret in printed:
        assert len(smsapi.webhook_key(secret)) == 32


def test_webhook_signature_is_what_receivers_verify():
    body = b'{"type":"sms.sent","timestamp":"2026-11-29T10:00:00+00:00","data":{}}'
    signature = smsapi.sign(smsapi.webhook_key(SECRET), "msg_abc", "1795000000", body)
    headers = {
        "webhook-id": "msg_abc",
        "webhook-timestamp": "1795000000",
        "webhook-signature": signature,
    }
    assert verified_by_hand(SECRET, headers, body)
    assert not verified_by_hand(SECRET, headers, body + b" ")
    # the Standard Webhooks spec's own example: its secret, id, timestamp and body
    spec_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    spec_body = b'{"test": 2432232314}'
    assert smsapi.sign(
        smsapi.webhook_key(spec_secret),
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "1614265330",
        spec_body,
    ) == ("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")


def readme_section(title):
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as file:
        readme = file.read()
    start = readme.index("\n## " + title + "\n")
    return readme[start : readme.index("\n## ", start + 1)]


def test_webhook_readme_verifiers_accept_smsapis_signature_only(
    tmp_path, spool, receiver
):
    hook = receiver()
    app = webhook_app(tmp_path, spool, hook.url)
    try:
        message_id = sent_id(app)
        ticks(app)
        smsd_sends(spool, message_id, 1)
        ticks(app)
        hook.wait_for(1)
    finally:
        app.close()
    headers, body, _ = hook.deliveries[0]
    section = readme_section("Webhooks")
    snippets = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    shell = re.findall(r"```sh\n(key=.*?)```", section, re.DOTALL)
    assert len(snippets) == 2 and len(shell) == 1
    forged = {**headers, "webhook-id": "msg_" + "b" * 32}
    rejected = standardwebhooks.WebhookVerificationError if standardwebhooks else ()
    for snippet in snippets[1:] if standardwebhooks is None else snippets:
        space = {}
        exec(snippet, space)  # noqa: S102 (the README's own code, run as a reader would)
        assert space["verify"](SECRET, headers, body)
        try:
            accepted = space["verify"](SECRET, forged, body)
        except rejected:  # the package raises
            accepted = False
        assert not accepted
    (tmp_path / "body.json").write_bytes(body)
    for given, verified in ((headers, True), (forged, False)):
        env = {
            **os.environ,
            "secret": SECRET,
            "id": given["webhook-id"],
            "ts": given["webhook-timestamp"],
            "signature": given["webhook-signature"],
        }
        shown = subprocess.run(
            ["bash", "-c", shell[0]],
            check=False,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        assert (shown.stdout == "verified\n") == verified, shown.stderr


def test_webhook_ids_are_stable_and_have_no_dot():
    first = smsapi.event_id("sms.sent", "smsapi.abcdef.0000000000AAAAAAAAAAAAAAAA")
    assert first == smsapi.event_id(
        "sms.sent", "smsapi.abcdef.0000000000AAAAAAAAAAAAAAAA"
    )
    assert first != smsapi.event_id(
        "sms.delivered", "smsapi.abcdef.0000000000AAAAAAAAAAAAAAAA"
    )
    assert "." not in first and smsapi.EVENT_FILE.fullmatch("0" * 20 + "-" + first)


def ticks(app, count=3):
    for _ in range(count):
        app.parts.watcher.tick()


def test_webhook_events_of_a_message_carry_its_status_in_order(
    tmp_path, spool, receiver
):
    hook = receiver()
    app = webhook_app(tmp_path, spool, hook.url)
    try:
        message_id = sent_id(app, report=True)
        failed_id = sent_id(app, "79680000001")
        ticks(app)
        smsd_sends(spool, message_id, 7)
        smsd_fails(spool, failed_id)
        ticks(app)
        sent_status = status_of(app, message_id)
        smsd_reports(spool, "79680000000", 7)
        ticks(app)
        events = {
            payload["type"]: (event_id, payload)
            for event_id, payload in hook.wait_for(3)
        }
        assert sorted(events) == ["sms.delivered", "sms.failed", "sms.sent"]
        sent, failed, delivered = (
            events[t][1] for t in ("sms.sent", "sms.failed", "sms.delivered")
        )
        assert sent["data"] == {**sent_status, "from": "lvv"}
        assert sent["data"]["status"] == "sent" and sent["data"]["report"] == "pending"
        assert delivered["data"] == {**status_of(app, message_id), "from": "lvv"}
        assert delivered["data"]["status"] == "delivered"
        assert failed["data"] == {**status_of(app, failed_id), "from": "lvv"}
        assert failed["data"]["reason"] == "+CMS ERROR: 500 (Unknown error)"
        for payload in (sent, failed, delivered):
            assert datetime_with_offset(payload["timestamp"])
        order = [
            p["type"] for _, p in hook.events() if p["data"]["message_id"] == message_id
        ]
        assert order == ["sms.sent", "sms.delivered"]
        headers = hook.deliveries[0][0]
        assert headers["content-type"] == "application/json"
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    finally:
        app.close()


def conforms(schema, value):
    """True when value has the shape of an OpenAPI schema of the document: the
    objects' keys (required, and no others), enums, strings and nullable."""
    if "anyOf" in schema:
        return any(conforms(option, value) for option in schema["anyOf"])
    if value is None:
        return schema.get("nullable", False)
    if schema.get("type") == "object":
        known = schema.get("properties", {})
        return (
            isinstance(value, dict)
            and set(schema.get("required", ())) <= set(value) <= set(known)
            and all(conforms(known[key], item) for key, item in value.items())
        )
    if "enum" in schema:
        return value in schema["enum"]
    return isinstance(value, str) if schema.get("type") == "string" else True


def test_webhook_event_schema_describes_the_bodies_sent(tmp_path, spool, receiver):
    hook = receiver()
    app = webhook_app(tmp_path, spool, hook.url)
    try:
        document = call(app, "GET", "/api/v1.0/openapi.json").json()
        schema = document["components"]["schemas"]["WebhookEvent"]
        message_id = sent_id(app, report=True)
        ticks(app)
        smsd_sends(spool, message_id, 7)
        put_file(spool, "incoming", "GSM1.ScHeMa", {"From": "358401234567"}, "hi")
        ticks(app)
        smsd_reports(spool, "79680000000", 7, code=70)
        ticks(app)
        events = hook.wait_for(3)
        assert {p["type"] for _, p in events} == {
            "sms.sent",
            "sms.received",
            "sms.undelivered",
        }
        for _, payload in events:
            assert conforms(schema, payload), payload
        assert not conforms(schema, {**payload, "data": {"surprise": 1}})
    finally:
        app.close()


def datetime_with_offset(text):
    import datetime

    return datetime.datetime.fromisoformat(text).utcoffset() is not None


def test_webhook_received_sms_is_its_inbox_entry_and_reports_are_not(
    tmp_path, spool, receiver
):
    hook = receiver()
    app = webhook_app(tmp_path, spool, hook.url)
    try:
        ticks(app)
        put_file(
            spool,
            "incoming",
            "GSM1.AbCdEf",
            {"From": "358401234567", "Received": "26-11-29 10:00:00"},
            "Reply: OK €",
        )
        smsd_reports(spool, "79680000000", 7)  # a report, not a received SMS
        ticks(app)
        ((_, payload),) = hook.wait_for(1)
        time.sleep(0.2)
        assert len(hook.events()) == 1
        listed = call(app, "GET", "/api/v1.0/sms/incoming/", user="inbox").json()[
            "messages"
        ]
        assert payload["type"] == "sms.received"
        assert payload["data"] == listed[0]
        assert (
            payload["data"]["text"] == "Reply: OK €"
            and payload["data"]["from"] == "358401234567"
        )
        assert payload["timestamp"] == listed[0]["received"]
    finally:
        app.close()


def test_webhook_events_and_users_choose_what_a_receiver_gets(
    tmp_path, spool, receiver
):
    hook = receiver()
    app = webhook_app(
        tmp_path, spool, hook.url, events="sms.sent sms.received", users="ann"
    )
    try:
        mine, theirs = sent_id(app, user="ann"), sent_id(app, "79680000001")
        ticks(app)
        smsd_sends(spool, mine, 1)
        smsd_sends(spool, theirs, 2)
        put_file(spool, "incoming", "GSM1.QwErTy", {"From": "358401234567"}, "hi")
        ticks(app)
        hook.wait_for(2)
        time.sleep(0.2)
        got = sorted((p["type"], p["data"]["message_id"]) for _, p in hook.events())
        assert got == [("sms.received", "GSM1.QwErTy"), ("sms.sent", mine)]
    finally:
        app.close()


def attempts(hook, count):
    """The receiver's deliveries once there are count of them (and not more, a moment later)."""
    wait_until(lambda: len(hook.deliveries) >= count, 10, f"{count} attempts")
    time.sleep(0.1)
    assert len(hook.deliveries) == count
    return hook.deliveries


def test_webhook_retries_on_the_schedule_then_drops(
    tmp_path, spool, receiver, caplog, clock
):
    hook = receiver(answers=[500, 500, 500, 500, 500])
    app = webhook_app(tmp_path, spool, hook.url, clock, retry_schedule="1s 1s")
    try:
        message_id = sent_id(app)
        ticks(app)
        smsd_sends(spool, message_id, 1)
        ticks(app)
        attempts(hook, 1)
        clock.advance(0.9)  # the first delay is 1 s, and up to 10% more
        attempts(hook, 1)
        clock.advance(0.3)
        attempts(hook, 2)
        clock.advance(1.2)
        tried = [int(h["webhook-timestamp"]) for h, _, _ in attempts(hook, 3)]
        assert len({h["webhook-id"] for h, _, _ in hook.deliveries}) == 1
        assert len({b for _, b, _ in hook.deliveries}) == 1  # the same body each time
        assert tried[1] - tried[0] >= 1 and tried[2] - tried[1] >= 1
        queue = app.parts.webhooks.queues["hook"]
        wait_until(lambda: queue.state()[2].get("dropped") == 1, 5, "the drop")
        assert os.listdir(tmp_path / "state" / "webhooks" / "hook") == []
        assert re.search(r"dropped after 3 attempts in 2 s, the last: HTTP 500", caplog.text)
        clock.advance(60)
        attempts(hook, 3)
    finally:
        app.close()


def test_webhook_one_refused_event_holds_up_only_its_own_message(
    tmp_path, spool, receiver, clock
):
    hook = receiver(answers=[500])  # the first event fails once
    app = webhook_app(tmp_path, spool, hook.url, clock, retry_schedule="2s")
    try:
        first, second = sent_id(app, report=True), sent_id(app, "79680000001")
        ticks(app)
        smsd_sends(spool, first, 1)
        ticks(app)
        attempts(hook, 1)
        smsd_reports(spool, "79680000000", 1)  # first's next event waits behind it
        smsd_sends(spool, second, 2)  # another message's event does not
        ticks(app)
        events = hook.wait_for(1, 5)
        assert [p["data"]["message_id"] for _, p in events] == [second]
        attempts(hook, 2)
        clock.advance(2.3)
        hook.wait_for(3, 10)
        tries = [
            (json.loads(body)["type"], int(headers["webhook-timestamp"]), answer)
            for headers, body, answer in hook.deliveries
            if json.loads(body)["data"]["message_id"] == first
        ]
        assert [(kind, answer) for kind, _, answer in tries] == [
            ("sms.sent", 500),
            ("sms.sent", 204),
            ("sms.delivered", 204),
        ]
        assert tries[1][1] - tries[0][1] >= 2  # the retry waited its delay
    finally:
        app.close()


def test_webhook_retry_after_is_honoured_when_longer(tmp_path, spool, receiver, clock):
    hook = receiver(answers=[503])  # with Retry-After: 2
    app = webhook_app(tmp_path, spool, hook.url, clock, retry_schedule="1s 10s")
    try:
        message_id = sent_id(app)
        ticks(app)
        smsd_sends(spool, message_id, 1)
        ticks(app)
        attempts(hook, 1)
        clock.advance(1.9)  # the schedule says in a second; the receiver, in 2 s
        attempts(hook, 1)
        clock.advance(0.1)
        hook.wait_for(1, 10)
        tried = [int(h["webhook-timestamp"]) for h, _, _ in attempts(hook, 2)]
        assert tried[1] - tried[0] == 2
    finally:
        app.close()


def test_webhook_410_disables_until_a_reload(tmp_path, spool, receiver, caplog, clock):
    hook = receiver(answers=[410])
    app = webhook_app(tmp_path, spool, hook.url, clock, retry_schedule="1s")
    try:
        first, second = sent_id(app), sent_id(app, "79680000001")
        ticks(app)
        smsd_sends(spool, first, 1)
        ticks(app)
        attempts(hook, 1)
        queue = app.parts.webhooks.queues["hook"]
        wait_until(lambda: queue.state()[3], 5, "the 410 to be taken")
        smsd_sends(spool, second, 2)
        ticks(app)
        clock.advance(3)
        attempts(hook, 1)  # disabled: nothing more is sent
        check = call(app, "GET", "/api/v1.0/health").json()["checks"]["webhook:hook"]
        assert (
            check["status"] == "warn"
            and check["queued"] == 1  # the first: what came after is not stored
            and "410" in check["output"]
        )
        assert "answered 410 Gone" in caplog.text
        assert len(os.listdir(tmp_path / "state" / "webhooks" / "hook")) == 1
        assert app.reload(app.config.path)
        events = hook.wait_for(1, 10)
        assert [p["data"]["message_id"] for _, p in events] == [first]
    finally:
        app.close()


def test_webhook_events_wait_in_the_state_directory_across_restarts(
    tmp_path, spool, receiver
):
    hook = receiver(answers=["hang"])
    app = webhook_app(tmp_path, spool, hook.url)
    message_id = sent_id(app)
    ticks(app)
    smsd_sends(spool, message_id, 1)
    ticks(app)
    wait_until(lambda: hook.answers == [], 5, "the attempt that hangs")
    app.close()  # as a crash: the event is stored, not delivered
    stored = os.listdir(tmp_path / "state" / "webhooks" / "hook")
    assert len(stored) == 1
    again = webhook_app(tmp_path, spool, hook.url)
    try:
        ticks(again)  # the sent file is not news again: it was emitted
        ((event_id, payload),) = hook.wait_for(1, 15)
        assert stored[0].endswith(event_id)
        assert payload["data"]["message_id"] == message_id
        time.sleep(0.2)
        assert len(hook.events()) == 1
    finally:
        again.close()


def delivered(app, webhook="hook"):
    """Wait until the webhook has taken the answer to each delivery: a stop
    before that leaves the event stored, to be sent again at the next start
    (at least once, as Standard Webhooks has it)."""
    queue = app.parts.webhooks.queues[webhook]
    wait_until(lambda: queue.state()[0] == 0, 5, "the answers to be taken")


def test_webhook_changes_made_while_down_are_emitted_once_at_start(
    tmp_path, spool, receiver
):
    hook = receiver()
    app = webhook_app(tmp_path, spool, hook.url)
    before, during = sent_id(app, report=True), sent_id(app, "79680000001", report=True)
    ticks(app)
    smsd_sends(spool, before, 1)
    ticks(app)
    hook.wait_for(1)
    delivered(app)
    app.close()
    smsd_sends(spool, during, 2)  # while smsapi is down
    smsd_reports(spool, "79680000000", 1)
    put_file(spool, "incoming", "GSM1.DoWnDo", {"From": "358401234567"}, "while down")
    for _ in range(2):  # two starts: the second emits nothing more
        again = webhook_app(tmp_path, spool, hook.url)
        try:
            ticks(again, 5)
            hook.wait_for(4, 10)
            time.sleep(0.2)
            delivered(again)
        finally:
            again.close()
    got = sorted((p["type"], p["data"]["message_id"]) for _, p in hook.events())
    assert got == sorted(
        [
            ("sms.sent", before),
            ("sms.sent", during),
            ("sms.delivered", before),
            ("sms.received", "GSM1.DoWnDo"),
        ]
    )


def test_webhook_first_start_does_not_replay_the_spool(tmp_path, spool, receiver):
    put_file(spool, "incoming", "GSM1.OlDoNe", {"From": "358401234567"}, "old news")
    hook = receiver()
    app = webhook_app(tmp_path, spool, hook.url)
    try:
        ticks(app)
        put_file(spool, "incoming", "GSM1.NeWoNe", {"From": "358401234567"}, "news")
        ticks(app)
        hook.wait_for(1)
        time.sleep(0.2)
        assert [p["data"]["message_id"] for _, p in hook.events()] == ["GSM1.NeWoNe"]
    finally:
        app.close()


def test_webhook_damaged_state_is_skipped_with_a_log_line(
    tmp_path, spool, receiver, caplog
):
    state = tmp_path / "state"
    (state / "webhooks" / "hook").mkdir(parents=True)
    (state / "events.journal").write_bytes(
        b'["clock", "soon"]\n\xff\n[1]\n["emitted"]\n'
    )
    damaged = state / "webhooks" / "hook" / ("0" * 20 + "-msg_" + "a" * 32)
    damaged.write_bytes(b"not json\n{}")
    os.mkfifo(state / "webhooks" / "hook" / ("1" * 20 + "-msg_" + "b" * 32))
    (state / "webhooks" / "hook" / ("2" * 20 + "-msg_" + "c" * 32)).mkdir()
    (state / "webhooks" / "hook" / ".unfinished").write_bytes(b"[")
    hook = receiver()
    app = webhook_app(tmp_path, spool, hook.url)
    try:
        assert "4 damaged lines skipped" in caplog.text
        assert "removed damaged event file" in caplog.text
        assert os.listdir(state / "webhooks" / "hook") == [
            "2" * 20 + "-msg_" + "c" * 32
        ]
        assert caplog.text.count("removed damaged event file") == 3
        message_id = sent_id(app)
        ticks(app)
        smsd_sends(spool, message_id, 1)
        ticks(app)
        assert hook.wait_for(1)[0][1]["data"]["message_id"] == message_id
    finally:
        app.close()


def test_webhook_metrics_count_deliveries_and_the_queue(
    tmp_path, spool, receiver, clock
):
    hook = receiver(answers=[500])
    app = webhook_app(tmp_path, spool, hook.url, clock, retry_schedule="1s")
    try:
        message_id = sent_id(app)
        ticks(app)
        smsd_sends(spool, message_id, 1)
        ticks(app)
        attempts(hook, 1)
        clock.advance(1.2)
        hook.wait_for(1)
        text = call(app, "GET", "/metrics").body.decode()
        assert (
            'smsapi_webhook_deliveries_total{webhook="hook",outcome="delivered"} 1'
            in text
        )
        assert (
            'smsapi_webhook_deliveries_total{webhook="hook",outcome="failed"} 1' in text
        )
        assert (
            'smsapi_webhook_deliveries_total{webhook="hook",outcome="gone"} 0' in text
        )
        assert 'smsapi_webhook_queue_events{webhook="hook"} 0' in text
    finally:
        app.close()


def test_webhook_health_warns_when_an_event_waited_ten_minutes():
    now = time.time()
    fresh = smsapi.webhook_checks({"a": (1, now - 599, {}, False, -math.inf)}, now)
    stale = smsapi.webhook_checks({"a": (1, now - 600, {}, False, -math.inf)}, now)
    assert fresh["webhook:a"]["status"] == "pass"
    assert stale["webhook:a"]["status"] == "warn"
    assert stale["webhook:a"]["oldest_seconds"] == 600


class Dribbler:
    """A receiver on loopback that reads a request and then answers one byte at a
    time, a byte every 0.2 s, for as long as the connection stays open."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/hook"
        self.connections, self.closed = [], threading.Event()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while not self.closed.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self.dribble, args=(conn,), daemon=True).start()

    def dribble(self, conn):
        with conn, contextlib.suppress(OSError):
            conn.recv(65536)
            for byte in itertools.cycle(b"HTTP/1.1 200 OK\r\nX-Slow: "):
                if self.closed.wait(0.2):
                    return
                conn.sendall(bytes([byte]))

    def close(self):
        self.closed.set()
        self.server.close()


def test_webhook_an_attempt_ends_at_its_deadline_however_the_receiver_dribbles(
    tmp_path, spool, caplog
):
    dribbler = Dribbler()
    app = webhook_app(tmp_path, spool, dribbler.url, timeout="1", retry_schedule="1hour")
    try:
        message_id = sent_id(app)
        ticks(app)
        smsd_sends(spool, message_id, 1)
        started = time.monotonic()
        ticks(app)
        queue = app.parts.webhooks.queues["hook"]
        wait_until(lambda: queue.state()[2].get("failed"), 10, "the attempt to end")
        assert time.monotonic() - started < 3  # a second, not a byte's wait each time
        assert "no whole answer within 1 s" in caplog.text
    finally:
        app.close()
        dribbler.close()


def test_webhook_events_are_dropped_by_age_not_by_attempts(
    tmp_path, spool, receiver, caplog, clock
):
    hook = receiver(answers=[500] * 5)
    app = webhook_app(tmp_path, spool, hook.url, clock, retry_schedule="1s 1s")
    try:
        message_id = sent_id(app)
        ticks(app)
        smsd_sends(spool, message_id, 1)
        ticks(app)
        attempts(hook, 1)
        clock.advance(100)  # the receiver took long: the schedule's time is spent
        queue = app.parts.webhooks.queues["hook"]
        wait_until(lambda: queue.state()[2].get("dropped") == 1, 5, "the drop")
        attempts(hook, 1)  # dropped without another try
        assert "dropped after 1 attempts in 100 s" in caplog.text
    finally:
        app.close()


def test_webhook_queue_is_bounded_oldest_first(tmp_path, spool, receiver, caplog):
    hook = receiver(answers=[503] * 10)  # with Retry-After: 2
    app = webhook_app(tmp_path, spool, hook.url, max_events=3, retry_schedule="1hour")
    try:
        ids = [sent_id(app, f"7968000000{n}") for n in range(5)]
        ticks(app)
        for n, message_id in enumerate(ids):
            smsd_sends(spool, message_id, n)
        ticks(app)
        queue = app.parts.webhooks.queues["hook"]
        wait_until(lambda: queue.state()[2].get("overflowed") == 2, 5, "the overflow")
        stored = os.listdir(tmp_path / "state" / "webhooks" / "hook")
        assert len([n for n in stored if not n.startswith(".")]) == 3  # (a retry writes)
        check = call(app, "GET", "/api/v1.0/health").json()["checks"]["webhook:hook"]
        assert check["status"] == "warn" and "max_events" in check["output"]
        text = call(app, "GET", "/metrics").body.decode()
        assert 'smsapi_webhook_deliveries_total{webhook="hook",outcome="overflowed"} 2' in text
        assert "webhook hook: 2 events dropped, the oldest" in caplog.text
    finally:
        app.close()


def test_webhook_disabled_by_a_410_stores_nothing_new(tmp_path, spool, receiver):
    hook = receiver(answers=[410])
    app = webhook_app(tmp_path, spool, hook.url)
    try:
        first, second = sent_id(app), sent_id(app, "79680000001")
        ticks(app)
        smsd_sends(spool, first, 1)
        ticks(app)
        attempts(hook, 1)
        queue = app.parts.webhooks.queues["hook"]
        wait_until(lambda: queue.state()[3], 5, "the 410")
        smsd_sends(spool, second, 2)
        ticks(app)
        assert len(os.listdir(tmp_path / "state" / "webhooks" / "hook")) == 1
        assert queue.state()[2]["gone"] == 2  # the 410, and the event not stored
    finally:
        app.close()


def test_webhook_removed_by_a_reload_stops_its_thread(tmp_path, spool, receiver):
    hook = receiver(answers=["hang"])
    app = webhook_app(tmp_path, spool, hook.url)
    try:
        message_id = sent_id(app)
        ticks(app)
        smsd_sends(spool, message_id, 1)
        ticks(app)
        wait_until(lambda: hook.answers == [], 5, "the attempt that hangs")
        thread = app.parts.webhooks.queues["hook"].thread
        path = app.config.path
        with open(path) as file:
            text = file.read()
        with open(path, "w") as file:
            file.write(text.replace(webhook_ini(hook.url), ""))
        assert app.reload(path)
        thread.join(2)
        assert not thread.is_alive() and "hook" not in app.parts.webhooks.queues
    finally:
        app.close()


def test_webhook_credentials_in_the_url_are_basic_auth_and_never_logged(
    tmp_path, spool, receiver, caplog
):
    hook = receiver(answers=[410])
    url = hook.url.replace("http://", "http://hook%20user:s3cr%40t@") + "?token=t0k3n"
    app = webhook_app(tmp_path, spool, url)
    try:
        message_id = sent_id(app)
        ticks(app)
        smsd_sends(spool, message_id, 1)
        ticks(app)
        (headers, _, _), = attempts(hook, 1)
        expected = base64.b64encode(b"hook user:s3cr@t").decode()
        assert headers["authorization"] == "Basic " + expected
        wait_until(lambda: "410 Gone" in caplog.text, 5, "the log line")
        assert "s3cr" not in caplog.text and "t0k3n" not in caplog.text
        assert f"http://127.0.0.1:{hook.server.server_port}" in caplog.text
    finally:
        app.close()


def test_webhook_a_clock_stepped_back_loses_no_event(tmp_path, spool, receiver):
    hook = receiver()
    webhook_app(tmp_path, spool, hook.url).close()
    journal = tmp_path / "state" / "events.journal"  # its last clock an hour ahead:
    journal.write_text(json.dumps(["clock", time.time() + 3600]) + "\n")  # stepped back
    put_file(spool, "incoming", "GSM1.AfTeR", {"From": "358401234567"}, "new")
    again = webhook_app(tmp_path, spool, hook.url)  # the file came while it was down
    try:
        ticks(again)
        assert [p["data"]["message_id"] for _, p in hook.wait_for(1)] == ["GSM1.AfTeR"]
        with open(journal) as file:  # the clock as it is now, at once
            assert json.loads(file.read().splitlines()[-1])[1] < time.time() + 60
    finally:
        again.close()


def test_webhook_journal_takes_a_clock_stepped_back_at_once(tmp_path, spool, receiver):
    hook = receiver()
    webhook_app(tmp_path, spool, hook.url).close()
    journal = tmp_path / "state" / "events.journal"
    journal.write_text(json.dumps(["clock", time.time() + 3600]) + "\n")
    app = webhook_app(tmp_path, spool, hook.url)
    try:
        ticks(app, 1)  # nothing happened, but the journal's clock is ahead: written
        with open(journal) as file:
            assert json.loads(file.read().splitlines()[-1])[1] < time.time() + 60
    finally:
        app.close()


def test_webhook_a_dead_receiver_slows_neither_the_api_nor_other_webhooks(
    tmp_path, spool, receiver
):
    dead, alive = receiver(answers=["hang"] * 5), receiver()
    extra = webhook_ini(dead.url, "dead") + webhook_ini(alive.url, "alive")
    app = smsapi.Application(
        smsapi.load_config(write_ini(tmp_path, spool, extra=extra))
    )
    app.start()
    try:
        message_id = sent_id(app)
        ticks(app)
        smsd_sends(spool, message_id, 1)
        ticks(app)
        wait_until(lambda: len(dead.answers) == 4, 5, "the attempt that hangs")
        started = time.monotonic()
        ids = [sent_id(app, f"796800001{number:02d}") for number in range(20)]
        ticks(app)
        for number, later in enumerate(ids):
            smsd_sends(spool, later, number)
        ticks(app)
        alive.wait_for(21, 5)  # while the dead one still hangs on its first
        assert time.monotonic() - started < 5  # not 10 s of a timeout
        assert dead.deliveries == []
    finally:
        app.close()


###############################################################################
# ntfy, Gotify and tokens ######################################################
###############################################################################

BOT_TOKEN = "tk_" + "Bot0" * 7 + "x"  # bot's: a user with a token and no password
NOTIFYING = f"""
[group:oncall]
mobiles = 79680000000 79680000001
[topic:alerts]
to = @oncall
[topic:backups]
to = 79680000002
users = ann root
[topic:abroad]
to = 447700900123
[user:bot]
tokens = {smsapi.token_entry(BOT_TOKEN)}
default_to = 79680000009
mobiles = 7968*
"""


def add_token(path, user):
    """A new token of user, made by the command a sysadmin runs."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert smsapi.main(["add-token", user, "--config", path]) == 0
    return out.getvalue().strip()


@pytest.fixture
def notifying(tmp_path, spool):
    """An app with topics, and a token of lvv's and of bot (a token-only user)."""
    path = write_ini(tmp_path, spool, extra=NOTIFYING)
    tokens = {"lvv": add_token(path, "lvv"), "bot": BOT_TOKEN}
    app = smsapi.Application(smsapi.load_config(path))
    yield types.SimpleNamespace(app=app, path=path, tokens=tokens)
    app.close()


def bearer(token):
    return {"Authorization": "Bearer " + token}


def test_token_made_once_kept_as_a_digest_and_taken_in_each_form(notifying):
    app, token = notifying.app, notifying.tokens["lvv"]
    assert smsapi.TOKEN.fullmatch(token)  # ntfy's form: tk_ and 29 (172 bits)
    text = pathlib.Path(notifying.path).read_text()
    assert token not in text and smsapi.token_entry(token) in text
    assert f"tokens = {token[:7]}:" in text
    sent = "/api/v1.0/sms/sent/"
    gotify = {"X-Gotify-Key": token}
    ntfy_basic = {"Authorization": "Basic " + base64.b64encode(b":" + token.encode()).decode()}
    for headers, query in ((bearer(token), ""), (gotify, ""), ({}, "token=" + token),
                           (ntfy_basic, "")):  # fmt: skip
        response = call(app, "GET", sent, headers=headers, query=query)
        assert response.status == 200, (headers, query)
    users = call(app, "GET", "/api/v1.0/sms/sent/", headers=bearer(notifying.tokens["bot"]))
    assert users.status == 200
    assert app.parts.authenticator.hashes_checked == 0  # no scrypt for a token
    assert smsapi.main(["check-config", "--config", notifying.path]) == 0


def test_token_wrong_or_removed_is_401_and_counts_for_the_throttle(notifying, caplog):
    app, token = notifying.app, notifying.tokens["lvv"]
    sent = "/api/v1.0/sms/sent/"
    wrong = token[:-1] + ("x" if token[-1] != "x" else "y")
    response = call(app, "GET", sent, headers=bearer(wrong))
    assert response.status == 401 and response.json() == {"error": "Unauthorized access"}
    assert "authentication failed for a token from 127.0.0.1" in caplog.text
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # named by its first characters
        assert smsapi.main(["remove-token", "lvv", token[:7], "--config", notifying.path]) == 0
    assert f"token {token[:7]}... of user lvv removed" in out.getvalue()
    assert app.reload(notifying.path)
    assert call(app, "GET", sent, headers=bearer(token)).status == 401
    assert call(app, "GET", sent, headers=bearer(notifying.tokens["bot"])).status == 200
    for _ in range(smsapi.FAILURE_LIMIT):
        call(app, "GET", sent, query="token=tk_guess")
    guessed = call(app, "GET", sent, headers=bearer(notifying.tokens["bot"]))
    assert guessed.status == 429 and guessed.headers["Retry-After"]
    elsewhere = call(app, "GET", sent, headers=bearer(notifying.tokens["bot"]),
                     remote_addr="192.0.2.7")  # fmt: skip
    assert elsewhere.status == 200
    for secret in (token, wrong, smsapi.token_entry(token)[8:]):
        assert secret not in caplog.text


def test_token_guesses_from_many_addresses_slow_down_no_user(notifying):
    app, sent = notifying.app, "/api/v1.0/sms/sent/"
    for n in range(smsapi.Throttle.USER_BUDGET + 5):  # each address stays under its limit
        wrong = call(app, "GET", sent, headers=bearer(f"tk_guess{n}"), remote_addr=f"10.0.0.{n}")
        assert wrong.status == 401
    ntfy_basic = {"Authorization": "Basic " + base64.b64encode(f":{BOT_TOKEN}".encode()).decode()}
    for headers in (ntfy_basic, bearer(BOT_TOKEN)):  # from an address never seen
        assert call(app, "GET", sent, headers=headers, remote_addr="192.0.2.99").status == 200


def test_token_commands_refuse_what_they_cannot_do_and_change_nothing(notifying):
    path = pathlib.Path(notifying.path)
    before = path.read_text()
    for args in (["remove-token", "lvv", "tk_none"], ["remove-token", "nobody", "tk_"],
                 ["remove-token", "lvv", "tk_"], ["add-token", "bad name!"]):  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            assert smsapi.main([*args, "--config", notifying.path]) in (1, 2), args
        assert path.read_text() == before, args
    second = add_token(notifying.path, "lvv")  # two of lvv's now: tk_ names both
    app = smsapi.Application(smsapi.load_config(notifying.path))
    sent = "/api/v1.0/sms/sent/"
    assert call(app, "GET", sent, headers=bearer(second)).status == 200
    assert call(app, "GET", sent, headers=bearer(notifying.tokens["lvv"])).status == 200
    app.close()
    result = run_cli("remove-token", "lvv", second, "--config", notifying.path)
    assert result.returncode == 0 and second not in result.stdout + result.stderr
    assert smsapi.token_entry(second) not in path.read_text()
    assert smsapi.token_entry(notifying.tokens["lvv"]) in path.read_text()


def test_token_only_user_needs_no_password_and_a_bad_digest_is_refused(tmp_path, spool):
    extra = "\n[user:bot]\ntokens = tk_abcd:" + "0" * 63
    with pytest.raises(smsapi.ConfigError) as caught:
        smsapi.load_config(write_ini(tmp_path, spool, extra=extra))
    assert "[user:bot] tokens: expected what python3 smsapi.py add-token writes" in (
        caught.value.problems[0]
    )
    with pytest.raises(smsapi.ConfigError) as caught:
        smsapi.load_config(write_ini(tmp_path, spool, extra="\n[user:bot]\nmobiles = 7968*"))
    assert "[user:bot] password: missing (or tokens)" in caught.value.problems[0]


@pytest.mark.parametrize(
    ("section", "problem"),
    [("[topic:api]\nto = 79680000000", "[topic:api]: a topic is 1-64 letters"),
     ("[topic:metrics]\nto = 79680000000", "none of api metrics status message"),
     ("[topic:a.b]\nto = 79680000000", "[topic:a.b]: a topic is 1-64 letters"),
     ("[topic:x]\nusers = lvv", "[topic:x] to: missing"),
     ("[topic:x]\nto = @nobody", "[topic:x] to: no [group:nobody]"),
     ("[topic:x]\nto = 79680000000\nusers = zed", "[topic:x] users: no [user:zed]"),
     ("[user:bot]\ntokens =\npassword = x\ndefault_to = @none", "default_to: no [group:none]")],
)  # fmt: skip
def test_topic_config_is_checked(tmp_path, spool, section, problem):
    with pytest.raises(smsapi.ConfigError) as caught:
        smsapi.load_config(write_ini(tmp_path, spool, extra="\n" + section))
    assert any(problem in p for p in caught.value.problems), caught.value.problems


def test_topic_names_keep_clear_of_every_route():
    firsts = {route.path.split("/")[1] for route in smsapi.ROUTES} - {"", "{topic}"}
    assert firsts <= set(smsapi.ROUTE_ROOTS)  # a new route's first part is reserved


def ntfy(app, topic, message, user="lvv", method="POST", headers=None, query=""):
    headers = {"Content-Type": "text/plain", **(headers or {})}
    return call(app, method, "/" + topic, message.encode(), user, headers, query)


def test_ntfy_publish_as_ntfys_curl_examples_send_title_colon_message(notifying, spool):
    app = notifying.app
    response = ntfy(app, "alerts", "Backup failed on db1", headers={"Title": "Backups"})
    data = response.json()
    assert response.status == 200, data
    assert set(data) == {"id", "time", "event", "topic", "message", "title"}
    assert (data["event"], data["topic"], data["title"]) == ("message", "alerts", "Backups")
    assert data["message"] == "Backup failed on db1" and abs(data["time"] - time.time()) < 5
    texts = texts_in(spool)
    assert texts == dict.fromkeys(["79680000000", "79680000001"], "Backups: Backup failed on db1")
    assert data["id"] in os.listdir(spool["outgoing"])
    for name in os.listdir(spool["outgoing"]):
        os.unlink(os.path.join(spool["outgoing"], name))
    put = ntfy(app, "alerts", "  disk full  ", method="PUT", headers={"t": "db1", "ta": "warning,skull"},
               query="priority=high")  # fmt: skip
    assert put.status == 200 and put.json()["tags"] == ["warning", "skull"]
    assert put.json()["priority"] == 4 and put.json()["title"] == "db1"
    assert set(texts_in(spool).values()) == {"db1: disk full"}
    for name in os.listdir(spool["outgoing"]):
        os.unlink(os.path.join(spool["outgoing"], name))
    bare = ntfy(app, "alerts", "", query="title=From+the+query")  # ntfy's default text
    assert bare.status == 200 and set(texts_in(spool).values()) == {"From the query: triggered"}


@pytest.mark.parametrize(
    ("sent", "title"),
    [
        ("Größe".encode().decode("latin-1"), "Größe"),  # curl's UTF-8, as WSGI hands it on
        ("=?utf-8?q?Gr=C3=B6=C3=9Fe_=E2=82=AC?=", "Größe €"),  # RFC 2047, as ntfy reads it
        ("=?UTF-8?B?R3LDtsOfZQ==?= =?utf-8?q?!?=", "Größe!"),  # the space between words goes
        ("Caf\xe9", "Café"),  # Latin-1 that is not UTF-8 stays Latin-1
        ("=?utf-8?b?!!!?=", "=?utf-8?b?!!!?="),  # malformed: as sent
        ("=?no-such?q?x?=", "=?no-such?q?x?="),
        ("=?utf-8?q?=FF?=", "=?utf-8?q?=FF?="),
    ],
)
def test_ntfy_headers_are_read_as_ntfy_reads_them(notifying, spool, sent, title):
    response = ntfy(notifying.app, "alerts", "disk full", headers={"Title": sent})
    assert response.status == 200 and response.json()["title"] == title
    assert set(texts_in(spool).values()) == {title + ": disk full"}


@pytest.mark.parametrize("sent", ["u=3", "u=0, i", "u=1,i", "u=7, 2"])
def test_ntfy_ignores_the_http_priority_that_proxies_and_browsers_add(notifying, spool, sent):
    plain = ntfy(notifying.app, "alerts", "ping", headers={"Priority": sent})
    assert plain.status == 200 and "priority" not in plain.json()  # RFC 9218's, not ntfy's
    urgent = ntfy(notifying.app, "alerts", "pong", headers={"Priority": sent}, query="p=5")
    assert urgent.status == 200 and urgent.json()["priority"] == 5
    heads = {read_spool_file(spool, "outgoing", n) for n in os.listdir(spool["outgoing"])}
    assert sum(b"Priority: High" in head for head in heads) == 2  # pong, to two numbers


def test_ntfy_json_publish_as_apprise_sends_it(notifying, spool):
    body = {"topic": "alerts", "message": "CPU at 99%", "title": "db1", "priority": 5,
            "tags": ["fire"]}  # fmt: skip
    response = call(notifying.app, "POST", "/", body, "lvv")
    data = response.json()
    assert response.status == 200, data
    assert (data["topic"], data["priority"], data["tags"]) == ("alerts", 5, ["fire"])
    assert set(texts_in(spool).values()) == {"db1: CPU at 99%"}
    heads = [read_spool_file(spool, "outgoing", n) for n in os.listdir(spool["outgoing"])]
    assert all(b"Priority: High" in head for head in heads)  # 5: urgent


@pytest.mark.parametrize(
    ("how", "held"),
    [("ntfy:5", False), ("ntfy:urgent", False), ("ntfy:max", False), ("ntfy:4", False),
     ("ntfy:high", False), ("ntfy:3", True), ("ntfy:", True), ("ntfy:low", True), ("ntfy:1", True),
     ("gotify:10", False), ("gotify:8", False), ("gotify:7", True), ("gotify:4", True),
     ("gotify:3", True), ("gotify:0", True), ("gotify:", True)],
)  # fmt: skip
def test_notification_priorities_against_quiet_hours(tmp_path, spool, how, held):
    extra = NOTIFYING.replace("[user:bot]", "[user:bot]\nquiet_hours = " + window_around_now())
    path = write_ini(tmp_path, spool, extra=extra)
    token = BOT_TOKEN
    app = smsapi.Application(smsapi.load_config(path))
    protocol, _, priority = how.partition(":")
    if protocol == "ntfy":
        headers = {**bearer(token), **({"Priority": priority} if priority else {})}
        response = ntfy(app, "alerts", "ping", user=None, headers=headers)
    else:
        fields = {"message": "ping", **({"priority": int(priority)} if priority else {})}
        response = call(app, "POST", "/message", fields, headers={"X-Gotify-Key": token})
    assert response.status == 200, response.body
    written = os.listdir(spool["outgoing"])
    assert (not written) == held
    assert len(os.listdir(held_dir(app))) == (2 if protocol == "ntfy" else 1) * held
    assert all(b"Priority: High" in read_spool_file(spool, "outgoing", n) for n in written)
    app.close()


def test_gotify_message_as_json_or_form_goes_to_default_to(notifying, spool):
    app, token = notifying.app, notifying.tokens["bot"]
    key = {"X-Gotify-Key": token}
    body = {"message": "Backup done", "title": "pve1", "priority": 5}
    response = call(app, "POST", "/message", body, headers=key)
    data = response.json()
    assert response.status == 200, data
    assert {"id", "appid", "message", "title", "priority", "date"} <= set(data)
    assert (data["message"], data["title"], data["priority"]) == ("Backup done", "pve1", 5)
    assert isinstance(data["id"], int) and isinstance(data["appid"], int)
    assert texts_in(spool) == {"79680000009": "pve1: Backup done"}
    os.unlink(os.path.join(spool["outgoing"], os.listdir(spool["outgoing"])[0]))
    form = b"message=Disk+full&priority=9"
    response = call(app, "POST", "/message", form, headers={**key, **FORM}, query="")
    assert response.status == 200 and response.json()["title"] == ""
    assert texts_in(spool) == {"79680000009": "Disk full"}


def test_gotify_message_as_proxmox_ve_sends_it_arrives_without_its_code_fence(notifying, spool):
    token = notifying.tokens["bot"]
    body = {"title": "vzdump backup status (pve1): backup failed",
            "message": "```\nVMID  Name  Status\n101   db1   err\n```", "priority": 9,
            "extras": {"client::display": {"contentType": "text/markdown"}}}  # fmt: skip
    headers = {"Authorization": "Bearer " + token, "X-Gotify-Key": token}
    response = call(notifying.app, "POST", "/message", body, headers=headers)
    assert response.status == 200 and response.json()["message"] == body["message"]
    text = "vzdump backup status (pve1): backup failed: VMID  Name  Status\n101   db1   err"
    assert texts_in(spool) == {"79680000009": text}
    assert b"Priority: High" in read_spool_file(spool, "outgoing", os.listdir(spool["outgoing"])[0])


def ntfy_error(response):
    data = response.json()
    assert set(data) == {"code", "http", "error"} and data["http"] == response.status
    return response.status


def gotify_error(response):
    data = response.json()
    assert set(data) == {"error", "errorCode", "errorDescription"}
    assert data["errorCode"] == response.status and data["error"]
    return response.status


def test_notification_refusals_in_each_servers_shape_write_nothing(notifying, spool):
    app, bot = notifying.app, notifying.tokens["bot"]
    long = "x" * 160 * (app.config.max_parts + 1)
    assert ntfy_error(ntfy(app, "nothing", "hi")) == 404
    assert ntfy_error(ntfy(app, "backups", "hi")) == 403  # users = ann root
    assert ntfy_error(ntfy(app, "abroad", "hi")) == 403  # lvv may not text it
    assert ntfy_error(ntfy(app, "alerts", "hi", headers={"Priority": "6"})) == 400
    assert ntfy_error(ntfy(app, "alerts", long)) == 413
    assert ntfy_error(call(app, "POST", "/alerts", b"\xff\xfe", "lvv")) == 400
    assert ntfy_error(ntfy(app, "alerts", "hi", user=None)) == 401
    assert ntfy_error(ntfy(app, "alerts", "hi", user=None, headers=bearer("tk_wrong"))) == 401
    assert ntfy_error(call(app, "POST", "/", {"message": "no topic"}, "lvv")) == 400
    assert ntfy_error(call(app, "POST", "/", {"topic": "alerts", "title": 3}, "lvv")) == 400
    assert ntfy_error(call(app, "POST", "/", b"{", "lvv", {"Content-Type": "application/json"})) == 400
    key = {"X-Gotify-Key": bot}
    assert gotify_error(call(app, "POST", "/message", {"message": "hi"}, "lvv")) == 400  # no default_to
    assert gotify_error(call(app, "POST", "/message", {"message": ""}, headers=key)) == 400
    assert gotify_error(call(app, "POST", "/message", {"message": "x", "priority": 11},
                             headers=key)) == 400  # fmt: skip
    assert gotify_error(call(app, "POST", "/message", {"message": "x", "priority": True},
                             headers=key)) == 400  # fmt: skip
    assert gotify_error(call(app, "POST", "/message", {"message": long}, headers=key)) == 413
    assert gotify_error(call(app, "POST", "/message", {"message": "x"})) == 401
    assert os.listdir(spool["outgoing"]) == [] and os.listdir(held_dir(app)) == []
    assert call(app, "GET", "/metrics", user="root").status == 200  # no topic shadows it
    assert call(app, "GET", "/api", user="lvv").status == 404


def test_ntfy_publish_once_per_idempotency_key(notifying, spool):
    key = {"Idempotency-Key": "backup-2026-12-06"}
    first = ntfy(notifying.app, "alerts", "Backup failed", headers=key)
    again = ntfy(notifying.app, "alerts", "Backup failed", headers=key)
    assert first.status == again.status == 200
    assert first.json()["id"] == again.json()["id"] and len(os.listdir(spool["outgoing"])) == 2


def test_topic_reload_that_lets_more_users_publish_is_a_loosening(tmp_path, spool):
    old = smsapi.load_config(write_ini(tmp_path, spool, extra=NOTIFYING))
    wider = NOTIFYING.replace("users = ann root", "users = ann root lvv")
    new = smsapi.load_config(write_ini(tmp_path, spool, extra=wider))
    assert smsapi.loosened(old, new) == ["lets more users publish to [topic:backups]"]
    assert smsapi.loosened(new, old) == []
    gone = smsapi.load_config(write_ini(tmp_path, spool, extra=NOTIFYING.split("[topic:backups]")[0]))
    assert "drops [topic:backups]" in smsapi.loosened(old, gone)


###############################################################################
# The status page ##############################################################
###############################################################################

BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
#: Text from strangers: each must show as these characters, and do nothing.
HOSTILE = [
    "<img src=x onerror=\"document.title='owned'\">",
    "</td><script>document.title='owned'</script>",
    "\" onmouseover=\"alert(1)",
    "</table></section><h1>fake</h1>",
    "a\x00b\x1bc",
]


class PageReader(html.parser.HTMLParser):
    """The elements, attributes and text of an HTML page."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.attributes, self.text = [], set(), []
        self.sections, self.title, self.at = {}, "", []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes.update(name for name, _ in attrs)
        self.at.append(tag)
        if tag == "section":
            self.section = dict(attrs)["id"]
            self.sections[self.section] = []

    def handle_endtag(self, tag):
        if self.at and self.at[-1] == tag:
            self.at.pop()

    def handle_data(self, data):
        self.text.append(data)
        if self.at[-1:] == ["title"]:
            self.title += data
        elif self.sections:
            self.sections[self.section].append(data)


def read_page(body):
    reader = PageReader()
    reader.feed(body.decode("utf-8"))
    reader.close()
    return reader


STATUS_SECTIONS = ["smsd", "queues", "health", "sent", "received", "scheduled",
                   "heartbeats", "budgets", "webhooks", "pages"]  # fmt: skip


def test_status_page_is_for_admins_with_its_headers_and_no_script(app):
    page = call(app, "GET", "/status", user="root")
    assert page.status == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
    body = page.body.decode()
    style = re.search(r"<style>(.*?)</style>", body, re.DOTALL).group(1)
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    assert page.headers["Content-Security-Policy"] == (
        f"default-src 'none'; style-src 'sha256-{digest}'"
    )  # the one style of the page, and nothing else: no script, image or font
    assert page.headers["X-Frame-Options"] == "DENY"
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert page.headers["Cache-Control"] == "no-store"
    assert "Set-Cookie" not in page.headers
    reader = read_page(page.body)
    assert set(reader.tags) <= {"html", "head", "meta", "title", "style", "body", "header",
                                "h1", "h2", "p", "span", "section", "div", "table", "tr",
                                "th", "td"}  # fmt: skip
    assert reader.attributes <= {"lang", "charset", "name", "content", "http-equiv", "id", "class"}
    assert '<meta http-equiv="refresh" content="30">' in body
    assert 'name="viewport"' in body
    assert list(reader.sections) == STATUS_SECTIONS
    assert call(app, "GET", "/status", user="lvv").status == 403
    anonymous = call(app, "GET", "/status", headers={"Accept": BROWSER})
    assert anonymous.status == 401
    assert anonymous.headers["WWW-Authenticate"] == 'Basic realm="smsapi"'
    assert call(app, "HEAD", "/status", user="root").body == b""


def test_index_sends_a_browser_to_the_status_page_and_api_clients_json(app):
    browser = call(app, "GET", "/", headers={"Accept": BROWSER})
    assert browser.status == 303 and browser.headers["Location"] == "status"
    for accept in ("*/*", "application/json", "text/html, application/json", ""):
        index = call(app, "GET", "/", headers={"Accept": accept} if accept else {})
        assert index.status == 200 and index.json()["name"] == "smsapi", accept


def test_status_page_shows_every_part_of_the_box(tmp_path, spool, fake_smsd, clock):
    extra = (GROUPS + "\n[alerts]\nack = yes\n[heartbeat:backup]\nevery = 1day\nto = @oncall\n"
             + webhook_ini("http://127.0.0.1:9/"))  # fmt: skip
    path = write_ini(tmp_path, spool, smsd_conf=fake_smsd.conf, extra=extra)
    text = pathlib.Path(path).read_text().replace(
        "[user:ann]\npassword", "[user:ann]\nmax_per_day = 5\npassword"
    )
    pathlib.Path(path).write_text(text)
    app = smsapi.Application(smsapi.load_config(path), clock=clock, health_every=0)
    try:
        app.parts.watcher.tick()  # the start's look at the spool: what follows is news
        sent = send(app, ["79680000000"], "to the sent list", user="ann").json()
        name = sent["message_id"]["79680000000"]
        content = read_spool_file(spool, "outgoing", name).replace(
            b"\n\n", f"\nModem: GSM1\nSent: {smsd_stamp(clock.time())}\n\n".encode(), 1
        )
        pathlib.Path(spool["sent"], name).write_bytes(content)  # smsd sent it
        os.unlink(os.path.join(spool["outgoing"], name))
        send(app, ["79160000000"], "later", user="ann", send_at="+1hour")
        earlier = clock.time() - 7200  # smsd's Received: time, and the modem it came in on
        put_file(spool, "incoming", "GSM1.hello", {"From": "79680000001", "Modem": "GSM1",
                                                   "Received": smsd_stamp(earlier)}, "hello from a phone")  # fmt: skip
        post_alert(app, notification([alert("DiskFull", n=1)]), "to=@oncall", "root")
        app.parts.watcher.tick()
        page = call(app, "GET", "/status", user="root")
        reader = read_page(page.body)
        shown = {key: " ".join(" ".join(texts).split()) for key, texts in reader.sections.items()}
    finally:
        app.close()
    assert f"smsd running smsd runs as pid {fake_smsd.process.pid}" in shown["smsd"]
    assert "GSM1 Idle -73 dBm (Excellent) 26-11-24 22:46:20 0 0 0" in shown["smsd"]
    assert "GSM2 Sending -109 dBm (Marginal)" in shown["smsd"]
    last = f"{short_time(clock.time())} {short_time(earlier)}"
    assert f"GSM1 Idle -73 dBm (Excellent) 26-11-24 22:46:20 0 0 0 {last}" in shown["smsd"]
    assert "outgoing and checked pass" in shown["queues"] and "scheduled pass 1" in shown["queues"]
    assert "modem:GSM2 warn Sending since" in shown["health"]
    assert "ann 79680000000 sent 1" in shown["sent"]
    assert "79680000001 hello from a phone" in shown["received"]
    assert "ann 79160000000 send_at" in shown["scheduled"]
    assert "backup ok" in shown["heartbeats"]
    assert "ann max per day ok 2 of 5" in shown["budgets"]  # sent and scheduled
    assert "hook pass 2 0 s" in shown["webhooks"]  # sms.sent, sms.received
    assert "DiskFull firing" in shown["pages"] and "79680000000, 79680000001" in shown["pages"]


def short_time(seconds):
    return time.strftime("%m-%d %H:%M", time.localtime(seconds))


def test_recent_failures_leave_the_count_when_their_hour_is_up(tmp_path, clock):
    failures = smsapi.RecentFailures(str(tmp_path), clock)
    for name, age in (("GSM1.a", 10), ("GSM1.b", 1800), ("GSM1.c", 7200)):
        path = tmp_path / name
        path.write_text("To: 79680000000\n\nhi\n")
        os.utime(path, (clock.time() - age, clock.time() - age))
        failures.arrived(name)
    assert failures.count() == 2  # c failed before the last hour
    clock.advance(1800)
    assert failures.count() == 1  # b's hour is up
    failures.arrived("GSM1.a")  # the same file again
    assert failures.count() == 1
    failures.gone("GSM1.a")
    assert failures.count() == 0
    again = tmp_path / "GSM1.d"  # filed, then filed again under the same name
    again.write_text("To: 79680000000\n\nhi\n")
    for age in (3000, 0):
        os.utime(again, (clock.time() - age, clock.time() - age))
        failures.arrived("GSM1.d")
    clock.advance(1000)
    assert failures.count() == 1  # its first hour is up, its last is not


def test_recent_messages_keep_the_newest_and_a_bounded_number_of_modems():
    recent = smsapi.RecentMessages(size=3)
    recent.heard("x" * 100, 1.0)  # a name from a file anyone may write: cut short
    for n in (5, 1, 4, 2, 3):
        headers = {"To": "79680000000", "Sent": f"26-12-06 10:00:0{n}", "Modem": f"GSM{n}"}
        recent.add(smsapi.Message(f"m{n}", "sent", headers, "hi"))
    assert [f.name for f in recent.listing()] == ["m5", "m4", "m3"]  # the newest
    for n in range(2 * recent.MAX_MODEMS):
        recent.heard(f"modem{n}", 2.0)
    times = recent.modem_times()
    assert len(times) == recent.MAX_MODEMS and times["x" * 32] == {"received": 1.0}
    assert times["GSM5"] == {"sent": smsapi.smsd_time("26-12-06 10:00:05")}


def test_status_page_shows_hostile_text_as_text_and_runs_nothing(tmp_path, spool, fake_smsd):
    path = write_ini(tmp_path, spool, smsd_conf=fake_smsd.conf)
    app = smsapi.Application(smsapi.load_config(path), health_every=0)
    try:
        for i, text in enumerate(HOSTILE):
            put_file(spool, "incoming", f"GSM1.x{i}", {"From": text, "Modem": text}, text)
            put_file(spool, "sent", f"other{i}", {"From": text, "To": text, "Modem": text,
                                                 "Sent": "26-12-06 10:00:00"}, text)  # fmt: skip
        lines = [f"{t.splitlines()[0] if t.strip() else 'x'}:\t26-11-24 22:46:20,\t{t},\t1,\t2,\t3,"
                 "\tssi: -73 dBm (Excellent), ber: ??" for t in HOSTILE[:4]]  # fmt: skip
        fake_smsd.write_status("Status:\t26-11-24 22:46:21,\ti\n" + "\n".join(lines) + "\n")
        app.parts.watcher.tick()
        page = call(app, "GET", "/status", user="root")
    finally:
        app.close()
    reader = read_page(page.body)
    assert reader.title == f"smsapi on {socket.gethostname()}"
    assert set(reader.tags) <= {"html", "head", "meta", "title", "style", "body", "header",
                                "h1", "h2", "p", "span", "section", "div", "table", "tr",
                                "th", "td"}  # fmt: skip
    assert reader.attributes <= {"lang", "charset", "name", "content", "http-equiv", "id", "class"}
    text = "".join(reader.text)
    for hostile in HOSTILE[:4]:
        assert text.count(hostile) >= 3, hostile  # received, sent (from, to), modem
    assert "a\ufffdb\ufffdc" in text and "\x00" not in text


def test_status_page_lists_no_big_directory(tmp_path, spool, monkeypatch):
    app = smsapi.Application(smsapi.load_config(write_ini(tmp_path, spool)), health_every=0)
    for i in range(300):
        put_file(spool, "sent", f"old{i:04d}", {"To": "79680000000", "Sent": "26-12-06 10:00:00"})
        put_file(spool, "failed", f"bad{i:04d}", {"To": "79680000000"})
    app.parts.watcher.tick()  # the start's rescan lists them, once
    listed = []
    real_listdir, real_scandir = os.listdir, os.scandir
    monkeypatch.setattr(os, "listdir", lambda p=".": listed.append(p) or real_listdir(p))
    monkeypatch.setattr(os, "scandir", lambda p=".": listed.append(p) or real_scandir(p))
    page = call(app, "GET", "/status", user="root")
    app.close()
    assert page.status == 200
    assert not {spool["sent"], spool["failed"], spool["incoming"]} & set(map(str, listed))
    sent = read_page(page.body).sections["sent"]
    assert sum(t == "sent" for t in sent) + sum(t == "failed" for t in sent) == 50


@pytest.mark.parametrize("value", HOSTILE + ["plain", "", "&amp;", 42, None])
def test_status_cell_escapes_every_value(value):
    shown = smsapi.cell(value)
    reader = read_page(f"<td>{shown}</td>".encode())
    assert reader.tags in (["td"], ["td", "span"])
    if value is None:
        assert "".join(reader.text) == "–"
    else:
        expected = smsapi.CONTROL_CHARACTERS.sub("\ufffd", str(value))
        assert "".join(reader.text) == expected
    badge = read_page(smsapi.cell(smsapi.Badge(str(value))).encode())
    assert badge.tags == ["span"] and badge.attributes == {"class"}


@pytest.mark.parametrize(
    ("word", "colour"),
    [("pass", "good"), ("delivered", "good"), ("Idle", "good"), ("warn", "warn"),
     ("firing", "warn"), ("fail", "bad"), ("not running", "bad"), ("used up", "bad"),
     ("undelivered", "bad"), ("Trouble", "bad"), ("<b>", "info")],
)  # fmt: skip
def test_status_badges_show_a_word_in_its_colour(word, colour):
    assert smsapi.cell(smsapi.Badge(word)) == (
        f'<span class="b {colour}">{html.escape(word)}</span>'
    )


###############################################################################
# Live servers #################################################################
###############################################################################


class Server:
    """smsapi.py running as a subprocess on an ephemeral loopback port."""

    def __init__(self, ini, tmp_path, python_args=(), env=None, module=False):
        self.log_path = os.path.join(str(tmp_path), f"server-{time.monotonic_ns()}.log")
        self.log = open(self.log_path, "w+")  # noqa: SIM115 (lives as long as the server)
        # module: run as the unit does, python3 -m smsapi (precompiled, PYTHONPATH)
        program = ["-m", "smsapi"] if module else [os.path.join(HERE, "smsapi.py")]
        self.process = subprocess.Popen(
            [sys.executable, *python_args, *program, "--config", ini],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self.url = self.wait_for_url()

    def wait_for_url(self, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path) as file:
                match = re.search(r"listening on (http://\S+)", file.read())
            if match:
                return match.group(1)
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError("server did not start:\n" + self.output())

    def output(self):
        with open(self.log_path) as file:
            return file.read()

    def request(self, method, path, body=None, user=None, timeout=30, headers=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers=headers or {}
        )
        if body is not None:
            req.add_header("Content-Type", "application/json")
        if user:
            req.add_header("Authorization", auth(user))
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return (
                    response.status,
                    dict(response.headers),
                    json.loads(response.read()),
                )
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), json.loads(exc.read())

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture
def live(tmp_path, spool):
    servers = []

    def start(python_args=(), env=None):
        servers.append(Server(write_ini(tmp_path, spool), tmp_path, python_args, env))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def test_live_openssl_loads_at_the_first_login_not_at_start(tmp_path, spool):
    server = Server(
        write_ini(tmp_path, spool), tmp_path, env={"PYTHONPATH": HERE}, module=True
    )
    try:

        def mapped():
            with open(f"/proc/{server.process.pid}/maps") as maps:
                return maps.read()

        assert "libcrypto" not in mapped()
        assert server.request("GET", "/api/v1.0/health")[0] in (200, 503)
        assert "libcrypto" not in mapped()  # no login, no scrypt
        assert server.request("GET", "/api/v1.0/sms/outgoing/", user="lvv")[0] == 200
        assert "libcrypto" in mapped()
    finally:
        server.stop()


def test_live_waitress_smoke(live, spool):
    server = live()
    assert "waitress is not installed" not in server.output()
    status, headers, data = server.request(
        "POST",
        "/api/v1.0/sms/outgoing",
        {"mobiles": ["79680000000"], "text": "live"},
        "lvv",
    )
    assert status == 201 and headers["Server"] == "smsapi"
    message_id = data["message_id"]["79680000000"]
    assert (
        server.request("GET", "/api/v1.0/sms/status/" + message_id, user="lvv")[2][
            "status"
        ]
        == "queued"
    )
    status, headers, data = server.request("GET", "/api/v1.0/sms/outgoing/", user="ann")
    assert status == 200 and data["message_id"] == []
    assert (
        "POST /api/v1.0/sms/outgoing 201 user=lvv ids=" + message_id in server.output()
    )


#: Run smsapi.py as if waitress were not installed (its import fails).
WITHOUT_WAITRESS = [
    "-c",
    (
        "import sys, runpy; sys.modules['waitress'] = None; "
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    ),
]


@pytest.mark.parametrize("waitress", [True, False])
def test_live_systemd_notify_ready_watchdog_stopping(live, tmp_path, waitress):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(path)
        notify.settimeout(10)
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}
        server = live([] if waitress else WITHOUT_WAITRESS, env)
        messages = [notify.recv(1024).decode() for _ in range(3)]
        assert (
            len([m for m in messages if m.startswith("READY=1")]) == 1
            and "WATCHDOG=1" in messages
        )
        assert (
            server.request("GET", "/api/v1.0/monitoring")[0] == 200
        )  # READY came once the port was bound
        server.process.send_signal(signal.SIGHUP)
        while not notify.recv(1024).startswith(b"RELOADING=1\nMONOTONIC_USEC="):
            pass  # watchdog pings meanwhile; a timeout here fails the test
        while notify.recv(1024) != b"READY=1":
            pass
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(15) == 0
        while notify.recv(1024) != b"STOPPING=1":  # a timeout here fails the test
            pass


def test_live_stops_cleanly_on_repeated_signals(live):
    server = live()
    server.process.send_signal(signal.SIGINT)
    for _ in range(20):  # an impatient Ctrl-C, and a relayed SIGTERM or two
        time.sleep(0.01)
        server.process.send_signal(random.choice([signal.SIGINT, signal.SIGTERM]))
    assert server.process.wait(20) == 0
    assert "Traceback" not in server.output()


class UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix socket, as curl --unix-socket does."""

    def __init__(self, socket_path, timeout=10):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def unix_request(socket_path, method, path, body=None, user=None):
    """(status, JSON answer) of one request over the unix socket."""
    headers = {"Content-Type": "application/json"}
    if user:
        headers["Authorization"] = auth(user)
    connection = UnixConnection(socket_path)
    try:
        connection.request(method, path, json.dumps(body) if body else None, headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


#: A client run as another local account: prints the status line it got.
OTHER_USER_CLIENT = """
import socket, sys
with socket.socket(socket.AF_UNIX) as s:
    s.settimeout(10)
    s.connect(sys.argv[1])
    s.sendall(b"GET /api/v1.0/sms/outgoing/ HTTP/1.0\\r\\n\\r\\n")
    print(s.recv(64).split(b"\\r\\n")[0].decode())
"""


@pytest.mark.parametrize("waitress", [True, False])
def test_live_unix_socket_knows_the_local_user(tmp_path, spool, waitress):
    directory = tempfile.mkdtemp(prefix="smsapi-")  # in /tmp: other accounts reach it
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "smsapi.sock")
    me = pwd.getpwuid(os.getuid()).pw_name
    ini = write_ini(tmp_path, spool, listen=f"127.0.0.1:0 unix:{path}")
    with open(ini, "a") as file:
        file.write(f"[user:cron]\nunix_users = {me}\nmobiles = 7968*\n")
    server = Server(ini, tmp_path, [] if waitress else WITHOUT_WAITRESS)
    try:
        assert f"listening on unix:{path}" in server.output()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
        body = {"mobiles": ["79680000000"], "text": "from cron"}
        status, data = unix_request(path, "POST", "/api/v1.0/sms/outgoing", body)
        assert status == 201
        (message_id,) = data["message_id"].values()
        assert f"201 user=cron ids={message_id}" in server.output()
        # a password still works on the socket; the local account counts only there
        status, data = unix_request(path, "GET", "/api/v1.0/sms/outgoing/", user="lvv")
        assert (status, data["message_id"]) == (200, [])
        assert server.request("POST", "/api/v1.0/sms/outgoing", body)[0] == 401
        if os.getuid() == 0:  # an account no unix_users names gets the challenge
            other = subprocess.run(
                ["/usr/bin/python3", "-c", OTHER_USER_CLIENT, path],
                user="nobody",
                cwd="/",
                capture_output=True,
                text=True,
                check=True,
            )
            assert other.stdout.split()[1] == "401", other
    finally:
        server.stop()
        left_behind = os.path.exists(path)
        shutil.rmtree(directory, ignore_errors=True)
    assert "Traceback" not in server.output()
    assert server.process.returncode == 0
    assert not left_behind  # the socket file goes with the server


def test_live_port_in_use_is_one_clear_line(tmp_path, spool):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        ini = write_ini(tmp_path, spool, listen=f"unix:{tmp_path}/ok.sock {address}")
        run = subprocess.run(
            [sys.executable, os.path.join(HERE, "smsapi.py"), "--config", ini],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert run.returncode == 1
    assert f"cannot listen: [Errno {errno.EADDRINUSE}] {address}: " in run.stderr
    assert "Traceback" not in run.stderr
    assert not os.path.exists(tmp_path / "ok.sock")  # closed again, not left bound


def test_live_sighup_reloads_users_and_keeps_connections(live, tmp_path):
    server = live()
    body = {"mobiles": ["79680000000"], "text": "reload"}
    assert server.request("POST", "/api/v1.0/sms/outgoing", body, "lvv")[0] == 201
    host, port = urllib.parse.urlsplit(server.url).netloc.rsplit(":", 1)
    kept = http.client.HTTPConnection(host, int(port), timeout=10)
    kept.request("GET", "/api/v1.0/monitoring")
    assert kept.getresponse().read()
    ini = tmp_path / "smsapi.ini"
    text = ini.read_text()
    changed = text.replace("mobiles = 7968* 79160000000", "mobiles = 7916*")
    changed = changed.replace(f"[user:ann]\npassword = {HASHES['ann']}\n", "")
    assert changed.count("[user:") == text.count("[user:") - 1
    ini.write_text(changed.replace("listen = 127.0.0.1:0", "listen = 127.0.0.1:1"))
    server.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "reloaded" in server.output(), what="the reload")
    assert "reload: listen changes only with a restart" in server.output()
    assert server.request("POST", "/api/v1.0/sms/outgoing", body, "lvv")[0] == 403
    assert server.request("GET", "/api/v1.0/sms/outgoing/", user="ann")[0] == 401
    kept.request("GET", "/api/v1.0/monitoring")  # the same connection, still open
    assert kept.getresponse().status == 200
    kept.close()
    ini.write_text(changed + "threads = 0\n")  # lands in the last user's section
    server.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in server.output(), what="the refusal")
    assert "reload refused: " + str(ini) + ": [user:inbox] threads: unknown option" in (
        server.output()
    )
    status = server.request("GET", "/api/v1.0/sms/outgoing/", user="lvv")[0]
    assert status == 200  # the config in use stays
    assert server.process.poll() is None


def test_live_socket_activation(tmp_path, spool):
    listener = socket.create_server(("127.0.0.1", 0))
    fd, port = listener.fileno(), listener.getsockname()[1]
    # an address this host does not have: binding it would fail
    ini = write_ini(tmp_path, spool, listen="192.0.2.1:5000")
    with open(tmp_path / "activated.log", "w+") as log:
        process = subprocess.Popen(
            ["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", sys.executable]
            + [os.path.join(HERE, "smsapi.py"), "--config", ini],
            env={**os.environ, "LISTEN_FDS": "1"},
            pass_fds=(fd, 3),
            preexec_fn=lambda: os.dup2(fd, 3),  # noqa: PLW1509 (fd 3, as systemd hands it)
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        listener.close()
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{port}/api/v1.0/monitoring", timeout=20
            ) as response:
                assert response.status == 200
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == 0
        log.seek(0)
        output = log.read()
    assert "listening on 1 sockets from systemd" in output
    assert f"listening on http://127.0.0.1:{port}" in output


@pytest.mark.parametrize("waitress", [True, False])
def test_live_sigterm_answers_requests_in_progress(tmp_path, spool, waitress):
    ini = write_ini(tmp_path, spool, extra="threads = 1")
    server = Server(ini, tmp_path, [] if waitress else WITHOUT_WAITRESS)
    answers = {}

    def ask(name, *args):
        try:
            answers[name] = server.request(*args)
        except OSError as exc:
            answers[name] = exc

    body = {"mobiles": ["79680000000"], "text": "in flight"}
    clients = [
        threading.Thread(
            target=ask,
            args=("send", "POST", "/api/v1.0/sms/outgoing?wait=30", body, "lvv"),
        ),
        threading.Thread(target=ask, args=("queued", "GET", "/api/v1.0/monitoring")),
    ]
    try:
        clients[0].start()
        wait_until(lambda: os.listdir(spool["outgoing"]), what="the message file")
        clients[1].start()  # waits for the one thread, busy with the send
        time.sleep(0.3)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        for client in clients:
            client.join(15)
        assert server.process.wait(15) == 0
        assert time.monotonic() - started < 10
    finally:
        server.stop()
    assert not isinstance(answers["send"], OSError), answers["send"]
    assert not isinstance(answers["queued"], OSError), answers["queued"]
    status, _, data = answers["send"]  # smsd is not there: still queued
    assert status == 504
    assert data["message_id"]["79680000000"] in os.listdir(spool["outgoing"])
    assert answers["queued"][0] == 200
    with pytest.raises(OSError):
        server.request("GET", "/api/v1.0/monitoring", timeout=2)


def test_live_log_lines_for_journald_and_elsewhere(live):
    journal = live(env={"JOURNAL_STREAM": "8:12345"})
    journal.request("GET", "/api/v1.0/monitoring")
    lines = journal.output().splitlines()
    assert any(
        re.fullmatch(r"<6>GET /api/v1\.0/monitoring 200 user=- ids=- [\d.]+ms", line)
        for line in lines
    )
    assert all(re.match(r"<[2-7]>", line) for line in lines)  # a priority, no timestamp
    plain = live()
    plain.request("GET", "/api/v1.0/monitoring")
    stamped = (
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} INFO GET /api/v1\.0/monitoring 200 .*"
    )
    assert any(re.fullmatch(stamped, line) for line in plain.output().splitlines())


def test_live_waitress_turns_away_huge_bodies(live):
    server = live()
    host, port = server.url[len("http://") :].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /api/v1.0/sms/outgoing HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 99999999999\r\n\r\n"
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 413")


def test_live_wsgiref_fallback_without_waitress(live):
    server = live(WITHOUT_WAITRESS)
    assert "waitress is not installed" in server.output()
    status, _, data = server.request(
        "POST",
        "/api/v1.0/sms/outgoing",
        {"mobiles": ["79680000000"], "text": "x"},
        "lvv",
    )
    assert status == 201 and data["parts_count"] == 1


def unix_server(tmp_path, spool, waitress, extra=""):
    """smsapi on loopback and on a unix socket the test's own account is mapped on."""
    directory = tempfile.mkdtemp(prefix="smsapi-")
    path = os.path.join(directory, "smsapi.sock")
    me = pwd.getpwuid(os.getuid()).pw_name
    ini = write_ini(tmp_path, spool, listen=f"127.0.0.1:0 unix:{path}", extra=extra)
    with open(ini, "a") as file:
        file.write(f"[user:cron]\nunix_users = {me}\nmobiles = 7968*\n")
    return Server(ini, tmp_path, [] if waitress else WITHOUT_WAITRESS), path


class Drippers:
    """count connections that each send a byte now and then, never a whole request."""

    def __init__(self, url, count, every=1.0):
        host, port = url[len("http://") :].rsplit(":", 1)
        self.sockets = []
        for _ in range(count):
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.send(b"G")
            self.sockets.append(sock)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.drip, args=(every,), daemon=True)
        self.thread.start()

    def drip(self, every):
        while not self.stop.wait(every):
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.send(b"E")

    def closed(self):
        """How many the server has closed."""
        gone = 0
        for sock in self.sockets:
            sock.setblocking(False)
            try:
                gone += sock.recv(1) == b""
            except BlockingIOError:
                pass  # still open
            except ConnectionResetError:  # closed with its bytes unread
                gone += 1
        return gone

    def close(self):
        self.stop.set()
        self.thread.join()
        for sock in self.sockets:
            sock.close()


def test_live_a_thousand_dripping_connections_lock_nobody_out(tmp_path, spool):
    server, path = unix_server(tmp_path, spool, True, extra="request_timeout = 3")
    drippers = Drippers(server.url, 1000)
    try:
        time.sleep(1)
        started = time.monotonic()
        assert unix_request(path, "GET", "/api/v1.0/monitoring")[0] == 200
        assert time.monotonic() - started < 2  # the unix socket has room of its own
        started = time.monotonic()
        assert server.request("GET", "/api/v1.0/monitoring", timeout=20)[0] == 200
        assert time.monotonic() - started < 3 + 4  # request_timeout, and a bit
        # dribbling kept none (those in the listen backlog get their turn later)
        wait_until(lambda: drippers.closed() >= 900, 15, "the drippers to be cut off")
    finally:
        drippers.close()
        server.stop()


def thread_count(pid):
    with open(f"/proc/{pid}/status") as file:
        return int(re.search(r"Threads:\s+(\d+)", file.read()).group(1))


def test_live_wsgiref_serves_from_a_fixed_pool(tmp_path, spool):
    server, path = unix_server(tmp_path, spool, False, extra="request_timeout = 3")
    drippers = Drippers(server.url, 300)
    try:
        time.sleep(1)
        assert thread_count(server.process.pid) < 30  # not a thread per connection
        started = time.monotonic()
        assert unix_request(path, "GET", "/api/v1.0/monitoring")[0] == 200
        assert time.monotonic() - started < 2  # its own workers
        wait_until(
            lambda: drippers.closed() >= 6, 10, "the first drippers to be cut off"
        )
        assert "Traceback" not in server.output()  # cut off with one line each
    finally:
        drippers.close()
        server.stop()


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as file:
        return int(re.search(r"VmRSS:\s+(\d+)", file.read()).group(1)) / 1024


def test_live_failed_logins_with_huge_names_cost_no_memory(tmp_path, spool):
    server = Server(write_ini(tmp_path, spool), tmp_path)
    host, port = server.url[len("http://") :].rsplit(":", 1)

    def fail(n):
        name = f"{n}-" + "x" * 150_000
        connection = http.client.HTTPConnection(
            host,
            int(port),
            timeout=30,
            source_address=(f"127.2.{n // 250}.{n % 250 + 1}", 0),
        )
        connection.request("GET", "/api/v1.0/sms/sent/", headers=basic(name, "guess"))
        status = connection.getresponse().status
        connection.close()
        return status

    try:
        assert fail(0) == 401
        before = rss_mb(server.process.pid)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(fail, range(1, 201)))
        assert set(statuses) == {401}
        assert (
            rss_mb(server.process.pid) - before < 15
        )  # 30 MB before names were digests
        assert os.path.getsize(server.log_path) < 200_000  # names cut short in the log
    finally:
        server.stop()


def test_live_memory_stays_small_however_many_users_log_in(tmp_path, spool):
    users = {f"user{n}": f"pass-{n}" for n in range(11)}  # hashed at the real cost
    extra = "".join(
        f"\n[user:{name}]\npassword = {smsapi.hash_password(password)}"
        for name, password in users.items()
    )
    server = Server(write_ini(tmp_path, spool, extra=extra), tmp_path)
    host, port = server.url[len("http://") :].rsplit(":", 1)

    def login(name, password, source="127.0.0.1"):
        connection = http.client.HTTPConnection(
            host, int(port), timeout=30, source_address=(source, 0)
        )
        connection.request("GET", "/api/v1.0/sms/sent/", headers=basic(name, password))
        status = connection.getresponse().status
        connection.close()
        return status

    try:
        assert login("user0", users["user0"]) == 200
        first = rss_mb(server.process.pid)
        attempts = [(n, p) for n, p in users.items() if n != "user0"]
        attempts += [(f"user{n % 11}", "wrong", f"127.4.0.{n + 1}") for n in range(20)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # on every worker
            statuses = list(pool.map(lambda a: login(*a), attempts))
        assert statuses == [200] * 10 + [401] * 20
        assert rss_mb(server.process.pid) - first < 6  # was 64 MB more: scrypt's buffers
    finally:
        server.stop()


#: 16 clients asking for /monitoring as fast as they can, until killed.
FLOOD = """
import http.client, sys, threading
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def flood():
    connection = http.client.HTTPConnection(host, port, timeout=30)
    while True:
        connection.request("GET", "/api/v1.0/monitoring")
        connection.getresponse().read()
for _ in range(count):
    threading.Thread(target=flood, daemon=True).start()
print("flooding", flush=True)
threading.Event().wait()
"""


def test_live_a_flood_of_monitoring_does_not_slow_a_send(live):
    server = live()
    host, port = server.url[len("http://") :].rsplit(":", 1)
    body = json.dumps({"mobiles": ["79680000000"], "text": "timed"})

    def send_times(count=30):
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        times = []
        for _ in range(count):
            started = time.perf_counter()
            connection.request(
                "POST",
                "/api/v1.0/sms/outgoing",
                body,
                {**basic("lvv", PASSWORDS["lvv"]), "Content-Type": "application/json"},
            )
            assert connection.getresponse().read() and True
            times.append(time.perf_counter() - started)
        connection.close()
        return statistics.median(times)

    quiet = send_times()
    flood = subprocess.Popen(  # in a process of its own: no GIL shared with the timing
        [sys.executable, "-c", FLOOD, host, port, "16"], stdout=subprocess.PIPE
    )
    try:
        assert flood.stdout.readline() == b"flooding\n"
        time.sleep(0.5)
        flooded = send_times()
    finally:
        flood.kill()
        flood.wait()
        flood.stdout.close()
    print(f"send: {quiet * 1000:.1f} ms quiet, {flooded * 1000:.1f} ms under the flood")
    assert flooded < 3 * quiet + 0.005, (quiet, flooded)  # 5 ms of slack for a busy box


#: Eleven wrong passwords for lvv over the unix socket; prints the status codes.
OTHER_USER_GUESSES = """
import base64, socket, sys
token = base64.b64encode(b"lvv:wrong").decode()
codes = []
for _ in range(11):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(sys.argv[1])
        s.sendall(f"GET /api/v1.0/sms/outgoing/ HTTP/1.0\\r\\nAuthorization: Basic {token}\\r\\n\\r\\n".encode())
        codes.append(s.recv(64).split(b"\\r\\n")[0].split()[1].decode())
print(" ".join(codes))
"""


def login_from(server, source, user, password, timeout=30):
    """The status of a listing asked for as user, from a loopback source address."""
    host, port = urllib.parse.urlsplit(server.url).netloc.rsplit(":", 1)
    connection = http.client.HTTPConnection(
        host, int(port), timeout=timeout, source_address=(source, 0)
    )
    try:
        connection.request("GET", "/api/v1.0/sms/sent/", headers=basic(user, password))
        return connection.getresponse().status
    finally:
        connection.close()


def test_live_a_guessed_user_gets_in_late_never_refused(live):
    server = live()
    for n in range(smsapi.Throttle.USER_BUDGET):  # many addresses guessed lvv
        assert login_from(server, f"127.1.0.{n + 1}", "lvv", "guess") == 401
    stop, tried = threading.Event(), collections.Counter()

    def guesser(source):
        while not stop.is_set():
            tried[login_from(server, source, "lvv", "guess-again")] += 1

    threads = [
        threading.Thread(target=guesser, args=(f"127.3.0.{n}",), daemon=True)
        for n in range(1, 5)
    ]
    flooding = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(1)  # the guessers hold the lane
    started = time.monotonic()
    status = login_from(server, "127.2.0.1", "lvv", PASSWORDS["lvv"])
    waited = time.monotonic() - started
    time.sleep(2)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert status == 200 and waited < 15, (status, waited)  # in turn, never refused
    checks = server.output().count("authentication failed for user lvv from 127.3.")
    assert 0 < checks <= time.monotonic() - flooding + 2, checks  # one a second
    assert tried[401] == checks and set(tried) <= {401, 429}  # the rest waited


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as nobody")
@pytest.mark.parametrize("waitress", [True, False])
def test_live_another_account_cannot_lock_out_the_mapped_one(tmp_path, spool, waitress):
    server, path = unix_server(tmp_path, spool, waitress)
    os.chmod(os.path.dirname(path), 0o755)  # nobody reaches the socket
    try:
        guesses = subprocess.run(
            ["/usr/bin/python3", "-c", OTHER_USER_GUESSES, path],
            user="nobody",
            cwd="/",
            capture_output=True,
            text=True,
            check=True,
        )
        assert guesses.stdout.split()[-1] == "429"  # nobody is throttled, by its uid
        assert (
            unix_request(path, "GET", "/api/v1.0/sms/outgoing/")[0] == 200
        )  # root, as cron
        assert (
            unix_request(path, "GET", "/api/v1.0/sms/outgoing/", user="lvv")[0] == 200
        )
    finally:
        server.stop()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="needs a browser: chromium (Debian package chromium)"
)


def browse(tmp_path, url, *args):
    """The DOM headless chromium makes of url (after any redirect), or what it
    prints when args say what else to do."""
    profile = os.path.join(str(tmp_path), "chromium")
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={profile}", *(args or ["--dump-dom"]), url],
        capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def png_size(path):
    """(width, height) of a PNG file, from its header."""
    with open(path, "rb") as file:
        head = file.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


@needs_chromium
def test_browser_shows_the_status_page_to_an_admin_and_nothing_runs(tmp_path, spool):
    for i, text in enumerate(HOSTILE[:4]):
        put_file(spool, "incoming", f"GSM1.h{i}", {"From": text, "Received": "26-12-06 09:00:00"}, text)
    put_file(spool, "sent", "other-tool", {"From": "cron", "To": "79681110000", "Modem": "GSM1",
                                           "Sent": "26-12-06 09:30:00"}, "backup done")  # fmt: skip
    extra = "\n[heartbeat:backup]\nevery = 1day\nto = 79680000000\n"
    server = Server(write_ini(tmp_path, spool, extra=extra), tmp_path)
    try:
        assert server.request("POST", "/api/v1.0/heartbeats/backup", {}, "lvv")[0] == 200
        login = server.url.replace("http://", f"http://root:{PASSWORDS['root']}@")
        dom = browse(tmp_path, login + "/")  # the index sends a browser on
        screens = os.environ.get("SMSAPI_SCREENSHOTS") or str(tmp_path)
        os.makedirs(screens, exist_ok=True)
        for width, height in ((1280, 800), (390, 844)):
            shot = os.path.join(screens, f"status-{width}x{height}.png")
            browse(tmp_path, login + "/status", f"--window-size={width},{height}",
                   f"--screenshot={shot}")  # fmt: skip
            assert png_size(shot) == (width, height)
        anonymous = browse(tmp_path, server.url + "/status")  # it cancels the login
        challenge = server.request("GET", "/status", headers={"Accept": BROWSER})
        user = browse(tmp_path, server.url.replace("http://", f"http://lvv:{PASSWORDS['lvv']}@") + "/status")
    finally:
        server.stop()
    reader = read_page(dom.encode())
    assert reader.title == f"smsapi on {socket.gethostname()}"  # no script changed it
    assert list(reader.sections) == STATUS_SECTIONS
    assert set(reader.tags) <= {"html", "head", "meta", "title", "style", "body", "header",
                                "h1", "h2", "p", "span", "section", "div", "table", "tbody",
                                "tr", "th", "td"}  # fmt: skip
    assert reader.attributes <= {"lang", "charset", "name", "content", "http-equiv", "id", "class"}
    received = " ".join(reader.sections["received"])
    assert all(text in received for text in HOSTILE[:4])
    assert "cron 79681110000 sent 1" in " ".join(" ".join(reader.sections["sent"]).split())
    assert "backup ok" in " ".join(" ".join(reader.sections["heartbeats"]).split())
    headers = {k.lower(): v for k, v in challenge[1].items()}
    assert challenge[0] == 401 and headers["www-authenticate"] == 'Basic realm="smsapi"'
    assert "<section" not in anonymous
    assert "The status page is for admins" in user and "<section" not in user


###############################################################################
# The real smsd with an emulated modem #########################################
###############################################################################

SMSD = shutil.which("smsd") or (
    "/usr/sbin/smsd" if os.path.exists("/usr/sbin/smsd") else None
)
needs_smsd = pytest.mark.skipif(
    SMSD is None, reason="smsd (Debian package smstools) is not installed"
)

def test_fakemodem_runs_on_its_own_and_takes_an_sms_from_the_command_line(tmp_path):
    program = [sys.executable, os.path.join(HERE, "fakemodem.py")]
    modem = subprocess.Popen([*program, "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(re.search(r"127\.0\.0\.1:(\d+)", modem.stdout.readline()).group(1))
        given = subprocess.run(
            [*program, "--port", str(port), "sms", "+79681234567", "Hi there €"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert given.returncode == 0, given.stderr
        assert modem.stdout.readline() == "received from 79681234567: Hi there €\n"
        rung = subprocess.run([*program, "--port", str(port), "call", "+79681234567"],
                              capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
        assert rung.returncode == 0 and rung.stdout == "call from 79681234567: ringing\n"
        assert modem.stdout.readline() == "call from 79681234567: ringing\n"
    finally:
        modem.terminate()
        modem.wait(10)
        modem.stdout.close()
    conf = tmp_path / "smsd.conf"
    conf.write_text(subprocess.run([*program, "smsd-conf"], capture_output=True,
                                   text=True, check=True).stdout)  # fmt: skip
    modem_section = smsapi.read_smsd_sections(str(conf))["GSM1"]
    assert modem_section["device"] == f"@127.0.0.1:{fakemodem.DEFAULT_PORT}"


class SmsdStack:
    """The modem emulator, the real smsd over a temporary spool, and smsapi over it."""

    def __init__(self, root, extra="", modem=""):
        self.root = str(root)
        # smsd runs as Debian runs it, as smsd:dialout (without its smsd group),
        # over a spool like Debian's, in a directory it can reach.
        self.smsd_root = tempfile.mkdtemp(prefix="smsapi-smsd-", dir="/var/tmp")
        os.chmod(self.smsd_root, 0o755)
        self.spool = make_spool(self.smsd_root)
        self.modem = ModemEmulator()
        self.smsd_log = os.path.join(self.smsd_root, "smsd.log")
        conf = os.path.join(self.smsd_root, "smsd.conf")
        os.mkdir(os.path.join(self.smsd_root, "stats"))
        smsd = pwd.getpwnam("smsd")
        for path in [*self.spool.values(), os.path.join(self.smsd_root, "stats")]:
            os.chown(path, smsd.pw_uid, smsd.pw_gid)
            os.chmod(path, 0o3775)  # drwxrwsr-t, as Debian makes them
        os.chown(os.path.join(self.smsd_root, "spool"), smsd.pw_uid, smsd.pw_gid)
        os.chown(self.smsd_root, smsd.pw_uid, smsd.pw_gid)
        with open(conf, "w") as file:
            file.write(
                "\n".join(
                    ["devices = GSM1"]
                    + ["{} = {}".format(*item) for item in self.spool.items()]
                    + [
                        "logfile = " + self.smsd_log,
                        f"infofile = {self.smsd_root}/smsd.working",
                        f"pidfile = {self.smsd_root}/smsd.pid",
                        f"stats = {self.smsd_root}/stats",
                        "loglevel = 7",
                        "delaytime = 1",
                        "delaytime_mainprocess = 1",
                        "errorsleeptime = 1",
                        "receive_before_send = no",
                        "incoming_utf8 = yes",
                        "autosplit = 3",
                        "",
                        "[GSM1]",
                        f"device = @127.0.0.1:{self.modem.port}",
                        "incoming = yes",
                        "send_retries = 1",
                        modem,
                        "",
                    ]
                )
            )
        self.smsd = subprocess.Popen(
            [SMSD, "-t", "-c" + conf, "-usmsd", "-gdialout"],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        path = write_ini(root, self.spool, extra=extra, smsd_conf=conf)
        text = pathlib.Path(path).read_text()  # the group smsd runs as: dialout
        pathlib.Path(path).write_text(text.replace("[spool]\n", "[spool]\nsmsd_group = dialout\n"))
        self.api = Server(path, root)

    def restart_api(self, kill=False):
        """Stop smsapi (or kill -9 it) and start it again on the same state."""
        if kill:
            self.api.process.kill()
        self.api.stop()
        self.api = Server(os.path.join(self.root, "smsapi.ini"), self.root)

    def pause_smsd(self):
        os.killpg(self.smsd.pid, signal.SIGSTOP)

    def resume_smsd(self):
        os.killpg(self.smsd.pid, signal.SIGCONT)

    def stop(self):
        self.api.stop()
        try:
            os.killpg(self.smsd.pid, signal.SIGCONT)
            os.killpg(self.smsd.pid, signal.SIGTERM)
            self.smsd.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.smsd.pid, signal.SIGKILL)
            self.smsd.wait()
        self.modem.close()
        shutil.rmtree(self.smsd_root, ignore_errors=True)

    def smsd_output(self):
        with open(self.smsd_log, errors="replace") as file:
            return file.read()[-5000:]

    def wait_for(self, predicate, timeout=60, what="condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.smsd.poll() is None:
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(
            f"gave up waiting for {what}; smsd log ends:\n{self.smsd_output()}"
        )

    def status(self, message_id, user="lvv"):
        return self.api.request("GET", "/api/v1.0/sms/status/" + message_id, user=user)[
            2
        ]

    def heartbeats(self):
        return self.api.request("GET", "/api/v1.0/heartbeats", user="lvv")[2][
            "heartbeats"
        ]

    def status_of_heartbeat(self):
        return self.heartbeats()[0]["state"]

    def last_beat(self):
        return self.heartbeats()[0]["last_beat"]

    def wait_final(self, message_id, user="lvv", timeout=60):
        def final():
            status = self.status(message_id, user)
            return status if status.get("status") in ("sent", "failed") else None

        return self.wait_for(final, timeout, f"message {message_id} to leave the queue")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if SMSD is None:
        pytest.skip("smsd (Debian package smstools) is not installed")
    stack = SmsdStack(tmp_path_factory.mktemp("smsd"))
    yield stack
    stack.stop()


#: Texts that must reach the phone exactly, in exactly the parts we report.
CORPUS = [
    "A",
    "a" * 160,
    "b" * 161,
    "c" * 306,
    "d" * 307,
    "€[]{}~^\\|",
    "x" * 151 + "€" + "y" * 20,
    "x" * 152 + "€" + "y" * 20,
    "x" * 153 + "{" + "y" * 20,
    "€" * 80,
    "€" * 81,
    "é à ù Ñ Ü ß è ì ò Ç Ø å Æ É ä ö ñ ü à",
    "ç ú õ",
    "back`tick",
    "tab\there",
    "Привет, мир!",
    "Γειά σου Κόσμε",
    "ΔΦΓΛΩΠΨΣΘΞ",
    "你好，世界",
    "😀",
    "Server down 🔥 at 03:00",
    "u" * 66 + "😀" + "v" * 10,
    "line1\nline2\n\nline4\n",
    "\r\nwindows\r\n",
    "trailing spaces   ",
    "   ",
    "@£$¥_!\"#%&'()*+,-./:;<=>?¡§¿",
    "¤ sign",
    "Ж" * 71,
    "Ж" * 135,
    "form\ffeed",
    "Thumbs 👍🏽 up",
    "zero\u200bwidth",
    "a" * 1530,
]


@pytest.fixture(scope="module")
def corpus_results(stack):
    """Send every corpus text to its own number, wait until all have left the queue."""
    results = []
    for i, text in enumerate(CORPUS):
        number = f"4917100{i:05d}"
        status, _, data = stack.api.request(
            "POST", "/api/v1.0/sms/outgoing", {"mobiles": [number], "text": text}, "ann"
        )
        assert status == 201, data
        results.append((number, data))
    for number, data in results:
        stack.wait_final(data["message_id"][number], user="ann", timeout=120)
    return results


@needs_smsd
@pytest.mark.parametrize("index", range(len(CORPUS)))
def test_smsd_corpus_text_and_parts_on_the_air(stack, corpus_results, index):
    number, data = corpus_results[index]
    status = stack.status(data["message_id"][number], user="ann")
    assert status["status"] == "sent", status
    parts = stack.modem.parts_to(number)
    assert len(parts) == data["parts_count"]
    assert on_air_text(parts) == CORPUS[index]
    assert all(p["ucs2"] == (data["encoding"] == "UCS2") for p in parts)


@needs_smsd
def test_smsd_lifecycle_queued_then_sent(stack):
    stack.pause_smsd()
    try:
        status, _, data = stack.api.request(
            "POST",
            "/api/v1.0/sms/outgoing",
            {"mobiles": ["79680000010"], "text": "cycle"},
            "lvv",
        )
        message_id = data["message_id"]["79680000010"]
        assert stack.status(message_id)["status"] == "queued"
    finally:
        stack.resume_smsd()
    final = stack.wait_final(message_id)
    assert final["status"] == "sent" and final["modem"] == "GSM1"
    assert re.fullmatch(r"\d\d-\d\d-\d\d \d\d:\d\d:\d\d", final["sent_at"])
    status, _, sent = stack.api.request(
        "GET", "/api/v1.0/sms/sent/" + message_id, user="lvv"
    )
    assert status == 200
    assert (
        sent["From"] == "lvv"
        and sent["To"] == "79680000010"
        and sent["Sent"] == final["sent_at"]
    )
    assert sent["IMSI"] == "244070123456789" and sent["text"] == "cycle"


@needs_smsd
def test_smsd_health_and_metrics_see_the_real_smsd(stack):
    with open(os.path.join(stack.smsd_root, "smsd.pid")) as file:
        pid = int(file.read())

    def modem_seen():
        checks = stack.api.request("GET", "/api/v1.0/health")[2]["checks"]
        return checks if "modem:GSM1" in checks else None

    checks = stack.wait_for(modem_seen, what="smsd's status file")
    assert checks["smsd"] == {
        "status": "pass",
        "output": f"smsd runs as pid {pid}",
        "pid": pid,
    }
    modem = checks["modem:GSM1"]
    assert modem["signal_dbm"] == -73  # the emulator answers +CSQ: 20
    assert modem["state"] in ("Idle", "Sending", "Receiving"), modem

    def sent_count():
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(stack.api.url + "/metrics", timeout=10) as answer:
            text = answer.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "smsapi_messages_total" and sample.labels == {
                    "state": "sent"
                }:
                    return sample.value
        raise AssertionError("no smsapi_messages_total{state=sent}")

    time.sleep(1.5)  # a watcher tick: earlier tests' messages are counted by now
    before = sent_count()
    _, _, data = stack.api.request(
        "POST",
        "/api/v1.0/sms/outgoing",
        {"mobiles": ["79680000019"], "text": "counted"},
        "lvv",
    )
    assert stack.wait_final(data["message_id"]["79680000019"])["status"] == "sent"
    stack.wait_for(lambda: sent_count() > before, what="the sent message counted")
    time.sleep(1.5)  # a tick more: smsd's file lands once, and is counted once
    assert sent_count() == before + 1


@needs_smsd
def test_smsd_failed_send_reports_reason(stack):
    stack.modem.fail.add("79680000011")
    _status, _, data = stack.api.request(
        "POST",
        "/api/v1.0/sms/outgoing",
        {"mobiles": ["79680000011"], "text": "doomed"},
        "lvv",
    )
    final = stack.wait_final(data["message_id"]["79680000011"])
    assert final["status"] == "failed"
    assert "CMS ERROR: 500" in final["reason"] and final["failed_at"]


@needs_smsd
def test_smsd_several_recipients_each_get_their_own(stack):
    numbers = ["79680000021", "79680000022", "79160000000"]
    status, _, data = stack.api.request(
        "POST", "/api/v1.0/sms/outgoing", {"mobiles": numbers, "text": "to all"}, "lvv"
    )
    assert status == 201 and len(set(data["message_id"].values())) == 3
    for number in numbers:
        assert stack.wait_final(data["message_id"][number])["status"] == "sent"
        assert [on_air_text([p]) for p in stack.modem.parts_to(number)] == ["to all"]


@needs_smsd
def test_smsd_cancelled_message_never_reaches_the_modem(stack):
    stack.pause_smsd()
    try:
        doomed = stack.api.request(
            "POST",
            "/api/v1.0/sms/outgoing",
            {"mobiles": ["79680000031"], "text": "no"},
            "lvv",
        )[2]
        kept = stack.api.request(
            "POST",
            "/api/v1.0/sms/outgoing",
            {"mobiles": ["79680000032"], "text": "yes"},
            "lvv",
        )[2]
        doomed_id = doomed["message_id"]["79680000031"]
        assert (
            stack.api.request(
                "DELETE", "/api/v1.0/sms/outgoing/" + doomed_id, user="lvv"
            )[0]
            == 200
        )
    finally:
        stack.resume_smsd()
    assert stack.wait_final(kept["message_id"]["79680000032"])["status"] == "sent"
    assert stack.modem.parts_to("79680000031") == []
    assert (
        stack.api.request("GET", "/api/v1.0/sms/status/" + doomed_id, user="lvv")[0]
        == 404
    )


@needs_smsd
def test_smsd_inbox_gsm_and_ucs2(stack):
    now = time.time()
    stack.modem.store(deliver_pdu("358401234567", "Hello from GSM [ok] €", now))
    stack.modem.store(deliver_pdu("358407654321", "Привет 😀", now))

    def listed():
        ids = stack.api.request("GET", "/api/v1.0/sms/incoming/", user="inbox")[2][
            "message_id"
        ]
        return ids if len(ids) >= 2 else None

    ids = stack.wait_for(listed, what="two received messages")
    messages = {}
    for message_id in ids:
        status, _, message = stack.api.request(
            "GET", "/api/v1.0/sms/incoming/" + message_id, user="inbox"
        )
        assert status == 200
        messages[message["From"]] = message
    assert messages["358401234567"]["text"] == "Hello from GSM [ok] €"
    assert messages["358407654321"]["text"] == "Привет 😀"
    assert messages["358407654321"]["Alphabet"] == "UCS2"
    for message in messages.values():
        assert re.fullmatch(r"\d\d-\d\d-\d\d \d\d:\d\d:\d\d", message["Received"])
        assert message["Sent"] == time.strftime(
            "%y-%m-%d %H:%M:%S", time.localtime(now)
        )
    assert (
        stack.api.request("GET", "/api/v1.0/sms/incoming/" + ids[0], user="lvv")[0]
        == 404
    )


def post(stack, numbers, text="hello", user="lvv", query="", headers=None, **fields):
    """POST a send to the live stack; returns (status, data)."""
    body = json.dumps({"mobiles": numbers, "text": text, **fields}).encode()
    req = urllib.request.Request(
        stack.api.url + "/api/v1.0/sms/outgoing" + ("?" + query if query else ""),
        data=body,
        method="POST",
    )
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", auth(user))
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_status(stack, message_id, wanted, timeout=60):
    def reached():
        status = stack.status(message_id)
        return status if status.get("status") in wanted else None

    return stack.wait_for(reached, timeout, f"{message_id} to become {wanted}")


@needs_smsd
@pytest.mark.parametrize("text", ["one part", "three parts " * 30])
def test_smsd_delivery_reports_delivered_and_undelivered(stack, text):
    good, bad = (
        f"79680000{100 + len(text) % 100:03d}",
        f"79680000{200 + len(text) % 100:03d}",
    )
    stack.modem.undelivered.add(bad)
    status, data = post(stack, [good, bad], text, report=True)
    assert status == 201
    delivered = wait_status(
        stack, data["message_id"][good], ("delivered", "undelivered")
    )
    undelivered = wait_status(
        stack, data["message_id"][bad], ("delivered", "undelivered")
    )
    assert delivered["status"] == "delivered" and delivered["delivered_at"]
    assert (
        undelivered["status"] == "undelivered"
        and undelivered["reason"] == "SM validity period expired"
    )
    parts = stack.modem.parts_to(good)
    assert len(parts) == data["parts_count"] and all(p["srr"] for p in parts)


@needs_smsd
def test_smsd_delivery_reports_with_colliding_references(stack):
    # Two messages to one number carry the same reference (it wraps at 256);
    # both reports come back after both were sent, the later one first.
    number = "79680000300"
    stack.modem.hold_reports = True
    stack.modem.mr = 99  # the next submit gets reference 100
    first = post(stack, [number], "first", report=True)[1]["message_id"][number]
    assert stack.wait_final(first)["status"] == "sent"
    time.sleep(2)  # smsd's Sent times differ by whole seconds
    stack.modem.undelivered.add(number)
    stack.modem.mr = 99
    second = post(stack, [number], "second", report=True)[1]["message_id"][number]
    assert stack.wait_final(second)["status"] == "sent"
    stack.modem.release_reports(reverse=True)
    assert (
        wait_status(stack, second, ("undelivered", "delivered"))["status"]
        == "undelivered"
    )
    assert (
        wait_status(stack, first, ("undelivered", "delivered"))["status"] == "delivered"
    )
    sent = [
        stack.api.request("GET", "/api/v1.0/sms/sent/" + i, user="lvv")[2]
        for i in (first, second)
    ]
    assert [m["Message_id"] for m in sent] == ["100", "100"]


@needs_smsd
def test_smsd_send_and_wait(stack):
    stack.modem.fail.add("79680000402")
    status, data = post(stack, ["79680000401"], query="wait=30")
    assert status == 201 and next(iter(data["messages"].values()))["status"] == "sent"
    status, data = post(stack, ["79680000401", "79680000402"], query="wait=30")
    assert status == 502 and "CMS ERROR: 500" in data["error"]
    status, data = post(
        stack, ["79680000403"], query="wait=30&wait_for=delivered", report=True
    )
    assert (
        status == 201 and next(iter(data["messages"].values()))["status"] == "delivered"
    )
    stack.pause_smsd()
    try:
        status, data = post(stack, ["79680000404"], query="wait=2")
        assert (
            status == 504
            and next(iter(data["messages"].values()))["status"] == "queued"
        )
    finally:
        stack.resume_smsd()
    assert stack.wait_final(data["message_id"]["79680000404"])["status"] == "sent"


@needs_smsd
def test_smsd_idempotent_retry_after_restart(stack):
    key = {"Idempotency-Key": "backup-2026-11-24"}
    status, first = post(stack, ["79680000501"], "backup done", headers=key)
    assert status == 201
    stack.restart_api()
    status, again = post(stack, ["79680000501"], "backup done", headers=key)
    assert (status, again) == (201, first)
    assert post(stack, ["79680000501"], "something else", headers=key)[0] == 422
    assert stack.wait_final(first["message_id"]["79680000501"])["status"] == "sent"
    time.sleep(2)  # a second file would be sent within this
    assert len(stack.modem.parts_to("79680000501")) == 1


@needs_smsd
def test_smsd_hostile_sms_neither_forge_reports_nor_stop_the_inbox(stack):
    number, stranger = "79680000600", "358409999999"
    stack.modem.hold_reports = True
    stack.modem.undelivered.add(number)
    message_id = post(stack, [number], "watch this", report=True)[1]["message_id"][
        number
    ]
    assert stack.wait_final(message_id)["status"] == "sent"
    ref = stack.api.request("GET", "/api/v1.0/sms/sent/" + message_id, user="lvv")[2][
        "Message_id"
    ]
    now = time.time()
    poison = "SMS STATUS REPORT\nMessage_id: " + "9" * 4400 + "\nStatus: 0,Ok"
    for pdu in deliver_parts(stranger, poison, now):  # 30 parts, joined by smsd
        stack.modem.store(pdu)
    forged = f"SMS STATUS REPORT\nMessage_id: {ref}\nStatus: 0,Ok,short message received by the SME"
    stack.modem.store(deliver_pdu(number, forged, now))  # from the recipient's number
    ordinary = {f"ordinary {n}" for n in range(3)}
    for text in ordinary:
        stack.modem.store(deliver_pdu(stranger, text, now))

    def received():
        listed = stack.api.request(
            "GET", "/api/v1.0/sms/incoming/?type=all&limit=1000", user="inbox"
        )[2]["messages"]
        mine = [m for m in listed if m["from"] in (number, stranger)]
        return (
            mine if {m["text"] for m in mine} >= ordinary | {poison, forged} else None
        )

    listed = stack.wait_for(received, what="the hostile and the ordinary SMS")
    assert {m["type"] for m in listed} == {"sms"}
    assert stack.status(message_id)["status"] == "sent"  # the forgery changed nothing
    stack.modem.release_reports()
    outcome = wait_status(stack, message_id, ("delivered", "undelivered"))
    assert outcome["status"] == "undelivered"  # the genuine report, and only it
    reports = stack.api.request(
        "GET", f"/api/v1.0/sms/incoming/?type=report&from={number}", user="inbox"
    )[2]["messages"]
    assert len(reports) == 1 and "Status: 70" in reports[0]["text"]


@needs_smsd
def test_smsd_webhook_every_event_once_across_a_kill_9(tmp_path):
    """Each kind of event from the real smsd reaches a receiver that fails at
    first, while smsapi is killed with kill -9 and started again; after
    de-duplication by webhook-id, each arrives exactly once, none lost."""
    hook = Receiver(answers=[500] * 4)
    stack = SmsdStack(
        tmp_path, extra=webhook_ini(hook.url, retry_schedule="1s 1s 2s 2s 5s 5s 10s")
    )
    try:
        good, bad, doomed = "79680000701", "79680000702", "79680000703"
        stack.modem.undelivered.add(bad)
        stack.modem.fail.add(doomed)
        ids = post(stack, [good, bad, doomed], "watch", report=True)[1]["message_id"]
        stack.modem.store(deliver_pdu("358401112233", "ack 42", time.time()))
        stack.wait_for(lambda: hook.deliveries, 30, "the first attempt")
        stack.restart_api(kill=True)
        expected = {
            ("sms.sent", ids[good]),
            ("sms.delivered", ids[good]),
            ("sms.sent", ids[bad]),
            ("sms.undelivered", ids[bad]),
            ("sms.failed", ids[doomed]),
        }

        def arrived():
            by_id = {}
            for event_id, payload in hook.events():
                assert by_id.setdefault(event_id, payload) == payload  # same each time
            got = {(p["type"], p["data"]["message_id"]) for p in by_id.values()}
            return by_id if len(got) == len(by_id) == 6 and expected < got else None

        by_id = stack.wait_for(arrived, 60, "six events, each once")
        (received,) = [p for p in by_id.values() if p["type"] == "sms.received"]
        assert received["data"]["text"] == "ack 42"
        assert received["data"]["from"] == "358401112233"
        statuses = {
            (p["data"]["message_id"], p["data"].get("status")) for p in by_id.values()
        }
        assert (ids[bad], "undelivered") in statuses and (
            ids[doomed],
            "failed",
        ) in statuses
        for event_id in by_id:  # sent before delivered, for each message
            order = [
                p["type"]
                for _, p in hook.events()
                if p["data"]["message_id"] == by_id[event_id]["data"]["message_id"]
            ]
            assert order == sorted(
                order, key=lambda t: t in ("sms.delivered", "sms.undelivered")
            )
    finally:
        stack.stop()
        hook.close()
    assert hook.rejected == []


@needs_smsd
def test_smsd_scheduled_message_waits_outlives_a_restart_and_goes_once(stack):
    number = "79680000801"
    started = time.monotonic()
    status, data = post(stack, [number], "at five", send_at="+5s")
    assert status == 201 and data["status"] == "scheduled"
    time.sleep(max(0.0, started + 3 - time.monotonic()))
    assert stack.modem.parts_to(number) == []  # not on the air at 3 s
    time.sleep(max(0.0, started + 4 - time.monotonic()))
    stack.restart_api()
    stack.wait_for(
        lambda: stack.modem.parts_to(number),
        max(0.1, started + 10 - time.monotonic()),
        "the scheduled message on the air by 10 s",
    )
    time.sleep(2)
    assert [on_air_text([p]) for p in stack.modem.parts_to(number)] == ["at five"]


@needs_smsd
def test_smsd_cancelled_scheduled_message_never_reaches_the_modem(stack):
    doomed, kept = "79680000802", "79680000803"
    message_id = post(stack, [doomed], "never", send_at="+2s")[1]["message_id"][doomed]
    path = "/api/v1.0/sms/scheduled/" + message_id
    assert stack.api.request("DELETE", path, user="lvv")[0] == 200
    time.sleep(3)  # past its time
    later = post(stack, [kept], "sent")[1]["message_id"][kept]
    assert stack.wait_final(later)["status"] == "sent"
    assert stack.modem.parts_to(doomed) == []
    assert stack.api.request("GET", path, user="lvv")[0] == 404


@needs_smsd
def test_smsd_message_due_while_smsapi_was_stopped_goes_at_start(stack):
    number = "79680000804"
    message_id = post(stack, [number], "while away", send_at="+1s")[1]["message_id"][
        number
    ]
    stack.api.stop()
    time.sleep(2.5)
    stack.api = Server(os.path.join(stack.root, "smsapi.ini"), stack.root)
    assert stack.wait_final(message_id)["status"] == "sent"
    assert [on_air_text([p]) for p in stack.modem.parts_to(number)] == ["while away"]


@needs_smsd
def test_smsd_valid_until_passed_while_smsapi_was_down_lands_in_failed(stack):
    number = "79680000805"
    message_id = post(stack, [number], "too late", send_at="+3s", valid_until="+4s")[1][
        "message_id"
    ][number]
    stack.api.stop()  # down at send_at, and still at valid_until
    time.sleep(5)
    stack.restart_api()
    status = wait_status(stack, message_id, ("failed",), timeout=10)
    assert status["reason"].startswith("expired before it was sent (valid_until ")
    time.sleep(2)
    assert stack.modem.parts_to(number) == []
    assert stack.status(message_id)["status"] == "failed"


@needs_smsd
def test_smsd_quiet_hours_hold_normal_messages_not_urgent_ones(stack):
    ini = os.path.join(stack.root, "smsapi.ini")
    with open(ini, "a") as file:
        file.write(quiet_ini(window_around_now()).lstrip("\n") + "\n")
    stack.restart_api()
    normal, urgent = "79680000806", "79680000807"
    held = post(stack, [normal], "tomorrow", user="night")[1]
    assert held["held"] == "quiet_hours" and held["status"] == "scheduled"
    now = post(stack, [urgent], "disk full", user="night", priority="high")[1]
    assert stack.wait_final(now["message_id"][urgent], user="night")["status"] == "sent"
    assert stack.modem.parts_to(normal) == []
    status = stack.status(held["message_id"][normal], user="night")
    assert status["status"] == "scheduled" and status["send_at"] == held["send_at"]


APPRISE, CURL = shutil.which("apprise"), shutil.which("curl")
needs_apprise = pytest.mark.skipif(
    SMSD is None or APPRISE is None or CURL is None,
    reason="needs smsd, curl and Apprise (pip install apprise)",
)


def on_air(stack, number, text):
    """Wait until text has reached number over the emulated air."""
    return stack.wait_for(
        lambda: text in on_air_texts(stack, number), 60, f"{text!r} on air to {number}"
    )


def curl(*args):
    """(status, JSON) of a curl call, as a shell script makes it."""
    result = subprocess.run(
        [CURL, "-sS", "-w", "\n%{http_code}", *args],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    body, _, status = result.stdout.rpartition("\n")
    return int(status), json.loads(body)


@needs_apprise
def test_smsd_apprise_and_curl_speak_ntfy_and_gotify_to_the_phone(stack):
    kuma, token_topic, gotify, shell = (f"7968000082{i}" for i in range(4))
    ini = os.path.join(stack.root, "smsapi.ini")
    made = [run_cli("add-token", user, "--config", ini) for user in ("lvv", "pve")]
    assert [m.returncode for m in made] == [0, 0], made
    token, pve = (m.stdout.strip() for m in made)
    with open(ini, "a") as file:  # add-token made [user:pve] last: this is pve's
        file.write(f"default_to = {gotify}\n[topic:kuma]\nto = {kuma}\n"
                   f"[topic:tokens]\nto = {token_topic}\n[topic:shell]\nto = {shell}\n")  # fmt: skip
    stack.restart_api()
    host = stack.api.url.split("://")[1]

    def apprise(url, body, title=None):
        args = [APPRISE, "-vv", "-b", body, *(["-t", title] if title else []), url]
        result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stdout + result.stderr

    apprise(f"ntfy://lvv:{PASSWORDS['lvv']}@{host}/kuma", "db1 is down", "Uptime Kuma")
    apprise(f"ntfy://{token}@{host}/tokens?auth=token", "Backup done")
    apprise(f"gotify://{host}/{pve}", "Backup of vm 101 failed", "pve1")
    on_air(stack, kuma, "Uptime Kuma: db1 is down")
    on_air(stack, token_topic, "Backup done")
    on_air(stack, gotify, "pve1: Backup of vm 101 failed")
    url = stack.api.url + "/shell"
    status, data = curl("-u", f"lvv:{PASSWORDS['lvv']}", "-H", "Title: Größe db2",
                        "-H", "Priority: urgent", "-H", "Tags: warning", "-d", "disk full", url)  # fmt: skip
    assert status == 200 and (data["priority"], data["tags"]) == (5, ["warning"]), data
    assert stack.status(data["id"])["to"] == shell
    status, data = curl("-X", "PUT", "-H", f"Authorization: Bearer {token}",
                        "--data-binary", "swap at 90%", url)  # fmt: skip
    assert status == 200 and data["message"] == "swap at 90%", data
    on_air(stack, shell, "Größe db2: disk full")  # curl's UTF-8 header, read as ntfy does
    on_air(stack, shell, "swap at 90%")
    wrong = token[:-1] + ("0" if token[-1] != "0" else "1")  # one in 62 ends in 0
    refused = curl("-H", f"Authorization: Bearer {wrong}", "-d", "x", url)
    assert refused == (401, {"code": 40100, "http": 401, "error": "Unauthorized access"})
    assert run_cli("remove-token", "lvv", token, "--config", ini).returncode == 0
    stack.wait_for(  # the running server takes the changed file by itself
        lambda: curl("-H", f"Authorization: Bearer {token}", "-d", "x", url)[0] == 401,
        30, "the removed token to be refused",
    )  # fmt: skip
    assert on_air_texts(stack, shell) == ["Größe db2: disk full", "swap at 90%"]
    log = stack.api.output()
    assert "POST / 200 user=lvv" in log and "POST /message 200 user=pve" in log
    assert token not in log
    assert pve not in log


@needs_smsd
def test_smsd_substituted_and_truncated_texts_arrive_as_answered(stack):
    typographic, long = "Disk “full” – 95 % … on db1", "word " * 80
    fitted = post(stack, ["79680000830"], typographic, substitute=True)[1]
    cut = post(stack, ["79680000831"], long, max_parts=2, truncate=True)[1]
    assert fitted["substituted"] == 4 and cut["truncated"] and cut["parts_count"] == 2
    for number, answer in (("79680000830", fitted), ("79680000831", cut)):
        stack.wait_final(answer["message_id"][number])
        parts = stack.modem.parts_to(number)
        assert on_air_text(parts) == answer["sent_text"]
        assert len(parts) == answer["parts_count"]


@needs_smsd
def test_smsd_two_processes_moving_at_once_send_each_message_once(stack):
    numbers = [f"796800009{n:02d}" for n in range(8)]
    status, data = post(stack, numbers, "once each", send_at="+3s")
    assert status == 201
    second = Server(os.path.join(stack.root, "smsapi.ini"), stack.root)
    try:  # both movers race for the same files when they come due
        for number in numbers:
            stack.wait_final(data["message_id"][number])
    finally:
        second.stop()
    time.sleep(2)
    for number in numbers:
        assert [on_air_text([p]) for p in stack.modem.parts_to(number)] == ["once each"]


###############################################################################
# The real Alertmanager, and Zabbix's script engine ############################
###############################################################################

ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
AMTOOL = shutil.which("amtool")
ZABBIX_JS = shutil.which("zabbix_js")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


NO_ROUTES = "route: {receiver: none}\nreceivers: [{name: none}]\n"


class Alertmanager:
    """The real Alertmanager on loopback, alone (no cluster), with this config."""

    def __init__(self, root, config=NO_ROUTES, port=None, prefix=""):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}{prefix}"
        root = pathlib.Path(root) / f"alertmanager-{self.port}"
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "alertmanager.yml").write_text(config)
        self.log = open(root / "log", "w+")  # noqa: SIM115 (as long as the process)
        self.process = subprocess.Popen(
            [
                ALERTMANAGER,
                f"--config.file={root / 'alertmanager.yml'}",
                f"--storage.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                f"--web.external-url={self.url}/",
                f"--web.route-prefix={prefix or '/'}",
                "--cluster.listen-address=",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_until(self.ready, 20, "Alertmanager to be ready")

    def ready(self):
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def push(self, alerts):
        """POST alerts to its API, as Prometheus does."""
        request = urllib.request.Request(
            self.url + "/api/v2/alerts",
            json.dumps(alerts).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200

    def api(self, path, body=None, method=None):
        """The JSON answer of its API at path."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data, method=method,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read() or b"null")

    def silences(self, state=None):
        """Its silences (in this state only, if given)."""
        found = self.api("/api/v2/silences")
        return [s for s in found if state in (None, s["status"]["state"])]

    def stop(self):
        self.process.terminate()
        self.process.wait(10)
        self.log.close()


def alertmanager_config(api, user="lvv"):
    """Routes: alerts to @oncall; InstanceDown gathered a second; Watchdog to the
    heartbeat; Flood as a user with a budget."""
    to = api + "/api/v1.0/alerts/alertmanager?to=@oncall"

    def receiver(name, url, user=user, resolved=True):
        return f"""
  - name: {name}
    webhook_configs:
      - url: '{url}'
        send_resolved: {str(resolved).lower()}
        http_config:
          basic_auth: {{username: {user}, password: {PASSWORDS[user]}}}"""

    return f"""
route:
  receiver: sms
  group_by: [alertname]
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1h
  routes:
    - matchers: [alertname="InstanceDown"]
      receiver: sms
      group_wait: 3s
    - matchers: [alertname="Watchdog"]
      receiver: heartbeat
      repeat_interval: 1s
    - matchers: [alertname="Flood"]
      receiver: flood
receivers:{receiver("sms", to)}{receiver("heartbeat", api + "/api/v1.0/alerts/alertmanager?heartbeat=monitoring", resolved=False)}{receiver("flood", to, "night")}
"""


def rfc3339(seconds):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


needs_alertmanager = pytest.mark.skipif(
    SMSD is None or ALERTMANAGER is None or AMTOOL is None,
    reason="needs smsd (smstools) and Alertmanager (prometheus-alertmanager)",
)


@needs_alertmanager
def test_smsd_alertmanager_alerts_heartbeat_dedupe_and_budget(tmp_path):
    oncall = ["79681000001", "79681000002"]
    extra = (
        f"\n[group:oncall]\nmobiles = {' '.join(oncall)}"
        "\n[heartbeat:monitoring]\nevery = 5s\nto = @oncall"
        f"\n[user:night]\npassword = {HASHES['night']}\nmax_per_hour = 3"
    )
    stack = SmsdStack(tmp_path, extra=extra)
    pair = []
    try:
        pair = [
            Alertmanager(tmp_path, alertmanager_config(stack.api.url)) for _ in range(2)
        ]
        started = rfc3339(time.time())
        watchdog = {"labels": {"alertname": "Watchdog"}, "startsAt": started}
        pair[0].push([watchdog])  # Alertmanager's always-firing alert: the beats
        stack.wait_for(stack.last_beat, 20, "a first beat")
        firing = {
            "labels": {
                "alertname": "HighCPU",
                "instance": "db1:9100",
                "severity": "page",
            },
            "annotations": {"summary": "CPU at 95%"},
            "startsAt": started,
        }
        for manager in pair:  # an HA pair without gossip: both notify
            manager.push([firing])

        def on_air(number, count):
            texts = [on_air_text([p]) for p in stack.modem.parts_to(number)]
            return texts if len(texts) >= count else None

        for number in oncall:
            texts = stack.wait_for(lambda n=number: on_air(n, 1), 30, "the firing SMS")
            assert texts == ["FIRING:1 HighCPU db1:9100: CPU at 95%"]
        subprocess.run(
            [AMTOOL, f"--alertmanager.url={pair[0].url}", "alert", "add",
             "alertname=HighCPU", "instance=db1:9100", "severity=page",
             "--annotation=summary=CPU at 95%", f"--start={started}",
             f"--end={rfc3339(time.time() - 1)}"],
            check=True, capture_output=True,
        )  # fmt: skip
        for number in oncall:
            texts = stack.wait_for(
                lambda n=number: on_air(n, 2), 30, "the resolved SMS"
            )
            assert texts[1] == "RESOLVED HighCPU db1:9100: CPU at 95%"
        time.sleep(3)
        print(
            [[on_air_text([p]) for p in stack.modem.parts_to(n)] for n in oncall],
            stack.api.output()[-3000:],
        )
        assert [len(stack.modem.parts_to(n)) for n in oncall] == [
            2,
            2,
        ]  # the pair's twins sent once

        # Alertmanager flushes at once an alert that began group_wait ago: these begin now.
        now = rfc3339(time.time())
        storm = [
            {"labels": {"alertname": "InstanceDown", "instance": f"node{n:02d}:9100"},
             "annotations": {"summary": "target is down"}, "startsAt": now}
            for n in range(50)
        ]  # fmt: skip
        pair[0].push(storm)
        texts = stack.wait_for(lambda: on_air(oncall[0], 3), 30, "the storm's SMS")
        assert texts[2].startswith("FIRING:50 InstanceDown node")
        assert re.search(r" \+\d+ more$", texts[2]) and len(texts[2]) <= 160

        assert stack.status_of_heartbeat() == "ok"  # the beats kept coming all along
        pair[0].push([dict(watchdog, endsAt=rfc3339(time.time() - 1))])  # it stops
        texts = stack.wait_for(lambda: on_air(oncall[0], 4), 20, "the missed SMS")
        assert texts[3].startswith("heartbeat monitoring missed, last beat at 20")
        time.sleep(3)
        assert len(stack.modem.parts_to(oncall[0])) == 4  # once
        pair[0].push([dict(watchdog, startsAt=rfc3339(time.time()))])  # it is back
        texts = stack.wait_for(lambda: on_air(oncall[0], 5), 20, "the back SMS")
        assert texts[4] == "heartbeat monitoring back"

        flood = [
            {"labels": {"alertname": "Flood", "n": str(n)}, "startsAt": started}
            for n in range(2)
        ]
        pair[1].push(flood[:1])  # 2 SMS of night's 3 an hour
        stack.wait_for(lambda: on_air(oncall[0], 6), 20, "the first flood SMS")
        pair[1].push(flood)  # 2 more: refused, and Alertmanager retries in vain
        stack.wait_for(
            lambda: " 429 user=night" in stack.api.output(), 20, "the budget's 429"
        )
        assert re.search(r"alert of group \S*Flood\S* not sent: Budget", stack.api.output())
        time.sleep(2)
        assert len(stack.modem.parts_to(oncall[0])) == 6
    finally:
        for manager in pair:
            manager.stop()
        stack.stop()


def test_live_readme_send_later_examples_are_never_stale(live):
    """The README's two "Send later" commands, run as written, at any date."""
    server = live()
    block = re.search(r"```sh\n(.*?)```", readme_section("The API").split("### Send later")[1], re.DOTALL)
    script = block.group(1).replace("http://127.0.0.1:5000", server.url)
    answers = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    assert len(answers) == 2
    for answer in map(json.loads, answers):
        assert answer["status"] == "scheduled", answer


def readme_alertmanager_yml(smsapi_url):
    """The README's alertmanager.yml as written, but for the address smsapi has."""
    yml = re.search(r"```yaml\n(# alertmanager\.yml\n.*?)```", readme_section("Alerts"), re.DOTALL)
    return yml.group(1).replace("http://127.0.0.1:5000", smsapi_url)


@pytest.mark.skipif(ALERTMANAGER is None, reason="needs Alertmanager (prometheus-alertmanager)")
def test_live_readme_alertmanager_yml_beats_well_inside_every(tmp_path, spool):
    """The README's routes, Alertmanager's defaults for the rest: the Watchdog's
    beats must come well inside the heartbeat's every, or all is well and yet
    "missed" and "back" SMS go out."""
    extra = (
        f"\n[user:alertmanager]\npassword = {smsapi.hash_password('the-password', ln=10)}"
        "\n[group:oncall]\nmobiles = 79680000000"
        "\n[heartbeat:monitoring]\nevery = 5min\nto = @oncall"
    )
    server = Server(write_ini(tmp_path, spool, extra=extra), tmp_path)
    manager = None
    try:
        manager = Alertmanager(tmp_path, readme_alertmanager_yml(server.url))
        manager.push([{"labels": {"alertname": "Watchdog"}, "startsAt": rfc3339(time.time())}])
        beats = re.compile(r"POST /api/v1.0/alerts/alertmanager 200 user=alertmanager")
        wait_until(lambda: len(beats.findall(server.output())) >= 2, 80, "two beats")
        times = [
            datetime_seconds(line[:24])
            for line in server.output().splitlines()
            if beats.search(line)
        ]
        every = smsapi.load_config(str(tmp_path / "smsapi.ini")).heartbeats["monitoring"].every
        assert times[1] - times[0] <= every / 4, times  # four beats at least in every
        assert spool_snapshot(spool) == {}  # a beat sends nothing
    finally:
        if manager:
            manager.stop()
        server.stop()


def datetime_seconds(text):
    """Seconds since the epoch of a log line's ISO 8601 time (2026-12-06T09:35:57+0000)."""
    import datetime

    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z").timestamp()


@pytest.mark.skipif(ZABBIX_JS is None, reason="needs zabbix_js (zabbix-server-pgsql)")
def test_live_zabbix_media_type_from_the_readme_sends_through_smsapi(tmp_path, spool):
    script = re.search(r"```js\n(.*?)```", readme_section("Alerts"), re.DOTALL).group(1)
    (tmp_path / "smsapi.js").write_text(script)
    extra = "\n[group:oncall]\nmobiles = 79680000000 79680000001"
    server = Server(write_ini(tmp_path, spool, extra=extra), tmp_path)
    try:

        def media(to, password=PASSWORDS["lvv"]):
            params = {
                "URL": server.url + "/",
                "To": to,
                "Subject": "Problem: Disk full on db1",
                "Message": "Free space on /var is 1%",
                "User": "lvv",
                "Password": password,
            }
            return subprocess.run(
                [ZABBIX_JS, "-s", str(tmp_path / "smsapi.js"), "-p", json.dumps(params)],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip

        sent = media("@oncall, +79160000000")
        assert sent.returncode == 0 and sent.stdout.strip() == "OK", sent
        texts = texts_in(spool)
        assert texts == dict.fromkeys(
            ["79680000000", "79680000001", "79160000000"],
            "Problem: Disk full on db1\nFree space on /var is 1%",
        )
        refused = media("4915112345678")  # not on lvv's allow-list
        assert (
            refused.returncode != 0
            and "smsapi answered 403" in refused.stdout + refused.stderr
        )
        wrong = media("79680000000", "wrong")
        assert (
            wrong.returncode != 0
            and "smsapi answered 401" in wrong.stdout + wrong.stderr
        )
        assert len(os.listdir(spool["outgoing"])) == 3
    finally:
        server.stop()


needs_alertmanager_alone = pytest.mark.skipif(
    ALERTMANAGER is None, reason="needs Alertmanager (prometheus-alertmanager)"
)


def high_cpu(ends=None):
    """The alert HighCPU as Prometheus pushes it to Alertmanager."""
    alert = {"labels": {"alertname": "HighCPU", "instance": "db1:9100"},
             "startsAt": rfc3339(time.time() - 60)}  # fmt: skip
    return dict(alert, endsAt=rfc3339(ends)) if ends else alert


def the_page(app):
    [page] = [p for p in pages_of(app, "root") if p["status"] != "resolved"] or [None]
    return page


@needs_alertmanager_alone
def test_pager_silence_made_extended_left_to_end_and_expired_in_alertmanager(
    tmp_path, spool
):
    manager = Alertmanager(tmp_path)
    config = write_ini(tmp_path, spool, extra=PAGING + f"alertmanager_url = {manager.url}/\nack_for = 6\n")
    app = smsapi.Application(smsapi.load_config(config))
    app.start()
    try:
        manager.push([high_cpu()])
        assert fire(app).status == 201
        page_id = the_page(app)["id"]
        put_file(spool, "incoming", "GSM1.ack", {"From": "79680000001"}, "1a")
        page = wait_until(lambda: (the_page(app) or {}).get("silence_id") and the_page(app))
        [silence] = manager.silences("active")
        assert silence["id"] == page["silence_id"]
        assert silence["matchers"] == [
            {"name": "alertname", "value": "HighCPU", "isRegex": False, "isEqual": True}
        ]
        assert "smsapi" in silence["createdBy"] and "79680000001" in silence["createdBy"]
        assert page_id in silence["comment"] and "1a" in silence["comment"]
        confirmation = wait_until(lambda: sms_to(spool, "79680000001", "smsapi:pager"))
        assert re.fullmatch(r"#1 HighCPU: acknowledged\. Silenced until \d\d:\d\d\.", confirmation[0])
        put_file(spool, "incoming", "GSM1.twice", {"From": "79680000000"}, "ack 1")
        wait_until(lambda: len(sms_to(spool, "79680000000", "smsapi:pager")) == 2)
        first_end = silence["endsAt"]
        extended = wait_until(  # still firing: extended before its end, in place
            lambda: [s for s in manager.silences("active") if s["endsAt"] > first_end],
            15, "the silence to be extended",
        )  # fmt: skip
        assert [s["id"] for s in extended] == [silence["id"]]
        assert len(manager.silences()) == 1  # one silence all along, however often acked

        manager.api("/api/v2/silence/" + silence["id"], method="DELETE")  # by hand
        wait_until(lambda: the_page(app)["status"] == "firing", 10, "the page to fire again")
        time.sleep(2.5)
        assert manager.silences("active") == []  # not made again behind the person's back
        put_file(spool, "incoming", "GSM1.reack", {"From": "79680000000"}, "1a")
        wait_until(lambda: manager.silences("active"), 10, "a new silence")

        manager.push([high_cpu(ends=time.time() - 1)])  # it stops firing
        wait_until(lambda: the_page(app) is None, 15, "the page to close")
        assert pages_of(app)[0]["status"] == "resolved"
        assert fire(app).status == 200  # a twin's late repeat: sent before, no new page
        assert the_page(app) is None
        wait_until(lambda: manager.silences("expired"), 15, "the silence to end by itself")

        manager.push([high_cpu()])  # the next incident: paged, acknowledged, resolved
        time.sleep(1)
        assert fire(app, n=2).status == 201
        put_file(spool, "incoming", "GSM1.again", {"From": "79680000000"}, "a")
        page = wait_until(lambda: (the_page(app) or {}).get("silence_id") and the_page(app))
        assert resolve(app).status == 201
        wait_until(  # within 3 s: its own end (ack_for) is 6 s after it began
            lambda: [s for s in manager.silences("expired") if s["id"] == page["silence_id"]],
            3, "the silence expired at once",
        )  # fmt: skip
        assert len(manager.silences("active")) == 0
    finally:
        app.close()
        manager.stop()


@needs_alertmanager_alone
def test_pager_silence_pending_while_no_alertmanager_answers_then_made_once(
    tmp_path, spool, monkeypatch
):
    monkeypatch.setattr(smsapi, "ALERTMANAGER_RETRY", (1,))
    port = free_port()
    extra = PAGING + f"alertmanager_url = http://127.0.0.1:{port}/prefix\nack_for = 1h\n"
    config = smsapi.load_config(write_ini(tmp_path, spool, extra=extra))
    app = smsapi.Application(config)
    app.start()
    manager = None
    try:
        assert fire(app).status == 201
        put_file(spool, "incoming", "GSM1.ack", {"From": "79680000000"}, "1a")
        told = wait_until(lambda: sms_to(spool, "79680000000", "smsapi:pager"))
        assert told == [("#1 HighCPU: acknowledged. Silence pending: no Alertmanager"
                        " answers yet; smsapi keeps trying.")]  # fmt: skip
        assert sms_to(spool, "79680000001", "smsapi:pager")[0].startswith(
            "#1 HighCPU: acknowledged by +79680000000 at "
        )
        check = wait_until(lambda: call(app, "GET", "/api/v1.0/health").json()["checks"]["pages"]["silences_pending"] and call(app, "GET", "/api/v1.0/health").json()["checks"]["pages"])
        assert check["status"] == "warn" and check["silences_pending"] == 1
        app.close()  # down, as after a kill -9 in the middle of asking

        manager = Alertmanager(tmp_path, port=port, prefix="/prefix")
        page = smsapi.Application(config).parts.pager.pages[the_page(app)["id"]]
        made = smsapi.Alertmanagers(lambda: smsapi.load_config(write_ini(
            tmp_path, spool, extra=PAGING + f"alertmanager_url = {manager.url}\n"
        ))).set_silence(page, rfc3339(time.time()), rfc3339(time.time() + 3600))  # fmt: skip
        app = smsapi.Application(config)  # the restart: it finds that silence
        assert the_page(app)["silence_id"] is None
        app.start()
        page = wait_until(lambda: the_page(app)["silence_id"], 15, "the silence found")
        assert page == made and [s["id"] for s in manager.silences()] == [made]
        time.sleep(1.5)
        assert len(manager.silences()) == 1
        assert sms_to(spool, "79680000000", "smsapi:pager") == told  # told once
    finally:
        app.close()
        if manager:
            manager.stop()


def paging_config(api, repeat="5s"):
    """Alertmanager routing every alert to smsapi's pages for @oncall."""
    return f"""
route:
  receiver: sms
  group_by: [alertname]
  group_wait: 0s
  group_interval: 1s
  repeat_interval: {repeat}
receivers:
  - name: sms
    webhook_configs:
      - url: '{api}/api/v1.0/alerts/alertmanager?to=@oncall'
        send_resolved: true
        http_config:
          basic_auth: {{username: lvv, password: {PASSWORDS["lvv"]}}}
"""


@needs_alertmanager
def test_smsd_page_acknowledged_by_reply_silences_the_group_in_alertmanager(tmp_path):
    oncall = ["79681000001", "79681000002"]
    port = free_port(), free_port()
    extra = (
        f"\n[group:oncall]\nmobiles = {' '.join(oncall)}\n[alerts]\nack = yes"
        f"\nalertmanager_url = http://127.0.0.1:{port[0]} http://127.0.0.1:{port[1]}\n"
    )
    stack = SmsdStack(tmp_path, extra=extra)
    pair = []

    def on_air(number, count=1):
        texts = [on_air_text([p]) for p in stack.modem.parts_to(number)]
        return texts if len(texts) >= count else None

    def wait_on_air(number, count, what):
        return stack.wait_for(lambda: on_air(number, count), 40, what)

    try:
        pair = [Alertmanager(tmp_path, paging_config(stack.api.url), p) for p in port]
        for manager in pair:  # an HA pair without gossip: both notify
            manager.push([high_cpu()])
        for number in oncall:
            page = wait_on_air(number, 1, "the page")
            assert page == ["FIRING:1 HighCPU db1:9100 Reply 1a to ack"]

        stack.modem.receive(oncall[1], "1a")
        assert wait_on_air(oncall[1], 2, "the confirmation")[1].startswith(
            "#1 HighCPU: acknowledged. Silenced until "
        )
        assert re.fullmatch(r"#1 HighCPU: acknowledged by \+79681000002 at \d\d:\d\d\.",
                            wait_on_air(oncall[0], 2, "the notice")[1])  # fmt: skip
        [silence] = pair[0].silences("active")  # the first Alertmanager took it
        queried = subprocess.run(
            [AMTOOL, f"--alertmanager.url={pair[0].url}", "silence", "query", "-o", "json",
             "alertname=HighCPU"], capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert [s["id"] for s in json.loads(queried)] == [silence["id"]]
        assert "79681000002" in silence["createdBy"]

        stack.modem.receive(oncall[0], "ack 1")  # the other, later: told who
        assert wait_on_air(oncall[0], 3, "who acknowledged")[2].startswith(
            "#1 HighCPU: acknowledged by +79681000002 at "
        )
        stack.modem.receive(oncall[0], "what is this")  # no code: what to send
        assert wait_on_air(oncall[0], 4, "the help")[3] == "Reply 1a to ack #1 HighCPU"
        for _ in range(5):
            stack.modem.receive(oncall[0], "??")  # more: not answered again so soon
        stack.modem.receive("79689999999", "1a")  # never paged: nothing
        time.sleep(12)  # two repeat_intervals: the twin notifies again, sending nothing
        assert [len(on_air(n)) for n in oncall] == [4, 2]
        assert stack.modem.parts_to("79689999999") == []
        assert re.search(r"POST /api/v1.0/alerts/alertmanager 200 user=lvv ids=- acknowledged"
                         r" by \+79681000002: not sent", stack.api.output())  # fmt: skip
        assert sum(len(m.silences()) for m in pair) == 1

        for manager in pair:  # resolved: the twin without the silence tells smsapi
            manager.push([high_cpu(ends=time.time() - 1)])
        assert wait_on_air(oncall[0], 5, "the resolved SMS")[4] == "RESOLVED HighCPU db1:9100"
        stack.wait_for(lambda: pair[0].silences("expired"), 20, "the silence expired")
        stack.modem.receive(oncall[1], "1a")  # too late
        assert re.fullmatch(r"#1 HighCPU: resolved at \d\d:\d\d; nothing to acknowledge\.",
                            wait_on_air(oncall[1], 4, "resolved already")[3])  # fmt: skip

        # smsapi is killed; the next page's reply comes while it is down
        disk_full = {"labels": {"alertname": "DiskFull"}, "startsAt": rfc3339(time.time())}
        pair[0].push([disk_full])
        assert wait_on_air(oncall[0], 6, "the next page")[5] == "FIRING:1 DiskFull Reply 1a to ack"
        received = len(os.listdir(stack.spool["incoming"]))
        stack.api.process.kill()
        stack.modem.receive(oncall[0], "a")
        stack.wait_for(lambda: len(os.listdir(stack.spool["incoming"])) > received,
                       30, "smsd to file the reply")  # fmt: skip
        stack.restart_api()
        assert wait_on_air(oncall[0], 7, "the confirmation after the restart")[6].startswith(
            "#1 DiskFull: acknowledged. Silenced until "
        )
        time.sleep(2)
        assert [s["matchers"][0]["value"] for s in pair[0].silences("active")] == ["DiskFull"]
    finally:
        for manager in pair:
            manager.stop()
        stack.stop()


def chain_config(api, chain):
    """Alertmanager routing every alert through smsapi's chain."""
    return paging_config(api, "1h").replace("?to=@oncall", f"?escalation={chain}")


def on_air_texts(stack, number):
    return [on_air_text([p]) for p in stack.modem.parts_to(number)]


@needs_alertmanager
def test_smsd_escalation_steps_calls_failures_requests_and_a_missed_call(tmp_path):
    p, b, m, p2, b2, m2 = (f"7968200000{i}" for i in range(6))
    extra = (
        f"\n[group:primary]\nmobiles = {p}\n[alerts]\nack = yes\nack_by_call = yes\n"
        f"[escalation:quick]\nsteps = @primary, 6s {b}, 16s {m}\n"
        f"[escalation:slow]\nsteps = {p2}, 60s {b2}, 120s call {m2}\n"
    )
    stack = SmsdStack(tmp_path, extra=extra, modem="phonecalls = clip")
    stack.modem.undelivered.add(p2)
    manager = None
    try:
        port = free_port()
        config = pathlib.Path(stack.root, "smsapi.ini")  # the silences go to it
        config.write_text(config.read_text().replace("ack_by_call = yes",
                          f"ack_by_call = yes\nalertmanager_url = http://127.0.0.1:{port}"))  # fmt: skip
        stack.restart_api()
        manager = Alertmanager(tmp_path, chain_config(stack.api.url, "quick"), port)
        started = time.monotonic()
        manager.push([high_cpu()])
        page = stack.wait_for(lambda: on_air_texts(stack, p), 30, "step 1")
        assert page == ["FIRING:1 HighCPU db1:9100 Reply 1a to ack"]
        step_two = stack.wait_for(lambda: on_air_texts(stack, b), 30, "step 2")
        assert step_two == page and time.monotonic() - started >= 6  # on time
        stack.modem.receive(b, "1a")  # step 2's number acknowledges
        stack.wait_for(lambda: len(on_air_texts(stack, b)) == 2, 40, "the confirmation")
        assert on_air_texts(stack, b)[1].startswith("#1 HighCPU: acknowledged. Silenced until")
        assert manager.silences("active")
        time.sleep(max(0, 18 - (time.monotonic() - started)))  # past step 3's time
        assert on_air_texts(stack, m) == []  # no step after the acknowledgement

        status, _, data = stack.api.request(
            "POST", "/api/v1.0/alerts/alertmanager?escalation=slow",
            notification([alert("DiskFull", "db2", "full")], group='{}:{alertname="DiskFull"}'),
            "lvv",
        )  # fmt: skip
        assert status == 201, data
        # step 1's SMS is undelivered (its report says so): step 2 at once, not in 60 s
        stack.wait_for(lambda: on_air_texts(stack, b2), 40, "step 2 after the undelivered one")
        stack.modem.receive(b2, "1e")  # and step 3, a call, on request
        stack.wait_for(lambda: m2 in stack.modem.dialled, 40, "step 3 to ring")
        stack.wait_for(lambda: len(on_air_texts(stack, b2)) == 2, 40, "who was paged")
        assert on_air_texts(stack, b2)[1] == f"#1 DiskFull: escalated; paged +{m2}."
        assert on_air_texts(stack, m2) == []  # rung, not texted
        stack.wait_for(lambda: not os.listdir(stack.spool["checked"]), 40, "the call to end")
        stack.modem.ring(m2)  # a missed call from step 3's number acknowledges
        confirmation = stack.wait_for(lambda: on_air_texts(stack, m2), 40, "the call's ack")
        assert confirmation[0].startswith("#1 DiskFull: acknowledged.")
        assert time.monotonic() - started < 60 + 18  # all before step 2's own time
        pages = stack.api.request("GET", "/api/v1.0/alerts", user="lvv")[2]["pages"]
        assert [(x["escalation"], x["status"], x["acknowledged_by"]) for x in pages] == [
            ("slow", "acknowledged", m2), ("quick", "acknowledged", b),
        ]  # fmt: skip
    finally:
        if manager:
            manager.stop()
        stack.stop()


@needs_smsd
def test_smsd_escalation_repeat_resolved_kill_9_and_a_missed_heartbeat(tmp_path):
    p, b, m, p2, b2, p3, b3 = (f"7968300000{i}" for i in range(7))
    extra = (
        f"\n[escalation:again]\nsteps = {p}, 3s {b}\nrepeat = 1\nround = 8s\n"
        f"[escalation:stop]\nsteps = {p2}, 3s {b2}, 40s {m}\n"
        f"[escalation:beat]\nsteps = {p3}, 60s {b3}\n"
        "[heartbeat:backup]\nevery = 4s\nescalation = beat\n"
    )
    stack = SmsdStack(tmp_path, extra=extra)
    try:
        def post(chain, name, status="firing"):
            payload = notification([alert(name, "db", "it", status)], status,
                                   group=f'{{}}:{{alertname="{name}"}}')  # fmt: skip
            answer = stack.api.request(
                "POST", f"/api/v1.0/alerts/alertmanager?escalation={chain}", payload, "lvv"
            )
            assert answer[0] in (200, 201), answer

        missed = stack.wait_for(lambda: on_air_texts(stack, p3), 30, "the missed heartbeat")
        assert missed == ["heartbeat backup missed, last beat at never Reply 1a to ack"]
        stack.restart_api(kill=True)  # kill -9 after the page: its reply is still heard
        stack.modem.receive(p3, "1a")
        stack.wait_for(lambda: len(on_air_texts(stack, p3)) == 2, 30, "the acknowledgement")
        assert on_air_texts(stack, p3)[1] == "#1 heartbeat backup: acknowledged."
        stack.api.request("POST", "/api/v1.0/heartbeats/backup", user="root")
        assert stack.wait_for(lambda: on_air_texts(stack, p3)[2:], 30, "back") == [
            "heartbeat backup back"
        ]

        post("again", "Repeated")  # two rounds of two steps, then nothing
        stack.wait_for(lambda: len(on_air_texts(stack, b)) == 2, 40, "round 2's step 2")
        assert len(on_air_texts(stack, p)) == 2
        post("stop", "Stopped")
        stack.wait_for(lambda: on_air_texts(stack, p2), 30, "step 1")
        stack.api.process.kill()  # kill -9 between two steps: none twice, none skipped
        time.sleep(4)  # step 2 comes due while smsapi is down
        stack.restart_api()
        stack.wait_for(lambda: on_air_texts(stack, b2), 30, "step 2, at the start")
        post("stop", "Stopped", "resolved")  # exactly the numbers paged
        for number in (p2, b2):
            stack.wait_for(lambda n=number: len(on_air_texts(stack, n)) == 2, 30, "resolved")
            assert on_air_texts(stack, number)[1] == "RESOLVED Stopped db: it"
        time.sleep(6)
        assert [len(on_air_texts(stack, n)) for n in (p, b, m, p2, b2, b3)] == [2, 2, 0, 2, 2, 0]
    finally:
        stack.stop()
