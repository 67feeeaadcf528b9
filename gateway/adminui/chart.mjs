// A line chart of a Series on a <canvas>, and its legend as plain DOM text
// (what a screen reader, or a test, reads: the latest value of each line).

const COLORS = ["#2f7ed8", "#e4572e", "#29a36a", "#9c5ccf", "#f0a202", "#17becf", "#d62780",
  "#7f7f7f", "#8c564b", "#bcbd22", "#1f3b73", "#ff7f0e"];

export function colorOf(index) {
  return COLORS[index % COLORS.length];
}

// The y axis's top: `ticks` steps of 1, 2, 2.5 or 5 times a power of ten, so that
// every grid line has a round label.
export function niceMax(v, ticks = 4) {
  if (!(v > 0)) return ticks;
  const step = v / ticks;
  const p = 10 ** Math.floor(Math.log10(step));
  for (const m of [1, 2, 2.5, 5, 10]) if (step <= m * p) return m * p * ticks;
  return 10 * p * ticks;
}

function fmt(v) {
  if (!Number.isFinite(v)) return "-";
  if (Math.abs(v) >= 100 || Number.isInteger(v)) return String(Math.round(v));
  return String(Number(v.toFixed(Math.abs(v) < 1 ? 2 : 1)));
}

export class Chart {
  // windowS: how many seconds of the series the x axis spans; unit: after each value;
  // floor: the least top of the y axis (4 for counts of sessions: no quarter steps).
  constructor(canvas, legend, { windowS = 120, unit = "", floor = 0 } = {}) {
    this.canvas = canvas;
    this.legend = legend;
    this.windowS = windowS;
    this.unit = unit;
    this.floor = floor;
    this.keyOrder = []; // a key keeps its color for the chart's life
  }

  colorFor(key) {
    let i = this.keyOrder.indexOf(key);
    if (i < 0) {
      this.keyOrder.push(key);
      i = this.keyOrder.length - 1;
    }
    return colorOf(i);
  }

  draw(series, nowS) {
    const c = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const w = c.clientWidth || 480;
    const h = c.clientHeight || 180;
    if (c.width !== Math.round(w * ratio) || c.height !== Math.round(h * ratio)) {
      c.width = Math.round(w * ratio);
      c.height = Math.round(h * ratio);
    }
    const g = c.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, w, h);
    const left = 44;
    const right = 8;
    const top = 8;
    const bottom = 18;
    const pw = w - left - right;
    const ph = h - top - bottom;
    const ymax = niceMax(Math.max(series.max(), this.floor));

    g.font = "11px system-ui, sans-serif";
    g.fillStyle = "#667";
    g.strokeStyle = "#dde";
    g.lineWidth = 1;
    for (let i = 0; i <= 4; i += 1) {
      const y = top + ph - (ph * i) / 4;
      g.beginPath();
      g.moveTo(left, y);
      g.lineTo(left + pw, y);
      g.stroke();
      g.textAlign = "right";
      g.textBaseline = "middle";
      g.fillText(fmt((ymax * i) / 4), left - 6, y);
    }
    g.textAlign = "left";
    g.textBaseline = "top";
    g.fillText(`-${this.windowS} s`, left, top + ph + 4);
    g.textAlign = "right";
    g.fillText("now", left + pw, top + ph + 4);

    const x = (t) => left + pw - ((nowS - t) / this.windowS) * pw;
    const y = (v) => top + ph - (Math.min(v, ymax) / ymax) * ph;
    const keys = series.keys();
    g.lineWidth = 2;
    for (const key of keys) {
      g.strokeStyle = this.colorFor(key);
      g.beginPath();
      let started = false;
      for (const p of series.points) {
        if (nowS - p.t > this.windowS) continue;
        const v = p.values.get(key) ?? 0;
        if (!started) g.moveTo(x(p.t), y(v));
        else g.lineTo(x(p.t), y(v));
        started = true;
      }
      g.stroke();
    }
    // What was drawn, for a reader that cannot see the canvas: points, the highest value, the axis top.
    c.dataset.points = String(series.points.length);
    c.dataset.max = String(series.max());
    c.dataset.top = String(ymax);
    this.drawLegend(series.latest(), keys);
  }

  drawLegend(latest, keys) {
    const items = [];
    for (const key of keys) {
      const li = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.backgroundColor = this.colorFor(key);
      const name = document.createElement("span");
      name.className = "key";
      name.textContent = key;
      const value = document.createElement("span");
      value.className = "value";
      value.textContent = `${fmt(latest.get(key) ?? 0)}${this.unit}`;
      li.dataset.key = key;
      li.append(swatch, name, value);
      items.push(li);
    }
    this.legend.replaceChildren(...items);
  }
}
