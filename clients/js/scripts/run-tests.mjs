// Run the tests with Node's own runner. Node 20 has a global WebSocket only behind a flag (on by
// default from Node 22): turn it on for the test processes when this Node needs it.
import { spawnSync } from "node:child_process";
import { readdirSync } from "node:fs";

const env = { ...process.env };
if (typeof globalThis.WebSocket === "undefined") {
  env.NODE_OPTIONS = `${env.NODE_OPTIONS ?? ""} --experimental-websocket`.trim();
}
// `npm test -- test/live.test.js` runs one file; without arguments every test/*.test.js runs, one
// file at a time (each starts its own servers; the machine is small).
const given = process.argv.slice(2);
const files = given.some((arg) => !arg.startsWith("-"))
  ? []
  : readdirSync(new URL("../test/", import.meta.url))
      .filter((name) => name.endsWith(".test.js"))
      .sort()
      .map((name) => `test/${name}`);
const args = ["--test", "--test-concurrency=1", "--test-timeout=120000", ...given, ...files];
const result = spawnSync(process.execPath, args, { stdio: "inherit", env });
process.exit(result.status ?? 1);
