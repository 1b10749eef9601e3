"""What the examples need from this checkout: the Warren binaries (built with
cargo when missing or older than the sources, cargo's progress shown), and a
broker to talk to (a throwaway one when nothing listens at the local default
address).

    binaries({"warren": "WARREN_BIN"}) -> {"warren": path}
    with broker(url) as url: ...
"""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlparse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where each binary's sources are: the workspace's crates, and the cart.
SOURCES = ("crates", os.path.join("examples", "shop", "cart"), "Cargo.toml", "Cargo.lock")
PACKAGES = {"warren": "warren", "shop-cart": "shop-cart"}


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def newest_source():
    """The newest modification time of any file a binary is built from."""
    newest = 0.0
    for source in SOURCES:
        path = os.path.join(ROOT, source)
        if os.path.isfile(path):
            newest = max(newest, os.path.getmtime(path))
            continue
        for folder, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if d not in ("target", "tests", "benches")]
            for name in files:
                if name.endswith(".rs") or name == "Cargo.toml":
                    newest = max(newest, os.path.getmtime(os.path.join(folder, name)))
    return newest


def binaries(wanted):
    """Paths of the binaries in `wanted` (name -> environment variable that
    may name a prebuilt one). A binary not given by its variable is taken
    from target/release, else target/debug, if it is newer than every
    source; otherwise all such binaries are built in release mode at once."""
    found, stale = {}, []
    newest = None
    for name, variable in wanted.items():
        given = os.environ.get(variable) if variable else None
        if given:
            if not os.path.isfile(given):
                raise SystemExit("%s=%s: no such file" % (variable, given))
            found[name] = given
            continue
        if newest is None:
            newest = newest_source()
        for build in ("release", "debug"):
            candidate = os.path.join(ROOT, "target", build, name)
            if os.path.isfile(candidate) and os.path.getmtime(candidate) >= newest:
                found[name] = candidate
                break
        else:
            stale.append(name)
    if stale:
        if shutil.which("cargo") is None:
            raise SystemExit("cargo is needed to build %s (https://rustup.rs)" % ", ".join(stale))
        command = ["cargo", "build", "--release"]
        for name in stale:
            command += ["-p", PACKAGES[name]]
        say("building %s: %s (the first build takes a few minutes)" % (", ".join(stale), " ".join(command)))
        subprocess.run(command, cwd=ROOT, check=True)
        for name in stale:
            found[name] = os.path.join(ROOT, "target", "release", name)
    return found


def listening(host, port, timeout=1.0):
    try:
        with socket.create_connection((host, port), timeout):
            return True
    except OSError:
        return False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def broker(url):
    """Yields the URL to use. When `url` names this machine and nothing
    listens there, a Warren broker from this checkout is started on a free
    port with a temporary data folder for the duration, and its URL is
    yielded instead; any other URL is used as it is."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "localhost", parsed.port or 5672
    if host not in ("localhost", "127.0.0.1", "::1") or listening(host, port):
        yield url
        return
    warren = binaries({"warren": "WARREN_BIN"})["warren"]
    port = free_port()
    data = tempfile.mkdtemp(prefix="warren-example-")
    say("no broker at %s:%d: starting %s on port %d for this example"
        % (host, parsed.port or 5672, os.path.relpath(warren, os.getcwd()), port))
    process = subprocess.Popen(
        [warren, "--amqp-port", str(port), "--http-port", "0", "--prometheus-port", "0", "--bind", "127.0.0.1", "--data-dir", data, "--log", "warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not listening("127.0.0.1", port, 0.2):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the broker did not start (%s)" % warren)
            time.sleep(0.05)
        user = parsed.username or "guest"
        password = parsed.password or "guest"
        yield "amqp://%s:%s@127.0.0.1:%d%s" % (user, password, port, parsed.path or "/%2F")
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(data, ignore_errors=True)


def run_example(main, default_url):
    """Runs an example's `main(argv)` (which returns {"ok": …, …}) with
    this process's arguments, its `--url` (or `default_url`) replaced by
    the broker `broker` finds or starts. Returns whether it held."""
    argv, url = [], default_url
    args = iter(sys.argv[1:])
    for arg in args:
        if arg == "--url":
            url = next(args, url)
        elif arg.startswith("--url="):
            url = arg[len("--url="):]
        else:
            argv.append(arg)
    with broker(url) as url:
        return bool(main(argv + ["--url", url])["ok"])
