// The Server-Sent Events fallback, through the `eventsource` package (Node 20 has no EventSource):
// used where there is no WebSocket, or after WebSocket attempts fail before opening.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import EventSource from "eventsource";

import { follow, numbers, range, startServer, waitFor } from "./helpers.js";

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
