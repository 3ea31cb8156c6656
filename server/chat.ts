// Chat messages → prompt token ids through the model's Jinja chat template (or a plain default for base models).
import { Template } from '@huggingface/jinja';
import type { Tokenizer } from '../model/tokenizer.ts';
import { ApiError } from './errors.ts';
import type { ChatMessage } from './schemas.ts';

/**
 * For base models that ship no template (stories260K): a plain transcript that ends with "Assistant:",
 * so a completion model continues in the assistant's voice.
 */
export const defaultChatTemplate =
  "{{ bos_token }}{% for message in messages %}" +
  "{% if message.role == 'system' or message.role == 'developer' %}{{ message.content }}\n\n" +
  "{% elif message.role == 'user' %}User: {{ message.content }}\n" +
  "{% elif message.role == 'assistant' %}Assistant: {{ message.content }}\n" +
  "{% else %}Tool: {{ message.content }}\n{% endif %}{% endfor %}" +
  "{% if add_generation_prompt %}Assistant:{% endif %}";

/** One model's compiled chat template and the tokenizer it feeds. */
export class ChatFormatter {
  private readonly template: Template;
  private readonly bosText: string | null;
  private readonly eosText: string | null;

  constructor(
    private readonly tokenizer: Tokenizer,
    source: string | undefined,
  ) {
    try {
      this.template = new Template(source ?? defaultChatTemplate);
    } catch (err) {
      throw new Error(`the model's chat template does not parse (${(err as Error).message}); fix its chat_template or serve it without one`);
    }
    this.bosText = tokenizer.bosId === null ? null : tokenizer.idToToken(tokenizer.bosId);
    this.eosText = tokenizer.eosId === null ? null : tokenizer.idToToken(tokenizer.eosId);
  }

  /** The rendered prompt text, exactly as the template writes it. */
  render(messages: ChatMessage[], addGenerationPrompt = true): string {
    const plain = messages.map((m) => ({
      role: m.role,
      // Text parts are joined the way OpenAI documents: in order, no separator.
      content: typeof m.content === 'string' ? m.content : (m.content ?? []).map((p) => p.text ?? '').join(''),
      ...(m.name ? { name: m.name } : {}),
    }));
    try {
      return this.template.render({
        messages: plain,
        add_generation_prompt: addGenerationPrompt,
        bos_token: this.bosText ?? '',
        eos_token: this.eosText ?? '',
        tools: null,
        documents: null,
      });
    } catch (err) {
      // Templates reject what they cannot format (e.g. roles out of order) with raise_exception: the client's fault.
      throw new ApiError(400, `the chat template rejected these messages: ${(err as Error).message}`, 'messages');
    }
  }

  /**
   * Prompt token ids. The template writes BOS/EOS as text; tokenizers without special-token parsing
   * (llama2.c, GGUF) would spell them out letter by letter, so they become their ids here. No BOS is
   * added beyond what the template writes (as vLLM and transformers do for chat).
   */
  tokens(messages: ChatMessage[], addGenerationPrompt = true): number[] {
    return this.encodeWithSpecials(this.render(messages, addGenerationPrompt));
  }

  encodeWithSpecials(text: string): number[] {
    const specials: Array<[string, number]> = [];
    if (this.bosText && this.tokenizer.bosId !== null) specials.push([this.bosText, this.tokenizer.bosId]);
    if (this.eosText && this.tokenizer.eosId !== null) specials.push([this.eosText, this.tokenizer.eosId]);
    const ids: number[] = [];
    let rest = text;
    while (rest.length) {
      let at = -1;
      let hit: [string, number] | null = null;
      for (const s of specials) {
        const i = rest.indexOf(s[0]);
        if (i >= 0 && (at < 0 || i < at)) [at, hit] = [i, s];
      }
      if (!hit) {
        ids.push(...this.tokenizer.encode(rest));
        break;
      }
      if (at > 0) ids.push(...this.tokenizer.encode(rest.slice(0, at)));
      ids.push(hit[1]);
      rest = rest.slice(at + hit[0].length);
    }
    return ids;
  }
}
