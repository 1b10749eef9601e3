"""The web UI in a real browser: Debian's headless Chromium driven by
Playwright (its own browser download does not work here), against a real
broker whose queue a pika client declared.

    WARREN_BIN=target/debug/warren python3 -m pytest -q tests/ui
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pika
import pytest
from playwright.sync_api import expect, sync_playwright


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port):
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nothing listens on %d" % port)


@pytest.fixture(scope="module")
def broker():
    binary = os.environ.get("WARREN_BIN", "target/debug/warren")
    data = tempfile.mkdtemp(prefix="warren-ui-")
    amqp, http = free_port(), free_port()
    log = open(os.path.join(data, "warren.log"), "w")
    process = subprocess.Popen(
        [binary, "--amqp-port", str(amqp), "--http-port", str(http), "--prometheus-port", "0",
         "--bind", "127.0.0.1", "--data-dir", os.path.join(data, "data"), "--log", "warn"],
        stdout=log, stderr=subprocess.STDOUT)
    wait_port(amqp)
    wait_port(http)
    yield amqp, http
    process.terminate()
    process.wait()
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    assert executable, "Debian's chromium is needed (apt-get install chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


def log_in(page, http, password="guest"):
    page.goto("http://127.0.0.1:%d/" % http)
    page.get_by_label("Username").fill("guest")
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()


def test_a_wrong_password_is_refused(broker, browser):
    _, http = broker
    page = browser.new_page()
    log_in(page, http, password="wrong")
    expect(page.get_by_role("alert")).to_contain_text("Login failed")
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    page.close()


def test_a_queue_a_client_declared_is_shown_published_to_peeked_and_deleted(broker, browser):
    amqp, http = broker
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", amqp))
    channel = connection.channel()
    channel.queue_declare("ui-orders", durable=True)
    for i in range(3):
        channel.basic_publish("", "ui-orders", b"order %d" % i)
    page = browser.new_page()
    log_in(page, http)
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    expect(page.locator("#total-queues b")).to_have_text("1")

    page.get_by_role("link", name="Queues").click()
    row = page.locator("#queue-table tr", has_text="ui-orders")
    expect(row).to_contain_text("3")
    row.get_by_role("link", name="ui-orders").click()
    expect(page.locator("#queue-ready")).to_have_text("3")

    page.get_by_label("Payload").fill("hello from the UI")
    page.get_by_role("button", name="Publish message").click()
    expect(page.locator("#queue-ready")).to_have_text("4")
    page.get_by_label("Messages").fill("4")
    page.get_by_role("button", name="Get messages").click()
    expect(page.locator("pre.payload").last).to_have_text("hello from the UI")
    expect(page.locator("pre.payload").first).to_have_text("order 0")
    # A peek puts them back.
    page.reload()
    expect(page.locator("#queue-ready")).to_have_text("4")

    page.get_by_role("button", name="Delete queue").click()
    expect(page.get_by_role("heading", name="Queues")).to_be_visible()
    expect(page.locator("#queue-table")).not_to_contain_text("ui-orders")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as closed:
        channel.queue_declare("ui-orders", passive=True)
    assert closed.value.reply_code == 404
    connection.close()
    page.close()


def test_an_administrator_adds_a_user_who_can_then_log_in(broker, browser):
    _, http = broker
    page = browser.new_page()
    log_in(page, http)
    page.get_by_role("link", name="Admin").click()
    page.locator("#add-user").get_by_label("Name").fill("ui-user")
    page.locator("#add-user").get_by_label("Password").fill("ui-pw")
    page.locator("#add-user").get_by_label("Tags").fill("management")
    page.get_by_role("button", name="Add user").click()
    expect(page.locator("table").first).to_contain_text("ui-user")
    page.get_by_role("button", name="Log out").click()
    page.get_by_label("Username").fill("ui-user")
    page.get_by_label("Password").fill("ui-pw")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    expect(page.locator("#nav-admin")).to_be_hidden()
    page.close()


def test_a_connection_page_shows_the_client_and_its_channels_and_closes_it(broker, browser):
    amqp, http = broker
    params = pika.ConnectionParameters("127.0.0.1", amqp, client_properties={"connection_name": "ui-client"})
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    channel.queue_declare("ui-work", durable=False)
    channel.basic_qos(prefetch_count=5)
    channel.basic_consume("ui-work", lambda *args: None, consumer_tag="ui-worker")
    page = browser.new_page()
    log_in(page, http)
    page.get_by_role("link", name="Connections").click()
    page.locator("table").first.get_by_role("link").first.click()
    expect(page.locator("#client")).to_contain_text("ui-client")
    row = page.locator("table tr", has_text="(1)")
    expect(row).to_contain_text("5")  # the channel's prefetch
    page.get_by_label("Reason").fill("moved by the operator")
    page.get_by_role("button", name="Close connection").click()
    expect(page.get_by_role("heading", name="Connections")).to_be_visible()
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
        for _ in range(50):
            connection.process_data_events(time_limit=0.1)
    assert closed.value.reply_code == 320
    assert "moved by the operator" in closed.value.reply_text
    page.close()


def test_a_policy_added_in_the_page_caps_a_queue_and_is_deleted_again(broker, browser):
    amqp, http = broker
    page = browser.new_page()
    log_in(page, http)
    page.get_by_role("link", name="Policies").click()
    form = page.locator("#add-policy")
    form.get_by_label("Name").fill("ui-cap")
    form.get_by_label("Pattern").fill("^ui-capped$")
    form.get_by_label("Definition (JSON)").fill("not json")
    page.get_by_role("button", name="Add policy").click()
    expect(page.get_by_role("alert")).to_contain_text("not JSON")
    form.get_by_label("Definition (JSON)").fill('{"max-length": 2}')
    page.get_by_role("button", name="Add policy").click()
    expect(page.locator("#policy-table")).to_contain_text("ui-cap")
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", amqp))
    channel = connection.channel()
    channel.queue_declare("ui-capped")
    for i in range(5):
        channel.basic_publish("", "ui-capped", b"m%d" % i)
    page.goto("http://127.0.0.1:%d/#/queues/%%2F/ui-capped" % http)
    expect(page.locator("#queue-ready")).to_have_text("2")
    expect(page.locator("#queue-policy")).to_contain_text("ui-cap")
    page.get_by_role("link", name="Policies").click()
    page.locator("#policy-table tr", has_text="ui-cap").get_by_role("button", name="Delete").click()
    expect(page.locator("#policy-table")).not_to_contain_text("ui-cap")
    channel.queue_delete("ui-capped")
    connection.close()
    page.close()


def test_a_thousand_queues_page_and_sort(broker, browser):
    amqp, http = broker
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", amqp))
    channel = connection.channel()
    for i in range(1000):
        channel.queue_declare("ui-many-%04d" % i)
    channel.basic_publish("", "ui-many-0500", b"deep")
    page = browser.new_page()
    log_in(page, http)
    page.get_by_role("link", name="Queues").click()
    page.get_by_label("Filter by name").fill("ui-many-")
    page.get_by_label("Per page").select_option("500")
    started = time.monotonic()
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#filter")).to_contain_text("1000 of")
    expect(page.locator("#queue-table tbody tr")).to_have_count(500)
    shown = time.monotonic() - started
    page.locator("#queue-table th", has_text="total").click()
    page.locator("#queue-table th", has_text="total").click()
    expect(page.locator("#queue-table tbody tr").first).to_contain_text("ui-many-0500")
    sorted_in = time.monotonic() - started - shown
    print("\n1,000 queues: 500 rows shown in %.0f ms, sorted by depth in %.0f ms" % (shown * 1000, sorted_in * 1000))
    page.get_by_role("button", name="Next").click()
    expect(page.locator("#filter")).to_contain_text("page 2 of 2")
    for i in range(1000):
        channel.queue_delete("ui-many-%04d" % i)
    connection.close()
    page.close()
