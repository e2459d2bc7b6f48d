// A client that reads too slowly is closed by the server with 4001 (its queue passed the bound); the
// client reconnects and resumes from the last event it applied, with nothing lost.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { follow, numbers, range, startServer, waitFor } from "./helpers.js";

let server;
before(async () => {
  // A 64 KiB queue bound and a history long enough for the resume to replay everything.
  server = await startServer(["--queue-max-size", "65536", "--backend", "memory://?history_size=5000"]);
});
after(async () => {
  await server?.stop();
});

/** Block this process's event loop: nothing reads the socket, as on a phone busy elsewhere. */
function stall(ms) {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

test("a real slow-consumer close (4001) reconnects and resumes with nothing lost", async () => {
  const { client, app } = follow(server, "slow");
  try {
    client.connect();
    await client.when("connected", { timeout: 5000 });
    const total = 1500;
    await server.publish("slow", total, { size: 30000, background: true }); // 45 MB, more than socket buffers hold
    stall(3000);
    await waitFor(() => app.items.size === total, { timeout: 60000, message: `${total} items` });
    assert.ok(
      app.disconnects.some((d) => d.code === 4001),
      `expected a 4001 close, saw ${JSON.stringify(app.disconnects.map((d) => d.code))}`,
    );
    assert.deepEqual(numbers(app), range(total));
    // The backlog (about 1,300 events of 30 kB) is far larger than the 64 KiB queue bound: the server
    // answers that resume with resync_required (too_far_behind) instead of queueing a replay that would
    // close the connection with 4001 again, and the client reloads the snapshot.
    const reasons = app.resyncs.map((r) => r.reason);
    assert.ok(
      client.stats.resumed >= 1 && (reasons.length === 1 || reasons[1] === "too_far_behind"),
      `resumed ${client.stats.resumed}, resyncs ${reasons}`,
    );
  } finally {
    client.close();
  }
});
