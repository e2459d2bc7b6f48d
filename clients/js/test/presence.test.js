// Presence on protocol 2 against the real server: the snapshot in `subscribed`, join and leave frames
// in order, none for a subscription that did not ask, and a fresh snapshot after a reconnect. Needs an
// rtbroadcast with presence (Broadcaster(presence=...)): skipped, saying so, where the server has none.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Client } from "../dist/index.js";
import { followChannel, startServer, waitFor } from "./helpers.js";

let server;
let available = false;
before(async () => {
  server = await startServer(["--presence", "room:lobby"]);
  available = (await server.stats()).presence === true;
});
after(async () => {
  await server?.stop();
});

function device(name, room, extra = {}) {
  const client = new Client({
    url: `${server.wsBase}?device=${name}`,
    protocol: 2,
    backoff: { initialDelay: 50, maxDelay: 200 },
  });
  const welcomes = [];
  client.on("connected", (welcome) => welcomes.push(welcome));
  client.on("error", () => {});
  const followed = followChannel(client, server, room, { presence: true, ...extra });
  return { client, welcomes, ...followed };
}

const members = (subscription) => subscription.presence.members.map((m) => m.identity);

test("snapshot, join and leave: each device sees who else follows the restaurant", async (t) => {
  if (!available) return t.skip("this rtbroadcast has no presence (Broadcaster(presence=...))");
  const a = device("stand-a", "lobby-1");
  const b = device("stand-b", "lobby-1");
  const quiet = device("stand-q", "lobby-1", { presence: false });
  try {
    a.client.connect();
    await waitFor(() => a.app.presence.length === 1, { message: "A's snapshot" });
    assert.equal(a.app.presence[0].kind, "snapshot");
    assert.equal(a.subscription.presence.count, 1);
    const [self] = a.subscription.presence.members;
    assert.equal(self.client, a.welcomes[0].connection);
    assert.equal(self.identity, "stand-a");
    assert.deepEqual(self.info, { name: "stand-a" });

    b.client.connect();
    await waitFor(() => b.app.presence.length === 1 && a.app.presence.length === 2, { message: "B's snapshot, A's join" });
    assert.deepEqual(members(b.subscription), ["stand-a", "stand-b"]); // join order
    assert.equal(a.app.presence[1].kind, "join");
    assert.equal(a.app.presence[1].member.identity, "stand-b");
    assert.deepEqual(members(a.subscription), ["stand-a", "stand-b"]);

    quiet.client.connect(); // a member too, but it asked for no presence frames
    await waitFor(() => a.subscription.presence.count === 3, { message: "the quiet device's join" });
    assert.equal(quiet.subscription.presence, null);
    assert.deepEqual(quiet.app.presence, []);

    b.client.close();
    await waitFor(() => a.subscription.presence.count === 2, { message: "B's leave" });
    assert.equal(a.app.presence.at(-1).kind, "leave");
    assert.equal(a.app.presence.at(-1).member.identity, "stand-b");
    assert.deepEqual(members(a.subscription), ["stand-a", "stand-q"]);
    assert.deepEqual(quiet.app.presence, []);
  } finally {
    a.client.close();
    b.client.close();
    quiet.client.close();
  }
});

test("after a reconnect a subscription gets a fresh snapshot (presence is not replayed)", async (t) => {
  if (!available) return t.skip("this rtbroadcast has no presence (Broadcaster(presence=...))");
  const a = device("stand-r", "lobby-2");
  try {
    a.client.connect();
    await waitFor(() => a.app.presence.length === 1, { message: "the first snapshot" });
    await server.closeConnections("lobby-2", 1012);
    await waitFor(() => a.app.presence.length === 2 && a.client.stats.welcomes === 2, { message: "the second snapshot" });
    assert.equal(a.app.presence[1].kind, "snapshot");
    assert.equal(a.subscription.presence.count, 1, "the old connection left, the new one joined");
    assert.equal(a.subscription.presence.members[0].client, a.welcomes[1].connection);
  } finally {
    a.client.close();
  }
});

test("presence on a channel without it: presence_unavailable, the subscription stands", async () => {
  const a = device("stand-n", "no-presence-1");
  try {
    a.client.connect();
    await waitFor(() => a.app.errors.length === 1, { message: "presence_unavailable" });
    assert.equal(a.app.errors[0].reason, "presence_unavailable");
    assert.equal(a.subscription.state, "live");
    assert.equal(a.subscription.presence, null);
  } finally {
    a.client.close();
  }
});
