"""AMQPS end to end through pika: certificates made with the openssl command
line for this run (a CA, a server certificate for 127.0.0.1 and a client
certificate whose common name is a Warren user), a broker
(WARREN_BIN, else target/{release,debug}/warren) with a `[tls]` section.

- PLAIN over TLS, without a client certificate;
- EXTERNAL with a client certificate logs in as its common name (proved by
  publishing with that user_id, which the broker checks);
- EXTERNAL without a client certificate is refused;
- a client that does not trust the server's CA fails the handshake, and a
  plain AMQP client on the TLS port gets nothing, while the broker serves
  everyone else.
"""

import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time

import pika
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "overload"))
import overload  # noqa: E402  (broker binary lookup and free ports)


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(directory):
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=warren-test-ca",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=directory)
    # X.509 v3 with the usual extensions: webpki refuses v1 certificates.
    extensions = {
        "server": "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        "client": "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    }
    for name, text in extensions.items():
        with open(os.path.join(directory, name + ".ext"), "w") as f:
            f.write(text)
    for name, cn in (("server", "localhost"), ("client", "tlsuser")):
        ext = ["-extfile", name + ".ext"]
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=" + cn,
                "-keyout", name + ".key", "-out", name + ".csr", cwd=directory)
        openssl("x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-out", name + ".pem", *ext, cwd=directory)


@pytest.fixture(scope="module")
def broker():
    directory = tempfile.mkdtemp(prefix="warren-tls-")
    make_certificates(directory)
    port, tls_port, https_port = overload.free_port(), overload.free_port(), overload.free_port()
    data = os.path.join(directory, "data")
    config = os.path.join(directory, "warren.toml")
    with open(config, "w") as f:
        f.write('amqp_port = %d\nhttp_port = 0\nprometheus_port = 0\nbind = ["127.0.0.1"]\ndata_dir = "%s"\n'
                '[tls]\nport = %d\nhttps_port = %d\ncert_file = "%s/server.pem"\nkey_file = "%s/server.key"\n'
                'ca_file = "%s/ca.pem"\nverify_peer = true\n'
                % (port, data, tls_port, https_port, directory, directory, directory))
    warren = overload.find_broker()
    for args in (["add_user", "tlsuser", "unused-password"], ["set_permissions", "tlsuser", ".*", ".*", ".*"]):
        subprocess.run([warren, "ctl", "--data-dir", data, *args], check=True, capture_output=True)
    log = open(os.path.join(directory, "warren.log"), "w")
    process = subprocess.Popen([warren, "--config", config], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", tls_port), 1).close()
            break
        except OSError:
            assert time.time() < deadline and process.poll() is None, open(log.name).read()
            time.sleep(0.05)
    yield {"dir": directory, "port": port, "tls_port": tls_port, "https_port": https_port}
    process.terminate()
    process.wait(20)
    log.close()
    shutil.rmtree(directory, ignore_errors=True)


def context(broker, client_cert=True, trust=True):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if trust:
        ctx.load_verify_locations(os.path.join(broker["dir"], "ca.pem"))
    else:
        ctx.load_default_certs()
    if client_cert:
        ctx.load_cert_chain(os.path.join(broker["dir"], "client.pem"), os.path.join(broker["dir"], "client.key"))
    return ctx


def params(broker, ctx, credentials):
    return pika.ConnectionParameters("127.0.0.1", broker["tls_port"], credentials=credentials,
                                     ssl_options=pika.SSLOptions(ctx, "localhost"))


def test_plain_login_over_tls(broker):
    conn = pika.BlockingConnection(params(broker, context(broker, client_cert=False),
                                          pika.PlainCredentials("guest", "guest")))
    ch = conn.channel()
    ch.queue_declare("tls-plain")
    ch.basic_publish("", "tls-plain", b"secret")
    _method, _props, body = ch.basic_get("tls-plain", auto_ack=True)
    assert body == b"secret"
    version = conn._impl._transport._sock.version()  # the negotiated protocol
    assert version in ("TLSv1.2", "TLSv1.3"), version
    conn.close()


def test_external_login_is_the_certificate_common_name(broker):
    conn = pika.BlockingConnection(params(broker, context(broker), pika.credentials.ExternalCredentials()))
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare("tls-external")
    # The broker refuses a user_id other than the logged-in user (406).
    ch.basic_publish("", "tls-external", b"x", pika.BasicProperties(user_id="tlsuser"))
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        ch.basic_publish("", "tls-external", b"x", pika.BasicProperties(user_id="guest"))
    assert refused.value.reply_code == 406
    conn.close()


def test_external_without_a_certificate_is_refused(broker):
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(params(broker, context(broker, client_cert=False),
                                       pika.credentials.ExternalCredentials()))


def test_untrusted_and_plaintext_clients_fail_and_others_carry_on(broker):
    with pytest.raises((pika.exceptions.AMQPConnectionError, ssl.SSLError)):
        pika.BlockingConnection(params(broker, context(broker, trust=False), pika.PlainCredentials("guest", "guest")))
    raw = socket.create_connection(("127.0.0.1", broker["tls_port"]), 2)
    raw.sendall(b"AMQP\x00\x00\x09\x01")
    raw.settimeout(3)
    try:
        answer = raw.recv(8)
    except (socket.timeout, ConnectionResetError):
        answer = b""
    assert not answer.startswith(b"\x01"), "no AMQP frame on the TLS port for a plaintext client"
    raw.close()
    plain = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", broker["port"]))
    plain.channel().queue_declare("after-tls-failures")
    plain.close()


def test_the_management_api_over_https_with_the_brokers_certificate(broker):
    import base64
    import json
    import urllib.error
    import urllib.request
    context = ssl.create_default_context(cafile=os.path.join(broker["dir"], "ca.pem"))
    context.check_hostname = False
    request = urllib.request.Request("https://127.0.0.1:%d/api/whoami" % broker["https_port"])
    request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        assert json.loads(response.read())["name"] == "guest"
    # A client that does not trust the certificate gets no answer.
    with pytest.raises(urllib.error.URLError) as refused:
        urllib.request.urlopen(request, context=ssl.create_default_context(), timeout=10)
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)
