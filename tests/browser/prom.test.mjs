// The admin page's Prometheus text parser and rates, under `node --test`
// (run by tests/browser/test_prom_parser.py).
import assert from "node:assert/strict";
import { test } from "node:test";

import { ParseError, parsePrometheus, rates, Series, sumBy, topKeys } from "../../gateway/adminui/prom.mjs";

const SCRAPE = `# HELP gateway_sessions_open Sessions open now
# TYPE gateway_sessions_open gauge
gateway_sessions_open{route="chat"} 3.0
gateway_sessions_open{route="orders"} 0.0
# HELP gateway_messages_total Messages relayed
# TYPE gateway_messages_total counter
gateway_messages_total{direction="in",route="chat"} 10.0
gateway_messages_total{direction="out",route="chat"} 4.0
gateway_messages_created{direction="in",route="chat"} 1.7649e+09
gateway_draining 0.0
process_cpu_seconds_total 1.25 1700000000000
`;

test("samples: names, labels and values; comments and created lines apart", () => {
  const s = parsePrometheus(SCRAPE);
  assert.equal(s.length, 7);
  assert.deepEqual(s[0], { name: "gateway_sessions_open", labels: { route: "chat" }, value: 3 });
  assert.deepEqual(s[5], { name: "gateway_draining", labels: {}, value: 0 });
  assert.equal(s[4].value, 1.7649e9);
  assert.equal(s[6].value, 1.25); // the timestamp is not the value
});

test("label values keep escaped quotes, backslashes, newlines, commas and braces", () => {
  const [s] = parsePrometheus('m{a="x\\"y",b="c:\\\\d",c="l1\\nl2",d="p,q}r"} 1\n');
  assert.deepEqual(s.labels, { a: 'x"y', b: "c:\\d", c: "l1\nl2", d: "p,q}r" });
});

test("special values and CRLF line ends", () => {
  const s = parsePrometheus("a NaN\r\nb +Inf\r\nc -Inf\r\nd 1e3\r\ne -0.5\r\n");
  assert.ok(Number.isNaN(s[0].value));
  assert.deepEqual(s.slice(1).map((x) => x.value), [Infinity, -Infinity, 1000, -0.5]);
});

test("a malformed line is an error naming its line", () => {
  for (const [text, line, what] of [
    ["ok 1\nbad{route=\"x} 1\n", 2, /unterminated/],
    ["ok 1\n\nm{route=x} 1\n", 3, /expected ="/],
    ["m 0x1f\n", 1, /not a number/],
    ["m\n", 1, /expected a value/],
    ["m 1 2 3\n", 1, /expected a value/],
    ["{a=\"b\"} 1\n", 1, /metric name/],
    ['m{a="b\\q"} 1\n', 1, /bad escape/],
  ]) {
    assert.throws(() => parsePrometheus(text), (e) => e instanceof ParseError && e.lineNo === line && what.test(e.message),
      JSON.stringify(text));
  }
});

test("sums by label, over the labels not asked for", () => {
  const s = parsePrometheus(SCRAPE);
  assert.deepEqual([...sumBy(s, "gateway_sessions_open", ["route"])], [["chat", 3], ["orders", 0]]);
  assert.deepEqual([...sumBy(s, "gateway_messages_total", ["route"])], [["chat", 14]]);
  assert.deepEqual([...sumBy(s, "gateway_messages_total", ["route", "direction"])], [["chat in", 10], ["chat out", 4]]);
  assert.equal(sumBy(s, "nope", ["route"]).size, 0);
});

test("rates: deltas per second; a reset counter counts from 0; a new key from 0", () => {
  const before = new Map([["a", 10], ["b", 50]]);
  const after = new Map([["a", 30], ["b", 5], ["c", 4]]);
  assert.deepEqual([...rates(before, after, 2)], [["a", 10], ["b", 2.5], ["c", 2]]);
  assert.equal(rates(before, after, 0).size, 0);
});

test("topKeys keeps the largest and sums the rest", () => {
  const v = new Map([["a", 1], ["b", 5], ["c", 3], ["d", 2]]);
  assert.equal(topKeys(v, 4), v);
  assert.deepEqual([...topKeys(v, 3)], [["b", 5], ["c", 3], ["(other)", 3]]);
});

test("a series keeps its capacity, its keys and its max", () => {
  const s = new Series(3);
  for (let i = 0; i < 5; i += 1) s.push(i, new Map([["k", i], ...(i === 1 ? [["old", 99]] : [])]));
  assert.equal(s.points.length, 3);
  assert.deepEqual(s.keys(), ["k"]);
  assert.equal(s.max(), 4);
  assert.equal(s.latest().get("k"), 4);
});

test("the chart's y axis ends on round grid lines", async () => {
  const { niceMax } = await import("../../gateway/adminui/chart.mjs");
  assert.deepEqual([0, 4, 5, 212, 0.5, 1000].map((v) => niceMax(v)), [4, 4, 8, 400, 0.8, 1000]);
});
