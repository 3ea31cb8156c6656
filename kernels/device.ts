// GPU device setup through Dawn (npm `webgpu`): hardware adapter first, SwiftShader fallback, errors thrown.
import { existsSync } from 'node:fs';
import { create, globals } from 'webgpu';

Object.assign(globalThis, globals);

const SWIFTSHADER_ICD = '/usr/lib/chromium/vk_swiftshader_icd.json';

export interface GpuContext {
  device: GPUDevice;
  adapterName: string;
  isSoftware: boolean;
  features: Set<string>;
  limits: GPUSupportedLimits;
  subgroupSize: number;
  /**
   * Tensor-core shapes the adapter offers through `chromium-experimental-subgroup-matrix` (empty without the feature):
   * on the H200 i8×i8→i32 and u8×u8→u32 with M 16, N 16 or 8, K 32.
   */
  subgroupMatrixConfigs: SubgroupMatrixConfig[];
  /** Compute pipelines keyed by label + source; one cache per device. */
  pipeline(label: string, code: string, entryPoint?: string, constants?: Record<string, number>): GPUComputePipeline;
  /** Throws the first uncaptured GPU error (with its WGSL label) or device loss, if any happened. */
  checkErrors(): void;
  destroy(): void;
}

export interface SubgroupMatrixConfig {
  componentType: string;
  resultComponentType: string;
  M: number;
  N: number;
  K: number;
}

/**
 * Dawn toggles every device gets unless the caller passes its own: subgroup matrices (tensor cores) exist only behind
 * allow_unsafe_apis. MLA_SERVE_SAFE_APIS=1 leaves it off (the int8 GEMMs then take the dot4I8Packed path).
 */
export function defaultDawnFlags(): string[] {
  // Dawn rounds timestamps down to 2^16 ns by default (timing-attack hardening for browsers): per-dispatch profiles
  // (runner.stepProfile) came back in steps of 65.5 µs on the H200. Unquantized timestamps only serve measurements.
  const flags = ['disable-dawn-features=timestamp_quantization'];
  return process.env.MLA_SERVE_SAFE_APIS === '1' ? flags : ['enable-dawn-features=allow_unsafe_apis', ...flags];
}

export interface GpuOptions {
  /** Extra Dawn toggles, e.g. 'enable-dawn-features=allow_unsafe_apis'. */
  dawnFlags?: string[];
  /** Force the software adapter even when hardware exists (tests). */
  forceSoftware?: boolean;
  log?: (msg: string) => void;
}

type Gpu = ReturnType<typeof create>;

let gpuHandle: Gpu | undefined;
let gpuFlagsKey = '';

function gpuInstance(flags: string[]): Gpu {
  const key = flags.join('\n');
  if (!gpuHandle || key !== gpuFlagsKey) {
    gpuHandle = create(flags);
    gpuFlagsKey = key;
  }
  return gpuHandle;
}

async function requestAdapter(flags: string[]): Promise<GPUAdapter | null> {
  try {
    return await gpuInstance(flags).requestAdapter({ powerPreference: 'high-performance' });
  } catch {
    return null;
  }
}

/** Opens a GPU device with the adapter's maximum limits. */
export async function openGpu(opts: GpuOptions = {}): Promise<GpuContext> {
  const log = opts.log ?? ((m: string) => process.stderr.write(m + '\n'));
  const flags = opts.dawnFlags ?? defaultDawnFlags();
  let adapter: GPUAdapter | null = null;
  let isSoftware = false;
  if (!opts.forceSoftware && !process.env.VK_ICD_FILENAMES) {
    adapter = await requestAdapter(flags);
  }
  if (adapter && adapter.info?.vendor === '' && adapter.info?.architecture === '' && /swiftshader/i.test(adapter.info?.description ?? '')) {
    isSoftware = true;
  }
  if (!adapter) {
    if (process.env.VK_ICD_FILENAMES) {
      adapter = await requestAdapter(flags);
      isSoftware = /swiftshader/i.test(process.env.VK_ICD_FILENAMES);
    } else if (existsSync(SWIFTSHADER_ICD)) {
      process.env.VK_ICD_FILENAMES = SWIFTSHADER_ICD;
      gpuHandle = undefined; // Vulkan is re-enumerated by a fresh instance
      adapter = await requestAdapter(flags);
      isSoftware = true;
      if (adapter) log('mla-serve: no hardware GPU adapter found; using SwiftShader (software Vulkan, slow)');
    }
  }
  if (!adapter) {
    throw new Error(
      'No WebGPU adapter: Dawn found no Vulkan GPU driver and no SwiftShader. ' +
        'Install a GPU driver with Vulkan support (and libvulkan1), or for a CPU-only machine ' +
        '`apt-get install chromium libvulkan1` (it ships SwiftShader at ' + SWIFTSHADER_ICD + ').',
    );
  }
  const wanted: GPUFeatureName[] = [];
  for (const f of ['subgroups', 'timestamp-query', 'shader-f16', 'chromium-experimental-subgroup-matrix'] as const) {
    if (adapter.features.has(f)) wanted.push(f as GPUFeatureName);
  }
  const requiredLimits: Record<string, number> = {};
  const al = adapter.limits as unknown as Record<string, number>;
  for (const name of [
    'maxBufferSize',
    'maxStorageBufferBindingSize',
    'maxUniformBufferBindingSize',
    'maxStorageBuffersPerShaderStage',
    'maxComputeWorkgroupStorageSize',
    'maxComputeInvocationsPerWorkgroup',
    'maxComputeWorkgroupSizeX',
    'maxComputeWorkgroupSizeY',
    'maxComputeWorkgroupSizeZ',
    'maxComputeWorkgroupsPerDimension',
    'maxBindGroups',
  ]) {
    if (typeof al[name] === 'number') requiredLimits[name] = al[name];
  }
  const device = await adapter.requestDevice({ requiredFeatures: wanted, requiredLimits });
  const info = adapter.info;
  const adapterName = [info?.vendor, info?.architecture, info?.device, info?.description].filter(Boolean).join(' ') || 'unknown adapter';
  if (/swiftshader/i.test(adapterName)) isSoftware = true;

  let firstError: Error | undefined;
  device.addEventListener('uncapturederror', (ev) => {
    const e = (ev as GPUUncapturedErrorEvent).error;
    firstError ??= new Error(`GPU error: ${e.message}`);
  });
  let lost: string | undefined;
  void device.lost.then((info) => {
    if (info.reason !== 'destroyed') lost = `GPU device lost: ${info.reason} ${info.message}`;
  });

  const cache = new Map<string, GPUComputePipeline>();
  const configs = (info as unknown as { subgroupMatrixConfigs?: SubgroupMatrixConfig[] })?.subgroupMatrixConfigs ?? [];
  const ctx: GpuContext = {
    device,
    subgroupMatrixConfigs: device.features.has('chromium-experimental-subgroup-matrix' as GPUFeatureName)
      ? [...configs].map((c) => ({ componentType: c.componentType, resultComponentType: c.resultComponentType, M: c.M, N: c.N, K: c.K }))
      : [],
    adapterName,
    isSoftware,
    features: new Set(device.features as unknown as Iterable<string>),
    limits: device.limits,
    subgroupSize: (info as unknown as { subgroupMinSize?: number })?.subgroupMinSize ?? (isSoftware ? 4 : 32),
    pipeline(label, code, entryPoint = 'main', constants) {
      const key = `${label}\u0000${entryPoint}\u0000${JSON.stringify(constants ?? {})}\u0000${code}`;
      let p = cache.get(key);
      if (p) return p;
      device.pushErrorScope('validation');
      const module = device.createShaderModule({ label, code });
      p = device.createComputePipeline({ label, layout: 'auto', compute: { module, entryPoint, constants } });
      // Validation errors surface asynchronously; checkErrors()/popErrorScope report them with the label.
      void device.popErrorScope().then((err) => {
        if (err) firstError ??= new Error(`WGSL pipeline '${label}' failed: ${err.message}`);
      });
      cache.set(key, p);
      return p;
    },
    checkErrors() {
      if (lost) throw new Error(lost);
      if (firstError) {
        const e = firstError;
        firstError = undefined;
        throw e;
      }
    },
    destroy() {
      device.destroy();
      cache.clear();
    },
  };
  return ctx;
}

/** Drops the Dawn instance so the process can exit (call after destroying every device). */
export function releaseGpu(): void {
  gpuHandle = undefined;
}
