// The type generator (scripts/asyncapi-to-ts.mjs): JSON Schema constructs to TypeScript, compiled by tsc
// under the package's strict options, and its refusals. The example service's generated file is checked
// against the service's current schema by the repository's pytest (tests/test_js_types.py).

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { test } from "node:test";

import { SchemaError, generate, typeName } from "../scripts/asyncapi-to-ts.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const script = path.join(here, "../scripts/asyncapi-to-ts.mjs");
const tsc = path.join(here, "../node_modules/typescript/bin/tsc");

// What rtbroadcast.schema.event_schemas returns for two events, with the constructs pydantic emits.
const schemas = {
  order_placed: {
    $schema: "https://json-schema.org/draft/2020-12/schema",
    title: "OrderPlaced",
    description: "An order was placed.",
    type: "object",
    properties: {
      type: { const: "order_placed", type: "string" },
      lines: { type: "array", items: { $ref: "#/$defs/Line" } },
      note: { anyOf: [{ type: "string" }, { type: "null" }], description: "Free text */ with a comment end." },
      channel: { enum: ["web", "phone"] },
      totals: { type: "object", additionalProperties: { type: "number" } },
      "x-trace": { type: "string" },
      pair: { type: "array", prefixItems: [{ type: "string" }, { type: "integer" }], items: false },
      meta: { type: "object" },
      anything: {},
      seq: { type: "integer", minimum: 1 },
    },
    required: ["type", "lines", "note", "channel", "totals", "seq"],
    $defs: {
      Line: {
        type: "object",
        properties: { sku: { type: "string" }, qty: { type: "integer" }, tags: { type: ["string", "null"] } },
        required: ["sku", "qty"],
      },
    },
  },
  order_cancelled: {
    title: "OrderCancelled",
    type: "object",
    properties: { type: { const: "order_cancelled", type: "string" }, line: { $ref: "#/$defs/Line" }, seq: { type: "integer" } },
    required: ["type", "seq"],
    $defs: {
      Line: {
        type: "object",
        properties: { sku: { type: "string" }, qty: { type: "integer" }, tags: { type: ["string", "null"] } },
        required: ["sku", "qty"],
      },
    },
  },
};

test("JSON Schema constructs become the TypeScript types they mean", () => {
  const out = generate(schemas, { union: "ShopEvent" });
  assert.match(out, /export interface OrderPlaced \{/);
  assert.match(out, /  type: "order_placed";/);
  assert.match(out, /  lines: Line\[\];/);
  assert.match(out, /  note: string \| null;/);
  assert.match(out, /Free text \*\\\/ with a comment end\./); // cannot end the comment early
  assert.match(out, /  channel: "web" \| "phone";/);
  assert.match(out, /  totals: \{\n    \[key: string\]: number;\n  \};/);
  assert.match(out, /  "x-trace"\?: string;/);
  assert.match(out, /  pair\?: \[string, number\];/);
  assert.match(out, /  meta\?: \{\n    \[key: string\]: unknown;\n  \};/);
  assert.match(out, /  anything\?: unknown;/);
  assert.match(out, /export interface Line \{\n  sku: string;\n  qty: number;\n  tags\?: string \| null;\n\}/);
  assert.equal(out.match(/export interface Line /g).length, 1, "a definition shared by two events, once");
  assert.match(out, /export type ShopEvent =\n  \| OrderPlaced\n  \| OrderCancelled;/);
  assert.match(out, /export interface ShopEventMap \{\n  order_placed: OrderPlaced;\n  order_cancelled: OrderCancelled;\n\}/);
  assert.equal(generate(schemas, { union: "ShopEvent" }), out, "deterministic");
});

test("the generated module compiles under the package's strict options, and narrows by type", (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), "rtb-gen-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  writeFileSync(path.join(dir, "events.ts"), generate(schemas, { union: "ShopEvent" }));
  writeFileSync(
    path.join(dir, "use.ts"),
    `import type { ShopEvent, ShopEventMap } from "./events.js";
export function total(event: ShopEvent): number {
  if (event.type === "order_placed") return event.lines.reduce((sum, line) => sum + line.qty, 0);
  const cancelled: ShopEventMap["order_cancelled"] = event;
  return cancelled.line?.qty ?? 0;
}
// @ts-expect-error: not an event type
export const wrong: ShopEvent["type"] = "order_shipped";
`,
  );
  const result = spawnSync(
    process.execPath,
    [tsc, "--noEmit", "--strict", "--exactOptionalPropertyTypes", "--noUncheckedIndexedAccess", "--target", "ES2022",
      "--module", "ES2022", "--moduleResolution", "Bundler", path.join(dir, "events.ts"), path.join(dir, "use.ts")],
    { encoding: "utf8" },
  );
  assert.equal(result.status, 0, result.stdout + result.stderr);
});

test("an AsyncAPI document: the events' messages, not the protocol frames", () => {
  const document = {
    asyncapi: "3.0.0",
    info: { title: "Shop", version: "2.1.0" },
    components: {
      schemas: {
        OrderPlaced: { type: "object", properties: { type: { const: "order_placed" }, seq: { type: "integer" } }, required: ["type", "seq"] },
        "rtbroadcast.WelcomeFrame": { type: "object", properties: { type: { const: "welcome" } } },
      },
      messages: {
        order_placed: { payload: { $ref: "#/components/schemas/OrderPlaced" }, summary: "An order was placed." },
        welcome: { payload: { $ref: "#/components/schemas/rtbroadcast.WelcomeFrame" }, tags: [{ name: "protocol" }] },
      },
    },
  };
  const out = generate(document);
  assert.match(out, /from "Shop 2\.1\.0"/);
  assert.match(out, /\/\*\* An order was placed\. \*\/\nexport interface OrderPlaced \{/);
  assert.doesNotMatch(out, /Welcome/);
  assert.match(out, /export type ServiceEvent =\n  \| OrderPlaced;/);
});

test("what cannot be typed is refused with a SchemaError that says why", () => {
  const event = (properties) => ({ e: { type: "object", properties: { type: { const: "e" }, ...properties } } });
  const cases = [
    [[], /not a JSON object/],
    [{ asyncapi: "2.6.0" }, /AsyncAPI 2\.6\.0 is not supported/],
    [{ asyncapi: "3.0.0", components: {} }, /declares no events/],
    [event({ a: { $ref: "#/$defs/Missing" } }), /unresolvable \$ref "#\/\$defs\/Missing"/],
    [event({ a: { type: "decimal" } }), /unknown JSON Schema type "decimal"/],
    [{ e: { type: "object", properties: { type: { type: "string" } } } }, /has no constant 'type'/],
  ];
  for (const [input, message] of cases) assert.throws(() => generate(input), (error) => error instanceof SchemaError && message.test(error.message), JSON.stringify(input));
  assert.throws(() => generate(schemas, { union: "not an identifier" }), SchemaError);
});

test("type names are PascalCase identifiers that shadow nothing", () => {
  assert.equal(typeName("guest_created"), "GuestCreated");
  assert.equal(typeName("rtbroadcast.WelcomeFrame"), "RtbroadcastWelcomeFrame");
  assert.equal(typeName("2fa"), "T2fa");
  assert.equal(typeName("Event"), "EventType");
  assert.equal(typeName("string"), "String");
});

test("the command line: stdin or a file, --out, --check, and exit code 2 on bad input", (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), "rtb-gen-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const run = (args, input) => spawnSync(process.execPath, [script, ...args], { input, encoding: "utf8" });
  const json = JSON.stringify(schemas);
  const printed = run(["-"], json);
  assert.equal(printed.status, 0, printed.stderr);
  assert.equal(printed.stdout, generate(schemas));
  const out = path.join(dir, "events.ts");
  assert.equal(run(["-", "--out", out], json).status, 0);
  assert.equal(run(["-", "--check", out], json).status, 0);
  const drifted = run(["-", "--check", out], json.replace('"note"', '"remark"'));
  assert.equal(drifted.status, 1);
  assert.match(drifted.stderr, /is not what the schema generates/);
  const bad = run(["-"], "{not json");
  assert.equal(bad.status, 2);
  assert.match(bad.stderr, /is not JSON/);
  assert.equal(run(["--frobnicate"], "").status, 2);
  assert.equal(run([path.join(dir, "missing.json")], "").status, 2);
});
