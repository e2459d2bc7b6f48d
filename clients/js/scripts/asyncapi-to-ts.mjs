#!/usr/bin/env node
// asyncapi-to-ts: turn a service's AsyncAPI 3.0 document (what `python -m rtbroadcast schema app:app`
// prints) or JSON Schema (rtbroadcast.schema.event_schemas / event_schema) into TypeScript types for
// @rtbroadcast/client: one interface per event and per nested object, the union of the events, and a
// map from event `type` to its interface.
//
//   node scripts/asyncapi-to-ts.mjs asyncapi.json > src/events.ts
//   python -m rtbroadcast schema myapp:app | node scripts/asyncapi-to-ts.mjs - --out src/events.ts
//
// Options: --out FILE (default: stdout), --union NAME (the events' union, default ServiceEvent),
// --check FILE (exit 1 when FILE differs from what would be generated: for CI).
// No dependencies: it runs on a bare Node 20, before `npm ci` (the repository's pytest runs it).
//
// The output is deterministic (same input, same bytes), so a test can diff it against a committed copy.

import { readFileSync, writeFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

/** A schema this generator cannot turn into a type. */
export class SchemaError extends Error {
  name = "SchemaError";
}

const IDENTIFIER = /^[A-Za-z_$][A-Za-z0-9_$]*$/;
const RESERVED = new Set(
  (
    "break case catch class const continue debugger default delete do else enum export extends false finally " +
    "for function if import in instanceof new null return super switch this throw true try typeof var void " +
    "while with as implements interface let package private protected public static yield any boolean " +
    "never number object string symbol undefined unknown bigint Record Array Date Error Event"
  ).split(" "),
);

/** A TypeScript type name for a schema name: PascalCase letters and digits, never a reserved word. */
export function typeName(raw) {
  const words = String(raw).split(/[^A-Za-z0-9]+/).filter(Boolean);
  let name = words.map((w) => w[0].toUpperCase() + w.slice(1)).join("");
  if (name === "" || /^[0-9]/.test(name)) name = `T${name}`;
  if (RESERVED.has(name)) name = `${name}Type`;
  return name;
}

const propertyKey = (key) => (IDENTIFIER.test(key) ? key : JSON.stringify(key));

function docComment(lines, indent) {
  const text = lines.filter((line) => typeof line === "string" && line.trim() !== "").join("\n\n");
  if (text === "") return "";
  const body = text.replaceAll("*/", "*\\/").split("\n");
  if (body.length === 1) return `${indent}/** ${body[0]} */\n`;
  return `${indent}/**\n${body.map((line) => `${indent} *${line ? ` ${line}` : ""}`).join("\n")}\n${indent} */\n`;
}

/**
 * Converts schemas to TypeScript type expressions. Named schemas (the document's definitions) become
 * interfaces or type aliases; `$ref`s point at them by name.
 */
class Generator {
  /** @param {Map<string, object>} definitions ref -> schema; @param {Map<string, string>} names ref -> TS name */
  constructor(definitions, names) {
    this.definitions = definitions;
    this.names = names;
  }

  refName(ref) {
    const name = this.names.get(ref);
    if (name === undefined) throw new SchemaError(`unresolvable $ref ${JSON.stringify(ref)}`);
    return name;
  }

  /** The type expression of `schema`; `indent` is the indentation of the line it starts on. */
  type(schema, indent = "") {
    if (schema === true || schema === undefined) return "unknown";
    if (schema === false) return "never";
    if (typeof schema !== "object" || schema === null || Array.isArray(schema)) {
      throw new SchemaError(`a schema is an object or a boolean, not ${JSON.stringify(schema)}`);
    }
    if (typeof schema.$ref === "string") return this.refName(schema.$ref);
    if ("const" in schema) return literal(schema.const);
    if (Array.isArray(schema.enum)) return union(schema.enum.map(literal));
    for (const key of ["anyOf", "oneOf"]) {
      if (Array.isArray(schema[key])) return union(schema[key].map((s) => this.type(s, indent)));
    }
    if (Array.isArray(schema.allOf)) {
      return schema.allOf.map((s) => wrap(this.type(s, indent))).join(" & ") || "unknown";
    }
    const types = Array.isArray(schema.type) ? schema.type : schema.type === undefined ? null : [schema.type];
    if (types === null) {
      if (schema.properties !== undefined) return this.object(schema, indent);
      return "unknown";
    }
    return union(types.map((t) => this.typeOf(t, schema, indent)));
  }

  typeOf(type, schema, indent) {
    switch (type) {
      case "string":
        return "string";
      case "integer":
      case "number":
        return "number";
      case "boolean":
        return "boolean";
      case "null":
        return "null";
      case "array":
        return this.array(schema, indent);
      case "object":
        return this.object(schema, indent);
      default:
        throw new SchemaError(`unknown JSON Schema type ${JSON.stringify(type)}`);
    }
  }

  array(schema, indent) {
    if (Array.isArray(schema.prefixItems)) {
      const items = schema.prefixItems.map((s) => this.type(s, indent));
      if (schema.items === false) return `[${items.join(", ")}]`;
      return `[${[...items, `...${wrap(this.type(schema.items, indent))}[]`].join(", ")}]`;
    }
    return `${wrap(this.type(schema.items, indent))}[]`;
  }

  /** An object literal type: declared properties (optional unless required) and additional ones. */
  object(schema, indent) {
    const properties = schema.properties ?? {};
    const required = new Set(schema.required ?? []);
    const inner = `${indent}  `;
    const lines = [];
    for (const [key, property] of Object.entries(properties)) {
      // Only descriptions: pydantic's automatic titles ("Guest Id" for guest_id) say nothing more.
      lines.push(docComment([property?.description], inner));
      lines.push(`${inner}${propertyKey(key)}${required.has(key) ? "" : "?"}: ${this.type(property, inner)};\n`);
    }
    const extra = schema.additionalProperties;
    if (extra !== undefined && extra !== false && (extra !== true || lines.length === 0)) {
      lines.push(`${inner}[key: string]: ${this.type(extra, inner)};\n`);
    } else if (extra === undefined && lines.length === 0) {
      lines.push(`${inner}[key: string]: unknown;\n`);
    }
    return `{\n${lines.join("")}${indent}}`;
  }

  /** The declaration of a named schema: an interface for an object, a type alias otherwise. */
  declaration(name, schema, extraDoc = []) {
    const doc = docComment([...extraDoc, schema?.description ?? null], "");
    const isObject =
      typeof schema === "object" &&
      schema !== null &&
      (schema.type === "object" || (schema.type === undefined && schema.properties !== undefined)) &&
      schema.$ref === undefined &&
      !("const" in schema) &&
      !["anyOf", "oneOf", "allOf", "enum"].some((key) => key in schema);
    if (isObject) return `${doc}export interface ${name} ${this.object(schema, "")}\n`;
    return `${doc}export type ${name} = ${this.type(schema, "")};\n`;
  }
}

function literal(value) {
  if (value === null || ["string", "number", "boolean"].includes(typeof value)) return JSON.stringify(value);
  throw new SchemaError(`only string, number, boolean and null constants have a literal type, not ${JSON.stringify(value)}`);
}

function union(types) {
  const unique = [...new Set(types)];
  if (unique.includes("unknown")) return "unknown";
  return unique.length === 0 ? "never" : unique.join(" | ");
}

/** Parenthesise a union or intersection before `[]` or `&`. */
const wrap = (type) => (/^[A-Za-z0-9_$."\[\]]+$/.test(type) ? type : `(${type})`);

/** What the input is, turned into one shape: named definitions and the events (name, type, schema ref). */
function collect(document) {
  if (typeof document !== "object" || document === null || Array.isArray(document)) {
    throw new SchemaError("the input is not a JSON object (an AsyncAPI document or JSON Schema)");
  }
  const definitions = new Map();
  const events = [];
  let title = null;
  if (typeof document.asyncapi === "string") {
    if (!document.asyncapi.startsWith("3.")) {
      throw new SchemaError(`AsyncAPI ${document.asyncapi} is not supported: give an AsyncAPI 3 document`);
    }
    title = [document.info?.title, document.info?.version].filter(Boolean).join(" ");
    const schemas = document.components?.schemas ?? {};
    for (const [key, schema] of Object.entries(schemas)) definitions.set(`#/components/schemas/${key}`, { key, schema });
    for (const [key, message] of Object.entries(document.components?.messages ?? {})) {
      // The protocol's own frames (welcome, pong, ...) have their types in the client package.
      if ((message.tags ?? []).some((tag) => tag?.name === "protocol")) continue;
      const ref = message.payload?.$ref;
      if (typeof ref !== "string" || !definitions.has(ref)) {
        throw new SchemaError(`message ${JSON.stringify(key)} has no payload $ref into components/schemas`);
      }
      events.push({ ref, summary: message.summary ?? null });
    }
  } else if (typeof document.type === "object" || document.properties !== undefined) {
    // One event's JSON Schema (rtbroadcast.schema.event_schema).
    addSchemaDocument(document, null, definitions, events);
  } else {
    // {event type: JSON Schema} (rtbroadcast.schema.event_schemas).
    for (const [key, schema] of Object.entries(document)) addSchemaDocument(schema, key, definitions, events);
  }
  if (events.length === 0) throw new SchemaError("the input declares no events");
  return { definitions, events, title };
}

function addSchemaDocument(schema, key, definitions, events) {
  if (typeof schema !== "object" || schema === null) throw new SchemaError(`${key ?? "the input"} is not a JSON Schema`);
  const { $defs = {}, $schema: _dialect, ...rest } = schema;
  const name = rest.title ?? key ?? "Event";
  const ref = `#event/${name}`;
  for (const [defKey, defSchema] of Object.entries($defs)) {
    const existing = definitions.get(`#/$defs/${defKey}`);
    if (existing !== undefined && JSON.stringify(existing.schema) !== JSON.stringify(defSchema)) {
      throw new SchemaError(`two different definitions are named ${JSON.stringify(defKey)}`);
    }
    definitions.set(`#/$defs/${defKey}`, { key: defKey, schema: defSchema });
  }
  definitions.set(ref, { key: name, schema: rest });
  events.push({ ref, summary: null });
}

/**
 * Generate the TypeScript module text for `document` (a parsed AsyncAPI 3 document or JSON Schema).
 *
 * @param {object} document
 * @param {{union?: string, source?: string}} options
 * @returns {string}
 * @throws {SchemaError} when the input cannot be turned into types
 */
export function generate(document, options = {}) {
  const unionName = options.union ?? "ServiceEvent";
  if (!IDENTIFIER.test(unionName)) throw new SchemaError(`--union needs an identifier, not ${JSON.stringify(unionName)}`);
  const { definitions, events, title } = collect(document);
  const names = new Map();
  const taken = new Set([unionName, `${unionName}Map`, `${unionName}Type`]);
  for (const [ref, { key }] of definitions) {
    let name = typeName(key);
    while (taken.has(name)) name += "_";
    taken.add(name);
    names.set(ref, name);
  }
  const generator = new Generator(definitions, names);
  const eventRefs = new Set(events.map((event) => event.ref));
  // Only what the events reach: a document's protocol frames (and anything else unused) stay out.
  const reachable = new Set();
  const visit = (value) => {
    if (Array.isArray(value)) value.forEach(visit);
    else if (typeof value === "object" && value !== null) {
      if (typeof value.$ref === "string" && !reachable.has(value.$ref)) {
        reachable.add(value.$ref);
        const target = definitions.get(value.$ref);
        if (target === undefined) throw new SchemaError(`unresolvable $ref ${JSON.stringify(value.$ref)}`);
        visit(target.schema);
      }
      for (const [key, child] of Object.entries(value)) if (key !== "$ref") visit(child);
    }
  };
  for (const ref of eventRefs) visit({ $ref: ref });

  const eventTypes = [];
  for (const event of events) {
    const schema = definitions.get(event.ref).schema;
    const type = schema?.properties?.type?.const;
    if (typeof type !== "string") {
      throw new SchemaError(`event ${names.get(event.ref)} has no constant 'type' (properties.type.const)`);
    }
    eventTypes.push({ type, name: names.get(event.ref), summary: event.summary });
  }

  const out = [];
  const from = options.source ?? (title ? `"${title}"` : "the service's schema");
  out.push(
    `// Generated by @rtbroadcast/client's scripts/asyncapi-to-ts.mjs from ${from}. Do not edit: generate it again.\n`,
  );
  out.push(`// Every event as a client receives it: the service's fields and the \`seq\` the server adds.\n\n`);
  for (const [ref, { schema }] of definitions) {
    if (!reachable.has(ref)) continue;
    const summary = events.find((event) => event.ref === ref)?.summary;
    const extra = summary && summary !== schema?.description ? [summary] : [];
    out.push(generator.declaration(names.get(ref), schema, extra), "\n");
  }
  out.push(`/** Every event the service sends, told apart by \`type\`. */\n`);
  out.push(`export type ${unionName} =\n${eventTypes.map((e) => `  | ${e.name}`).join("\n")};\n\n`);
  out.push(`/** The event types. */\n`);
  out.push(`export type ${unionName}Type = ${unionName}["type"];\n\n`);
  out.push(`/** Each event's interface by its \`type\`: \`${unionName}Map["${eventTypes[0].type}"]\`. */\n`);
  out.push(`export interface ${unionName}Map {\n`);
  for (const { type, name } of eventTypes) out.push(`  ${propertyKey(type)}: ${name};\n`);
  out.push("}\n\n");
  out.push(`/** The event types, as values (for a \`switch\` that must cover them all, or a runtime check). */\n`);
  out.push(`export const ${lowerFirst(unionName)}Types: readonly ${unionName}Type[] = [\n`);
  for (const { type } of eventTypes) out.push(`  ${JSON.stringify(type)},\n`);
  out.push("];\n");
  return out.join("");
}

const lowerFirst = (name) => name[0].toLowerCase() + name.slice(1);

function parseArgs(argv) {
  const options = { input: null, out: null, check: null, union: undefined };
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new SchemaError(`${arg} needs a value`);
      return argv[++i];
    };
    if (arg === "--out" || arg === "-o") options.out = value();
    else if (arg === "--check") options.check = value();
    else if (arg === "--union") options.union = value();
    else if (arg === "--help" || arg === "-h") options.help = true;
    else if (arg.startsWith("-") && arg !== "-") throw new SchemaError(`unknown option ${arg}`);
    else if (options.input === null) options.input = arg;
    else throw new SchemaError(`one input only, not also ${arg}`);
  }
  return options;
}

const USAGE = "usage: asyncapi-to-ts.mjs INPUT.json|- [--out FILE | --check FILE] [--union NAME]";

function main(argv) {
  let options;
  try {
    options = parseArgs(argv);
  } catch (error) {
    process.stderr.write(`asyncapi-to-ts: ${error.message}\n${USAGE}\n`);
    return 2;
  }
  if (options.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  if (options.input === null) {
    process.stderr.write(`asyncapi-to-ts: no input\n${USAGE}\n`);
    return 2;
  }
  let text;
  try {
    text = readFileSync(options.input === "-" ? 0 : options.input, "utf8");
  } catch (error) {
    process.stderr.write(`asyncapi-to-ts: cannot read ${options.input}: ${error.message}\n`);
    return 2;
  }
  let output;
  try {
    let document;
    try {
      document = JSON.parse(text);
    } catch (error) {
      throw new SchemaError(`${options.input} is not JSON: ${error.message}`);
    }
    output = generate(document, { union: options.union });
  } catch (error) {
    if (!(error instanceof SchemaError)) throw error;
    process.stderr.write(`asyncapi-to-ts: ${error.message}\n`);
    return 2;
  }
  if (options.check !== null) {
    let current = null;
    try {
      current = readFileSync(options.check, "utf8");
    } catch {
      // missing: differs
    }
    if (current !== output) {
      process.stderr.write(
        `asyncapi-to-ts: ${options.check} is not what the schema generates: generate it again ` +
          `(node scripts/asyncapi-to-ts.mjs ${options.input} --out ${options.check})\n`,
      );
      return 1;
    }
    return 0;
  }
  if (options.out !== null) writeFileSync(options.out, output);
  else process.stdout.write(output);
  return 0;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) process.exitCode = main(process.argv.slice(2));
