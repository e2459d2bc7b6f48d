// Refusals: 4003 stops the client (no reconnect storm) unless getToken returns a fresh token.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Client } from "../dist/index.js";
import { follow, sleep, startServer, waitFor } from "./helpers.js";

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.stop();
});

const attempts = async (token) => (await server.stats()).counts[`websocket:${token}`] ?? 0;

test("a 4003 refusal stops the client: one connection attempt in 3 s, state closed", async () => {
  await server.revoke("expired-1");
  const client = new Client({ url: server.wsUrl("r"), token: "expired-1", backoff: { initialDelay: 10, maxDelay: 50 } });
  const errors = [];
  const disconnects = [];
  client.on("error", (error) => errors.push(error));
  client.on("disconnect", (info) => disconnects.push(info));
  client.connect();
  await client.when("closed", { timeout: 5000 });
  await sleep(3000); // with a 10..50 ms backoff a storm would make dozens of attempts by now
  assert.equal(await attempts("expired-1"), 1);
  assert.equal(client.stats.attempts, 1);
  assert.deepEqual(disconnects, [{ code: 4003, reason: "token expired", retryIn: null, retry: 0 }]);
  assert.equal(errors.length, 1);
  assert.equal(errors[0].code, 4003);
});

test("a 4004 refusal (bad request) stops the client", async () => {
  const client = new Client({ url: `ws://127.0.0.1:${server.port}/realtime?no_room=1`, backoff: { initialDelay: 10 } });
  const disconnects = [];
  client.on("disconnect", (info) => disconnects.push(info));
  client.on("error", () => {});
  client.connect();
  await client.when("closed", { timeout: 5000 });
  await sleep(500);
  assert.equal(client.stats.attempts, 1);
  assert.equal(disconnects[0].code, 4004);
});

test("after a 4003, a fresh token from getToken reconnects and resumes with nothing lost", async () => {
  const requests = [];
  let issued = 0;
  const { client, app } = follow(server, "tokens", {
    token: "t-1",
    getToken: async (request) => {
      requests.push(request);
      issued += 1;
      return `t-${issued + 1}`;
    },
  });
  client.connect();
  await client.when("connected", { timeout: 5000 });
  await server.publish("tokens", 5);
  await waitFor(() => app.items.size === 5, { message: "5 items" });
  // The token expires: the server refuses it from now on, and ends the connection (as a service would).
  await server.revoke("t-1");
  await server.closeConnections("tokens", 1012);
  await server.publish("tokens", 5);
  await waitFor(() => app.items.size === 10, { message: "10 items after the refresh" });
  assert.deepEqual(
    requests.map((r) => [r.reason, r.code, r.message]),
    [["refused", 4003, "token expired"]],
  );
  assert.equal(await attempts("t-1"), 2); // the first connection, the refused one
  assert.equal(await attempts("t-2"), 1);
  assert.deepEqual(app.applied, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  assert.equal(app.resyncs.length, 1); // resumed after the refresh: no reload
  client.close();
});

test("getToken returning the same token (or nothing) stops after one refused attempt", async () => {
  await server.revoke("stale");
  let calls = 0;
  const client = new Client({
    url: server.wsUrl("r2"),
    backoff: { initialDelay: 10, maxDelay: 50 },
    getToken: () => {
      calls += 1;
      return "stale";
    },
  });
  client.on("error", () => {});
  client.connect();
  await client.when("closed", { timeout: 5000 });
  await sleep(1000);
  assert.equal(calls, 2); // once to connect, once after the refusal
  assert.equal(await attempts("stale"), 1);
});

test("a getToken without a token option is asked before the first connection", async () => {
  const client = new Client({ url: server.wsUrl("r3"), getToken: async () => "first" });
  client.connect();
  await client.when("connected", { timeout: 5000 });
  assert.equal(await attempts("first"), 1);
  client.close();
});
