// Model specs → local paths: a path as is, or a Hugging Face repo id through the HF cache layout (download when online and missing).
import { createWriteStream, existsSync, mkdirSync, readFileSync, renameSync, rmSync, statSync, symlinkSync, writeFileSync, openSync, readSync, closeSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join, posix, relative, resolve } from 'node:path';
import { once } from 'node:events';
import { SingleBar, Presets } from 'cli-progress';
import { request } from 'undici';

export interface RepoSpec {
  /** "owner/name" */
  repo: string;
  /** Branch, tag or commit; "main" unless the spec says `@rev`. */
  revision: string;
  /** A file or folder inside the repo, or '' for the repo root. */
  subpath: string;
}

/** Files of a Hugging Face model directory fetched when present; config.json and the weights are required. */
const OPTIONAL_FILES = ['tokenizer.json', 'tokenizer_config.json', 'tokenizer.model', 'generation_config.json', 'chat_template.jinja', 'special_tokens_map.json'];

/** Parses "owner/name", "owner/name@rev", "owner/name/sub/path" and "owner/name@rev/sub/path"; null when it is not repo-like. */
export function parseRepoSpec(spec: string): RepoSpec | null {
  if (spec.startsWith('/') || spec.startsWith('.') || spec.startsWith('~') || spec.includes('\\') || spec.includes('//')) return null;
  const m = /^([A-Za-z0-9][\w.-]*)\/([\w.-]+?)(?:@([\w./-]+?))?(?:\/(.+))?$/.exec(spec);
  if (!m) return null;
  const [, owner, name, revision, subpath] = m;
  if (subpath?.split('/').some((p) => p === '..' || p === '.')) return null;
  return { repo: `${owner}/${name}`, revision: revision ?? 'main', subpath: subpath ?? '' };
}

/** The hub cache directory: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (XDG_CACHE_HOME honoured). */
export function hubCacheDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.HF_HUB_CACHE) return env.HF_HUB_CACHE;
  if (env.HF_HOME) return join(env.HF_HOME, 'hub');
  const cache = env.XDG_CACHE_HOME || join(homedir(), '.cache');
  return join(cache, 'huggingface', 'hub');
}

export function isOffline(env: NodeJS.ProcessEnv = process.env): boolean {
  return /^(1|true|yes|on)$/i.test(env.HF_HUB_OFFLINE ?? '');
}

function repoCacheDir(repo: string): string {
  return join(hubCacheDir(), `models--${repo.replace('/', '--')}`);
}

/** The snapshot folder of a revision in the cache, or null when the cache does not know the revision. */
function cachedSnapshot(repo: string, revision: string): string | null {
  const dir = repoCacheDir(repo);
  if (/^[0-9a-f]{40}$/.test(revision)) {
    const snap = join(dir, 'snapshots', revision);
    return existsSync(snap) ? snap : null;
  }
  const ref = join(dir, 'refs', revision);
  if (!existsSync(ref)) return null;
  const commit = readFileSync(ref, 'utf8').trim();
  const snap = join(dir, 'snapshots', commit);
  return existsSync(snap) ? snap : null;
}

/** Files a model directory needs that are missing from folder (config.json, then the weights it names). */
function missingModelFiles(folder: string): string[] {
  if (!existsSync(join(folder, 'config.json'))) return ['config.json'];
  const index = join(folder, 'model.safetensors.index.json');
  if (existsSync(index)) {
    const map = (JSON.parse(readFileSync(index, 'utf8')) as { weight_map?: Record<string, string> }).weight_map ?? {};
    return [...new Set(Object.values(map))].filter((f) => !existsSync(join(folder, f)));
  }
  return existsSync(join(folder, 'model.safetensors')) ? [] : ['model.safetensors (or model.safetensors.index.json and its shards)'];
}

/**
 * Resolves a model spec to a local path. An existing path is returned as is (absolute). A Hugging Face repo id
 * (`owner/name[@rev][/path/in/repo]`) is looked up in the HF cache (`snapshots/<commit>/` through `refs/<rev>`); when
 * files are missing and HF_HUB_OFFLINE is not set they are downloaded from huggingface.co into that cache layout.
 * Returns the snapshot folder, or the file/folder named by the sub-path. opts.files: repo-relative files that must be
 * there (default: a model directory's config.json + safetensors weights, or the file named by the sub-path).
 */
export async function resolveModelPath(spec: string, opts: { files?: string[] } = {}): Promise<string> {
  if (existsSync(spec)) return resolve(spec);
  const parsed = parseRepoSpec(spec);
  if (!parsed) throw new Error(`${spec}: no such file or directory (and not a Hugging Face repo id like owner/name)`);
  const { repo, revision, subpath } = parsed;
  const wantsDirectory = opts.files === undefined && (subpath === '' || !/\.[A-Za-z0-9]+$/.test(subpath));
  const required = opts.files ?? (wantsDirectory ? [] : [subpath]);
  const target = (snap: string): string => (subpath ? join(snap, subpath) : snap);

  let snap = cachedSnapshot(repo, revision);
  const missing = (s: string | null): string[] => {
    if (!s) return required.length ? required : ['config.json'];
    const m = required.filter((f) => !existsSync(join(s, f)));
    return wantsDirectory ? [...m, ...missingModelFiles(target(s)).map((f) => posix.join(subpath, f))] : m;
  };
  let absent = missing(snap);
  if (absent.length === 0 && snap) return target(snap);

  if (isOffline()) {
    const where = snap ?? join(repoCacheDir(repo), 'snapshots', '<commit>');
    throw new Error(
      `${repo}${revision !== 'main' ? '@' + revision : ''} is not complete in the Hugging Face cache and HF_HUB_OFFLINE is set. ` +
        `Missing: ${absent.join(', ')}. Put the files in ${where}/` +
        (snap ? '' : ` and write the commit id to ${join(repoCacheDir(repo), 'refs', revision)}`) +
        `, or unset HF_HUB_OFFLINE to download them.`,
    );
  }

  const hub = new HubDownloader(repo, revision);
  const fetchFile = async (file: string, optional: boolean): Promise<boolean> => {
    const s = hub.commit ? join(repoCacheDir(repo), 'snapshots', hub.commit) : snap;
    if (s && existsSync(join(s, file))) return true;
    return hub.download(file, optional);
  };
  for (const f of required) await fetchFile(f, false);
  if (wantsDirectory) {
    const prefix = subpath ? subpath + '/' : '';
    await fetchFile(prefix + 'config.json', false);
    if (await fetchFile(prefix + 'model.safetensors.index.json', true)) {
      const index = join(repoCacheDir(repo), 'snapshots', hub.commit!, prefix + 'model.safetensors.index.json');
      const map = (JSON.parse(readFileSync(index, 'utf8')) as { weight_map?: Record<string, string> }).weight_map ?? {};
      for (const shard of [...new Set(Object.values(map))].sort()) await fetchFile(prefix + shard, false);
    } else {
      await fetchFile(prefix + 'model.safetensors', false);
    }
    for (const f of OPTIONAL_FILES) await fetchFile(prefix + f, true);
  } else if (subpath.endsWith('.bin')) {
    // llama2.c checkpoints keep their tokenizer beside them as tok<vocab>.bin or tokenizer.bin.
    const vocab = llama2cVocab(join(repoCacheDir(repo), 'snapshots', hub.commit ?? '', subpath));
    const folder = posix.dirname(subpath) === '.' ? '' : posix.dirname(subpath) + '/';
    if (!(vocab && (await fetchFile(`${folder}tok${vocab}.bin`, true)))) await fetchFile(`${folder}tokenizer.bin`, true);
  }
  snap = hub.commit ? join(repoCacheDir(repo), 'snapshots', hub.commit) : cachedSnapshot(repo, revision);
  absent = missing(snap);
  if (!snap || absent.length) throw new Error(`${repo}: download finished but ${absent.join(', ')} still missing from ${snap ?? repoCacheDir(repo)}`);
  return target(snap);
}

function llama2cVocab(path: string): number | null {
  try {
    const fd = openSync(path, 'r');
    try {
      const b = Buffer.alloc(28);
      if (readSync(fd, b, 0, 28, 0) < 28) return null;
      return Math.abs(b.readInt32LE(20));
    } finally {
      closeSync(fd);
    }
  } catch {
    return null;
  }
}

/** Downloads files of one repo revision into the cache: blobs/<etag>, snapshots/<commit>/<file> → ../../blobs/<etag>, refs/<rev>. */
class HubDownloader {
  commit: string | null = null;
  private readonly endpoint = (process.env.HF_ENDPOINT ?? 'https://huggingface.co').replace(/\/$/, '');

  constructor(
    readonly repo: string,
    readonly revision: string,
  ) {}

  /** Fetches one file; false when optional and the repo does not have it (404). */
  async download(file: string, optional: boolean): Promise<boolean> {
    const encoded = file.split('/').map(encodeURIComponent).join('/');
    let url = `${this.endpoint}/${this.repo}/resolve/${encodeURIComponent(this.revision)}/${encoded}`;
    const headers: Record<string, string> = { 'user-agent': 'mla-serve' };
    const token = process.env.HF_TOKEN;
    if (token) headers.authorization = `Bearer ${token}`;
    let etag: string | null = null;
    for (let hop = 0; hop < 6; hop++) {
      let res;
      try {
        res = await request(url, { method: 'GET', headers: hop === 0 ? headers : { 'user-agent': 'mla-serve' } });
      } catch (e) {
        throw new Error(
          `${this.repo}: cannot download ${file} from ${url} (${(e as Error).message}). Check the network, or download it yourself into ${this.cacheHint()} and set HF_HUB_OFFLINE=1.`,
        );
      }
      const h = res.headers;
      const str = (k: string): string | null => {
        const v = h[k];
        return typeof v === 'string' ? v : Array.isArray(v) ? v[0] : null;
      };
      this.commit ??= str('x-repo-commit');
      etag ??= str('x-linked-etag') ?? str('etag');
      if (res.statusCode >= 300 && res.statusCode < 400 && str('location')) {
        await res.body.dump();
        url = new URL(str('location')!, url).toString();
        continue;
      }
      if (res.statusCode === 404 && optional) {
        await res.body.dump();
        return false;
      }
      if (res.statusCode !== 200) {
        const text = (await res.body.text()).slice(0, 200);
        const hint = res.statusCode === 401 || res.statusCode === 403 ? ' (gated or private repo: set HF_TOKEN)' : '';
        throw new Error(`${this.repo}: downloading ${file} got HTTP ${res.statusCode}${hint}: ${text}`);
      }
      if (!this.commit) throw new Error(`${this.repo}: the hub did not say which commit ${this.revision} is (no X-Repo-Commit header)`);
      const repoDir = repoCacheDir(this.repo);
      const blobName = (etag ?? `${this.commit}-${file}`).replace(/^W\//, '').replaceAll('"', '').replace(/[^\w.-]/g, '_');
      const blob = join(repoDir, 'blobs', blobName);
      const dest = join(repoDir, 'snapshots', this.commit, file);
      mkdirSync(dirname(blob), { recursive: true });
      mkdirSync(dirname(dest), { recursive: true });
      if (!existsSync(blob)) await this.save(res.body, blob + '.incomplete', file, Number(str('content-length') ?? 0));
      else await res.body.dump();
      if (existsSync(blob + '.incomplete')) renameSync(blob + '.incomplete', blob);
      try {
        symlinkSync(relative(dirname(dest), blob), dest);
      } catch {
        // File systems without symlinks: keep the blob under its snapshot name, as huggingface_hub does.
        renameSync(blob, dest);
      }
      mkdirSync(join(repoDir, 'refs'), { recursive: true });
      if (!/^[0-9a-f]{40}$/.test(this.revision)) writeFileSync(join(repoDir, 'refs', this.revision), this.commit);
      return true;
    }
    throw new Error(`${this.repo}: too many redirects downloading ${file}`);
  }

  private cacheHint(): string {
    return join(repoCacheDir(this.repo), 'snapshots', this.commit ?? '<commit>');
  }

  private async save(body: AsyncIterable<Uint8Array>, path: string, file: string, total: number): Promise<void> {
    const out = createWriteStream(path);
    const bar = new SingleBar({ format: `${file} [{bar}] {percentage}% {value}/{total} bytes`, hideCursor: true }, Presets.shades_classic);
    bar.start(total || 1, 0);
    let done = 0;
    try {
      for await (const chunk of body) {
        if (!out.write(chunk)) await once(out, 'drain');
        done += chunk.byteLength;
        bar.update(total ? done : 0);
      }
      out.end();
      await once(out, 'finish');
    } catch (e) {
      out.destroy();
      rmSync(path, { force: true });
      throw new Error(`${this.repo}: download of ${file} broke after ${done} bytes (${(e as Error).message}); run again to retry`);
    } finally {
      bar.stop();
    }
    if (total && statSync(path).size !== total) {
      rmSync(path, { force: true });
      throw new Error(`${this.repo}: ${file} arrived with ${done} of ${total} bytes; run again to retry`);
    }
  }
}
