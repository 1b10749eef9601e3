#!/usr/bin/env python3
"""Runs the RabbitMQ reference probes against a Warren broker and compares the
answers with RabbitMQ's recorded ones:

- scripts/reference/error_cases.py vs docs/rabbitmq-reference.json: every
  close (scope, reply code, exact text); class/method ids are not compared.
- scripts/reference/queue_features.py vs docs/rabbitmq-queue-features.json:
  everything a client sees in each case (bodies, properties, header values,
  their Python and wire types, top-level header key order, confirms, closes).
- scripts/reference/access_control.py vs docs/rabbitmq-access-control.json:
  logins, permissions, topic permissions, limits and changes made while
  connected, with users and vhosts managed through REF_CTL (`warren ctl
  --data-dir DIR` of the broker under test).

Cases where Warren differs on purpose (docs/rabbitmq-reference.md, "Where
Warren differs on purpose") must differ in exactly the documented way. Exits
non-zero on any other difference.

    REF_PORT=5672 REF_CTL="warren ctl --data-dir DIR" python3 scripts/conformance.py
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def start_probe(script, **env):
    """One reference probe started against REF_PORT; `probe_result` reads it."""
    return script, subprocess.Popen(
        [sys.executable, os.path.join(HERE, "reference", script), "--json"],
        env=dict(os.environ, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def probe_result(started):
    """The JSON output of a started probe, by case name."""
    script, process = started
    try:
        out, err = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        process.kill()
        sys.exit(f"{script} did not finish within 600 s")
    if process.returncode != 0:
        print(err, file=sys.stderr)
        sys.exit(f"{script} failed with {process.returncode}")
    return {e["case"]: e for e in json.loads(out)}


def probe(script, **env):
    return probe_result(start_probe(script, **env))


def recorded(name):
    with open(os.path.join(ROOT, "docs", name)) as f:
        return {e["case"]: e for e in json.load(f)}


# ---------------------------------------------------------------- error cases


def silent(w):
    """No frame: Warren accepted the tune and waits for connection.open until its
    10 s handshake timeout, which races the probe's own 10 s wait."""
    result = w.get("result", "")
    return "no AMQP frame" in result or "nothing received" in result


# case name -> a check of Warren's answer (documented deliberate differences)
DELIBERATE = {
    "basic.qos prefetch_size=1 (non-zero)": lambda w: "TimeoutError" in w.get("result", ""),
    "tune-ok with channel_max=0 (client asks for no limit)": silent,
    "tune-ok with channel_max above server's 2047 (4000)": silent,
    "tune-ok with frame_max=0 (client asks for no limit)": silent,
    "login with wrong password, no authentication_failure_close capability": lambda w: "no AMQP frame" in w.get("result", ""),
    "start-ok with unsupported mechanism (AMQPLAIN-XYZ)": lambda w: "COMMAND_INVALID - unknown authentication mechanism" in w.get("result", ""),
    "tune-ok with frame_max below 4096 (1024)": lambda w: "NOT_ALLOWED - frame_max=1024 < 4096" in w.get("result", ""),
    "tune-ok with frame_max above server's 131072 (262144)": lambda w: "NOT_ALLOWED - frame_max=262144 > 131072" in w.get("result", ""),
    "body frame larger than negotiated frame_max": lambda w: w.get("reply_code") == 501,
    "frame with bad frame-end octet": lambda w: w.get("reply_code") == 501,
}


def comparable(entry):
    return {k: v for k, v in (entry or {}).items() if k not in ("class_id", "method_id", "method")}


def error_cases(started):
    """Prints every difference; returns (cases, failures)."""
    expected = recorded("rabbitmq-reference.json")
    actual = probe_result(started)
    failures = 0
    for case, reference in expected.items():
        if "max size" in json.dumps(reference) and "max_message_size" in case:
            continue
        got = actual.get(case)
        if case in DELIBERATE:
            ok = got is not None and DELIBERATE[case](got)
        else:
            ok = comparable(reference) == comparable(got)
        if not ok:
            failures += 1
            print(f"DIFFERS: {case}\n  rabbitmq: {comparable(reference)}\n  warren:   {comparable(got)}")
    return len(expected), failures


# ------------------------------------------------------------- queue features


def sorted_x_death_keys(value):
    """RabbitMQ writes a new x-death entry as count, reason, queue, time,
    exchange, routing-keys[, original-expiration] (re-encoded entries come
    back sorted); Warren always sorts the keys. Same keys, same values."""
    if isinstance(value, dict):
        return {k: [sorted(keys) for keys in v] if k == "x_death_key_order" else sorted_x_death_keys(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [sorted_x_death_keys(v) for v in value]
    return value


def delivery_limit_on_any_queue(reference):
    """Warren accepts x-delivery-limit on every queue; RabbitMQ 3.10 only on
    quorum queues (406 for a classic queue). The other declares must match."""
    documented = {"arguments": {"x-delivery-limit": 2}, "result": "declare-ok"}
    return dict(reference, declares=[documented if d["arguments"] == documented["arguments"] else d
                                     for d in reference["declares"]])


# Applied to every case: the reference turned into Warren's documented answer.
DELIBERATE_EVERYWHERE = sorted_x_death_keys

# case name -> the reference turned into Warren's documented answer. Warren has
# no separate quorum queue type but accepts x-queue-type=quorum, and its
# x-delivery-limit (x-delivery-count 0, 1, 2, then dead-lettered with reason
# delivery_limit) answers the quorum case as RabbitMQ does: no entry needed.
DELIBERATE_QUEUE_FEATURES = {
    "queue.declare argument errors": delivery_limit_on_any_queue,
}


MISSING = "<missing>"


def differences(expected, got, path=""):
    """(path, expected, got) for every leaf that differs. Dicts compare by
    keys (their order is recorded separately where it matters), lists by
    position."""
    if isinstance(expected, dict) and isinstance(got, dict):
        for key in list(expected) + [k for k in got if k not in expected]:
            yield from differences(expected.get(key, MISSING), got.get(key, MISSING), f"{path}/{key}")
    elif isinstance(expected, list) and isinstance(got, list) and len(expected) == len(got):
        for i, (e, g) in enumerate(zip(expected, got)):
            yield from differences(e, g, f"{path}/{i}")
    elif expected != got or type(expected) is not type(got):
        yield path, expected, got


def queue_features():
    """Prints every difference; returns (cases, failures)."""
    expected = recorded("rabbitmq-queue-features.json")
    actual = probe("queue_features.py")

    def documented(case, reference):
        reference = DELIBERATE_EVERYWHERE(reference)
        if case in DELIBERATE_QUEUE_FEATURES:
            reference = DELIBERATE_QUEUE_FEATURES[case](reference)
        return reference

    return compare_all(expected, actual, documented)


def compare_all(expected, actual, documented=lambda _case, reference: reference):
    """Compares every recorded case (turned into Warren's documented answer
    by `documented`) with Warren's, printing each difference; returns
    (cases, failures)."""
    failures = 0
    for case, reference in expected.items():
        diffs = list(differences(documented(case, reference), actual.get(case)))
        if diffs:
            failures += 1
            print(f"DIFFERS: {case}")
            for path, want, got in diffs:
                print(f"  {path or '/'}\n    expected: {json.dumps(want)}\n    warren:   {json.dumps(got)}")
    return len(expected), failures


# ------------------------------------------------------------ access control


def access_control():
    """Users, permissions, topic permissions, vhost and user limits, changes
    while connected: every case field for field. Needs REF_CTL (a `warren
    ctl --data-dir DIR` for the broker under test); skipped without it."""
    if not os.environ.get("REF_CTL"):
        print("conformance (access control): skipped, REF_CTL is not set")
        return 0, 0
    expected = recorded("rabbitmq-access-control.json")
    actual = probe("access_control.py", REF_CTL_SETTLE=os.environ.get("REF_CTL_SETTLE", "0.4"))
    return compare_all(expected, actual)


def main():
    # The error-case probe spends most of its time waiting out silences (see
    # `silent`), on its own connections and names: it runs beside the others.
    started = start_probe("error_cases.py", REF_SET_LIMIT="0")
    total = 0
    failed = 0
    for name, compare in (("queue features", queue_features), ("access control", access_control),
                          ("error cases", lambda: error_cases(started))):
        cases, failures = compare()
        print(f"conformance ({name}): {cases - failures} passed, {failures} failed")
        total += cases
        failed += failures
    print(f"conformance: {total - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
