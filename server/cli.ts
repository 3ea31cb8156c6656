// `mla-serve <command>`: one program with subcommands; each command's module is loaded only when used.

type Command = { summary: string; run: (argv: string[]) => Promise<number> };

const commands: Record<string, Command> = {
  serve: {
    summary: 'serve models over an OpenAI-compatible HTTP API',
    run: async (argv) => (await import('./serve-command.ts')).runServe(argv),
  },
  generate: {
    summary: 'generate text from a prompt, streamed to the terminal',
    run: async (argv) => (await import('./generate-command.ts')).runGenerate(argv),
  },
  'eval-ppl': {
    summary: 'perplexity of a model on a text file (BOS-prefixed paragraph chunks)',
    run: async (argv) => (await import('./eval-ppl-command.ts')).runEvalPpl(argv),
  },
  convert: {
    summary: 'convert a GQA checkpoint to an MLA checkpoint (TransMLA)',
    run: async (argv) => (await import('./convert-command.ts')).runConvert(argv),
  },
  bench: {
    summary: 'load-test one or more models on a running server',
    run: async (argv) => (await import('../bench/cli.ts')).runBench(argv),
  },
};

function usage(): string {
  const lines = Object.entries(commands).map(([name, c]) => `  ${name.padEnd(10)} ${c.summary}`);
  return `usage: mla-serve <command> [options]\n\ncommands:\n${lines.join('\n')}\n\nRun 'mla-serve <command> --help' for a command's options.\n`;
}

export async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (!name || name === '--help' || name === '-h' || name === 'help') {
    process.stdout.write(usage());
    return name ? 0 : 2;
  }
  const command = commands[name];
  if (!command) {
    process.stderr.write(`mla-serve: unknown command '${name}'\n\n${usage()}`);
    return 2;
  }
  try {
    return await command.run(rest);
  } catch (err) {
    process.stderr.write(`mla-serve ${name}: ${(err as Error).message}\n`);
    if (process.env.MLA_SERVE_DEBUG) process.stderr.write(`${(err as Error).stack}\n`);
    return 1;
  }
}
