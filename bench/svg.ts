// Small self-contained SVG charts (lines and grouped bars) for the bench report: no scripts, no fonts, no network.

export const PALETTE = ['#1f6fb4', '#d6402b', '#2c9a3c', '#8a55b8', '#c7871a', '#17a2b8'];

export interface LineSeries {
  name: string;
  color: string;
  points: Array<[x: number, y: number]>;
}

export interface LineChartSpec {
  title: string;
  xLabel: string;
  yLabel: string;
  series: LineSeries[];
  /** Labels for x = 0, 1, 2, … instead of numeric ticks (e.g. concurrency levels). */
  xCategories?: string[];
  /** Upper end of the y axis at least this (e.g. 1 for a fraction). */
  yMaxAtLeast?: number;
  width?: number;
  height?: number;
}

export interface BarChartSpec {
  title: string;
  yLabel: string;
  /** Groups along x (e.g. p50, p90, p99). */
  categories: string[];
  /** One bar per series in each group. */
  series: Array<{ name: string; color: string; values: number[] }>;
  width?: number;
  height?: number;
}

const MARGIN = { left: 64, right: 16, top: 46, bottom: 44 };

/** Escapes text for XML content and attribute values. */
export function escapeXml(s: string): string {
  return s.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c] as string);
}

/** Round tick values (1, 2, 5 × 10^k steps) covering [min, max]. */
export function niceTicks(min: number, max: number, target = 5): number[] {
  if (!Number.isFinite(min) || !Number.isFinite(max)) return [0, 1];
  if (max <= min) max = min + (min === 0 ? 1 : Math.abs(min));
  const raw = (max - min) / target;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / mag;
  const step = (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 5 ? 5 : 10) * mag;
  const ticks: number[] = [];
  // Bounded by construction: (max - min) / step ≤ target + 2.
  for (let v = Math.floor(min / step) * step; v <= max + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  if (ticks[ticks.length - 1] < max) ticks.push(Number((ticks[ticks.length - 1] + step).toPrecision(12)));
  return ticks;
}

function formatTick(v: number): string {
  if (v === 0) return '0';
  const a = Math.abs(v);
  if (a >= 1e6) return `${(v / 1e6).toPrecision(3).replace(/\.?0+$/, '')}M`;
  if (a >= 1e4) return `${(v / 1e3).toPrecision(3).replace(/\.?0+$/, '')}k`;
  if (a >= 1) return String(Number(v.toPrecision(4)));
  return String(Number(v.toPrecision(3)));
}

function frame(title: string, width: number, height: number, body: string[], legend: Array<{ name: string; color: string }>): string {
  // Items side by side, spaced by an estimate of their text width (no font metrics without a browser).
  let x = MARGIN.left;
  const legendItems = legend.map((s) => {
    const item = `<rect x="${x}" y="26" width="12" height="12" fill="${s.color}"/><text x="${x + 16}" y="36" font-size="12">${escapeXml(s.name)}</text>`;
    x += 16 + 7 * s.name.length + 14;
    return item;
  });
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif" role="img" aria-label="${escapeXml(title)}">`,
    `<title>${escapeXml(title)}</title>`,
    `<rect width="${width}" height="${height}" fill="#fff"/>`,
    `<text x="${MARGIN.left}" y="16" font-size="14" font-weight="bold">${escapeXml(title)}</text>`,
    ...legendItems,
    ...body,
    '</svg>',
  ].join('\n');
}

function yAxis(ticks: number[], yOf: (v: number) => number, width: number, yLabel: string, height: number): string[] {
  const out: string[] = [];
  for (const t of ticks) {
    const y = yOf(t).toFixed(1);
    out.push(`<line x1="${MARGIN.left}" x2="${width - MARGIN.right}" y1="${y}" y2="${y}" stroke="#e3e3e3"/>`);
    out.push(`<text x="${MARGIN.left - 6}" y="${y}" font-size="11" text-anchor="end" dominant-baseline="middle">${formatTick(t)}</text>`);
  }
  const midY = (MARGIN.top + height - MARGIN.bottom) / 2;
  out.push(`<text x="14" y="${midY}" font-size="12" text-anchor="middle" transform="rotate(-90 14 ${midY})">${escapeXml(yLabel)}</text>`);
  return out;
}

export function lineChart(spec: LineChartSpec): string {
  const width = spec.width ?? 640;
  const height = spec.height ?? 300;
  const all = spec.series.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  const xs = all.map(([x]) => x);
  const ys = all.map(([, y]) => y);
  const xMin = spec.xCategories ? 0 : Math.min(0, ...xs);
  const xMax = spec.xCategories ? Math.max(1, spec.xCategories.length - 1) : Math.max(xMin + 1e-9, ...xs);
  const yTicks = niceTicks(0, Math.max(spec.yMaxAtLeast ?? 0, ...ys, 1e-9));
  const yMax = yTicks[yTicks.length - 1];
  const plotW = width - MARGIN.left - MARGIN.right;
  const plotH = height - MARGIN.top - MARGIN.bottom;
  const xOf = (x: number): number => MARGIN.left + ((x - xMin) / (xMax - xMin || 1)) * plotW;
  const yOf = (y: number): number => MARGIN.top + plotH - (y / yMax) * plotH;

  const body = yAxis(yTicks, yOf, width, spec.yLabel, height);
  const baseY = (MARGIN.top + plotH).toFixed(1);
  if (spec.xCategories) {
    spec.xCategories.forEach((label, i) => {
      body.push(`<text x="${xOf(i).toFixed(1)}" y="${Number(baseY) + 16}" font-size="11" text-anchor="middle">${escapeXml(label)}</text>`);
    });
  } else {
    for (const t of niceTicks(xMin, xMax)) {
      if (t > xMax + 1e-9) continue;
      body.push(`<text x="${xOf(t).toFixed(1)}" y="${Number(baseY) + 16}" font-size="11" text-anchor="middle">${formatTick(t)}</text>`);
    }
  }
  body.push(`<line x1="${MARGIN.left}" x2="${width - MARGIN.right}" y1="${baseY}" y2="${baseY}" stroke="#444"/>`);
  body.push(`<text x="${MARGIN.left + plotW / 2}" y="${height - 6}" font-size="12" text-anchor="middle">${escapeXml(spec.xLabel)}</text>`);
  for (const s of spec.series) {
    const pts = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    if (pts.length === 0) continue;
    const path = pts.map(([x, y]) => `${xOf(x).toFixed(1)},${yOf(y).toFixed(1)}`).join(' ');
    body.push(`<polyline class="series" data-series="${escapeXml(s.name)}" fill="none" stroke="${s.color}" stroke-width="2" points="${path}"/>`);
    if (pts.length <= 12) {
      for (const [x, y] of pts) body.push(`<circle cx="${xOf(x).toFixed(1)}" cy="${yOf(y).toFixed(1)}" r="3" fill="${s.color}"/>`);
    }
  }
  return frame(spec.title, width, height, body, spec.series);
}

export function barChart(spec: BarChartSpec): string {
  const width = spec.width ?? 360;
  const height = spec.height ?? 260;
  const values = spec.series.flatMap((s) => s.values).filter(Number.isFinite);
  const yTicks = niceTicks(0, Math.max(1e-9, ...values));
  const yMax = yTicks[yTicks.length - 1];
  const plotW = width - MARGIN.left - MARGIN.right;
  const plotH = height - MARGIN.top - MARGIN.bottom;
  const yOf = (y: number): number => MARGIN.top + plotH - (y / yMax) * plotH;
  const body = yAxis(yTicks, yOf, width, spec.yLabel, height);
  const groupW = plotW / Math.max(1, spec.categories.length);
  const barW = (groupW * 0.8) / Math.max(1, spec.series.length);
  spec.categories.forEach((category, g) => {
    const gx = MARGIN.left + g * groupW + groupW * 0.1;
    spec.series.forEach((s, k) => {
      const v = s.values[g];
      if (!Number.isFinite(v)) return;
      const y = yOf(v);
      body.push(
        `<rect class="bar" x="${(gx + k * barW).toFixed(1)}" y="${y.toFixed(1)}" width="${(barW * 0.92).toFixed(1)}" height="${(MARGIN.top + plotH - y).toFixed(1)}" fill="${s.color}"><title>${escapeXml(`${s.name} ${category}: ${formatTick(v)}`)}</title></rect>`,
      );
    });
    body.push(`<text x="${(gx + groupW * 0.4).toFixed(1)}" y="${MARGIN.top + plotH + 16}" font-size="11" text-anchor="middle">${escapeXml(category)}</text>`);
  });
  body.push(`<line x1="${MARGIN.left}" x2="${width - MARGIN.right}" y1="${MARGIN.top + plotH}" y2="${MARGIN.top + plotH}" stroke="#444"/>`);
  return frame(spec.title, width, height, body, spec.series);
}
