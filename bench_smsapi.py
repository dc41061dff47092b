#!/usr/bin/env python3
"""Benchmark smsapi against what cannot be avoided, side by side in one run.

    python3 bench_smsapi.py [--json FILE] [--seconds N] [--only PART]

Starts every server it measures itself, on loopback, over temporary spools,
and stops them. Load comes from wrk (Debian package wrk). Absolute numbers
on a shared machine are noise; the ratios, measured minutes apart in the
same run, are what to read.
"""

import argparse
import base64
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SMSAPI = os.path.join(HERE, "smsapi.py")
PASSWORD = "bench-password"
BODY = json.dumps({"mobiles": ["79680000000"], "text": "Disk full on db1"})
THREADS, CONNECTIONS = 4, 8
TARGETS = {  # figure -> (comparison, limit)
    "send_vs_durable_floor": (">=", 0.75),
    "status_100k_vs_10": ("<=", 1.2),
    "sent_100k_vs_10": ("<=", 1.2),
    "list_100k_ms": ("<=", 150),
    "rss_idle_mb": ("<=", 16),
    "rss_login_20k_sends_mb": ("<=", 21),
    "rss_scrape_100k_queued_growth_mb": ("<", 1),
    "startup_over_hello_ms": ("<=", 25),
    "idle_cpu_s": ("<", 0.05),
    "idle_cpu_20k_awaiting_s": ("<", 0.05),
    "report_send_20k_vs_empty": ("<", 1.5),
    "health_100k_failed_vs_empty": ("<=", 2.0),
    "status_page_100k_vs_empty": ("<=", 2.0),
    "rss_ten_users_growth_mb": ("<=", 6),
}


# The reference apps: each a program of its own that imports only what it uses

#: The least a waitress app can be, served as smsapi is served (4 threads).
HELLO = """
import waitress.server

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
    return [b"hello\\n"]

server = waitress.server.create_server(app, listen="127.0.0.1:0", threads=4)
print(f"listening on http://127.0.0.1:{server.effective_port}", flush=True)
server.run()
"""

#: The unavoidable work of a send: read the JSON body, write, fsync, rename;
#: DURABLE also fsyncs the directory, so that the rename survives a power cut
#: (what smsapi does before it answers 201).
FLOOR = """
import json, os, sys, waitress.server

outgoing, durable = sys.argv[1], sys.argv[2] == "durable"
answer = b'{"message_id": {"79680000000": "x"}, "parts_count": 1}\\n'

def app(environ, start_response):
    size = int(environ.get("CONTENT_LENGTH") or 0)
    json.loads(environ["wsgi.input"].read(size))
    name = "floor." + os.urandom(12).hex()
    temp = os.path.join(outgoing, "." + name)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o660)
    os.write(fd, b"To: 79680000000\\nAlphabet: UTF-8\\n\\nDisk full on db1")
    os.fsync(fd)
    os.close(fd)
    os.rename(temp, os.path.join(outgoing, name))
    if durable:
        directory = os.open(outgoing, os.O_RDONLY)
        os.fsync(directory)
        os.close(directory)
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(answer)))]
    start_response("201 Created", headers)
    return [answer]

server = waitress.server.create_server(app, listen="127.0.0.1:0", threads=4)
print(f"listening on http://127.0.0.1:{server.effective_port}", flush=True)
server.run()
"""


def installed(workdir):
    """smsapi as install.sh leaves it: the module and its bytecode in one directory."""
    lib = os.path.join(workdir, "lib")
    os.makedirs(lib)
    shutil.copy(SMSAPI, lib)
    subprocess.run([sys.executable, "-m", "compileall", "-q", lib], check=True)
    return lib


def start_smsapi(lib, ini, log_path):
    """smsapi started as the unit starts it: python3 -m smsapi from its directory,
    with the unit's UMask=0007."""
    command = [sys.executable, "-m", "smsapi", "--config", ini]
    return Server(command, log_path, cwd=lib, umask=0o007)


# Servers and measurements ###################################################


class Server:
    """A server process on an ephemeral loopback port."""

    def __init__(self, args, log_path, cwd=None, probe="/", umask=-1):
        self.log_path = log_path
        self.started = time.perf_counter()
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, umask=umask
            )
        self.url = self.wait_for_url()
        host, port = self.url[len("http://") :].rsplit(":", 1)
        while True:  # start-up is over at the first answer
            try:
                connection = http.client.HTTPConnection(host, int(port), timeout=5)
                connection.request("GET", probe)
                connection.getresponse().read()
                connection.close()
                break
            except OSError:
                time.sleep(0.001)
        self.startup = time.perf_counter() - self.started

    def wait_for_url(self):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with open(self.log_path) as log:
                match = re.search(r"listening on (http://\S+)", log.read())
            if match:
                return match.group(1)
            if self.process.poll() is not None:
                break
            time.sleep(0.001)
        with open(self.log_path) as log:
            raise SystemExit("server did not start:\n" + log.read())

    def wait_for_log(self, text, timeout=120):
        """Wait until the server logs text (say, that its start-up work is done)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path) as log:
                if text in log.read():
                    return
            time.sleep(0.1)
        raise SystemExit(f"server never logged {text!r}")

    def rss_mb(self):
        with open(f"/proc/{self.process.pid}/status") as status:
            kb = int(re.search(r"VmRSS:\s+(\d+)", status.read()).group(1))
        return kb / 1024

    def cpu_seconds(self):
        with open(f"/proc/{self.process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def wrk(url, seconds, connections=CONNECTIONS, post=False, auth=None, workdir=None):
    """Run wrk; return (requests per second, median latency in ms, requests done)."""
    script = os.path.join(workdir, "wrk.lua")
    with open(script, "w") as lua:
        if post:
            lua.write(f"wrk.method = 'POST'\nwrk.body = '{BODY}'\n")
            lua.write("wrk.headers['Content-Type'] = 'application/json'\n")
        if auth:
            lua.write(f"wrk.headers['Authorization'] = '{auth}'\n")
    threads = min(2, connections)
    command = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{seconds}s",
        "--latency",
        "-s",
        script,
        url,
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in output:
        raise SystemExit("wrk saw errors from " + url + ":\n" + output)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    done = int(re.search(r"(\d+) requests in", output).group(1))
    return rate, latency_ms(re.search(r"50%\s+([\d.]+\w+)", output).group(1)), done


def median_ms(url, path, auth, count=15, method="GET", body=None, expect=200):
    """Median latency of count sequential requests on one keep-alive connection."""
    host, port = url[len("http://") :].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = auth
    times = []
    for _ in range(count):
        started = time.perf_counter()
        connection.request(method, path, body, headers)
        response = connection.getresponse()
        response.read()
        if response.status not in (expect if isinstance(expect, tuple) else (expect,)):
            raise SystemExit(f"{method} {path}: {response.status}")
        times.append((time.perf_counter() - started) * 1000)
    connection.close()
    return statistics.median(times)


def latency_ms(text):
    value, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def add_awaiting(smsapi, root, count, owner="bench"):
    """count messages smsd sent asking for a report, and count more still queued."""
    now = time.time()
    for n in range(count):
        name = smsapi.new_message_id(owner, now - count + n)
        head = f"From: {owner}\nTo: 79680000000\nAlphabet: UTF-8\nReport: yes\n"
        for kind, extra in (
            ("outgoing", ""),
            (
                "sent",
                f"Modem: GSM1\nSent: {time.strftime('%y-%m-%d %H:%M:%S')}\nMessage_id: {n % 256}\n",
            ),
        ):
            with open(os.path.join(root, kind, name), "w") as file:
                file.write(f"{head}{extra}\nhello")


def make_spool(smsapi, root, user_hash, files=0, owner="bench"):
    """A spool, a config over it, and `files` sent messages; returns (ini, an id in sent/)."""
    spool = {
        kind: os.path.join(root, kind)
        for kind in ("outgoing", "checked", "sent", "failed", "incoming")
    }
    for path in spool.values():
        os.makedirs(path)
    content = (
        f"From: {owner}\nTo: 79680000000\nAlphabet: UTF-8\nModem: GSM1\nSent: 26-11-24 10:00:00\n\nhello"
    ).encode()
    now = time.time()
    probe = None
    for n in range(files):
        name = smsapi.new_message_id(owner, now - files + n)
        path = os.path.join(spool["sent"], name)
        with open(path, "wb") as file:
            file.write(content)
        os.utime(path, (now - files + n, now - files + n))
        probe = name if n == files // 2 else probe
    ini = os.path.join(root, "smsapi.ini")
    with open(ini, "w") as file:
        file.write(
            f"[server]\nlisten = 127.0.0.1:0\nthreads = {THREADS}\nstate_dir = {root}/state\n[spool]\nsmsd_conf =\n"
        )
        file.writelines(f"{kind} = {path}\n" for kind, path in spool.items())
        file.write(
            f"[user:bench]\npassword = {user_hash}\n[user:admin]\npassword = {user_hash}\nadmin = yes\n"
        )
    return ini, probe


def best_of(runs, measure):
    """The best of a few alternating runs: noise only ever slows a run down."""
    return max(measure() for _ in range(runs))


def bench(seconds, workdir):
    sys.path.insert(0, HERE)
    import smsapi

    results = {}
    lib = installed(workdir)
    user_hash = smsapi.hash_password(PASSWORD)
    token = "Basic " + base64.b64encode(f"bench:{PASSWORD}".encode()).decode()
    admin = "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
    small_ini, _ = make_spool(
        smsapi, os.path.join(workdir, "small"), user_hash, files=10
    )
    results.update(bench_startup(lib, small_ini, workdir))

    # Memory idle, after one login, after 20,000 sends; sends against the floors.
    api = start_smsapi(lib, small_ini, os.path.join(workdir, "smsapi.log"))
    references = {"hello": Server([sys.executable, "-c", HELLO], log_in(workdir))}
    for kind in ("plain", "durable"):
        outgoing = os.path.join(workdir, kind)
        os.makedirs(outgoing)
        command = [sys.executable, "-c", FLOOR, outgoing, kind]
        references[kind] = Server(command, log_in(workdir))
    time.sleep(1)
    results["rss_idle_mb"] = api.rss_mb()
    results["hello_rss_mb"] = references["hello"].rss_mb()
    median_ms(api.url, "/api/v1.0/sms/status/x", token, 1, expect=404)
    results["rss_login_mb"] = api.rss_mb()
    send_url = api.url + "/api/v1.0/sms/outgoing"
    rounds, sent = [], 0
    for _ in range(5):  # each round all four, back to back: drift falls on all alike
        rate, _, done = wrk(send_url, seconds, post=True, auth=token, workdir=workdir)
        rates = {"smsapi": rate}
        sent += done
        for kind in ("plain", "durable"):
            url = references[kind].url + "/"
            rates[kind] = wrk(url, seconds, post=True, workdir=workdir)[0]
        url = references["hello"].url + "/"
        rates["hello"] = wrk(url, seconds, workdir=workdir)[0]
        rounds.append(rates)
    for name in rounds[0]:
        results[f"{name}_rps"] = statistics.median(r[name] for r in rounds)
    for name, floor in (
        ("floor", "plain"),
        ("durable_floor", "durable"),
        ("hello", "hello"),
    ):
        # the median of the rounds' own ratios: the disk's speed drifts from minute to minute
        results[f"send_vs_{name}"] = statistics.median(
            r["smsapi"] / r[floor] for r in rounds
        )
    while sent < 20000:
        sent += wrk(send_url, 2, post=True, auth=token, workdir=workdir)[2]
    results["sends_before_rss"] = sent
    results["rss_login_20k_sends_mb"] = api.rss_mb()
    for server in references.values():
        server.stop()

    # Idle cost.
    cpu = api.cpu_seconds()
    time.sleep(30)
    results["idle_cpu_s"] = api.cpu_seconds() - cpu
    api.stop()

    # Lookup does not grow with the spool; listing stays bounded.
    little_ini, little_id = make_spool(
        smsapi, os.path.join(workdir, "little"), user_hash, files=10
    )
    big_ini, big_id = make_spool(
        smsapi, os.path.join(workdir, "big"), user_hash, files=100_000
    )
    little = start_smsapi(lib, little_ini, log_in(workdir))
    big = start_smsapi(lib, big_ini, log_in(workdir))
    for server in (little, big):  # a first start reads sent/ once, in the background
        server.wait_for_log("delivery report index caught up")
    for path in ("status", "sent"):
        medians = {"little": [], "big": []}
        for _ in range(3):
            for name, server, probe in (
                ("little", little, little_id),
                ("big", big, big_id),
            ):
                url = f"{server.url}/api/v1.0/sms/{path}/{probe}"
                medians[name].append(
                    wrk(url, max(2, seconds // 2), 1, auth=token, workdir=workdir)[1]
                )
        results[f"{path}_10_ms"] = min(medians["little"])
        results[f"{path}_100k_ms"] = min(medians["big"])
        results[f"{path}_100k_vs_10"] = (
            results[f"{path}_100k_ms"] / results[f"{path}_10_ms"]
        )
    list_path = "/api/v1.0/sms/sent/?limit=100"
    results["list_100k_ms"] = median_ms(big.url, list_path, token)
    results["list_100k_admin_ms"] = median_ms(big.url, list_path, admin)
    little.stop()
    big.stop()
    results.update(bench_scrape(smsapi, lib, workdir, user_hash))
    results.update(bench_awaiting(smsapi, lib, workdir, user_hash, token))
    results.update(bench_health(smsapi, lib, workdir, user_hash, token))
    results.update(bench_status_page(smsapi, lib, workdir, user_hash))
    results.update(bench_users(smsapi, lib, workdir))
    return results


def log_in(workdir):
    """A fresh log file for one more server."""
    return os.path.join(workdir, f"server-{time.monotonic_ns()}.log")


def bench_startup(lib, ini, workdir, runs=5):
    """Process start to the first answer: smsapi and the bare hello-world, alternating."""
    times = {"smsapi": [], "hello": []}
    for _ in range(runs):
        for name, samples in times.items():
            if name == "smsapi":
                server = start_smsapi(lib, ini, log_in(workdir))
            else:
                server = Server([sys.executable, "-c", HELLO], log_in(workdir))
            samples.append(server.startup * 1000)
            server.stop()
    results = {"startup_ms": statistics.median(times["smsapi"])}
    results["hello_startup_ms"] = statistics.median(times["hello"])
    results["startup_over_hello_ms"] = (
        results["startup_ms"] - results["hello_startup_ms"]
    )
    return results


def bench_scrape(smsapi, lib, workdir, user_hash, count=100_000):
    """/health and /metrics with count messages queued: time, and memory kept."""
    root = os.path.join(workdir, "queued")
    ini, _ = make_spool(smsapi, root, user_hash)
    now = time.time()
    for n in range(count):
        name = smsapi.new_message_id("bench", now - count + n)
        with open(os.path.join(root, "outgoing", name), "w") as file:
            file.write("From: bench\nTo: 79680000000\nAlphabet: UTF-8\n\nhello")
    server = start_smsapi(lib, ini, log_in(workdir))
    time.sleep(1)
    results = {"rss_100k_queued_mb": server.rss_mb()}
    times = {"health": [], "metrics": []}
    for _ in range(3):  # apart by more than a second: each scrape scans anew
        time.sleep(1.1)
        for name, path in (("health", "/api/v1.0/health"), ("metrics", "/metrics")):
            # /health fails (503) with so much queued: the scan is the same
            times[name].append(median_ms(server.url, path, None, 1, expect=(200, 503)))
    results["scrape_health_100k_ms"] = statistics.median(times["health"])
    results["rss_scrape_100k_queued_growth_mb"] = (
        server.rss_mb() - results["rss_100k_queued_mb"]
    )
    server.stop()
    return results


def bench_health(smsapi, lib, workdir, user_hash, token, count=100_000):
    """8. /health with count files in failed/ against an empty spool, each call made anew."""
    servers = {}
    for name, files in (("empty", 0), ("failed", count)):
        root = os.path.join(workdir, "health-" + name)
        ini, _ = make_spool(smsapi, root, user_hash)
        old = time.time() - 2 * 86400  # failures of days past: /health passes
        for n in range(files):
            path = os.path.join(root, "failed", f"GSM1.f{n}")
            with open(path, "w") as file:
                file.write("To: 79680000000\nFail_reason: +CMS ERROR: 500\n\nhello")
            os.utime(path, (old, old))
        servers[name] = start_smsapi(lib, ini, log_in(workdir))
        servers[name].wait_for_log("delivery report index caught up")
    medians = in_turns(servers, "/api/v1.0/health", token)
    results = {f"health_{name}_ms": ms for name, ms in medians.items()}
    results["health_100k_failed_vs_empty"] = medians["failed"] / medians["empty"]
    return results


def in_turns(servers, path, auth):
    """{name: median ms} of six calls to path on each of the servers, in turns
    more than a second apart (/health makes its checks anew); then stop them."""
    times = {name: [] for name in servers}
    for _ in range(6):
        for name, server in servers.items():
            times[name].append(median_ms(server.url, path, auth, 1))
        time.sleep(1.1)
    for server in servers.values():
        server.stop()
    return {name: statistics.median(t) for name, t in times.items()}


def bench_status_page(smsapi, lib, workdir, user_hash, count=100_000):
    """9. The status page with count files in sent/ and as many in failed/,
    against an empty spool: built from indexes, it lists neither directory."""
    admin = "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
    servers = {}
    for name, files in (("empty", 0), ("full", count)):
        root = os.path.join(workdir, "page-" + name)
        ini, _ = make_spool(smsapi, root, user_hash, files=files)
        now = time.time()
        for n in range(files):  # one a second: the last hour's few thousand among them
            path = os.path.join(root, "failed", f"GSM1.f{n}")
            with open(path, "w") as file:
                file.write("To: 79680000000\nFail_reason: +CMS ERROR: 500\n\nhello")
            os.utime(path, (now - files + n, now - files + n))
        servers[name] = start_smsapi(lib, ini, log_in(workdir))
        servers[name].wait_for_log("delivery report index caught up")
    medians = in_turns(servers, "/status", admin)
    results = {f"status_page_{name}_ms": ms for name, ms in medians.items()}
    results["status_page_100k_vs_empty"] = medians["full"] / medians["empty"]
    return results


def bench_awaiting(smsapi, lib, workdir, user_hash, token, count=20_000):
    """7. The watcher's cost with count messages awaiting reports (and count queued)."""
    results, servers = {}, {}
    for name, files in (("empty", 0), ("awaiting", count)):
        root = os.path.join(workdir, name)
        ini, _ = make_spool(smsapi, root, user_hash)
        add_awaiting(smsapi, root, files)
        servers[name] = start_smsapi(lib, ini, log_in(workdir))
        servers[name].wait_for_log("delivery report index caught up")
    time.sleep(2)
    cpu = servers["awaiting"].cpu_seconds()
    time.sleep(10)
    results["idle_cpu_20k_awaiting_s"] = servers["awaiting"].cpu_seconds() - cpu
    body = json.dumps({"mobiles": ["79680000000"], "text": "report me", "report": True})
    medians = {"empty": [], "awaiting": []}
    for _ in range(3):  # alternate, so that noise falls on both alike
        for name, server in servers.items():
            medians[name].append(
                median_ms(
                    server.url, "/api/v1.0/sms/outgoing", token, 50, "POST", body, 201
                )
            )
    results["report_send_empty_ms"] = min(medians["empty"])
    results["report_send_20k_ms"] = min(medians["awaiting"])
    results["report_send_20k_vs_empty"] = (
        results["report_send_20k_ms"] / results["report_send_empty_ms"]
    )
    for server in servers.values():
        server.stop()
    return results


def bench_users(smsapi, lib, workdir, users=10, failures=20):
    """Memory kept after ten more users log in once, and twenty failed logins,
    against after the first login (scrypt takes 16 MiB for each)."""
    root = os.path.join(workdir, "users")
    ini, _ = make_spool(smsapi, root, smsapi.hash_password(PASSWORD))
    with open(ini, "a") as file:
        file.writelines(f"[user:u{n}]\npassword = {smsapi.hash_password(PASSWORD)}\n" for n in range(users))
    api = start_smsapi(lib, ini, log_in(workdir))
    token = "Basic " + base64.b64encode(f"bench:{PASSWORD}".encode()).decode()
    median_ms(api.url, "/api/v1.0/sms/status/x", token, 1, expect=404)
    first = api.rss_mb()
    for n in range(users):
        user = base64.b64encode(f"u{n}:{PASSWORD}".encode()).decode()
        median_ms(api.url, "/api/v1.0/sms/status/x", "Basic " + user, 1, expect=404)
    for n in range(failures):
        wrong = base64.b64encode(f"u{n % users}:wrong".encode()).decode()
        median_ms(api.url, "/api/v1.0/sms/status/x", "Basic " + wrong, 1, expect=(401, 429))
    results = {"rss_one_login_mb": first, "rss_ten_users_mb": api.rss_mb()}
    results["rss_ten_users_growth_mb"] = results["rss_ten_users_mb"] - first
    api.stop()
    return results


def bench_only(part, workdir):
    sys.path.insert(0, HERE)
    import smsapi

    user_hash = smsapi.hash_password(PASSWORD)
    token = "Basic " + base64.b64encode(f"bench:{PASSWORD}".encode()).decode()
    lib = installed(workdir)
    if part == "startup":
        ini, _ = make_spool(smsapi, os.path.join(workdir, "small"), user_hash)
        return bench_startup(lib, ini, workdir)
    if part == "scrape":
        return bench_scrape(smsapi, lib, workdir, user_hash)
    if part == "users":
        return bench_users(smsapi, lib, workdir)
    if part == "status-page":
        return bench_status_page(smsapi, lib, workdir, user_hash)
    measure = {"awaiting": bench_awaiting, "health": bench_health}[part]
    return measure(smsapi, lib, workdir, user_hash, token)


def report(results):
    """The table, target by target."""
    lines = [f"{'figure':<34} {'value':>10}  target", "-" * 60]
    for name, value in results.items():
        target = TARGETS.get(name)
        verdict = ""
        if target:
            op, limit = target
            met = (
                value >= limit
                if op == ">="
                else value <= limit
                if op == "<="
                else value < limit
            )
            verdict = f"{op} {limit:<6} {'ok' if met else 'MISSED'}"
        lines.append(f"{name:<34} {value:>10.3f}  {verdict}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument(
        "--seconds", type=int, default=8, help="length of each wrk run (default 8)"
    )
    parser.add_argument(
        "--only",
        choices=["startup", "scrape", "awaiting", "health", "status-page", "users"],
        help="measure only the start-up, a scrape with 100,000 queued, the watcher"
        " with 20,000 messages awaiting reports, /health with 100,000 failed, the"
        " status page with 100,000 sent and failed, or memory after ten users log in",
    )
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("bench_smsapi.py needs wrk: sudo apt-get install wrk", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="smsapi-bench-")
    try:
        results = (
            bench_only(args.only, workdir)
            if args.only
            else bench(args.seconds, workdir)
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(report(results))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
