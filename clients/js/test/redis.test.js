// Server restart on the Redis backend: the stream's history outlives the process, so the client
// resumes (no reload) and receives what was published while it was away. Skipped when no Redis answers
// on 127.0.0.1:6379 (CI starts one). Keys live under a prefix of their own and are deleted afterwards.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { after, test } from "node:test";

import { follow, python, range, startServer, tempDir, waitFor } from "./helpers.js";

const prefix = `rtbjs${process.pid}x${Date.now()}`;
const url = `redis://127.0.0.1:6379/0?key_prefix=${prefix}`;

function redisAvailable() {
  try {
    execFileSync(python, ["-c", "import redis; redis.Redis(host='127.0.0.1', socket_timeout=2).ping()"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

after(() => {
  execFileSync(python, [
    "-c",
    "import redis, sys; r = redis.Redis(host='127.0.0.1'); keys = list(r.scan_iter(match=sys.argv[1] + ':*')); keys and r.delete(*keys)",
    prefix,
  ]);
});

// In CI a missing Redis is a failure, never a silent skip (.ci/run starts one).
const skipRedis = process.env.CI === "true" ? false : !redisAvailable() && "no Redis on 127.0.0.1:6379";

test("a restarted server on Redis: the client resumes and receives what it missed", { skip: skipRedis }, async () => {
  const state = tempDir(); // the service's "database" survives the restart too
  const server = await startServer(["--backend", url, "--state", `${state.dir}/items.json`]);
  const { client, subscription, app } = follow(server, "redis");
  try {
    client.connect();
    await client.when("connected", { timeout: 5000 });
    await server.publish("redis", 10);
    await waitFor(() => app.items.size === 10, { message: "10 items" });
    const epoch = subscription.position.epoch;
    await server.stop();
    await server.start();
    await server.publish("redis", 10); // perhaps before the client is back: resume replays these
    await waitFor(() => app.items.size === 20, { timeout: 15000, message: "20 items" });
    assert.deepEqual(app.applied, range(20));
    assert.equal(app.resyncs.length, 1, "resumed: no reload");
    assert.equal(subscription.position.epoch, epoch);
    assert.ok(client.stats.resumed >= 1);
  } finally {
    client.close();
    await server.stop();
    state.remove();
  }
});
