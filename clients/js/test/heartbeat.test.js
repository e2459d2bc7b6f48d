// A connection that goes silent without a close frame (the server process frozen with SIGSTOP: its
// sockets stay open, nothing answers) is detected by the heartbeat within the documented bound:
// ping period + heartbeatTimeout after the last frame.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { MS, follow, startServer, waitFor } from "./helpers.js";

let server;
before(async () => {
  server = await startServer(["--heartbeat", "0.5"]); // welcome.heartbeat_interval = 0.5 s
});
after(async () => {
  server?.thaw();
  await server?.stop();
});

test("a silent connection is declared dead within heartbeat_interval + heartbeatTimeout, then resumed", async () => {
  const heartbeatTimeout = 1000;
  const bound = 500 + heartbeatTimeout;
  const { client, app } = follow(server, "hb", { heartbeatTimeout });
  client.connect();
  await client.when("connected", { timeout: 5000 });
  await server.publish("hb", 3);
  await waitFor(() => app.items.size === 3, { message: "3 items" });
  // Pings keep a quiet connection alive: no false alarm over several bounds.
  await new Promise((resolve) => setTimeout(resolve, 2 * bound));
  assert.equal(client.stats.heartbeatTimeouts, 0);
  assert.equal(client.state, "connected");

  server.freeze();
  const frozenAt = Date.now();
  try {
    await waitFor(() => client.stats.heartbeatTimeouts === 1, { timeout: 3 * bound, message: "the heartbeat timeout" });
    const detectedAt = app.disconnects[0].at;
    // The last frame came at most one ping period before the freeze (a pong), so detection takes at
    // most `bound` after the freeze, plus timer slack on a loaded machine.
    const took = detectedAt - frozenAt;
    assert.ok(took <= bound + 500 * MS, `detected after ${took} ms, bound ${bound} ms`);
    assert.ok(took >= heartbeatTimeout - 100, `detected too early: ${took} ms`);
    assert.equal(app.disconnects[0].code, 1006);
    assert.match(app.disconnects[0].reason, /no frame within 1500 ms/);
  } finally {
    server.thaw();
  }
  await server.publish("hb", 2);
  await waitFor(() => app.items.size === 5, { message: "5 items after the thaw" });
  assert.deepEqual(app.applied, [1, 2, 3, 4, 5]);
  assert.equal(app.resyncs.length, 1);
  client.close();
});
