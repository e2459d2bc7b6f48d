// The client conformance suite (tests/conformance/README.md), played by this client: each scenario of
// tests/conformance/scenarios.json against its own tests/conformance/harness.py, the same file and the
// same harness the Python client's runner (tests/test_conformance.py) plays. A scenario, server option,
// client option or step this runner does not know fails the test: nothing is skipped in silence.

import assert from "node:assert/strict";
import { once } from "node:events";
import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { test } from "node:test";

import { Client } from "../dist/index.js";
import { MS, sleep, spawnPython } from "./helpers.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const suiteDir = path.resolve(here, "../../../tests/conformance");
const suite = JSON.parse(readFileSync(path.join(suiteDir, "scenarios.json"), "utf8"));
const CLIENT_OPTIONS = new Set(["token", "tokens", "backoff", "heartbeat_interval_ms", "heartbeat_timeout_ms"]);
const SERVER_OPTIONS = new Set(["backend", "history_size", "heartbeat", "queue_max_size", "presence"]);
const SCENARIO_KEYS = new Set(["name", "description", "server", "client", "steps", "protocols"]);
/** The protocols this client speaks: every scenario runs on each that it lists (default: both). */
const PROTOCOLS = [1, 2];
/** The bound on every wait of a step (the README's 10 s). */
const WAIT = 10000 * MS;

/** Start harness.py with `server` options; resolves with its addresses once it printed READY. */
async function startHarness(server) {
  const { child, match } = await spawnPython(path.join(suiteDir, "harness.py"), [JSON.stringify(server)], {
    ready: /^READY (.*)\n/m,
    stdin: "pipe", // the harness stops when its stdin closes
  });
  return { child, ...JSON.parse(match[1]) };
}

async function stopHarness(harness) {
  if (harness.child.exitCode !== null || harness.child.signalCode !== null) return;
  const exited = once(harness.child, "exit");
  harness.child.stdin.end(); // the harness stops when its stdin closes
  const timer = setTimeout(() => harness.child.kill("SIGKILL"), 10000 * MS);
  await exited;
  clearTimeout(timer);
}

async function control(harness, method, pathAndQuery) {
  const response = await fetch(harness.control + pathAndQuery, { method });
  if (!response.ok) throw new Error(`${method} ${pathAndQuery}: ${response.status} ${await response.text()}`);
  return response.json();
}

/** The application of the README: a room's item numbers, kept by snapshot + events, and what happened. */
function makeApp(http, room) {
  const app = {
    room,
    items: [],
    violations: [],
    resyncs: [],
    welcomes: [],
    refusal: null,
    ended: false,
    presence: null,
    subscription: null,
    check(what) {
      if (!app.items.every((n, i) => n === i + 1)) app.violations.push(`after ${what}: [${app.items}]`);
    },
    async resync(info) {
      app.resyncs.push(info.reason);
      const response = await fetch(`${http}/rooms/${encodeURIComponent(room)}/items`);
      if (!response.ok) throw new Error(`snapshot: ${response.status}`);
      const body = await response.json();
      app.items = body.items.map((item) => item.n);
      app.check(`the snapshot (${info.reason})`);
      return { epoch: response.headers.get("x-stream-epoch"), seq: Number(response.headers.get("x-stream-seq")) };
    },
    onEvent(event) {
      app.items.push(event.n);
      app.check(`event n=${event.n}`);
    },
  };
  return app;
}

/**
 * The client's side of the scenario: its rooms' applications (by room, in subscription order) and
 * what happened to the connection. Protocol 2 records each room's `subscribed` frames as the wire
 * brings them (the WebSocket the client is given reports every frame it receives).
 */
function makeRun(protocol) {
  const run = {
    protocol,
    apps: new Map(),
    disconnects: [],
    tokenRequests: [],
    stopped: null,
    /** The room a step names, or the scenario's first. */
    app(step, where) {
      const room = step.room ?? [...run.apps.keys()][0];
      const app = run.apps.get(room);
      assert.ok(app !== undefined, `${where}: room '${room}' was not subscribed`);
      return app;
    },
    violations() {
      return [...run.apps.values()].flatMap((app) => app.violations);
    },
  };
  return run;
}

function tappedWebSocket(run) {
  const Base = globalThis.WebSocket;
  return class TappedWebSocket extends Base {
    constructor(...args) {
      super(...args);
      this.addEventListener("message", (message) => {
        if (typeof message.data !== "string") return;
        let frame;
        try {
          frame = JSON.parse(message.data);
        } catch {
          return; // the client reports it
        }
        if (frame?.type !== "subscribed" || typeof frame.channel !== "string") return;
        run.apps.get(frame.channel.replace(/^room:/, ""))?.welcomes.push(frame.resumed);
      });
    }
  };
}

function makeClient(url, options, run) {
  const unknown = Object.keys(options).filter((name) => !CLIENT_OPTIONS.has(name));
  assert.deepEqual(unknown, [], `unknown client options ${unknown}`);
  const backoff = options.backoff ?? { initial_ms: 50, max_ms: 200 };
  const tokens = [...(options.tokens ?? [])];
  const client = new Client({
    url,
    protocol: run.protocol,
    ...(run.protocol === 2 ? { WebSocket: tappedWebSocket(run) } : {}),
    ...(options.token !== undefined ? { token: options.token } : {}),
    ...(options.tokens !== undefined
      ? {
          getToken(request) {
            run.tokenRequests.push(request.reason);
            return tokens.length > 0 ? tokens.shift() : null;
          },
        }
      : {}),
    backoff: { initialDelay: backoff.initial_ms, maxDelay: backoff.max_ms },
    ...(options.heartbeat_interval_ms !== undefined ? { heartbeatInterval: options.heartbeat_interval_ms } : {}),
    ...(options.heartbeat_timeout_ms !== undefined ? { heartbeatTimeout: options.heartbeat_timeout_ms } : {}),
  });
  // Protocol 1: each welcome counts; protocol 2: each subscribed of a room (tappedWebSocket).
  if (run.protocol === 1) client.on("connected", (welcome) => run.apps.get([...run.apps.keys()][0])?.welcomes.push(welcome.resumed));
  client.on("disconnect", (info) => {
    run.disconnects.push({ at: performance.now(), code: info.code });
    if (info.retryIn === null) run.stopped = { kind: "refused", code: info.code };
  });
  client.on("unsubscribed", (subscription) => {
    const app = run.apps.get(subscription.channel.replace(/^room:/, ""));
    if (app !== undefined) app.ended = true;
  });
  client.on("error", () => {}); // what matters is recorded above; the steps check it
  return client;
}

function subscribe(client, run, app, step) {
  const presence = step.presence ?? false;
  assert.ok(run.protocol === 2 || !presence, "presence needs protocol 2");
  const subscription = client.subscribe({
    ...(run.protocol === 2 ? { channel: `room:${app.room}` } : {}),
    ...(presence ? { presence: true } : {}),
    resync: app.resync,
    onEvent: app.onEvent,
  });
  subscription.on("error", (error) => {
    if (error.reason !== "presence_unavailable") app.refusal = error.reason;
  });
  subscription.on("presence", (update) => {
    app.presence = update.presence.count;
  });
  app.subscription = subscription;
}

async function waitUntil(run, condition, what, timeout = WAIT) {
  const deadline = performance.now() + timeout;
  while (run.violations().length === 0 && !condition()) {
    if (performance.now() > deadline) throw new assert.AssertionError({ message: `${what}: still not so after ${timeout} ms` });
    await sleep(10);
  }
}

const matches = (actual, expected) =>
  actual.length === expected.length && actual.every((a, i) => (Array.isArray(expected[i]) ? expected[i].includes(a) : a === expected[i]));

async function play(scenario, protocol) {
  const unknownKeys = Object.keys(scenario).filter((name) => !SCENARIO_KEYS.has(name));
  assert.deepEqual(unknownKeys, [], `unknown scenario keys ${unknownKeys}`);
  const unknown = Object.keys(scenario.server).filter((name) => !SERVER_OPTIONS.has(name));
  assert.deepEqual(unknown, [], `unknown server options ${unknown}`);
  const harness = await startHarness(scenario.server);
  const run = makeRun(protocol);
  let client = null;
  let lastCut = 0;
  try {
    for (const [index, step] of scenario.steps.entries()) {
      const where = `step ${index + 1} (${step.op})`;
      switch (step.op) {
        case "subscribe": {
          assert.ok(!run.apps.has(step.room), `${where}: room '${step.room}' is subscribed already`);
          const app = makeApp(harness.http, step.room);
          run.apps.set(step.room, app);
          if (client === null) {
            const url = protocol === 1 ? `${harness.ws}?room=${encodeURIComponent(step.room)}` : `${harness.ws}?protocol=2`;
            client = makeClient(url, scenario.client, run);
            subscribe(client, run, app, step);
            client.connect();
          } else {
            assert.equal(protocol, 2, `${where}: a second room needs protocol 2 (list "protocols": [2])`);
            subscribe(client, run, app, step);
          }
          if (step.wait ?? true) {
            await waitUntil(run, () => app.welcomes.length > 0 || run.stopped !== null || app.refusal !== null, where);
            assert.equal(run.stopped, null, `${where}: stopped`);
            assert.equal(app.refusal, null, `${where}: refused`);
          }
          continue;
        }
        case "unsubscribe":
          assert.equal(protocol, 2, `${where}: unsubscribe needs protocol 2`);
          run.app(step, where).subscription.unsubscribe();
          break;
        case "publish":
          await control(harness, "POST", `/publish?room=${encodeURIComponent(step.room)}&n=${step.n}`);
          break;
        case "close":
          await control(harness, "POST", `/close?room=${encodeURIComponent(step.room)}&code=${step.code}`);
          break;
        case "stop":
        case "start":
        case "restart":
        case "restart_redis":
        case "cut":
          await control(harness, "POST", `/${step.op}`);
          if (step.op === "cut") lastCut = performance.now();
          break;
        case "gate":
          await control(harness, "POST", `/gate?open=${step.open ? 1 : 0}`);
          break;
        case "revoke":
          await control(harness, "POST", `/revoke?token=${encodeURIComponent(step.token)}`);
          break;
        case "join":
        case "leave":
          await control(harness, "POST", `/${step.op}?room=${encodeURIComponent(step.room)}`);
          break;
        case "arm_snapshot":
          await control(harness, "POST", `/arm_snapshot?room=${encodeURIComponent(step.room)}&n=${step.n}`);
          break;
        case "sleep":
          await sleep(step.ms);
          break;
        case "expect_attempts": {
          await sleep(step.after_ms ?? 0);
          const attempts = (await control(harness, "GET", "/stats")).attempts[step.token] ?? 0;
          assert.equal(attempts, step.count, `${where}: ${attempts} attempts with '${step.token}'`);
          break;
        }
        case "expect_subscribers": {
          const path = `/subscribers?room=${encodeURIComponent(step.room)}`;
          let count = null;
          const deadline = performance.now() + WAIT;
          while ((count = (await control(harness, "GET", path)).count) !== step.count && performance.now() < deadline) await sleep(20);
          assert.equal(count, step.count, `${where}: ${count} connections subscribed to room '${step.room}'`);
          break;
        }
        default:
          assert.ok(client !== null, `${where} before subscribe`);
          await expect(run, step, where, lastCut);
      }
    }
  } finally {
    client?.close();
    await stopHarness(harness);
  }
}

async function expect(run, step, where, lastCut) {
  switch (step.op) {
    case "expect_items": {
      const app = run.app(step, where);
      const wanted = Array.from({ length: step.count }, (_, i) => i + 1);
      await waitUntil(run, () => app.items.length === wanted.length && app.items.every((n, i) => n === wanted[i]), `${where}: items 1..${step.count}, have [${app.items}]`);
      break;
    }
    case "expect_resyncs": {
      const app = run.app(step, where);
      assert.ok(matches(app.resyncs, step.reasons), `${where}: resyncs ${JSON.stringify(app.resyncs)}`);
      break;
    }
    case "expect_welcomes":
      assert.deepEqual(run.app(step, where).welcomes, step.resumed, `${where}: welcomes (resumed)`);
      break;
    case "expect_disconnects": {
      await waitUntil(run, () => run.disconnects.length >= step.codes.length, `${where}: disconnects ${JSON.stringify(run.disconnects)}`);
      assert.deepEqual(run.disconnects.map((d) => d.code), step.codes, `${where}: disconnect codes`);
      if (step.within_ms !== undefined && step.codes.length > 0) {
        const took = run.disconnects.at(-1).at - lastCut;
        assert.ok(took <= step.within_ms, `${where}: the disconnect came ${Math.round(took)} ms after the cut`);
      }
      break;
    }
    case "expect_duplicates": {
      const { stats } = run.app(step, where).subscription;
      assert.equal(stats.duplicates, step.count, `${where}: ${JSON.stringify(stats)}`);
      break;
    }
    case "expect_stopped":
      await waitUntil(run, () => run.stopped !== null, where);
      assert.deepEqual(run.stopped, { kind: "refused", code: step.code }, where);
      break;
    case "expect_token_requests":
      assert.deepEqual(run.tokenRequests, step.reasons, `${where}: token requests`);
      break;
    case "expect_refused": {
      const app = run.app(step, where);
      await waitUntil(run, () => app.refusal !== null, `${where}: a refusal of room '${app.room}'`);
      assert.equal(app.refusal, step.error, `${where}: refused with`);
      break;
    }
    case "expect_ended": {
      const app = run.app(step, where);
      await waitUntil(run, () => app.ended, `${where}: the subscription of room '${app.room}' ended`);
      break;
    }
    case "expect_presence": {
      const app = run.app(step, where);
      await waitUntil(run, () => app.presence === step.count, `${where}: presence count ${app.presence}`);
      break;
    }
    default:
      assert.fail(`${where}: unknown step '${step.op}'`);
  }
  assert.deepEqual(run.violations(), [], "the application's state went wrong");
}

for (const scenario of suite.scenarios) {
  for (const protocol of scenario.protocols ?? PROTOCOLS) {
    assert.ok(PROTOCOLS.includes(protocol), `${scenario.name}: unknown protocol ${protocol}`);
    test(`conformance (protocol ${protocol}): ${scenario.name}`, { timeout: 120000 }, () => play(scenario, protocol));
  }
}
