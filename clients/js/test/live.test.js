// Live events, and resume after the server closes a connection (a slow-consumer close, a restart code).

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Client } from "../dist/index.js";
import { follow, numbers, range, startServer, waitFor } from "./helpers.js";

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.stop();
});

test("live events arrive in seq order, each once, after the snapshot", async () => {
  await server.publish("live", 3); // before the client: in its snapshot
  const { client, subscription, app } = follow(server, "live");
  client.connect();
  await client.when("connected", { timeout: 5000 });
  assert.deepEqual(numbers(app), range(3));
  await server.publish("live", 50);
  await waitFor(() => app.items.size === 53, { message: "53 items" });
  assert.deepEqual(app.applied, range(53).slice(3));
  assert.deepEqual(numbers(app), range(53));
  assert.deepEqual(subscription.position, { epoch: (await server.snapshot("live")).epoch, seq: 53 });
  assert.equal(subscription.channel, "room:live");
  assert.equal(app.resyncs.length, 1); // the initial snapshot only
  assert.equal(app.resyncs[0].reason, "initial");
  assert.deepEqual(app.errors, []);
  client.close();
  assert.equal(client.state, "closed");
});

test("without a resync callback the client starts at the channel's current position", async () => {
  await server.publish("plain", 5);
  const client = new Client({ url: server.wsUrl("plain") });
  const seen = [];
  client.subscribe().on("event", (event) => seen.push([event.type, event.seq, event.n]));
  client.connect();
  await client.when("connected", { timeout: 5000 });
  assert.deepEqual(client.subscription.position.seq, 5);
  await server.publish("plain", 2);
  await waitFor(() => seen.length === 2, { message: "two events" });
  assert.deepEqual(seen, [
    ["item", 6, 6],
    ["item", 7, 7],
  ]);
  client.close();
});

for (const [code, name] of [
  [4001, "slow consumer"],
  [1012, "service restart"],
  [1011, "internal error"],
]) {
  test(`a close with ${code} (${name}) reconnects and resumes with nothing lost`, async () => {
    const room = `close-${code}`;
    const { client, subscription, app } = follow(server, room);
    client.connect();
    await client.when("connected", { timeout: 5000 });
    await server.publish(room, 10);
    await waitFor(() => app.items.size === 10, { message: "10 items" });
    const { closed } = await server.closeConnections(room, code);
    assert.equal(closed, 1);
    await server.publish(room, 10); // while the client is away (or reconnecting)
    await waitFor(() => app.items.size === 20, { message: "20 items" });
    assert.equal(app.disconnects[0].code, code);
    assert.ok(app.disconnects[0].retryIn !== null);
    assert.deepEqual(app.applied, range(20));
    assert.equal(app.resyncs.length, 1, "resumed, no resync");
    assert.ok(client.stats.resumed >= 1);
    assert.equal(subscription.stats.gaps, 0);
    client.close();
  });
}

test("the backoff grows while connections die young, and starts over after a stable one", async () => {
  const room = "stable";
  const { client, app } = follow(server, room, { stableAfter: 400, backoff: { initialDelay: 50, maxDelay: 200 } });
  const dropWhenConnected = async () => {
    const seen = app.disconnects.length;
    await client.when("connected", { timeout: 5000 });
    assert.equal((await server.closeConnections(room, 1012)).closed, 1);
    await waitFor(() => app.disconnects.length === seen + 1, { message: "the drop" });
  };
  try {
    client.connect();
    for (let i = 0; i < 3; i += 1) await dropWhenConnected(); // each lived far less than 400 ms
    assert.deepEqual(app.disconnects.map((d) => d.retry), [1, 2, 3]);
    assert.ok(app.disconnects.every((d, i) => d.retryIn < Math.min(200, 50 * 2 ** i)), JSON.stringify(app.disconnects));
    await client.when("connected", { timeout: 5000 });
    await new Promise((resolve) => setTimeout(resolve, 600)); // stable: longer than stableAfter
    await server.closeConnections(room, 1012);
    await waitFor(() => app.disconnects.length === 4, { message: "the fourth drop" });
    assert.equal(app.disconnects[3].retry, 1);
  } finally {
    client.close();
  }
});
