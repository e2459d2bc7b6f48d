// The sans-I/O parts: seq verdicts, positions, backoff with full jitter, close-code decisions, URLs.

import assert from "node:assert/strict";
import { test } from "node:test";

import { Client, Cursor, backoffCeiling, backoffDelay, checkPosition, closeAction, decodeFrame, sseUrlFor } from "../dist/index.js";

test("a cursor applies the next seq, drops old ones, and reports a gap", () => {
  const cursor = new Cursor();
  assert.equal(cursor.judge(1), null);
  assert.deepEqual(cursor.resumeParams(), {});
  cursor.reset({ epoch: "e1", seq: 5 });
  assert.equal(cursor.judge(4), "duplicate");
  assert.equal(cursor.judge(5), "duplicate");
  assert.equal(cursor.judge(6), "apply");
  assert.equal(cursor.judge(8), "gap");
  cursor.advance(6);
  assert.deepEqual(cursor.position, { epoch: "e1", seq: 6 });
  assert.deepEqual(cursor.resumeParams(), { epoch: "e1", last_seq: "6" });
});

test("positions are checked", () => {
  assert.deepEqual(checkPosition({ epoch: "e", seq: 0 }), { epoch: "e", seq: 0 });
  for (const bad of [null, "e:1", { epoch: "", seq: 1 }, { epoch: "e", seq: -1 }, { epoch: "e", seq: 1.5 }, { epoch: "e" }, { epoch: "x".repeat(129), seq: 1 }]) {
    assert.throws(() => checkPosition(bad), TypeError, JSON.stringify(bad));
  }
});

test("backoff: full jitter below a ceiling that doubles from 500 ms up to 10 s", () => {
  assert.deepEqual([0, 1, 2, 3, 4, 5, 6, 10].map((n) => backoffCeiling(n)), [500, 1000, 2000, 4000, 8000, 10000, 10000, 10000]);
  assert.equal(backoffDelay(3, {}, () => 0), 0);
  assert.equal(backoffDelay(3, {}, () => 0.5), 2000);
  assert.equal(backoffDelay(3, {}, () => 0.999999), 3999);
  assert.equal(backoffCeiling(2, { initialDelay: 100, maxDelay: 300, multiplier: 3 }), 300);
  // Spread: 1,000 clients dropped at once come back over the whole window, not in a burst.
  const delays = Array.from({ length: 1000 }, () => backoffDelay(0));
  const buckets = [0, 0, 0, 0, 0];
  for (const delay of delays) {
    assert.ok(delay >= 0 && delay < 500);
    buckets[Math.floor(delay / 100)] += 1;
  }
  for (const count of buckets) assert.ok(count > 120 && count < 280, `buckets ${buckets}`);
});

test("close codes: 4003 asks for a token, 4004 and 1000 stop, everything else reconnects", () => {
  assert.equal(closeAction(4003), "refresh-token");
  assert.equal(closeAction(4004), "stop");
  assert.equal(closeAction(1000), "stop");
  for (const code of [1001, 1006, 1009, 1011, 1012, 1013, 4001, 4002, 4008]) assert.equal(closeAction(code), "reconnect", code);
});

test("frames are decoded and checked", () => {
  assert.deepEqual(decodeFrame('{"type":"item","seq":3,"n":1}'), { event: { type: "item", seq: 3, n: 1 } });
  assert.equal(decodeFrame('{"type":"welcome","channel":"c","epoch":"e","seq":0,"heartbeat_interval":25,"resumed":false,"protocol":1}').frame.type, "welcome");
  for (const bad of ["nope", "[]", '{"seq":1}', '{"type":"item"}', '{"type":"item","seq":-1}', '{"type":"welcome","epoch":"e"}', '{"type":"resync_required","reason":"x","epoch":"e"}']) {
    assert.throws(() => decodeFrame(bad), { name: "FrameError" }, bad);
  }
});

test("the SSE address is derived from the WebSocket one", () => {
  assert.equal(sseUrlFor("ws://h:1/realtime?room=a"), "http://h:1/realtime/sse?room=a");
  assert.equal(sseUrlFor("wss://h/realtime/?room=a"), "https://h/realtime/sse?room=a");
});

test("a client needs a ws:// address and a WebSocket (or an EventSource)", () => {
  assert.throws(() => new Client({ url: "http://h/realtime" }), TypeError);
  assert.throws(() => new Client({ url: "not a url" }), TypeError);
  const saved = globalThis.WebSocket;
  try {
    delete globalThis.WebSocket;
    assert.throws(() => new Client({ url: "ws://h/realtime" }), /no WebSocket here/);
  } finally {
    globalThis.WebSocket = saved;
  }
  const client = new Client({ url: "ws://h/realtime" });
  client.subscribe();
  assert.throws(() => client.subscribe(), /one channel per connection/);
});
