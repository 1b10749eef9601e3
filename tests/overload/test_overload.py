"""Resource alarms end to end through pika, each against its own broker
(WARREN_BIN, else target/{release,debug}/warren).

- publishers at ten times the consumer's rate for 15 s under a 128 MiB
  memory watermark (tests/overload/overload.py runs the same for minutes):
  half persistent into a durable queue, or all transient into a non-durable
  one, the spike is paged to disk (RSS under the watermark, publishers not
  blocked, nothing lost); with no prefetch limit the unacknowledged
  deliveries pile up in memory and the alarm blocks and unblocks them.
- test_disk_alarm...: a disk free limit above any disk's size raises the disk
  alarm at start; a publisher is blocked after its first publish, and a
  consumer on another connection is served throughout.
"""

import os
import sys
import threading

import pika

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overload  # noqa: E402


def test_a_spike_of_persistent_and_transient_messages_is_paged_not_blocked():
    result = overload.run(seconds=15, watermark_mb=128, publishers=4, body_kib=16, margin=0.10)
    print(result)
    assert all(result["checks"].values()), result


def test_a_transient_spike_into_a_non_durable_queue_is_paged_not_blocked():
    result = overload.run(seconds=15, watermark_mb=128, publishers=4, body_kib=16, margin=0.10, transient=True)
    print(result)
    assert all(result["checks"].values()), result
    # More than the watermark went through the queue without the alarm.
    assert result["confirmed"] * result["body_bytes"] > 128 * 1024 * 1024, result


def test_unacknowledged_deliveries_no_paging_can_take_raise_the_memory_alarm():
    # No prefetch limit and a slow consumer: deliveries pile up in the
    # broker, unacknowledged; only the alarm can stop the publishers. (Such
    # a consumer also pulls paged messages back into memory, so the peak
    # RSS is not checked here.)
    result = overload.run(seconds=15, watermark_mb=128, publishers=4, body_kib=16, margin=0.10, prefetch=0,
                          expect_blocking=True)
    print(result)
    assert all(result["checks"].values()), result
    assert result["memory_alarms"] >= 1, result


def test_disk_alarm_blocks_publishers_but_not_consumers():
    broker = overload.Broker(watermark=0, extra_config="disk_free_limit_bytes = %d\n" % (1 << 62))
    try:
        consumer = pika.BlockingConnection(broker.params())
        cch = consumer.channel()
        cch.queue_declare("disk", durable=True)

        publisher = pika.BlockingConnection(broker.params())
        reasons = []
        publisher.add_on_connection_blocked_callback(lambda _conn, frame: reasons.append(frame.method.reason))
        pch = publisher.channel()
        pch.confirm_delivery()
        # A connection is blocked once it publishes: its first publish is
        # taken and confirmed, then the broker stops reading it.
        pch.basic_publish("", "disk", b"first", pika.BasicProperties(delivery_mode=2))
        publisher.process_data_events(0.5)
        assert reasons == ["low on disk"]
        done = threading.Event()

        def publish_again():
            try:
                pch.basic_publish("", "disk", b"second")
                done.set()
            except pika.exceptions.ConnectionClosedByBroker:
                pass  # still blocked when the broker stops at the end

        threading.Thread(target=publish_again, daemon=True).start()
        assert not done.wait(2), "a blocked connection's publish must not complete"
        # Consumers keep draining.
        _method, _props, body = cch.basic_get("disk", auto_ack=True)
        assert body == b"first"
        assert cch.queue_declare("disk", passive=True).method.message_count == 0
        consumer.close()
        assert "disk alarm set" in broker.log_text()
    finally:
        broker.stop()
        broker.cleanup()
