// The Prometheus text exposition format (version 0.0.4), as /metrics serves it,
// parsed into samples; and the sums and rates the page draws. Pure functions:
// tests/browser/prom.test.mjs runs them under `node --test`.

const NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*/;
const LABEL = /^[a-zA-Z_][a-zA-Z0-9_]*/;

export class ParseError extends Error {
  constructor(lineNo, message) {
    super(`line ${lineNo}: ${message}`);
    this.name = "ParseError";
    this.lineNo = lineNo;
  }
}

function parseValue(raw, lineNo) {
  if (raw === "NaN") return NaN;
  if (raw === "+Inf" || raw === "Inf") return Infinity;
  if (raw === "-Inf") return -Infinity;
  // Number("") is 0 and Number("0x1f") is 31: neither is a Prometheus value.
  if (!/^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(raw)) {
    throw new ParseError(lineNo, `not a number: ${JSON.stringify(raw.slice(0, 40))}`);
  }
  return Number(raw);
}

// `{a="x",b="y\"z"}` from position `i` of `line`: [labels, position after the brace].
function parseLabels(line, i, lineNo) {
  const labels = {};
  i += 1; // past "{"
  for (;;) {
    while (line[i] === " ") i += 1;
    if (line[i] === "}") return [labels, i + 1];
    const m = LABEL.exec(line.slice(i));
    if (!m) throw new ParseError(lineNo, `bad label name at column ${i + 1}`);
    const key = m[0];
    i += key.length;
    while (line[i] === " ") i += 1;
    if (line[i] !== "=" || line[i + 1] !== '"') throw new ParseError(lineNo, `label ${key}: expected ="`);
    i += 2;
    let value = "";
    for (;;) {
      const c = line[i];
      if (c === undefined) throw new ParseError(lineNo, `label ${key}: unterminated value`);
      if (c === '"') break;
      if (c === "\\") {
        const e = line[i + 1];
        if (e === "n") value += "\n";
        else if (e === "\\" || e === '"') value += e;
        else throw new ParseError(lineNo, `label ${key}: bad escape \\${e ?? ""}`);
        i += 2;
      } else {
        value += c;
        i += 1;
      }
    }
    labels[key] = value;
    i += 1; // past the closing quote
    while (line[i] === " ") i += 1;
    if (line[i] === ",") i += 1;
    else if (line[i] !== "}") throw new ParseError(lineNo, `label ${key}: expected , or }`);
  }
}

// Every sample: [{name, labels: {k: v}, value}]. Comments (# HELP, # TYPE) and
// blank lines are skipped; a malformed line throws ParseError naming it.
export function parsePrometheus(text) {
  const samples = [];
  const lines = text.split("\n");
  for (let n = 0; n < lines.length; n += 1) {
    const line = lines[n].replace(/\r$/, "");
    const lineNo = n + 1;
    if (line.trim() === "" || line.trimStart().startsWith("#")) continue;
    const m = NAME.exec(line);
    if (!m) throw new ParseError(lineNo, "expected a metric name");
    const name = m[0];
    let i = name.length;
    let labels = {};
    if (line[i] === "{") [labels, i] = parseLabels(line, i, lineNo);
    const rest = line.slice(i).trim().split(/\s+/);
    if (rest.length < 1 || rest[0] === "" || rest.length > 2) {
      throw new ParseError(lineNo, `${name}: expected a value and an optional timestamp`);
    }
    samples.push({ name, labels, value: parseValue(rest[0], lineNo) });
  }
  return samples;
}

// Sum of the samples named `name`, by the values of `keys` joined with " "
// (one key: the value itself). Returns a Map, in the order first seen.
export function sumBy(samples, name, keys) {
  const out = new Map();
  for (const s of samples) {
    if (s.name !== name) continue;
    const k = keys.map((key) => s.labels[key] ?? "").join(" ");
    out.set(k, (out.get(k) ?? 0) + s.value);
  }
  return out;
}

// Per second, from two readings of the same counters `dt_s` apart. A counter
// that went down was reset (the process restarted): its whole value is new.
// A key absent before started from 0.
export function rates(before, after, dtS) {
  const out = new Map();
  if (!(dtS > 0)) return out;
  for (const [k, v] of after) {
    const prev = before.get(k) ?? 0;
    const delta = v >= prev ? v - prev : v;
    out.set(k, delta / dtS);
  }
  return out;
}

// At most `max` keys: the largest, by value; the rest summed under `other`, so a
// config with many routes still draws a readable chart of bounded size.
export function topKeys(values, max, other = "(other)") {
  if (values.size <= max) return values;
  const sorted = [...values].sort((a, b) => b[1] - a[1]);
  const out = new Map(sorted.slice(0, max - 1));
  out.set(other, sorted.slice(max - 1).reduce((acc, [, v]) => acc + v, 0));
  return out;
}

// A fixed number of readings, oldest dropped first: what a chart draws.
export class Series {
  constructor(capacity) {
    this.capacity = capacity;
    this.points = []; // [{t, values: Map}]
  }

  push(t, values) {
    this.points.push({ t, values });
    if (this.points.length > this.capacity) this.points.shift();
  }

  keys() {
    const seen = new Set();
    for (const p of this.points) for (const k of p.values.keys()) seen.add(k);
    return [...seen];
  }

  latest() {
    return this.points.length ? this.points[this.points.length - 1].values : new Map();
  }

  max() {
    let m = 0;
    for (const p of this.points) for (const v of p.values.values()) if (Number.isFinite(v) && v > m) m = v;
    return m;
  }
}
