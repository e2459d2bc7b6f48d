// Reconnect storm: N clients (default 1000) follow one room; the service goes down for D seconds (new
// connections closed with 1013, every open one closed with 1012) while events are published; then it
// comes back. Reports how the clients' attempts spread over the downtime and how their reconnections
// spread after it (histograms), and checks that every client resumed with every event, once, in order.
//
//   node --experimental-websocket bench/storm.mjs [clients=1000] [down_seconds=10]
//
// Not part of `npm test` (it takes D + about 15 seconds and a few hundred MB); run it after `npm run build`.

import { Client } from "../dist/index.js";
import { startServer, waitFor } from "../test/helpers.js";

const clients = Number(process.argv[2] ?? 1000);
const downSeconds = Number(process.argv[3] ?? 10);
const room = "storm";
const server = await startServer();

function histogram(times, bucketMs, label) {
  const buckets = new Map();
  for (const t of times) buckets.set(Math.floor(t / bucketMs), (buckets.get(Math.floor(t / bucketMs)) ?? 0) + 1);
  const keys = [...buckets.keys()].sort((a, b) => a - b);
  const widest = Math.max(...buckets.values());
  console.log(`\n${label} (${times.length}, ${bucketMs} ms buckets)`);
  for (let k = keys[0] ?? 0; k <= (keys.at(-1) ?? 0); k += 1) {
    const n = buckets.get(k) ?? 0;
    const from = ((k * bucketMs) / 1000).toFixed(1).padStart(5);
    console.log(`${from} s  ${String(n).padStart(5)}  ${"#".repeat(Math.round((60 * n) / widest))}`);
  }
}

const followers = [];
try {
  for (let i = 0; i < clients; i += 1) {
    const client = new Client({ url: server.wsUrl(room) });
    const follower = { client, seqs: [], welcomes: [], attempts: [] };
    client.subscribe({ onEvent: (event) => void follower.seqs.push(event.seq) });
    client.on("connected", () => follower.welcomes.push(Date.now()));
    client.on("state", (state) => state === "connecting" && follower.attempts.push(Date.now()));
    client.connect();
    followers.push(follower);
  }
  await waitFor(() => followers.every((f) => f.client.state === "connected"), { timeout: 60000, message: "all connected" });
  console.log(`${clients} clients connected`);
  await server.publish(room, 5);
  await waitFor(() => followers.every((f) => f.seqs.length === 5), { timeout: 30000, message: "5 events each" });

  await server.gate(false);
  const downAt = Date.now();
  await server.closeConnections(room, 1012);
  await server.publish(room, 10); // missed by everyone: the resume must replay them
  await new Promise((resolve) => setTimeout(resolve, downSeconds * 1000));
  await server.gate(true);
  const upAt = Date.now();
  await waitFor(() => followers.every((f) => f.client.state === "connected" && f.welcomes.at(-1) > upAt), {
    timeout: 60000,
    message: "all reconnected",
  });
  await server.publish(room, 5);
  await waitFor(() => followers.every((f) => f.seqs.length === 20), { timeout: 30000, message: "20 events each" });

  const expected = Array.from({ length: 20 }, (_, i) => i + 1).join(",");
  const bad = followers.filter((f) => f.seqs.join(",") !== expected).length;
  const resumed = followers.filter((f) => f.client.stats.resumed >= 1).length;
  const attemptsDown = followers.flatMap((f) => f.attempts.filter((t) => t >= downAt && t < upAt).map((t) => t - downAt));
  const back = followers.map((f) => f.welcomes.find((t) => t > upAt) - upAt);
  histogram(attemptsDown, 1000, `attempts while down (${downSeconds} s), by time since the drop`);
  histogram(back, 500, "reconnections, by time since the service came back");
  back.sort((a, b) => a - b);
  const pct = (p) => back[Math.min(back.length - 1, Math.floor((p / 100) * back.length))];
  console.log(`\nback after: p50 ${pct(50)} ms, p90 ${pct(90)} ms, p99 ${pct(99)} ms, max ${back.at(-1)} ms`);
  console.log(`attempts while down: ${attemptsDown.length} (${(attemptsDown.length / clients).toFixed(1)} per client)`);
  console.log(`resumed: ${resumed}/${clients}; every event once, in order: ${clients - bad}/${clients}`);
  if (bad > 0 || resumed < clients) process.exitCode = 1;
} finally {
  for (const f of followers) f.client.close();
  await server.stop();
}
