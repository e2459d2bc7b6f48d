// The host-stand page of the example service imports this package's built module from its static files
// (examples/restaurant_app/static/vendor/rtbroadcast-client/): that copy must be the current build.

import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import { test } from "node:test";

import { VENDOR, vendoredFiles } from "../scripts/vendor.mjs";

test("the example's vendored copy of the module is the current build (npm run vendor)", () => {
  const expected = vendoredFiles();
  const present = readdirSync(VENDOR).sort();
  assert.deepEqual(present, [...expected.keys()], "run `npm run vendor` in clients/js");
  for (const [name, text] of expected) {
    assert.equal(readFileSync(new URL(name, VENDOR), "utf8"), text, `${name} differs: run \`npm run vendor\` in clients/js`);
  }
});
