#!/usr/bin/env node
// Command-line entry: registers tsx so the TypeScript sources run without a build step, then dispatches.
import { register } from 'tsx/esm/api';

register();
const { main } = await import('../server/cli.ts');
process.exitCode = await main(process.argv.slice(2));
