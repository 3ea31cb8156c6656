// Parser for the Prometheus text exposition format (what /metrics serves), enough to read gauges and counters by label.

/** One sample line: `name{label="value",...} value [timestamp]`. */
export interface PromSample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** Thrown for a line that is not valid exposition text; names the line so the server's bug is easy to find. */
export class PromTextError extends Error {}

const NAME_START = /[a-zA-Z_:]/;
const NAME_CHAR = /[a-zA-Z0-9_:]/;
const LABEL_START = /[a-zA-Z_]/;
const LABEL_CHAR = /[a-zA-Z0-9_]/;

/**
 * Parses every sample in `text`. `# HELP`/`# TYPE` and other comments are skipped: the bench only
 * needs values by name and label, and histogram series (`_bucket`, `_sum`, `_count`) come through as
 * plain samples with their own names.
 */
export function parsePromText(text: string): PromSample[] {
  const samples: PromSample[] = [];
  const lines = text.split('\n');
  for (let lineNo = 0; lineNo < lines.length; lineNo++) {
    const line = lines[lineNo].replace(/\r$/, '');
    const trimmed = line.trim();
    if (trimmed === '' || trimmed.startsWith('#')) continue;
    samples.push(parseSampleLine(trimmed, lineNo + 1));
  }
  return samples;
}

function parseSampleLine(line: string, lineNo: number): PromSample {
  const fail = (why: string): never => {
    throw new PromTextError(`metrics text line ${lineNo}: ${why}: ${JSON.stringify(line.slice(0, 200))}`);
  };
  let i = 0;
  if (!NAME_START.test(line[i] ?? '')) fail('expected a metric name');
  while (i < line.length && NAME_CHAR.test(line[i])) i++;
  const name = line.slice(0, i);
  const labels: Record<string, string> = {};
  if (line[i] === '{') {
    i++;
    for (;;) {
      while (line[i] === ' ') i++;
      if (line[i] === '}') {
        i++;
        break;
      }
      const keyStart = i;
      if (!LABEL_START.test(line[i] ?? '')) fail('expected a label name');
      while (i < line.length && LABEL_CHAR.test(line[i])) i++;
      const key = line.slice(keyStart, i);
      while (line[i] === ' ') i++;
      if (line[i] !== '=') fail(`expected '=' after label ${key}`);
      i++;
      while (line[i] === ' ') i++;
      if (line[i] !== '"') fail(`expected a quoted value for label ${key}`);
      i++;
      let value = '';
      for (;;) {
        const c = line[i];
        if (c === undefined) fail(`unterminated value for label ${key}`);
        if (c === '"') {
          i++;
          break;
        }
        if (c === '\\') {
          const next = line[i + 1];
          if (next === 'n') value += '\n';
          else if (next === '\\' || next === '"') value += next;
          else fail(`bad escape \\${next ?? ''} in label ${key}`);
          i += 2;
          continue;
        }
        value += c;
        i++;
      }
      labels[key] = value;
      while (line[i] === ' ') i++;
      if (line[i] === ',') {
        i++;
        continue;
      }
      if (line[i] === '}') {
        i++;
        break;
      }
      fail(`expected ',' or '}' after label ${key}`);
    }
  }
  const rest = line.slice(i).trim().split(/\s+/);
  if (rest.length < 1 || rest[0] === '' || rest.length > 2) fail('expected a value and an optional timestamp');
  const value = parsePromNumber(rest[0]);
  if (value === undefined) fail(`bad value ${rest[0]}`);
  return { name, labels, value: value as number };
}

function parsePromNumber(s: string): number | undefined {
  if (s === 'NaN') return NaN;
  if (s === '+Inf' || s === 'Inf') return Infinity;
  if (s === '-Inf') return -Infinity;
  // Number('') is 0 and Number('0x10') is 16: only accept decimal floats.
  if (!/^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(s)) return undefined;
  return Number(s);
}

/** Samples named `name` whose labels include every pair in `match`. */
export function selectSamples(samples: PromSample[], name: string, match: Record<string, string> = {}): PromSample[] {
  return samples.filter((s) => s.name === name && Object.entries(match).every(([k, v]) => s.labels[k] === v));
}

/**
 * The value of `name` for one model: the sum over its series with `model_name` equal to `model`
 * (a counter may carry further labels); when no series names the model and the metric has a single
 * series without a `model_name` label, that one (a single-model server that does not label).
 * Undefined when the metric is absent.
 */
export function modelValue(samples: PromSample[], name: string, model: string): number | undefined {
  const mine = selectSamples(samples, name, { model_name: model });
  if (mine.length > 0) return mine.reduce((sum, s) => sum + s.value, 0);
  const all = selectSamples(samples, name);
  if (all.length === 1 && all[0].labels.model_name === undefined) return all[0].value;
  return undefined;
}

/** Labels of the first series of `name` for `model` (e.g. `vllm:cache_config_info`'s block_size, attention). */
export function modelLabels(samples: PromSample[], name: string, model: string): Record<string, string> | undefined {
  return selectSamples(samples, name, { model_name: model })[0]?.labels;
}

const METRIC_TYPES = new Set(['counter', 'gauge', 'histogram', 'summary', 'untyped', 'gaugehistogram', 'info', 'stateset', 'unknown']);

/**
 * The `# TYPE name type` lines of `text`, by metric family name. Throws on a malformed TYPE line, an
 * unknown type, or a family typed twice (each is invalid exposition text).
 */
export function parsePromTypes(text: string): Map<string, string> {
  const types = new Map<string, string>();
  const lines = text.split('\n');
  for (let lineNo = 0; lineNo < lines.length; lineNo++) {
    const line = lines[lineNo].replace(/\r$/, '').trim();
    if (!line.startsWith('# TYPE')) continue;
    const parts = line.split(/\s+/);
    const [, , name, type] = parts;
    const bad = (why: string) => new PromTextError(`metrics text line ${lineNo + 1}: ${why}: ${JSON.stringify(line.slice(0, 200))}`);
    if (parts.length !== 4 || !NAME_START.test(name[0]) || ![...name].every((c) => NAME_CHAR.test(c))) throw bad('expected "# TYPE <name> <type>"');
    if (!METRIC_TYPES.has(type)) throw bad(`unknown metric type ${type}`);
    if (types.has(name)) throw bad(`a second TYPE line for ${name}`);
    types.set(name, type);
  }
  return types;
}
