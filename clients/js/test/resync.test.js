// When the missed events cannot be replayed the server says resync_required; the client runs the
// application's resync callback (reload the snapshot) and continues from the snapshot's position.

import assert from "node:assert/strict";
import { test } from "node:test";

import { MS, follow, numbers, range, sleep, startServer, tempDir, waitFor } from "./helpers.js";

test("history trimmed while the client was away: resync, then continue with nothing lost", async () => {
  const server = await startServer(["--backend", "memory://?history_size=10"]);
  const { client, subscription, app } = follow(server, "trim");
  try {
    client.connect();
    await client.when("connected", { timeout: 5000 });
    await server.publish("trim", 5);
    await waitFor(() => app.items.size === 5, { message: "5 items" });
    // The service goes "down" (new connections get 1013) while 30 events are published: more than the
    // 10 the history keeps, so the resume cannot replay them.
    await server.gate(false);
    await server.closeConnections("trim", 1012);
    await waitFor(async () => ((await server.stats()).counts.gated ?? 0) >= 1, { message: "a retry while down" });
    await server.publish("trim", 30);
    await server.gate(true);
    await waitFor(() => app.snapshots === 2, { message: "the second snapshot" });
    await server.publish("trim", 5);
    await waitFor(() => app.items.size === 40, { message: "40 items" });
    assert.deepEqual(numbers(app), range(40));
    assert.equal(app.resyncs.length, 2);
    assert.equal(app.resyncs[1].reason, "history_trimmed");
    assert.equal(app.resyncs[1].seq, 35);
    assert.deepEqual(app.applied, [1, 2, 3, 4, 5, 36, 37, 38, 39, 40]);
    assert.deepEqual(subscription.position.seq, 40);
    assert.equal(subscription.state, "live");
    assert.ok(app.disconnects.some((d) => d.code === 1013), "saw the gate's 1013");
  } finally {
    client.close();
    await server.stop();
  }
});

test("server restart on the memory backend: epoch_changed, resync, then continue with nothing lost", async () => {
  const state = tempDir();
  const server = await startServer(["--state", `${state.dir}/items.json`]);
  const { client, subscription, app } = follow(server, "restart");
  try {
    client.connect();
    await client.when("connected", { timeout: 5000 });
    await server.publish("restart", 20);
    await waitFor(() => app.items.size === 20, { message: "20 items" });
    const before = subscription.position;
    await server.stop(); // SIGTERM: uvicorn closes the connections; the process, its history and epoch are gone
    await sleep(1500); // down for a while: the client's attempts meet a closed port
    const attemptsWhileDown = client.stats.attempts;
    await server.start(); // a new process on the same port: a new epoch, seqs from 1 again
    const startedAt = Date.now();
    await waitFor(() => app.snapshots === 2, { timeout: 15000, message: "the snapshot after the restart" });
    // Each failed attempt ends at once (not after connectTimeout), so the client is back within one
    // backoff ceiling (1 s in these tests) of the restart.
    assert.ok(Date.now() - startedAt < 1000 + 1500 * MS, `back after ${Date.now() - startedAt} ms`);
    assert.ok(attemptsWhileDown >= 3, `attempts while down: ${attemptsWhileDown}`);
    await server.publish("restart", 10);
    await waitFor(() => app.items.size === 30, { message: "30 items" });
    assert.deepEqual(numbers(app), range(30));
    assert.equal(app.resyncs[1].reason, "epoch_changed");
    assert.notEqual(subscription.position.epoch, before.epoch);
    assert.equal(subscription.position.seq, 10);
    assert.deepEqual(app.applied, [...range(20), ...range(10)]); // the new epoch counts from 1 again
    // uvicorn closes with 1012 (service restart) at shutdown, or the client sees the socket drop.
    assert.ok(app.disconnects.length >= 1, JSON.stringify(app.disconnects));
  } finally {
    client.close();
    await server.stop();
    state.remove();
  }
});

test("a snapshot taken past the resync point: the events it already holds are dropped as duplicates", async () => {
  const server = await startServer(["--backend", "memory://?history_size=5"]);
  let publishDuringResync = false;
  const { client, subscription, app } = follow(server, "race", {
    subscription: {
      async resync(info) {
        app.resyncs.push(info);
        // Events published while the snapshot loads arrive on the live connection, behind the
        // resync_required frame; the snapshot (read after them) contains them too.
        if (publishDuringResync) await server.publish("race", 5);
        const body = await server.snapshot("race");
        app.items = new Map(body.items.map((item) => [item.n, item]));
        app.snapshots += 1;
        return { epoch: body.epoch, seq: body.seq };
      },
    },
  });
  try {
    client.connect();
    await client.when("connected", { timeout: 5000 });
    await server.gate(false);
    await server.closeConnections("race", 1012);
    await server.publish("race", 20);
    publishDuringResync = true;
    await server.gate(true);
    await waitFor(() => subscription.stats.duplicates === 5, { message: "5 duplicates dropped" });
    assert.equal(app.resyncs[1].reason, "history_trimmed");
    assert.equal(app.resyncs[1].seq, 20);
    await server.publish("race", 5);
    await waitFor(() => app.items.size === 30, { message: "30 items" });
    assert.deepEqual(numbers(app), range(30));
    assert.deepEqual(app.applied, [26, 27, 28, 29, 30]);
  } finally {
    client.close();
    await server.stop();
  }
});

test("subscription.resync() reloads on the application's initiative and continues on the same connection", async () => {
  const server = await startServer();
  const { client, subscription, app } = follow(server, "asked");
  try {
    client.connect();
    await client.when("connected", { timeout: 5000 });
    await server.publish("asked", 3);
    await waitFor(() => app.items.size === 3, { message: "3 items" });
    app.items.clear(); // the application lost its state (say, applying an event failed)
    subscription.resync();
    await waitFor(() => app.snapshots === 2, { message: "the reload" });
    assert.equal(app.resyncs[1].reason, "requested");
    assert.deepEqual(numbers(app), range(3));
    await server.publish("asked", 2);
    await waitFor(() => app.items.size === 5, { message: "5 items" });
    assert.equal(client.stats.attempts, 1, "same connection");
  } finally {
    client.close();
    await server.stop();
  }
});
