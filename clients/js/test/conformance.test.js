// The client conformance suite (tests/conformance/README.md), played by this client: each scenario of
// tests/conformance/scenarios.json against its own tests/conformance/harness.py, the same file and the
// same harness the Python client's runner (tests/test_conformance.py) plays. A scenario, server option,
// client option or step this runner does not know fails the test: nothing is skipped in silence.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { test } from "node:test";

import { Client } from "../dist/index.js";
import { MS, python, sleep } from "./helpers.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const suiteDir = path.resolve(here, "../../../tests/conformance");
const suite = JSON.parse(readFileSync(path.join(suiteDir, "scenarios.json"), "utf8"));
const CLIENT_OPTIONS = new Set(["token", "tokens", "backoff", "heartbeat_interval_ms", "heartbeat_timeout_ms"]);
const SERVER_OPTIONS = new Set(["backend", "history_size", "heartbeat", "queue_max_size"]);
/** The bound on every wait of a step (the README's 10 s). */
const WAIT = 10000 * MS;

/** Start harness.py with `server` options; resolves with its addresses once it printed READY. */
async function startHarness(server) {
  const child = spawn(python, [path.join(suiteDir, "harness.py"), JSON.stringify(server)], {
    stdio: ["pipe", "pipe", "inherit"],
  });
  let output = "";
  const ready = new Promise((resolve, reject) => {
    child.stdout.setEncoding("utf8");
    child.stdout.on("data", (chunk) => {
      output += chunk;
      const line = output.split("\n").find((l) => l.startsWith("READY "));
      if (line !== undefined) resolve(JSON.parse(line.slice("READY ".length)));
    });
    child.once("exit", (code) => reject(new Error(`harness.py exited with ${code} before READY:\n${output}`)));
    child.once("error", reject);
  });
  const timer = setTimeout(() => child.kill("SIGKILL"), 20000 * MS);
  try {
    const addresses = await ready;
    return { child, ...addresses };
  } finally {
    clearTimeout(timer);
  }
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
    disconnects: [],
    tokenRequests: [],
    stopped: null,
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

function makeClient(url, options, app) {
  const unknown = Object.keys(options).filter((name) => !CLIENT_OPTIONS.has(name));
  assert.deepEqual(unknown, [], `unknown client options ${unknown}`);
  const backoff = options.backoff ?? { initial_ms: 50, max_ms: 200 };
  const tokens = [...(options.tokens ?? [])];
  const client = new Client({
    url,
    ...(options.token !== undefined ? { token: options.token } : {}),
    ...(options.tokens !== undefined
      ? {
          getToken(request) {
            app.tokenRequests.push(request.reason);
            return tokens.length > 0 ? tokens.shift() : null;
          },
        }
      : {}),
    backoff: { initialDelay: backoff.initial_ms, maxDelay: backoff.max_ms },
    ...(options.heartbeat_interval_ms !== undefined ? { heartbeatInterval: options.heartbeat_interval_ms } : {}),
    ...(options.heartbeat_timeout_ms !== undefined ? { heartbeatTimeout: options.heartbeat_timeout_ms } : {}),
  });
  client.on("connected", (welcome) => app.welcomes.push(welcome.resumed));
  client.on("disconnect", (info) => {
    app.disconnects.push({ at: performance.now(), code: info.code });
    if (info.retryIn === null) app.stopped = { kind: "refused", code: info.code };
  });
  client.on("error", () => {}); // what matters is recorded above; the steps check it
  return client;
}

async function waitUntil(app, condition, what, timeout = WAIT) {
  const deadline = performance.now() + timeout;
  while (app.violations.length === 0 && !condition()) {
    if (performance.now() > deadline) throw new assert.AssertionError({ message: `${what}: still not so after ${timeout} ms` });
    await sleep(10);
  }
}

const matches = (actual, expected) =>
  actual.length === expected.length && actual.every((a, i) => (Array.isArray(expected[i]) ? expected[i].includes(a) : a === expected[i]));

async function play(scenario) {
  const unknown = Object.keys(scenario.server).filter((name) => !SERVER_OPTIONS.has(name));
  assert.deepEqual(unknown, [], `unknown server options ${unknown}`);
  const harness = await startHarness(scenario.server);
  let app = null;
  let client = null;
  let lastCut = 0;
  try {
    for (const [index, step] of scenario.steps.entries()) {
      const where = `step ${index + 1} (${step.op})`;
      switch (step.op) {
        case "subscribe": {
          app = makeApp(harness.http, step.room);
          client = makeClient(`${harness.ws}?room=${encodeURIComponent(step.room)}`, scenario.client, app);
          client.subscribe({ resync: app.resync, onEvent: app.onEvent });
          client.connect();
          if (step.wait ?? true) {
            const current = app;
            await waitUntil(current, () => current.welcomes.length > 0 || current.stopped !== null, where);
            assert.equal(current.stopped, null, `${where}: stopped`);
          }
          continue;
        }
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
        default:
          assert.ok(app !== null && client !== null, `${where} before subscribe`);
          await expect(app, client, step, where, lastCut);
      }
    }
  } finally {
    client?.close();
    await stopHarness(harness);
  }
}

async function expect(app, client, step, where, lastCut) {
  switch (step.op) {
    case "expect_items": {
      const wanted = Array.from({ length: step.count }, (_, i) => i + 1);
      await waitUntil(app, () => app.items.length === wanted.length && app.items.every((n, i) => n === wanted[i]), `${where}: items 1..${step.count}, have [${app.items}]`);
      break;
    }
    case "expect_resyncs":
      assert.ok(matches(app.resyncs, step.reasons), `${where}: resyncs ${JSON.stringify(app.resyncs)}`);
      break;
    case "expect_welcomes":
      assert.deepEqual(app.welcomes, step.resumed, `${where}: welcomes (resumed)`);
      break;
    case "expect_disconnects": {
      await waitUntil(app, () => app.disconnects.length >= step.codes.length, `${where}: disconnects ${JSON.stringify(app.disconnects)}`);
      assert.deepEqual(app.disconnects.map((d) => d.code), step.codes, `${where}: disconnect codes`);
      if (step.within_ms !== undefined && step.codes.length > 0) {
        const took = app.disconnects.at(-1).at - lastCut;
        assert.ok(took <= step.within_ms, `${where}: the disconnect came ${Math.round(took)} ms after the cut`);
      }
      break;
    }
    case "expect_duplicates":
      assert.equal(client.subscription.stats.duplicates, step.count, `${where}: ${JSON.stringify(client.subscription.stats)}`);
      break;
    case "expect_stopped":
      await waitUntil(app, () => app.stopped !== null, where);
      assert.deepEqual(app.stopped, { kind: "refused", code: step.code }, where);
      break;
    case "expect_token_requests":
      assert.deepEqual(app.tokenRequests, step.reasons, `${where}: token requests`);
      break;
    default:
      assert.fail(`${where}: unknown step '${step.op}'`);
  }
  assert.deepEqual(app.violations, [], "the application's state went wrong");
}

for (const scenario of suite.scenarios) {
  test(`conformance: ${scenario.name}`, { timeout: 120000 }, () => play(scenario));
}
