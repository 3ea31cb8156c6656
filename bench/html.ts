// report.html: the side-by-side table and inline SVG charts (latency percentiles, throughput and KV usage over time, sweeps).
import { barChart, escapeXml, lineChart, PALETTE } from './svg.ts';
import { columnTitle, levelTitle, PERCENTILES, runsByLevel, tableCells, type BenchReport, type RunReport } from './report.ts';

function htmlTable(runs: RunReport[]): string {
  const { header, rows } = tableCells(runs);
  const th = header.map((h) => `<th>${escapeXml(h)}</th>`).join('');
  const trs = rows.map((r) => `<tr>${r.map((c, i) => (i === 0 ? `<th>${escapeXml(c)}</th>` : `<td>${escapeXml(c)}</td>`)).join('')}</tr>`);
  return `<table><thead><tr>${th}</tr></thead><tbody>\n${trs.join('\n')}\n</tbody></table>`;
}

function colorOf(models: string[], model: string): string {
  return PALETTE[Math.max(0, models.indexOf(model)) % PALETTE.length];
}

function latencyCharts(runs: RunReport[], models: string[]): string {
  const metrics = [
    ['ttft', 'TTFT'],
    ['tpot', 'TPOT'],
    ['itl', 'ITL'],
    ['e2el', 'E2EL'],
  ] as const;
  return metrics
    .map(([key, label]) =>
      barChart({
        title: `${label} percentiles`,
        yLabel: 'ms',
        categories: PERCENTILES.map((p) => `p${p}`),
        series: runs.map((r) => ({
          name: columnTitle(r),
          color: colorOf(models, r.model_id),
          values: PERCENTILES.map((p) => r[`p${p}_${key}_ms`]),
        })),
      }),
    )
    .join('\n');
}

function throughputChart(runs: RunReport[], models: string[]): string {
  return lineChart({
    title: 'Output token throughput over time',
    xLabel: 'seconds since the run started',
    yLabel: 'output tokens/s',
    series: runs.map((r) => {
      const { bucket_s, output_tokens_per_s } = r.throughput_timeline;
      return {
        name: columnTitle(r),
        color: colorOf(models, r.model_id),
        points: output_tokens_per_s.map((v, i): [number, number] => [(i + 0.5) * bucket_s, v]),
      };
    }),
  });
}

function kvUsageChart(runs: RunReport[], models: string[]): string {
  const series = runs.map((r) => ({
    name: columnTitle(r),
    color: colorOf(models, r.model_id),
    points: r.kv_usage_timeline
      .filter((p) => p.kv_cache_usage_perc !== null)
      .map((p): [number, number] => [p.t, (p.kv_cache_usage_perc as number) * 100]),
  }));
  if (series.every((s) => s.points.length === 0)) {
    return '<p class="note">No vllm:kv_cache_usage_perc on /metrics for these models: no KV usage chart.</p>';
  }
  return lineChart({ title: 'KV cache usage over time', xLabel: 'seconds since the run started', yLabel: 'vllm:kv_cache_usage_perc (%)', series, yMaxAtLeast: 100 });
}

function sweepCharts(report: BenchReport): string {
  const levels = runsByLevel(report.runs);
  if (levels.length < 2) return '';
  const categories = levels.map((l) => (l.level === null ? '∞' : String(l.level)));
  const models = report.config.models;
  const chart = (title: string, yLabel: string, pick: (r: RunReport) => number): string =>
    lineChart({
      title,
      xLabel: 'max concurrency',
      yLabel,
      xCategories: categories,
      series: models.map((m) => ({
        name: m,
        color: colorOf(models, m),
        points: levels.flatMap((l, i): Array<[number, number]> => {
          const r = l.runs.find((x) => x.model_id === m);
          return r ? [[i, pick(r)]] : [];
        }),
      })),
    });
  return `<section><h2>Concurrency sweep</h2><div class="charts">
${chart('Output throughput vs concurrency', 'output tokens/s', (r) => r.output_throughput)}
${chart('Median TTFT vs concurrency', 'ms', (r) => r.median_ttft_ms)}
${chart('Median TPOT vs concurrency', 'ms', (r) => r.median_tpot_ms)}
</div></section>`;
}

export function renderHtmlReport(report: BenchReport): string {
  const models = report.config.models;
  const sections = runsByLevel(report.runs).map(
    ({ level, runs }) => `<section>
<h2>${escapeXml(levelTitle(level, report.config))}</h2>
${htmlTable(runs)}
<div class="charts">
${latencyCharts(runs, models)}
</div>
<div class="charts">
${throughputChart(runs, models)}
${kvUsageChart(runs, models)}
</div>
</section>`,
  );
  const c = report.config;
  const setup = [
    `servers: ${c.urls.join(', ')}`,
    `dataset: ${c.dataset ?? 'random token ids'}`,
    `seed ${c.seed}`,
    c.ignore_eos ? 'ignore_eos' : 'stops at EOS',
    `timeout ${c.timeout_s} s`,
  ].join(' · ');
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>mla-serve bench: ${escapeXml(models.join(' vs '))}</title>
<style>
body { font-family: sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 12px 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; }
td { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: #f2f2f2; }
tbody th { text-align: left; font-weight: normal; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
.note { color: #666; }
</style>
</head>
<body>
<h1>mla-serve bench: ${escapeXml(models.join(' vs '))}</h1>
<p>${escapeXml(report.date)} · ${escapeXml(setup)}</p>
<p class="note">TTFT: send → first chunk with choices. ITL: gaps between successive chunks with content (a finish-only chunk with empty text is no token and makes no gap). E2EL: send → last chunk (the usage chunk). TPOT: (E2EL − TTFT) / (output tokens − 1), output tokens from usage.completion_tokens. Ratio columns: later model / first model.</p>
${sweepCharts(report)}
${sections.join('\n')}
</body>
</html>
`;
}
