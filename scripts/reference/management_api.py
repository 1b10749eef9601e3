#!/usr/bin/env python3
"""The management API's answers, as shapes: for a fixed set of calls, the
status code and every JSON field's name and type (recursively; a list by
its first item). Recorded against RabbitMQ 3.10.8's management plugin into
docs/rabbitmq-management-api.json, then checked against Warren: every field
RabbitMQ gives must be there with the same type, and every status the same.

    # record (RabbitMQ: scripts/rabbitmq.sh with RABBITMQ_PLUGINS=rabbitmq_management)
    scripts/reference/management_api.py --http 15673 --amqp 5673 --record docs/rabbitmq-management-api.json
    # check Warren
    scripts/reference/management_api.py --http 15672 --amqp 5672 --check docs/rabbitmq-management-api.json

The broker needs user guest/guest (administrator) on vhost /. The calls
declare `mgmt-ref-*` objects and delete them at the end.
"""

import argparse
import base64
import json
import sys
import urllib.error
import urllib.request

import pika

AUTH = "Basic " + base64.b64encode(b"guest:guest").decode()

# Fields whose value is an object keyed by data (names, nodes), not by
# field names: compared as "an object", not key by key.
OPAQUE = {"arguments", "client_properties", "capabilities", "cluster_state", "exchange_types",
          "socket_opts", "limits", "headers", "properties", "effective_policy_definition",
          "backing_queue_status", "garbage_collection", "metadata", "definition", "value",
          "sample_retention_policies", "applications", "contexts", "auth_mechanisms",
          "cluster_tags", "node_tags", "churn_rates"}


def call(http, method, path, body=None, auth=True, raw=None):
    data = json.dumps(body).encode() if body is not None else raw
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (http, path), data=data, method=method)
    if auth:
        req.add_header("Authorization", AUTH)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def kind(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object"


def shape(value, name=""):
    """A JSON value's shape: types, with objects' fields and lists' first item."""
    if isinstance(value, dict) and name not in OPAQUE:
        return {key: shape(item, key) for key, item in value.items()}
    if isinstance(value, list) and value and name not in OPAQUE:
        return [shape(value[0], name)]
    return kind(value)


def calls(http, amqp):
    """(label, status, body) for each call, with the objects they need."""
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", amqp))
    channel = connection.channel()
    consumer = connection.channel()
    out = []

    def record(label, method, path, body=None, auth=True, raw=None):
        status, raw = call(http, method, path, body, auth, raw)
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        out.append((label, status, parsed))
        return parsed

    try:
        record("declare queue", "PUT", "/api/queues/%2F/mgmt-ref-q",
               {"durable": True, "auto_delete": False, "arguments": {"x-max-length": 100}})
        record("declare exchange", "PUT", "/api/exchanges/%2F/mgmt-ref-x", {"type": "topic", "durable": True})
        record("bind", "POST", "/api/bindings/%2F/e/mgmt-ref-x/q/mgmt-ref-q", {"routing_key": "k.#"})
        record("publish", "POST", "/api/exchanges/%2F/mgmt-ref-x/publish",
               {"properties": {"delivery_mode": 2, "headers": {"h": 1}}, "routing_key": "k.1",
                "payload": "hello", "payload_encoding": "string"})
        consumer.basic_qos(prefetch_count=1)
        consumer.queue_declare("mgmt-ref-work", durable=False)
        channel.basic_publish("", "mgmt-ref-work", b"job")
        consumer.basic_consume("mgmt-ref-work", lambda *a: None, consumer_tag="mgmt-ref-consumer")
        connection.process_data_events(time_limit=0.5)
        record("get (peek)", "POST", "/api/queues/%2F/mgmt-ref-q/get",
               {"count": 1, "ackmode": "ack_requeue_true", "encoding": "auto", "truncate": 50000})
        for label, path in [
            ("overview", "/api/overview"),
            ("whoami", "/api/whoami"),
            ("nodes", "/api/nodes"),
            ("vhosts", "/api/vhosts"),
            ("vhost", "/api/vhosts/%2F"),
            ("queues", "/api/queues"),
            ("queue", "/api/queues/%2F/mgmt-ref-q"),
            ("queues page", "/api/queues/%2F?page=1&page_size=10&name=mgmt-ref&sort=name"),
            ("queue bindings", "/api/queues/%2F/mgmt-ref-q/bindings"),
            ("exchange", "/api/exchanges/%2F/mgmt-ref-x"),
            ("exchange source bindings", "/api/exchanges/%2F/mgmt-ref-x/bindings/source"),
            ("bindings between", "/api/bindings/%2F/e/mgmt-ref-x/q/mgmt-ref-q"),
            ("connections", "/api/connections"),
            ("channels", "/api/channels"),
            ("consumers", "/api/consumers"),
            ("users", "/api/users"),
            ("user", "/api/users/guest"),
            ("permissions", "/api/permissions"),
            ("permission", "/api/permissions/%2F/guest"),
            ("alarms check", "/api/health/checks/alarms"),
            ("port listener check", "/api/health/checks/port-listener/%d" % amqp),
            ("missing queue", "/api/queues/%2F/mgmt-ref-missing"),
            ("missing vhost", "/api/queues/mgmt-ref-nowhere"),
        ]:
            record(label, "GET", path)
        record("no credentials", "GET", "/api/overview", auth=False)
        record("inequivalent redeclare", "PUT", "/api/queues/%2F/mgmt-ref-q", {"durable": False})
        record("reserved name", "PUT", "/api/queues/%2F/amq.mgmt-ref", {"durable": True})
        record("delete binding", "DELETE", "/api/bindings/%2F/e/mgmt-ref-x/q/mgmt-ref-q/k.%23")
        record("purge", "DELETE", "/api/queues/%2F/mgmt-ref-q/contents")
        record("delete missing queue", "DELETE", "/api/queues/%2F/mgmt-ref-missing")
        record("delete missing exchange", "DELETE", "/api/exchanges/%2F/mgmt-ref-missing")
        record("malformed JSON", "PUT", "/api/queues/%2F/mgmt-ref-bad", raw=b"{not json")
        # Runtime parameters in a virtual host of their own.
        vh = "/api/%s/mgmt-ref-vh"
        record("create vhost", "PUT", vh % "vhosts")
        record("creator's permission", "GET", vh % "permissions" + "/guest")
        record("set policy", "PUT", vh % "policies" + "/mgmt-ref-p",
               {"pattern": "^q", "definition": {"max-length": 5}, "apply-to": "queues", "priority": 1})
        record("policy", "GET", vh % "policies" + "/mgmt-ref-p")
        record("policies", "GET", vh % "policies")
        record("unknown policy key", "PUT", vh % "policies" + "/mgmt-ref-bad",
               {"pattern": ".", "definition": {"max-lenght": 1}})
        record("set vhost limit", "PUT", vh % "vhost-limits" + "/max-queues", {"value": 10})
        record("vhost limits", "GET", vh % "vhost-limits")
        record("set topic permission", "PUT", vh % "topic-permissions" + "/guest",
               {"exchange": "amq.topic", "write": "^a", "read": ".*"})
        record("topic permission", "GET", vh % "topic-permissions" + "/guest")
        record("vhost definitions", "GET", vh % "definitions")
        record("delete policy", "DELETE", vh % "policies" + "/mgmt-ref-p")
        record("delete missing policy", "DELETE", vh % "policies" + "/mgmt-ref-p")
        record("delete vhost limit", "DELETE", vh % "vhost-limits" + "/max-queues")
        record("delete vhost", "DELETE", vh % "vhosts")
    finally:
        call(http, "DELETE", "/api/vhosts/mgmt-ref-vh")
        call(http, "DELETE", "/api/queues/%2F/mgmt-ref-q")
        call(http, "DELETE", "/api/queues/%2F/mgmt-ref-work")
        call(http, "DELETE", "/api/exchanges/%2F/mgmt-ref-x")
        connection.close()
    return out


# Fields of RabbitMQ's answers Warren leaves out on purpose, with why.
KNOWN_ABSENT = {
    "Erlang VM internals Warren has no counterpart of": [
        "context_switches", "context_switches_details", "gc_bytes_reclaimed", "gc_bytes_reclaimed_details",
        "gc_num", "gc_num_details", "metrics_gc_queue_length", "net_ticktime", "ra_open_file_metrics",
        "mnesia_disk_tx_count", "mnesia_disk_tx_count_details", "mnesia_ram_tx_count",
        "mnesia_ram_tx_count_details", "reductions", "reductions_details", "garbage_collection",
    ],
    "RabbitMQ's message store and queue index (Warren has one log)": [
        "msg_store_read_count", "msg_store_read_count_details", "msg_store_write_count",
        "msg_store_write_count_details", "queue_index_read_count", "queue_index_read_count_details",
        "queue_index_write_count", "queue_index_write_count_details", "backing_queue_status",
    ],
    "publisher counters Warren keeps per node (the overview has them), not per virtual host": [
        "confirm", "confirm_details", "return_unroutable", "return_unroutable_details",
    ],
    "not counted yet (churn and I/O counters)": [
        "io_read_avg_time", "io_read_avg_time_details", "io_read_bytes", "io_read_bytes_details",
        "io_read_count", "io_read_count_details", "io_reopen_count", "io_reopen_count_details",
        "io_seek_avg_time", "io_seek_avg_time_details", "io_seek_count", "io_seek_count_details",
        "io_sync_avg_time", "io_sync_avg_time_details", "io_sync_count", "io_sync_count_details",
        "io_write_avg_time", "io_write_avg_time_details", "io_write_bytes", "io_write_bytes_details",
        "io_write_count", "io_write_count_details", "channel_closed", "channel_closed_details",
        "channel_created", "channel_created_details", "connection_closed", "connection_closed_details",
        "connection_created", "connection_created_details", "queue_created", "queue_created_details",
        "queue_declared", "queue_declared_details", "queue_deleted", "queue_deleted_details",
        "disk_reads", "disk_reads_details", "disk_writes", "disk_writes_details",
    ],
}
ABSENT = {field for fields in KNOWN_ABSENT.values() for field in fields}


def differences(reference, actual, path):
    """What the reference shape has that the actual one lacks or types differently."""
    found = []
    if isinstance(reference, dict):
        if not isinstance(actual, dict):
            return ["%s: an object in RabbitMQ, %s here" % (path, actual)]
        for key, ref in reference.items():
            if key not in actual:
                if key not in ABSENT:
                    found.append("%s.%s: missing" % (path, key))
            else:
                found.extend(differences(ref, actual[key], "%s.%s" % (path, key)))
    elif isinstance(reference, list):
        if isinstance(actual, list) and actual:
            found.extend(differences(reference[0], actual[0], path + "[]"))
        elif actual != "list" and not isinstance(actual, list):
            found.append("%s: a list in RabbitMQ, %s here" % (path, actual))
    elif reference != actual and "null" not in (reference, actual):
        # A null on either side (no value yet) says nothing of the type.
        if not (isinstance(actual, (dict, list)) and reference in ("object", "list")):
            found.append("%s: %s in RabbitMQ, %s here" % (path, reference, actual))
    return found


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", type=int, required=True)
    parser.add_argument("--amqp", type=int, required=True)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--record")
    group.add_argument("--check")
    args = parser.parse_args()
    answers = {label: {"status": status, "shape": shape(body)} for label, status, body in calls(args.http, args.amqp)}
    if args.record:
        with open(args.record, "w") as f:
            json.dump(answers, f, indent=1, sort_keys=True)
            f.write("\n")
        print("recorded %d calls" % len(answers))
        return 0
    with open(args.check) as f:
        reference = json.load(f)
    failures = 0
    for label, ref in sorted(reference.items()):
        mine = answers.get(label)
        problems = []
        if mine is None:
            problems.append("not called")
        else:
            if mine["status"] != ref["status"]:
                problems.append("status %d, RabbitMQ %d" % (mine["status"], ref["status"]))
            problems.extend(differences(ref["shape"], mine["shape"], "body"))
        if problems:
            failures += 1
            print("FAIL %s:\n  %s" % (label, "\n  ".join(problems)))
        else:
            print("ok   %s" % label)
    print("management API: %d of %d calls answer as RabbitMQ's" % (len(reference) - failures, len(reference)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
