// Test support: a real rtbroadcast server (test/server.py under the repository's virtualenv), and an
// application that follows one room with the client, the way a page would.

import { spawn } from "node:child_process";
import { once } from "node:events";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { Client } from "../dist/index.js";

const here = path.dirname(fileURLToPath(import.meta.url));
export const python = process.env.RTB_PYTHON ?? path.resolve(here, "../../../.venv/bin/python");

/** One timing unit for these tests (ms): bounds are multiples of it, so a loaded machine can slow them all. */
export const MS = Number(process.env.RTB_TEST_MS ?? 1);

/**
 * Run a Python script of the repository (under its virtualenv) and wait for the line of its stdout
 * that `ready` matches: resolves with the child and that match. A script that exits first, or says
 * nothing within 20 s, fails. `stdin`: "ignore", or "pipe" for a script that stops when its stdin closes.
 */
export async function spawnPython(script, args, { ready, stdin = "ignore" }) {
  const child = spawn(python, [script, ...args], { stdio: [stdin, "pipe", "inherit"] });
  let output = "";
  const started = new Promise((resolve, reject) => {
    child.stdout.setEncoding("utf8");
    child.stdout.on("data", (chunk) => {
      output += chunk;
      const match = ready.exec(output);
      if (match) resolve(match);
    });
    child.once("exit", (code) => reject(new Error(`${path.basename(script)} exited with ${code} before it was ready:\n${output}`)));
    child.once("error", reject);
  });
  const timeout = setTimeout(() => child.kill("SIGKILL"), 20000 * MS);
  try {
    return { child, match: await started };
  } finally {
    clearTimeout(timeout);
  }
}

/** Start test/server.py; resolves once it listens. `args` are its command-line options. */
export async function startServer(args = [], { port = 0 } = {}) {
  const { child, match } = await spawnPython(path.join(here, "server.py"), ["--port", String(port), ...args], {
    ready: /PORT (\d+)\n/,
  });
  return new TestServer(child, Number(match[1]), args);
}

export class TestServer {
  constructor(child, port, args) {
    this.child = child;
    this.port = port;
    this.args = args;
    this.http = `http://127.0.0.1:${port}`;
  }

  /** The WebSocket address of the endpoint, without a channel (protocol 2 subscribes with frames). */
  get wsBase() {
    return `ws://127.0.0.1:${this.port}/realtime`;
  }

  /** The WebSocket address of `room`'s stream. */
  wsUrl(room) {
    return `ws://127.0.0.1:${this.port}/realtime?room=${encodeURIComponent(room)}`;
  }

  async post(pathAndQuery) {
    const response = await fetch(this.http + pathAndQuery, { method: "POST" });
    if (!response.ok) throw new Error(`POST ${pathAndQuery}: ${response.status}`);
    return response.json();
  }

  publish(room, n, { size = 0, background = false } = {}) {
    const extra = (size ? `&size=${size}` : "") + (background ? "&background=1" : "");
    return this.post(`/control/publish?room=${encodeURIComponent(room)}&n=${n}${extra}`);
  }

  closeConnections(room, code) {
    return this.post(`/control/close?room=${encodeURIComponent(room)}&code=${code}`);
  }

  gate(open) {
    return this.post(`/control/gate?open=${open ? 1 : 0}`);
  }

  revoke(token) {
    return this.post(`/control/revoke?token=${encodeURIComponent(token)}`);
  }

  async stats() {
    return (await fetch(`${this.http}/control/stats`)).json();
  }

  async snapshot(room) {
    return (await fetch(`${this.http}/rooms/${encodeURIComponent(room)}/items`)).json();
  }

  /** Stop the process with `signal` (SIGTERM: a graceful restart, 1001 to every client) and wait for it. */
  async stop(signal = "SIGTERM") {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = once(this.child, "exit");
    this.child.kill(signal);
    const timer = setTimeout(() => this.child.kill("SIGKILL"), 15000);
    await exited;
    clearTimeout(timer);
  }

  /** Start again on the same port with the same options (after `stop`). */
  async start() {
    const next = await startServer(this.args, { port: this.port });
    this.child = next.child;
  }

  /** Stop, then start again on the same port with the same options. */
  async restart(signal = "SIGTERM") {
    await this.stop(signal);
    await this.start();
  }

  /** Freeze the process (SIGSTOP): its sockets stay open and nothing answers, like a dead network. */
  freeze() {
    this.child.kill("SIGSTOP");
  }

  thaw() {
    this.child.kill("SIGCONT");
  }
}

/** A directory for a server's --state file, removed by the returned function. */
export function tempDir() {
  const dir = mkdtempSync(path.join(tmpdir(), "rtb-js-"));
  return { dir, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

/**
 * An application that shows one room's items: it loads the snapshot (positions from the response's
 * X-Stream-Epoch / X-Stream-Seq headers), applies events in order, and records what happened.
 */
export function follow(server, room, options = {}) {
  const { subscription: subscriptionOptions = {}, ...clientOptions } = options;
  const app = { ...roomApp(), disconnects: [] };
  const client = new Client({ url: server.wsUrl(room), backoff: { initialDelay: 100, maxDelay: 1000 }, ...clientOptions });
  // Protocol 1: the URL names the channel (the subscription names one only to have it confirmed).
  const { channel: _, ...snapshotAndEvents } = roomOptions(server, room, app);
  const subscription = client.subscribe({ ...snapshotAndEvents, ...subscriptionOptions });
  client.on("error", (error) => app.errors.push(error));
  client.on("disconnect", (info) => app.disconnects.push({ ...info, at: Date.now() }));
  return { client, subscription, app };
}

/** Poll `predicate` until it holds; fail after `timeout` ms with `message`. */
export async function waitFor(predicate, { timeout = 10000, message = "condition" } = {}) {
  const deadline = Date.now() + timeout * MS;
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout * MS} ms waiting for ${message}`);
    await sleep(20);
  }
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Numbers 1..n, to compare a room's item numbers with. */
export const range = (n) => Array.from({ length: n }, (_, i) => i + 1);

/** The item numbers an application holds, sorted. */
export const numbers = (app) => [...app.items.keys()].sort((a, b) => a - b);

/** An application's state for one room, fed by a subscription (see `followChannel`). */
export function roomApp() {
  return { items: new Map(), applied: [], resyncs: [], snapshots: 0, presence: [], errors: [] };
}

/** The subscription options of an application that shows `room`'s items (protocol 2: one per channel). */
export function roomOptions(server, room, app, extra = {}) {
  return {
    channel: `room:${room}`,
    async resync(info) {
      app.resyncs.push(info);
      const response = await fetch(`${server.http}/rooms/${encodeURIComponent(room)}/items`);
      if (!response.ok) throw new Error(`snapshot: ${response.status}`);
      const body = await response.json();
      app.items = new Map(body.items.map((item) => [item.n, item]));
      app.snapshots += 1;
      return { epoch: response.headers.get("x-stream-epoch"), seq: Number(response.headers.get("x-stream-seq")) };
    },
    onEvent(event) {
      app.applied.push(event.seq);
      app.items.set(event.n, { n: event.n, room: event.room });
    },
    ...extra,
  };
}

/** Subscribe `client` (protocol 2) to `room` with an application that records what happens. */
export function followChannel(client, server, room, extra = {}) {
  const app = roomApp();
  const subscription = client.subscribe(roomOptions(server, room, app, extra));
  subscription.on("presence", (update) => app.presence.push(update));
  subscription.on("error", (error) => app.errors.push(error));
  return { subscription, app };
}
