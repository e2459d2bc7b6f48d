// A gap (a seq skipped: a correct server never sends one, so here a lossy WebSocket in between drops
// one frame of a real connection) makes the client reconnect from the last event it applied; the
// server replays the rest.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { follow, range, startServer, waitFor } from "./helpers.js";

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.stop();
});

test("a skipped seq: reconnect with resume, the server replays, nothing lost or applied twice", async () => {
  let dropped = 0;
  class LossyWebSocket extends WebSocket {
    set onmessage(listener) {
      super.onmessage =
        listener &&
        ((event) => {
          if (dropped === 0 && JSON.parse(event.data).seq === 5) {
            dropped += 1; // lose this frame, once
            return;
          }
          listener(event);
        });
    }
    get onmessage() {
      return super.onmessage;
    }
  }
  const { client, subscription, app } = follow(server, "gap", { WebSocket: LossyWebSocket });
  try {
    client.connect();
    await client.when("connected", { timeout: 5000 });
    await server.publish("gap", 10);
    await waitFor(() => app.items.size === 10, { message: "10 items" });
    assert.equal(dropped, 1);
    assert.equal(subscription.stats.gaps, 1);
    assert.deepEqual(app.applied, range(10));
    assert.equal(app.resyncs.length, 1, "resumed, no reload");
    assert.match(app.disconnects[0].reason, /gap: expected seq 5, received 6/);
    assert.equal(client.stats.resumed, 2); // from the snapshot, then from seq 4
  } finally {
    client.close();
  }
});
