// Zod schemas for every request body of the OpenAI-compatible API, and zod issues turned into readable 400 messages.
import { z } from 'zod';
import { ApiError } from './errors.ts';

/** Server-side limits a body is checked against. */
export interface RequestLimits {
  /** Largest `n` (choices per prompt). */
  maxN: number;
  /** Largest `logprobs` / `top_logprobs`. */
  maxLogprobs: number;
}

export const defaultLimits: RequestLimits = { maxN: 16, maxLogprobs: 20 };

// A prompt is a string, a list of strings, a list of token ids, or a list of token-id lists.
// Checked by hand: zod's union errors would tell the user four things at once.
export type NormalizedPrompt = { kind: 'text'; texts: string[] } | { kind: 'ids'; ids: number[][] };

const isTokenId = (v: unknown): v is number => typeof v === 'number' && Number.isInteger(v) && v >= 0;

function normalizePrompt(value: unknown, ctx: z.RefinementCtx): NormalizedPrompt {
  const fail = (message: string): NormalizedPrompt => {
    ctx.addIssue({ code: 'custom', message, input: value });
    return z.NEVER;
  };
  const shape = 'prompt must be a string, an array of strings, an array of token ids, or an array of token-id arrays';
  if (typeof value === 'string') {
    return value.length === 0 ? fail('prompt must not be empty') : { kind: 'text', texts: [value] };
  }
  if (!Array.isArray(value)) return fail(`${shape}; got ${describe(value)}`);
  if (value.length === 0) return fail('prompt must not be empty (got an empty array)');
  if (value.every((v) => typeof v === 'string')) {
    const empty = value.findIndex((v) => v.length === 0);
    return empty >= 0 ? fail(`prompt[${empty}] must not be empty`) : { kind: 'text', texts: value as string[] };
  }
  if (value.every((v) => typeof v === 'number')) {
    const bad = value.findIndex((v) => !isTokenId(v));
    return bad >= 0 ? fail(`prompt[${bad}] must be a token id (an integer >= 0); got ${value[bad]}`) : { kind: 'ids', ids: [value as number[]] };
  }
  if (value.every((v) => Array.isArray(v))) {
    const lists = value as unknown[][];
    for (let i = 0; i < lists.length; i++) {
      if (lists[i].length === 0) return fail(`prompt[${i}] must not be empty`);
      const bad = lists[i].findIndex((v) => !isTokenId(v));
      if (bad >= 0) return fail(`prompt[${i}][${bad}] must be a token id (an integer >= 0); got ${describe(lists[i][bad])}`);
    }
    return { kind: 'ids', ids: lists as number[][] };
  }
  return fail(`${shape}; got an array mixing ${[...new Set(value.map((v) => describe(v).split(' ')[0]))].join(' and ')}`);
}

const logitBias = z
  .record(z.string(), z.number().min(-100).max(100))
  .superRefine((bias, ctx) => {
    for (const key of Object.keys(bias)) {
      if (!/^\d+$/.test(key)) {
        ctx.addIssue({ code: 'custom', path: [key], message: `logit_bias keys must be token ids (integers as strings, e.g. "42"); got "${key}"`, input: key });
      }
    }
  });

const stop = z.union([z.string(), z.array(z.string()).max(16)]);

function samplingFields(limits: RequestLimits) {
  return {
    model: z.string().nullish(),
    temperature: z.number().min(0).nullish(),
    top_p: z.number().gt(0).max(1).nullish(),
    top_k: z.int().min(-1).nullish(),
    min_p: z.number().min(0).max(1).nullish(),
    n: z.int().min(1).max(limits.maxN).nullish(),
    stream: z.boolean().nullish(),
    stream_options: z.object({ include_usage: z.boolean().nullish() }).nullish(),
    stop: stop.nullish(),
    stop_token_ids: z.array(z.int().min(0)).nullish(),
    seed: z.int().nullish(),
    presence_penalty: z.number().min(-2).max(2).nullish(),
    frequency_penalty: z.number().min(-2).max(2).nullish(),
    repetition_penalty: z.number().gt(0).max(10).nullish(),
    logit_bias: logitBias.nullish(),
    ignore_eos: z.boolean().nullish(),
    user: z.string().nullish(),
  };
}

export function completionSchema(limits: RequestLimits = defaultLimits) {
  // echo with logprobs returns the prompt tokens' logprobs too (the engine computes every prompt row for it).
  return z.object({
    ...samplingFields(limits),
    prompt: z.unknown().transform(normalizePrompt),
    max_tokens: z.int().min(1).nullish(),
    logprobs: z.int().min(0).max(limits.maxLogprobs).nullish(),
    echo: z.boolean().nullish(),
    suffix: z.string().max(0, { error: 'suffix is not supported' }).nullish(),
  });
}

const textPart = z.object({ type: z.string(), text: z.string().nullish() }).superRefine((part, ctx) => {
  if (part.type !== 'text' || typeof part.text !== 'string') {
    ctx.addIssue({ code: 'custom', message: `only text content parts ({"type":"text","text":...}) are supported; got type "${part.type}"`, input: part });
  }
});

export const chatMessage = z.object({
  role: z.enum(['system', 'developer', 'user', 'assistant', 'tool']),
  content: z.union([z.string(), z.array(textPart), z.null()]).optional(),
  name: z.string().nullish(),
});

export function chatSchema(limits: RequestLimits = defaultLimits) {
  return z
    .object({
      ...samplingFields(limits),
      messages: z.array(chatMessage).min(1),
      max_tokens: z.int().min(1).nullish(),
      max_completion_tokens: z.int().min(1).nullish(),
      logprobs: z.boolean().nullish(),
      top_logprobs: z.int().min(0).max(limits.maxLogprobs).nullish(),
      add_generation_prompt: z.boolean().nullish(),
    })
    .superRefine((body, ctx) => {
      if (body.top_logprobs != null && !body.logprobs) {
        ctx.addIssue({ code: 'custom', path: ['top_logprobs'], message: 'top_logprobs needs logprobs: true', input: body.top_logprobs });
      }
    });
}

/** /tokenize with a prompt. */
export const tokenizePromptSchema = z.object({ model: z.string().nullish(), prompt: z.string(), add_special_tokens: z.boolean().nullish() });
/** /tokenize with chat messages (rendered through the chat template first), as vLLM accepts. */
export const tokenizeChatSchema = z.object({ model: z.string().nullish(), messages: z.array(chatMessage).min(1), add_generation_prompt: z.boolean().nullish() });

export const detokenizeSchema = z.object({ model: z.string().nullish(), tokens: z.array(z.int().min(0)) });

export type CompletionBody = z.output<ReturnType<typeof completionSchema>>;
export type ChatBody = z.output<ReturnType<typeof chatSchema>>;
export type ChatMessage = z.output<typeof chatMessage>;
export type DetokenizeBody = z.output<typeof detokenizeSchema>;
export type SamplingBody = Pick<CompletionBody, keyof ReturnType<typeof samplingFields>>;

// ---- zod issues → one readable sentence naming the parameter ----

function describe(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  if (typeof v === 'string') return `string ${JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}…` : v)}`;
  if (typeof v === 'number' || typeof v === 'boolean') return `${typeof v} ${v}`;
  if (v === undefined) return 'nothing';
  return typeof v === 'object' ? 'an object' : typeof v;
}

const typeWords: Record<string, string> = {
  int: 'an integer',
  number: 'a number',
  string: 'a string',
  boolean: 'a boolean (true or false)',
  array: 'an array',
  object: 'an object',
  record: 'an object',
  null: 'null',
};

function paramName(path: readonly PropertyKey[]): string {
  let out = '';
  for (const p of path) out += typeof p === 'number' ? `[${p}]` : out ? `.${String(p)}` : String(p);
  return out;
}

function valueAt(body: unknown, path: readonly PropertyKey[]): unknown {
  let v = body;
  for (const p of path) v = v != null && typeof v === 'object' ? (v as Record<PropertyKey, unknown>)[p] : undefined;
  return v;
}

function issueMessage(issue: z.core.$ZodIssue, body: unknown): string {
  const param = paramName(issue.path);
  const got = valueAt(body, issue.path);
  const name = param || 'the request body';
  switch (issue.code) {
    case 'invalid_type': {
      if (got === undefined) return `${name} is required`;
      if (issue.expected === 'int' && typeof got === 'number') return `${name} must be an integer; got ${got}`;
      return `${name} must be ${typeWords[issue.expected] ?? issue.expected}; got ${describe(got)}`;
    }
    case 'too_small':
    case 'too_big': {
      const small = issue.code === 'too_small';
      const bound = small ? (issue as z.core.$ZodIssueTooSmall).minimum : (issue as z.core.$ZodIssueTooBig).maximum;
      const inclusive = issue.inclusive ?? true;
      if (issue.origin === 'array') return `${name} must have ${small ? 'at least' : 'at most'} ${bound} items; got ${Array.isArray(got) ? got.length : '?'}`;
      if (issue.origin === 'string') return issue.message.startsWith('Too') ? `${name} must have ${small ? 'at least' : 'at most'} ${bound} characters` : issue.message;
      const op = small ? (inclusive ? '>=' : '>') : inclusive ? '<=' : '<';
      return `${name} must be ${op} ${bound}; got ${typeof got === 'number' ? got : describe(got)}`;
    }
    case 'invalid_union': {
      const expected = new Set<string>();
      for (const branch of issue.errors) for (const sub of branch) if (sub.code === 'invalid_type' && sub.path.length === 0) expected.add(typeWords[sub.expected] ?? sub.expected);
      if (expected.size) return `${name} must be ${[...expected].join(' or ')}; got ${describe(got)}`;
      // The branches failed deeper down: report the first branch's first issue.
      const first = issue.errors.flat()[0];
      return first ? issueMessage({ ...first, path: [...issue.path, ...first.path] } as z.core.$ZodIssue, body) : `${name} is invalid`;
    }
    case 'invalid_value':
      return `${name} must be one of ${issue.values.map((v) => JSON.stringify(v)).join(', ')}; got ${describe(got)}`;
    case 'custom':
      return issue.message;
    default:
      return `${name}: ${issue.message}`;
  }
}

/** Parses `body` with `schema`; on failure throws a 400 ApiError naming the first bad parameter. */
export function parseBody<S extends z.ZodType>(schema: S, body: unknown): z.output<S> {
  if (body === null || typeof body !== 'object' || Array.isArray(body)) {
    throw new ApiError(400, `the request body must be a JSON object; got ${describe(body)}`);
  }
  const r = schema.safeParse(body);
  if (r.success) return r.data;
  const issue = r.error.issues[0];
  // A bad logit_bias key's path ends in the key itself; the parameter is logit_bias.
  const param = issue.path.length === 0 ? null : issue.path[0] === 'logit_bias' ? 'logit_bias' : paramName(issue.path);
  throw new ApiError(400, issueMessage(issue, body), param);
}
