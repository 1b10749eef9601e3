#!/usr/bin/env python3
"""Runs the RabbitMQ reference probes against a Warren broker and compares the
answers with RabbitMQ's recorded ones:

- scripts/reference/error_cases.py vs docs/rabbitmq-reference.json: every
  close (scope, reply code, exact text); class/method ids are not compared.
- scripts/reference/queue_features.py vs docs/rabbitmq-queue-features.json:
  everything a client sees in each case (bodies, properties, header values,
  their Python and wire types, top-level header key order, confirms, closes).
- scripts/reference/streams.py vs docs/rabbitmq-streams.json: stream queues
  (declare rules and arguments, offsets, credit, refusals, retention).
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


# ------------------------------------------------------------------- streams

OFFSET = "x-stream-offset"


def header_order_sorted(value, offset_must_be_last):
    """Every `header_order` with the publisher's keys sorted and the offset
    last: RabbitMQ re-encodes headers sorted by key, Warren keeps the
    publisher's bytes and appends x-stream-offset (a Warren order with the
    offset anywhere else is left as it is, and then differs)."""
    if isinstance(value, dict):
        return {k: (header_order_sorted(v, offset_must_be_last) if k != "header_order" else
                    sort_keys_offset_last(v, offset_must_be_last)) for k, v in value.items()}
    if isinstance(value, list):
        return [header_order_sorted(v, offset_must_be_last) for v in value]
    return value


def sort_keys_offset_last(order, offset_must_be_last):
    if not isinstance(order, list) or OFFSET not in order:
        return order
    if offset_must_be_last and order[-1] != OFFSET:
        return order
    return sorted(k for k in order if k != OFFSET) + [OFFSET]


def refused(closed, code, text):
    return {"closed": closed, "reply_code": code, "reply_text": text}


def bad_max_age(reference, _actual):
    """RabbitMQ 3.10 fails with 541 INTERNAL_ERROR (closing the
    connection) on x-max-age "abc" and "-1h"; Warren refuses them as it
    refuses "7d": 406 invalid_max_age."""
    declares = []
    for d in reference["declares"]:
        if d.get("reply_code") == 541:
            d = dict(d, **refused("channel", 406, "PRECONDITION_FAILED - invalid arg 'x-max-age' for queue "
                                  "'st-decl' in vhost '/': invalid_max_age"))
        declares.append(d)
    return dict(reference, declares=declares)


def bad_offset(term):
    """RabbitMQ 3.10 fails with 541 INTERNAL_ERROR on x-stream-offset
    values it cannot read ('bad', 'FIRST', '', a decimal, a boolean);
    Warren answers them as RabbitMQ answers '7d': 406 naming the value."""
    def documented(reference, _actual):
        return dict(reference, **refused("channel", 406, "PRECONDITION_FAILED - invalid arg 'x-stream-offset' "
                                         "for queue 'st-offset' in vhost '/': {invalid_stream_offset_arg,%s}" % term))
    return documented


def exclusive_enforced(reference, _actual):
    """RabbitMQ 3.10 accepts a second consumer beside an exclusive one on
    a stream; Warren refuses it as on any queue."""
    return dict(reference, after=refused("channel", 403, "ACCESS_REFUSED - queue 'st-exclusive' in vhost '/' "
                                         "in exclusive use"))


def recover_refused(reference, _actual):
    """basic.recover on a channel holding stream deliveries: RabbitMQ 3.10
    fails with 541 INTERNAL_ERROR; Warren refuses it with 540, as it
    refuses nack and reject there."""
    return dict(reference, reply_code=540, reply_text="NOT_IMPLEMENTED - basic.recover not supported by stream "
                "queues queue 'st-settle' in vhost '/'")


def real_consumer_count(reference, _actual):
    """RabbitMQ 3.10 reports 0 consumers on a stream; Warren counts them."""
    key = "passive_declare_with_a_consumer_holding_5_unacked"
    counted = dict(reference[key], **{"consumer_count (at once, after 1.5 s)": [1, 1]})
    return dict(reference, **{key: counted})


def if_unused_kept(reference, _actual):
    """queue.delete if_unused on a stream with a consumer: RabbitMQ 3.10
    deletes it anyway; Warren refuses, as on any queue (the consumer keeps
    reading)."""
    return dict(reference, **{
        "if_unused with a consumer": refused("channel", 406, "PRECONDITION_FAILED - queue 'st-if-unused' in "
                                             "vhost '/' in use"),
        "consumer after it": {"cancel_received": [], "channel_open": True},
        "passive after if_unused": {"result": "declare-ok", "message_count": 10, "consumer_count": 1},
    })


def exact_filters(reference, _actual):
    """RabbitMQ 3.10 has no stream filtering (3.13 added it, with a Bloom
    filter per chunk and matching left to the client); Warren filters
    exactly: a consumer gets the messages whose x-stream-filter-value is
    one of its values, and, with x-stream-match-unfiltered, those without."""
    wanted = {"x-stream-filter 'a'": ({"a"}, False), "x-stream-filter ['a','b']": ({"a", "b"}, False),
              "x-stream-filter 'a' + x-stream-match-unfiltered true": ({"a"}, True)}
    documented = dict(reference)
    for key, (values, unfiltered) in wanted.items():
        got = reference[key]
        keep = [i for i, h in enumerate(got["other_headers"])
                if h.get("x-stream-filter-value") in values or (unfiltered and "x-stream-filter-value" not in h)]
        documented[key] = dict(got, **{field: [got[field][i] for i in keep]
                                       for field in ("bodies", "offsets", "other_headers")})
    return documented


def retention_by_segments(reference, actual):
    """Both keep whole newest segments within x-max-length-bytes, so how
    many survive depends on each one's segment layout (RabbitMQ also spends
    offsets on chunks that are not messages). Warren's answer must be: the
    newest n of the published, 0 < n and n x 500 bytes within the limit
    plus one segment, offsets contiguous to the last, and the passive
    declare counting exactly them."""
    n = (actual or {}).get("received", 0)
    if not 0 < n <= (10000 + 2000) // 500:
        return reference
    published = reference["published"]
    prefixes = ["%03d" % i for i in range(published - n, published)]
    return dict(reference, received=n, bodies_prefixes=prefixes, offsets=list(range(published - n, published)),
                first_offset=published - n, last_offset=published - 1, first_body_prefix=prefixes[0] + "-",
                contiguous=True, passive_declare_message_count=n)


DELIBERATE_STREAMS = {
    "stream declare arguments: retention and segment size": bad_max_age,
    "stream consume: exclusive consumer, then a second consumer": exclusive_enforced,
    "stream offsets: 'FIRST' (wrong case) on 10 messages published one by one": bad_offset('{longstr,<<"FIRST">>}'),
    "stream offsets: 'bad' on 10 messages published one by one": bad_offset('{longstr,<<"bad">>}'),
    "stream offsets: empty string on 10 messages published one by one": bad_offset('{longstr,<<"">>}'),
    "stream offsets: decimal 1.5 (AMQP 'D'; pika cannot send a float) on 10 messages published one by one":
        bad_offset("{decimal,{1,15}}"),
    "stream offsets: boolean true on 10 messages published one by one": bad_offset("{bool,true}"),
    "stream acks: basic.recover requeue=true": recover_refused,
    "stream: queue.purge and passive declare (12 messages, then a consumer)": real_consumer_count,
    "stream: queue.delete if_empty, if_unused (with a consumer), plain": if_unused_kept,
    "stream filtering: x-stream-filter-value on publish, x-stream-filter on consume": exact_filters,
    "stream retention: x-max-length-bytes=10000, segments of 2000 bytes, 100 x 500 bytes": retention_by_segments,
}


def streams(started):
    """Stream queues, every case field for field (header key order compared
    as documented in `header_order_sorted`)."""
    expected = recorded("rabbitmq-streams.json")
    actual = {case: header_order_sorted(got, True) for case, got in probe_result(started).items()}

    def documented(case, reference):
        reference = header_order_sorted(reference, False)
        if case in DELIBERATE_STREAMS:
            reference = DELIBERATE_STREAMS[case](reference, actual.get(case))
        return reference

    return compare_all(expected, actual, documented)


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
    # So does the stream probe (waiting for deliveries that must not come).
    streams_started = start_probe("streams.py", REF_STREAM_COLLECT="0.3", REF_STREAM_SETTLE="0.3")
    total = 0
    failed = 0
    for name, compare in (("queue features", queue_features), ("streams", lambda: streams(streams_started)),
                          ("access control", access_control),
                          ("error cases", lambda: error_cases(started))):
        cases, failures = compare()
        print(f"conformance ({name}): {cases - failures} passed, {failures} failed")
        total += cases
        failed += failures
    print(f"conformance: {total - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
