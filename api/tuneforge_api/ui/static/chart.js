"use strict";
// A small line chart on a <canvas>: loss against step, one line per series. Drawn by hand so
// the console needs no third-party script.
const TFChart = (() => {
  const PAD = { left: 56, right: 16, top: 12, bottom: 36 };

  // About `count` round tick values covering [lo, hi].
  function ticks(lo, hi, count) {
    if (hi <= lo) return [lo];
    const raw = (hi - lo) / count;
    const magnitude = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
    return out;
  }

  // series: [{label, color, points: [[x, y], ...] sorted by x, dots}]
  function draw(canvas, series) {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || canvas.width;
    const height = canvas.clientHeight || canvas.height;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const all = series.flatMap((s) => s.points);
    if (all.length === 0) return;

    let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
    let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
    if (x1 === x0) [x0, x1] = [x0 - 1, x1 + 1];
    if (y1 === y0) [y0, y1] = [y0 - 0.5, y1 + 0.5];
    const margin = (y1 - y0) * 0.05;
    [y0, y1] = [y0 - margin, y1 + margin];
    const plotW = width - PAD.left - PAD.right;
    const plotH = height - PAD.top - PAD.bottom;
    const px = (x) => PAD.left + ((x - x0) / (x1 - x0)) * plotW;
    const py = (y) => PAD.top + (1 - (y - y0) / (y1 - y0)) * plotH;

    ctx.font = "12px system-ui, sans-serif";
    ctx.strokeStyle = "#d0d4da";
    ctx.fillStyle = "#555";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const y of ticks(y0, y1, 5)) {
      ctx.beginPath();
      ctx.moveTo(PAD.left, py(y));
      ctx.lineTo(width - PAD.right, py(y));
      ctx.stroke();
      ctx.fillText(String(y), PAD.left - 6, py(y));
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (const x of ticks(x0, x1, 8).filter((v) => Number.isInteger(v))) {
      ctx.fillText(String(x), px(x), height - PAD.bottom + 6);
    }
    ctx.fillText("step", PAD.left + plotW / 2, height - 16);

    for (const s of series) {
      if (s.points.length === 0) continue;
      ctx.strokeStyle = s.color;
      ctx.fillStyle = s.color;
      ctx.lineWidth = 2;
      ctx.beginPath();
      s.points.forEach(([x, y], i) => (i === 0 ? ctx.moveTo(px(x), py(y)) : ctx.lineTo(px(x), py(y))));
      ctx.stroke();
      if (s.dots || s.points.length === 1) {
        for (const [x, y] of s.points) {
          ctx.beginPath();
          ctx.arc(px(x), py(y), 3, 0, 2 * Math.PI);
          ctx.fill();
        }
      }
    }
  }

  return { draw, ticks };
})();
