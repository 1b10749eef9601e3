// Node amqplib (callback API) against Warren: node --test tests/node
// WARREN_AMQP_URL picks the broker (default amqp://guest:guest@127.0.0.1:5672/%2F).
'use strict';
const test = require('node:test');
const assert = require('node:assert');
const amqp = require('amqplib/callback_api');

const URL = process.env.WARREN_AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/%2F';

function connect() {
  return new Promise((resolve, reject) => amqp.connect(URL, (err, conn) => (err ? reject(err) : resolve(conn))));
}

// amqplib multiplexes channels round-robin, so connection.close can reach the
// broker before channel 1's last content frames. The broker must answer
// close-ok and let the client finish writing; resetting the socket lost the
// close callback and the client died with EPIPE.
test('closing with publishes still buffered calls back once close-ok arrives', async () => {
  const conn = await connect();
  const errors = [];
  conn.on('error', (err) => errors.push(err.message));
  const ch = await new Promise((resolve, reject) => conn.createChannel((err, c) => (err ? reject(err) : resolve(c))));
  const queue = `amqplib-burst-${process.pid}`;
  await new Promise((resolve, reject) => ch.assertQueue(queue, { autoDelete: true }, (err) => (err ? reject(err) : resolve())));
  let published = 1;
  while (ch.sendToQueue(queue, Buffer.from(`message ${published}`))) published += 1;
  assert.ok(published > 100, `the write buffer filled after ${published} messages`);
  const started = Date.now();
  const closeError = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('close callback did not fire within 5 s')), 5000);
    conn.close((err) => { clearTimeout(timer); resolve(err); });
  });
  assert.strictEqual(closeError, null);
  assert.deepStrictEqual(errors, []);
  assert.ok(Date.now() - started < 2000, `closed in ${Date.now() - started} ms`);
});
