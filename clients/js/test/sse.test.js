// The Server-Sent Events fallback, through the `eventsource` package (Node 20 has no EventSource):
// used where there is no WebSocket, or after WebSocket attempts fail before opening.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import EventSource from "eventsource";

import { Client } from "../dist/index.js";
import { follow, followChannel, numbers, range, startServer, waitFor } from "./helpers.js";

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.stop();
});

test("without a WebSocket the client uses SSE: live events, and resume after the stream ends", async () => {
  const saved = globalThis.WebSocket;
  let followed;
  try {
    delete globalThis.WebSocket;
    followed = follow(server, "sse", { EventSource });
  } finally {
    globalThis.WebSocket = saved;
  }
  const { client, app } = followed;
  try {
    assert.equal(client.transport, "sse");
    client.connect();
    await client.when("connected", { timeout: 5000 });
    await server.publish("sse", 10);
    await waitFor(() => app.items.size === 10, { message: "10 items" });
    await server.closeConnections("sse", 1012); // the server ends the stream
    await server.publish("sse", 10);
    await waitFor(() => app.items.size === 20, { message: "20 items" });
    assert.deepEqual(app.applied, range(20));
    assert.equal(app.resyncs.length, 1, "resumed from epoch/last_seq, no reload");
    assert.ok(client.stats.resumed >= 1);
    const counts = (await server.stats()).counts;
    assert.ok((counts["sse:-"] ?? 0) >= 2, JSON.stringify(counts));
    assert.equal(counts["websocket:-"] ?? 0, 0);
  } finally {
    client.close();
  }
});

test("after two WebSocket attempts fail before opening, the client falls back to SSE", async () => {
  const { client, app } = follow(server, "fallback", {
    url: `ws://127.0.0.1:${server.port}/blocked?room=fallback`, // no WebSocket route here: the handshake fails
    sseUrl: `${server.http}/realtime/sse?room=fallback`,
    EventSource,
  });
  try {
    assert.equal(client.transport, "websocket");
    client.connect();
    await client.when("connected", { timeout: 10000 });
    assert.equal(client.transport, "sse");
    assert.equal(client.stats.attempts, 3);
    await server.publish("fallback", 5);
    await waitFor(() => app.items.size === 5, { message: "5 items" });
    assert.deepEqual(numbers(app), range(5));
  } finally {
    client.close();
  }
});

test("a refused SSE request (403) is retried with backoff, not stormed", async () => {
  await server.revoke("sse-expired");
  const saved = globalThis.WebSocket;
  let followed;
  try {
    delete globalThis.WebSocket;
    followed = follow(server, "sse-refused", { EventSource, token: "sse-expired", backoff: { initialDelay: 200, maxDelay: 400 } });
  } finally {
    globalThis.WebSocket = saved;
  }
  const { client } = followed;
  client.on("error", () => {});
  try {
    client.connect();
    await new Promise((resolve) => setTimeout(resolve, 2000));
    const attempts = (await server.stats()).counts["sse:sse-expired"] ?? 0;
    // EventSource does not expose the status: the client cannot tell 403 from 503, so it backs off
    // (at most one attempt per 0..400 ms here, about 8 in 2 s) instead of stopping.
    assert.ok(attempts >= 2 && attempts <= 20, `attempts ${attempts}`);
  } finally {
    client.close();
  }
});

test("protocol 2 over SSE: several channels on one stream, resumed together after it ends", async (t) => {
  const probe = await fetch(`${server.http}/realtime/sse?protocol=2&channel=room:probe`);
  await probe.body?.cancel();
  if (probe.status === 400) return t.skip("this rtbroadcast has no protocol 2 over SSE");
  const saved = globalThis.WebSocket;
  let client;
  try {
    delete globalThis.WebSocket;
    client = new Client({ url: server.wsBase, protocol: 2, EventSource, backoff: { initialDelay: 100, maxDelay: 500 } });
  } finally {
    globalThis.WebSocket = saved;
  }
  const a = followChannel(client, server, "sse2-a");
  const b = followChannel(client, server, "sse2-b");
  client.on("error", (error) => a.app.errors.push(error));
  try {
    assert.equal(client.transport, "sse");
    client.connect();
    await waitFor(() => a.subscription.confirmed && b.subscription.confirmed, { message: "both channels on the stream" });
    await Promise.all([server.publish("sse2-a", 4), server.publish("sse2-b", 3)]);
    await waitFor(() => a.app.items.size === 4 && b.app.items.size === 3, { message: "first items" });
    await server.closeConnections("sse2-a", 1012); // ends the one stream that carries both
    await Promise.all([server.publish("sse2-a", 4), server.publish("sse2-b", 5)]);
    await waitFor(() => a.app.items.size === 8 && b.app.items.size === 8, { message: "caught up" });
    assert.deepEqual(a.app.applied, range(8));
    assert.deepEqual(b.app.applied, range(8));
    assert.equal(a.app.resyncs.length + b.app.resyncs.length, 2, "resumed from the resume token, no reload");
    assert.ok(client.stats.attempts >= 2);
    // A channel added later: a new stream names it too.
    const c = followChannel(client, server, "sse2-c");
    await server.publish("sse2-c", 2);
    await waitFor(() => c.app.items.size === 2, { message: "the added channel's items" });
    await server.publish("sse2-a", 1);
    await waitFor(() => a.app.items.size === 9, { message: "a goes on" });
    assert.deepEqual(a.app.applied, range(9));
  } finally {
    client.close();
  }
});
