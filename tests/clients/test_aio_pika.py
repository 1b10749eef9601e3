"""aio-pika's robust connection against Warren: the network between client
and broker fails (a proxy in between drops every connection), the
connection comes back by itself, and the consumer declared before the
failure is restored and receives what new channels publish.

Channels opened while the connection is still down fail in aio-pika 10.2
against RabbitMQ as against Warren (RuntimeError "... closed"): aiormq
races its own close against the broker's close-ok (docs/rabbitmq-reference.md,
"Closing").

    WARREN_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2F python3 -m pytest tests/clients
"""
import asyncio
import os
import uuid
from urllib.parse import urlparse

import aio_pika

URL = os.environ.get("WARREN_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


class Proxy:
    """Forwards TCP connections to the broker; `cut` drops them all at once."""

    def __init__(self, host, port):
        self.target = (host, port)
        self.sockets = []

    async def start(self):
        self.server = await asyncio.start_server(self.accept, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def accept(self, client_reader, client_writer):
        broker_reader, broker_writer = await asyncio.open_connection(*self.target)
        self.sockets += [client_writer, broker_writer]

        async def pipe(reader, writer):
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.transport.abort()

        await asyncio.gather(pipe(client_reader, broker_writer), pipe(broker_reader, client_writer))

    def cut(self):
        for writer in self.sockets:
            writer.transport.abort()
        self.sockets.clear()

    async def close(self):
        self.cut()
        self.server.close()
        await self.server.wait_closed()


async def robust_reconnection():
    target = urlparse(URL)
    proxy = Proxy(target.hostname, target.port or 5672)
    port = await proxy.start()
    url = target._replace(netloc="%s:%s@127.0.0.1:%d" % (target.username, target.password, port)).geturl()
    conn = await aio_pika.connect_robust(url + "?reconnect_interval=0.1")
    try:
        reconnected = asyncio.Event()
        conn.reconnect_callbacks.add(lambda *_: reconnected.set())
        channel = await conn.channel()
        queue = await channel.declare_queue("aio-pika-robust-%s" % uuid.uuid4().hex[:8], auto_delete=True)
        received = asyncio.Queue()

        async def on_message(message):
            async with message.process():
                await received.put(message.body)

        await queue.consume(on_message)
        proxy.cut()
        await asyncio.wait_for(reconnected.wait(), 10)
        opened = [await conn.channel() for _ in range(3)]
        for n, ch in enumerate(opened):
            await ch.default_exchange.publish(aio_pika.Message(b"after %d" % n), routing_key=queue.name)
        return sorted([await asyncio.wait_for(received.get(), 10) for _ in opened])
    finally:
        await conn.close()
        await proxy.close()


def test_a_robust_connection_comes_back_with_its_consumer_and_new_channels():
    assert asyncio.run(robust_reconnection()) == [b"after 0", b"after 1", b"after 2"]
