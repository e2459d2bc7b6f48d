// Protocol 2 against the real server: several subscriptions on one WebSocket, each with its own
// position, resume and resync; server-side subscriptions; errors per request; unsubscribe; presence
// where the server has none.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Client, SubscriptionError } from "../dist/index.js";
import { followChannel, numbers, range, roomOptions, roomApp, startServer, tempDir, waitFor } from "./helpers.js";

let server;
let state;
before(async () => {
  state = tempDir();
  server = await startServer(["--state", `${state.dir}/items.json`]);
});
after(async () => {
  await server?.stop();
  state?.remove();
});

const newClient = (options = {}) =>
  new Client({ url: server.wsBase, protocol: 2, backoff: { initialDelay: 100, maxDelay: 500 }, ...options });

test("two channels on one connection: each snapshot, then each channel's events in order", async () => {
  await server.publish("p2-a", 3);
  const client = newClient();
  const errors = [];
  client.on("error", (error) => errors.push(error));
  const a = followChannel(client, server, "p2-a");
  const b = followChannel(client, server, "p2-b");
  try {
    client.connect();
    await client.when("connected", { timeout: 5000 });
    await waitFor(() => a.subscription.confirmed && b.subscription.confirmed, { message: "both subscribed" });
    assert.deepEqual(numbers(a.app), range(3)); // from its snapshot
    await Promise.all([server.publish("p2-a", 20), server.publish("p2-b", 15)]);
    await waitFor(() => a.app.items.size === 23 && b.app.items.size === 15, { message: "all items" });
    assert.deepEqual(a.app.applied, range(23).slice(3));
    assert.deepEqual(b.app.applied, range(15));
    assert.equal(client.stats.attempts, 1, "one connection");
    assert.equal(client.stats.welcomes, 1);
    assert.deepEqual([...client.subscriptions.keys()].sort(), ["room:p2-a", "room:p2-b"]);
    assert.deepEqual(a.subscription.position.seq, 23);
    assert.deepEqual(errors, []);
  } finally {
    client.close();
  }
});

test("a dropped connection resumes every channel from its own position, nothing lost, no reload", async () => {
  const client = newClient();
  const a = followChannel(client, server, "p2-drop-a");
  const b = followChannel(client, server, "p2-drop-b");
  const disconnects = [];
  client.on("disconnect", (info) => disconnects.push(info));
  try {
    client.connect();
    await client.when("connected", { timeout: 5000 });
    await Promise.all([server.publish("p2-drop-a", 5), server.publish("p2-drop-b", 2)]);
    await waitFor(() => a.app.items.size === 5 && b.app.items.size === 2, { message: "first items" });
    const { closed } = await server.closeConnections("p2-drop-a", 1012);
    assert.equal(closed, 1);
    await Promise.all([server.publish("p2-drop-a", 5), server.publish("p2-drop-b", 7)]); // while away
    await waitFor(() => a.app.items.size === 10 && b.app.items.size === 9, { message: "caught up" });
    assert.equal(disconnects[0].code, 1012);
    assert.deepEqual(a.app.applied, range(10));
    assert.deepEqual(b.app.applied, range(9));
    assert.equal(a.app.resyncs.length, 1, "a resumed: only its first snapshot");
    assert.equal(b.app.resyncs.length, 1, "b resumed: only its first snapshot");
    assert.equal(client.stats.attempts, 2);
  } finally {
    client.close();
  }
});

test("a server restart with a new epoch: a resync per channel, each continues from its snapshot", async () => {
  const client = newClient();
  const a = followChannel(client, server, "p2-restart-a");
  const b = followChannel(client, server, "p2-restart-b");
  try {
    client.connect();
    await client.when("connected", { timeout: 5000 });
    await Promise.all([server.publish("p2-restart-a", 4), server.publish("p2-restart-b", 4)]);
    await waitFor(() => a.app.items.size === 4 && b.app.items.size === 4, { message: "first items" });
    await server.restart(); // the memory backend starts a new epoch; the items survive in --state
    await waitFor(() => a.app.resyncs.length === 2 && b.app.resyncs.length === 2, { message: "a resync each" });
    assert.equal(a.app.resyncs[1].reason, "epoch_changed");
    assert.equal(a.app.resyncs[1].channel, "room:p2-restart-a");
    assert.equal(b.app.resyncs[1].channel, "room:p2-restart-b");
    await Promise.all([server.publish("p2-restart-a", 3), server.publish("p2-restart-b", 1)]);
    await waitFor(() => a.app.items.size === 7 && b.app.items.size === 5, { message: "items after the restart" });
    assert.deepEqual(numbers(a.app), range(7));
    assert.deepEqual(numbers(b.app), range(5));
    assert.equal(a.subscription.stats.gaps, 0);
  } finally {
    client.close();
  }
});

test("a server-side subscription (id null): announced, followed, resumed through the resume token", async () => {
  await server.publish("p2-srv", 2);
  const app = roomApp();
  const seen = [];
  const client = newClient({
    url: `${server.wsBase}?room=p2-srv`, // the resolver subscribes the connection to room:p2-srv itself
    serverSubscription: (channel) => {
      seen.push(channel);
      const { channel: _c, ...options } = roomOptions(server, "p2-srv", app);
      return options;
    },
  });
  const announced = [];
  client.on("subscription", (subscription) => announced.push(subscription));
  const resumed = [];
  try {
    client.connect();
    await client.when("connected", { timeout: 5000 });
    await waitFor(() => announced.length === 1 && app.snapshots === 1, { message: "the server's subscription" });
    assert.deepEqual(seen, ["room:p2-srv"]);
    const [subscription] = announced;
    assert.equal(subscription.serverSide, true);
    assert.equal(subscription.channel, "room:p2-srv");
    assert.deepEqual(numbers(app), range(2)); // its first snapshot, loaded when the server announced it
    await server.publish("p2-srv", 3);
    await waitFor(() => app.items.size === 5, { message: "live items" });
    client.on("connected", () => resumed.push(client.stats.welcomes));
    await server.closeConnections("p2-srv", 1012);
    await server.publish("p2-srv", 4);
    await waitFor(() => app.items.size === 9, { message: "items after the drop" });
    assert.deepEqual(app.applied, range(9).slice(2));
    assert.equal(app.snapshots, 1, "resumed from the resume token, no reload");
    assert.equal(announced.length, 1, "the same subscription continues");
    assert.equal(client.subscriptions.get("room:p2-srv"), subscription);
  } finally {
    client.close();
  }
});

test("errors per request: a forbidden and an invalid channel fail alone; the connection and the rest go on", async () => {
  const client = newClient();
  const clientErrors = [];
  client.on("error", (error) => clientErrors.push(error));
  const ok = followChannel(client, server, "p2-ok");
  const forbidden = followChannel(client, server, "forbidden-1");
  const invalid = client.subscribe({ channel: "x".repeat(300) });
  const invalidErrors = [];
  invalid.on("error", (error) => invalidErrors.push(error));
  try {
    client.connect();
    await client.when("connected", { timeout: 5000 });
    await waitFor(() => forbidden.app.errors.length === 1 && invalidErrors.length === 1, { message: "two refusals" });
    const [denied] = forbidden.app.errors;
    assert.ok(denied instanceof SubscriptionError);
    assert.equal(denied.reason, "forbidden");
    assert.equal(denied.channel, "room:forbidden-1");
    assert.match(denied.message, /not your room/);
    assert.equal(forbidden.subscription.state, "closed");
    assert.equal(invalidErrors[0].reason, "invalid_channel");
    assert.equal(invalid.state, "closed");
    assert.deepEqual([...client.subscriptions.keys()], ["room:p2-ok"]);
    await server.publish("p2-ok", 3);
    await waitFor(() => ok.app.items.size === 3, { message: "the allowed channel's items" });
    assert.equal(client.state, "connected");
    assert.equal(client.stats.attempts, 1, "no reconnect for a refused subscription");
    assert.equal(clientErrors.filter((e) => e instanceof SubscriptionError).length, 2);
  } finally {
    client.close();
  }
});

test("unsubscribe: confirmed by the server, no event after it, the other channel goes on", async () => {
  const client = newClient();
  const a = followChannel(client, server, "p2-unsub-a");
  const b = followChannel(client, server, "p2-unsub-b");
  const ended = [];
  client.on("unsubscribed", (subscription, reason) => ended.push([subscription.channel, reason]));
  try {
    client.connect();
    await waitFor(() => a.subscription.confirmed && b.subscription.confirmed, { message: "both subscribed" });
    await server.publish("p2-unsub-a", 2);
    await waitFor(() => a.app.items.size === 2, { message: "a's items" });
    a.subscription.unsubscribe();
    assert.equal(a.subscription.state, "closed");
    await waitFor(() => ended.length === 1, { message: "the server's unsubscribed" });
    assert.deepEqual(ended, [["room:p2-unsub-a", "client"]]);
    await server.publish("p2-unsub-a", 3);
    await server.publish("p2-unsub-b", 2);
    await waitFor(() => b.app.items.size === 2, { message: "b's items" });
    assert.equal(a.app.items.size, 2, "nothing for a after its unsubscribe");
    assert.ok(!client.subscriptions.has("room:p2-unsub-a"));
    // The channel can be subscribed again: a new subscription, from a new snapshot.
    const again = followChannel(client, server, "p2-unsub-a");
    await waitFor(() => again.app.items.size === 5, { message: "the new subscription's snapshot" });
    await server.publish("p2-unsub-a", 1);
    await waitFor(() => again.app.items.size === 6, { message: "its live item" });
  } finally {
    client.close();
  }
});

test("presence asked where the server has none: presence_unavailable, the subscription itself stands", async () => {
  const client = newClient();
  client.on("error", () => {});
  const watched = followChannel(client, server, "p2-presence", { presence: true });
  try {
    client.connect();
    await waitFor(() => watched.app.errors.length === 1, { message: "presence_unavailable" });
    assert.equal(watched.app.errors[0].reason, "presence_unavailable");
    assert.equal(watched.subscription.state, "live");
    assert.equal(watched.subscription.presence, null);
    await server.publish("p2-presence", 2);
    await waitFor(() => watched.app.items.size === 2, { message: "its items" });
  } finally {
    client.close();
  }
});

test("protocol 2 option checks", () => {
  assert.throws(() => new Client({ url: server.wsBase, protocol: 3 }), TypeError);
  const client = newClient();
  assert.throws(() => client.subscribe({}), TypeError);
  client.subscribe({ channel: "room:x" });
  assert.throws(() => client.subscribe({ channel: "room:x" }), /already subscribes/);
  client.close();
});

test("a channel both the URL and the client subscribe to: one subscription, resumed after a drop", async () => {
  const client = newClient({ url: `${server.wsBase}?room=p2-both` });
  const errors = [];
  client.on("error", (error) => errors.push(error));
  const both = followChannel(client, server, "p2-both");
  try {
    client.connect();
    await waitFor(() => both.subscription.confirmed, { message: "confirmed" });
    await server.publish("p2-both", 3);
    await waitFor(() => both.app.items.size === 3, { message: "items" });
    await server.closeConnections("p2-both", 1012);
    await server.publish("p2-both", 3);
    await waitFor(() => both.app.items.size === 6, { message: "items after the drop" });
    assert.deepEqual(both.app.applied, range(6));
    assert.equal(both.app.resyncs.length, 1, "resumed, no reload");
    assert.equal(both.subscription.state, "live");
    assert.equal(both.subscription.stats.gaps, 0);
    assert.deepEqual(errors.filter((e) => e.reason !== "already_subscribed"), []);
    assert.equal(client.subscriptions.size, 1);
  } finally {
    client.close();
  }
});
