// Copy the built ES module (dist/*.js) into the example service's static files, where the host-stand page
// imports it: examples/restaurant_app/static/vendor/rtbroadcast-client/. `npm run vendor` builds and
// copies; `npm test` (test/vendored.test.js) fails when the committed copy is not the current build.
// Source-map comments are dropped: the maps point into src/, which the example does not serve.

import { mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

export const DIST = new URL("../dist/", import.meta.url);
export const VENDOR = new URL("../../../examples/restaurant_app/static/vendor/rtbroadcast-client/", import.meta.url);

/** The vendored files: name -> text, from the build in dist/. */
export function vendoredFiles() {
  const files = new Map();
  for (const name of readdirSync(DIST).filter((n) => n.endsWith(".js")).sort()) {
    const text = readFileSync(new URL(name, DIST), "utf8").replace(/\n\/\/# sourceMappingURL=\S+\s*$/, "\n");
    files.set(name, text);
  }
  if (!files.has("index.js")) throw new Error("dist/index.js is missing: run npm run build first");
  return files;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  rmSync(VENDOR, { recursive: true, force: true });
  mkdirSync(VENDOR, { recursive: true });
  for (const [name, text] of vendoredFiles()) writeFileSync(new URL(name, VENDOR), text);
  process.stdout.write(`copied ${[...vendoredFiles().keys()].join(", ")} to ${VENDOR.pathname}\n`);
}
