// Validates every manifest under deploy/ against the Kubernetes, Gateway API and prometheus-operator schemas, and checks their cross-references.
//
// Schemas come from the npm kubernetes-models family, which ships them offline in two forms, both used here:
// - compiled JSON-schema validators (ajv) behind each model's validate(): types, formats, patterns, enums, required fields;
// - TypeScript interfaces generated from the same OpenAPI schemas: compiled against the manifests, they reject fields
//   the schema does not declare (a misspelt `readinesProbe` passes the JSON schemas, which allow extra properties).
// No npm package ships the inference extension's InferencePool CRD; for it, only metadata and selector are checked
// against the Kubernetes schemas, and its references are checked against the objects it names.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { join, relative, resolve } from 'node:path';
import { spawnSync } from 'node:child_process';
import ts from 'typescript';
import { parse as parseYaml, parseAllDocuments } from 'yaml';
import type { IDeployment } from 'kubernetes-models/apps/v1/Deployment';
import type { IService } from 'kubernetes-models/v1/Service';
import type { IConfigMap } from 'kubernetes-models/v1/ConfigMap';
import type { IRoleBinding } from 'kubernetes-models/rbac.authorization.k8s.io/v1/RoleBinding';
import type { IContainer } from 'kubernetes-models/v1/Container';
import type { IHTTPRoute } from '@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/HTTPRoute';
import type { IPodMonitor } from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor';
import type { IServiceMonitor } from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor';
import { parseServeArgs } from '../server/serve-options.ts';

const projectRoot = resolve(import.meta.dirname, '..');
const deployDir = join(projectRoot, 'deploy');
const kustomizeDir = join(deployDir, 'kubernetes');

/** Where each kind's schema lives: the module exporting its model class (validator) and its TypeScript interface. */
interface KindSchema {
  module: string;
  className: string;
  interfaceName: string;
}

const kindSchemas: Record<string, KindSchema> = {};
function registerKind(apiVersion: string, kind: string, module: string): void {
  kindSchemas[`${apiVersion}/${kind}`] = { module, className: kind, interfaceName: `I${kind}` };
}
for (const kind of ['Namespace', 'Service', 'ServiceAccount', 'ConfigMap', 'Secret', 'PersistentVolumeClaim']) {
  registerKind('v1', kind, `kubernetes-models/v1/${kind}`);
}
registerKind('apps/v1', 'Deployment', 'kubernetes-models/apps/v1/Deployment');
for (const kind of ['Role', 'RoleBinding', 'ClusterRole', 'ClusterRoleBinding']) {
  registerKind('rbac.authorization.k8s.io/v1', kind, `kubernetes-models/rbac.authorization.k8s.io/v1/${kind}`);
}
for (const kind of ['Gateway', 'HTTPRoute']) {
  registerKind('gateway.networking.k8s.io/v1', kind, `@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/${kind}`);
}
for (const kind of ['PodMonitor', 'ServiceMonitor']) {
  registerKind('monitoring.coreos.com/v1', kind, `@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/${kind}`);
}

const INFERENCE_POOL = 'inference.networking.k8s.io/v1/InferencePool';
const OBJECT_META_MODULE = '@kubernetes-models/apimachinery/apis/meta/v1/ObjectMeta';
const LABEL_SELECTOR_MODULE = '@kubernetes-models/apimachinery/apis/meta/v1/LabelSelector';

interface K8sObject {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string; labels?: Record<string, string> };
  [field: string]: unknown;
}

/** The v1 InferencePool fields this test reads (not a schema: none ships on npm, see the file header). */
interface InferencePool extends K8sObject {
  spec: {
    selector: { matchLabels: Record<string, string> };
    targetPorts: { number: number }[];
    endpointPickerRef: { name: string; kind?: string; port?: { number: number }; failureMode?: string };
  };
}

interface Kustomization {
  namespace?: string;
  resources?: string[];
  configMapGenerator?: { name: string; literals?: string[] }[];
  images?: { name: string; newName?: string; newTag?: string }[];
  replicas?: { name: string; count: number }[];
}

interface Manifest {
  /** file:index within the file, for messages */
  where: string;
  object: K8sObject;
}

function yamlFilesUnder(dir: string): string[] {
  const files: string[] = [];
  for (const name of readdirSync(dir).sort()) {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) files.push(...yamlFilesUnder(path));
    else if (/\.ya?ml$/.test(name)) files.push(path);
  }
  return files;
}

/** Every YAML document of a file; a syntax error or a warning (duplicate key, bad tag) fails with its position. */
function parseYamlFile(path: string, text = readFileSync(path, 'utf8')): unknown[] {
  const docs = parseAllDocuments(text, { prettyErrors: true });
  const where = relative(projectRoot, path);
  for (const doc of docs) {
    const problems = [...doc.errors, ...doc.warnings];
    if (problems.length) throw new Error(`${where}: ${problems.map((p) => p.message).join('\n')}`);
  }
  return docs.map((d) => d.toJS() as unknown).filter((o) => o !== null && o !== undefined);
}

function asK8sObject(value: unknown, where: string): K8sObject {
  const o = value as Partial<K8sObject> | null;
  if (!o || typeof o !== 'object' || typeof o.apiVersion !== 'string' || typeof o.kind !== 'string') {
    throw new Error(`${where}: not a Kubernetes object (needs apiVersion and kind)`);
  }
  if (!o.metadata || typeof o.metadata.name !== 'string') throw new Error(`${where}: ${o.kind} has no metadata.name`);
  return o as K8sObject;
}

function loadDeployDir(): { manifests: Manifest[]; kustomizations: Map<string, Kustomization> } {
  const manifests: Manifest[] = [];
  const kustomizations = new Map<string, Kustomization>();
  for (const file of yamlFilesUnder(deployDir)) {
    parseYamlFile(file).forEach((doc, i) => {
      const where = `${relative(projectRoot, file)}#${i}`;
      const kind = (doc as { kind?: string }).kind;
      if (kind === 'Kustomization') kustomizations.set(file, doc as Kustomization);
      else manifests.push({ where, object: asK8sObject(doc, where) });
    });
  }
  return { manifests, kustomizations };
}

const kindKey = (o: K8sObject) => `${o.apiVersion}/${o.kind}`;
const label = (m: Manifest) => `${m.where} ${m.object.kind}/${m.object.metadata.name}`;

type ModelClass = new (data: unknown) => { validate(): void };

async function modelClass(module: string, className: string): Promise<ModelClass> {
  const exports = (await import(module)) as Record<string, unknown>;
  const ctor = exports[className];
  if (typeof ctor !== 'function') throw new Error(`${module} exports no ${className}`);
  return ctor as ModelClass;
}

/** JSON-schema validation of one object; returns the validator's message, or null when valid. */
async function jsonSchemaErrors(object: K8sObject): Promise<string | null> {
  const validateWith = async (module: string, className: string, data: unknown): Promise<string | null> => {
    const Model = await modelClass(module, className);
    try {
      new Model(data).validate();
      return null;
    } catch (err) {
      return (err as Error).message;
    }
  };
  if (kindKey(object) === INFERENCE_POOL) {
    const pool = object as InferencePool;
    const errors = [
      await validateWith(OBJECT_META_MODULE, 'ObjectMeta', pool.metadata),
      await validateWith(LABEL_SELECTOR_MODULE, 'LabelSelector', pool.spec?.selector),
    ].filter((e) => e !== null);
    return errors.length ? errors.join('; ') : null;
  }
  const schema = kindSchemas[kindKey(object)];
  if (!schema) return `no schema registered for ${kindKey(object)}`;
  return validateWith(schema.module, schema.className, object);
}

/**
 * Type-checks the objects as object literals of the packages' interfaces, in one in-memory program:
 * TypeScript's excess-property check rejects fields the schema does not declare. One literal per line,
 * so each diagnostic maps back to its object. Returns one message per failing object.
 */
function typeErrors(objects: { label: string; object: K8sObject }[]): string[] {
  const imports: string[] = [];
  const lines: string[] = [];
  const lineLabels: string[] = [];
  const typeAliases = new Map<string, string>();
  const typeFor = (module: string, interfaceName: string): string => {
    const key = `${module}#${interfaceName}`;
    let alias = typeAliases.get(key);
    if (!alias) {
      alias = `T${typeAliases.size}`;
      typeAliases.set(key, alias);
      imports.push(`import type { ${interfaceName} as ${alias} } from ${JSON.stringify(module)};`);
    }
    return alias;
  };
  const declare = (what: string, type: string, value: unknown) => {
    lines.push(`export const v${lines.length}: ${type} = ${JSON.stringify(value)};`);
    lineLabels.push(what);
  };
  for (const { label: what, object } of objects) {
    if (kindKey(object) === INFERENCE_POOL) {
      const pool = object as InferencePool;
      declare(`${what} metadata`, typeFor(OBJECT_META_MODULE, 'IObjectMeta'), pool.metadata);
      declare(`${what} spec.selector`, typeFor(LABEL_SELECTOR_MODULE, 'ILabelSelector'), pool.spec?.selector ?? null);
      continue;
    }
    const schema = kindSchemas[kindKey(object)];
    if (!schema) throw new Error(`${what}: no schema registered for ${kindKey(object)}`);
    declare(what, typeFor(schema.module, schema.interfaceName), object);
  }
  const source = [...imports, ...lines].join('\n');
  const firstObjectLine = imports.length;

  const virtualPath = join(projectRoot, 'test', '__deploy_manifest_types__.ts');
  const options: ts.CompilerOptions = {
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    target: ts.ScriptTarget.ES2022,
    lib: ['lib.es2022.d.ts'],
    types: [],
    strict: true,
    noEmit: true,
    skipLibCheck: true,
  };
  const host = ts.createCompilerHost(options);
  const readSource = host.getSourceFile.bind(host);
  const fileExists = host.fileExists.bind(host);
  host.getSourceFile = (fileName, languageVersion, ...rest) =>
    fileName === virtualPath ? ts.createSourceFile(fileName, source, languageVersion) : readSource(fileName, languageVersion, ...rest);
  host.fileExists = (fileName) => fileName === virtualPath || fileExists(fileName);
  const program = ts.createProgram([virtualPath], options, host);
  const sourceFile = program.getSourceFile(virtualPath);
  assert.ok(sourceFile, 'virtual type-check file missing from the program');

  const messages: string[] = [];
  for (const d of [...program.getSyntacticDiagnostics(sourceFile), ...program.getSemanticDiagnostics(sourceFile)]) {
    const text = ts.flattenDiagnosticMessageText(d.messageText, '\n  ');
    const line = d.start === undefined ? -1 : sourceFile.getLineAndCharacterOfPosition(d.start).line;
    const what = line >= firstObjectLine ? lineLabels[line - firstObjectLine] : 'imports';
    messages.push(`${what}: ${text}`);
  }
  return messages;
}

async function schemaFailures(manifests: Manifest[]): Promise<string[]> {
  const failures: string[] = [];
  for (const m of manifests) {
    const error = await jsonSchemaErrors(m.object);
    if (error) failures.push(`${label(m)}: ${error}`);
  }
  return failures;
}

const { manifests, kustomizations } = loadDeployDir();
const byKind = <T extends K8sObject>(kind: string, from: Manifest[] = manifests): T[] =>
  from.filter((m) => m.object.kind === kind).map((m) => m.object as T);
const named = <T extends K8sObject>(kind: string, name: string, from: Manifest[] = manifests): T => {
  const found = byKind<T>(kind, from).find((o) => o.metadata.name === name);
  assert.ok(found, `no ${kind} named '${name}' under deploy/`);
  return found;
};
const matches = (selector: Record<string, string>, labels: Record<string, string> | undefined) =>
  Object.entries(selector).every(([k, v]) => labels?.[k] === v);

const modelServer = () => named<IDeployment & K8sObject>('Deployment', 'mla-serve');
const serverContainer = (): IContainer => {
  const container = modelServer().spec?.template.spec?.containers.find((c) => c.name === 'server');
  assert.ok(container, "the mla-serve Deployment has no container named 'server'");
  return container;
};

test('every YAML file under deploy/ parses, and every object is a kind with a schema', () => {
  assert.ok(existsSync(join(kustomizeDir, 'kustomization.yaml')), 'deploy/kubernetes/kustomization.yaml is missing');
  const kinds = manifests.map((m) => kindKey(m.object)).sort();
  for (const required of [
    'apps/v1/Deployment',
    'v1/Service',
    'monitoring.coreos.com/v1/PodMonitor',
    INFERENCE_POOL,
    'gateway.networking.k8s.io/v1/HTTPRoute',
  ]) {
    assert.ok(kinds.includes(required), `deploy/ has no ${required} (has: ${[...new Set(kinds)].join(', ')})`);
  }
  const unknown = manifests.filter((m) => kindKey(m.object) !== INFERENCE_POOL && !kindSchemas[kindKey(m.object)]);
  assert.deepEqual(unknown.map(label), [], 'objects whose kind has no schema registered in this test');
});

test('every object passes its JSON schema (Kubernetes, Gateway API, prometheus-operator)', async () => {
  assert.deepEqual(await schemaFailures(manifests), []);
});

test('every object uses only fields its schema declares, with the declared types', () => {
  assert.deepEqual(typeErrors(manifests.map((m) => ({ label: label(m), object: m.object }))), []);
});

test('the validators reject broken manifests (controls: a typo, a wrong type, a bad Gateway API group)', async () => {
  const broken = structuredClone(modelServer()) as IDeployment & K8sObject;
  const container = broken.spec!.template.spec!.containers[0] as IContainer & Record<string, unknown>;
  container.readinesProbe = container.readinessProbe;
  delete container.readinessProbe;
  const typo = typeErrors([{ label: 'typo', object: broken }]);
  assert.equal(typo.length, 1, `expected the misspelt field to be rejected, got: ${typo.join('\n')}`);
  assert.match(typo[0], /readinesProbe/);
  assert.equal(await jsonSchemaErrors(broken), null, 'the JSON schemas allow unknown fields; the type check is what catches them');

  const wrongType = structuredClone(modelServer()) as IDeployment & K8sObject;
  (wrongType.spec!.template.spec!.containers[0].ports![0] as { containerPort: unknown }).containerPort = 'http';
  assert.match((await jsonSchemaErrors(wrongType)) ?? '', /containerPort must be integer/);

  const route = structuredClone(named<IHTTPRoute & K8sObject>('HTTPRoute', 'mla-serve'));
  route.spec.rules![0].backendRefs![0].group = 'Inference_Networking';
  assert.match((await jsonSchemaErrors(route)) ?? '', /backendRefs\/0\/group must match pattern/);

  // The Kubernetes schemas type names and labels but leave their syntax to the API server, so the
  // control for the pool's partial check is a type error.
  const pool = structuredClone(named<InferencePool>('InferencePool', 'mla-serve'));
  (pool.spec.selector as { matchLabels: unknown }).matchLabels = ['app.kubernetes.io/name=mla-serve'];
  (pool.metadata as { labels: unknown }).labels = { replicas: 2 };
  const poolErrors = (await jsonSchemaErrors(pool)) ?? '';
  assert.match(poolErrors, /data\/labels\/replicas must be string/);
  assert.match(poolErrors, /data\/matchLabels must be object/);
});

test('model server Deployment: one GPU, Vulkan ICD mounted, probes on /health, drain, HF cache volume', () => {
  const deployment = modelServer();
  const pod = deployment.spec!.template.spec!;
  const container = serverContainer();
  const env = new Map((container.env ?? []).map((e) => [e.name, e]));

  assert.equal(String(container.resources?.limits?.['nvidia.com/gpu']), '1', 'one GPU per pod (limits)');
  const capabilities = env.get('NVIDIA_DRIVER_CAPABILITIES')?.value?.split(',') ?? [];
  for (const cap of ['compute', 'utility', 'graphics']) assert.ok(capabilities.includes(cap), `NVIDIA_DRIVER_CAPABILITIES lacks ${cap}`);

  const httpPort = container.ports?.find((p) => p.name === 'http');
  assert.ok(httpPort, "no container port named 'http'");
  for (const probe of ['startupProbe', 'readinessProbe', 'livenessProbe'] as const) {
    const get = container[probe]?.httpGet;
    assert.equal(get?.path, '/health', `${probe} must GET /health`);
    assert.ok(get.port === 'http' || get.port === httpPort.containerPort, `${probe} must hit the http port`);
  }

  const preStopSleep = container.lifecycle?.preStop?.sleep?.seconds;
  assert.ok(typeof preStopSleep === 'number' && preStopSleep > 0, 'preStop must wait for endpoints to drop the pod');
  assert.ok((pod.terminationGracePeriodSeconds ?? 30) > preStopSleep, 'the preStop sleep eats the whole grace period');

  const hfHome = env.get('HF_HOME')?.value;
  assert.ok(hfHome, 'HF_HOME is not set');
  const mount = container.volumeMounts?.find((m) => hfHome === m.mountPath || hfHome.startsWith(`${m.mountPath}/`));
  assert.ok(mount, `HF_HOME ${hfHome} is not on a mounted volume`);
  const volume = pod.volumes?.find((v) => v.name === mount.name);
  assert.ok(volume?.emptyDir || volume?.persistentVolumeClaim, `the HF cache volume '${mount.name}' is neither emptyDir nor a PVC`);
  for (const m of container.volumeMounts ?? []) {
    assert.ok(pod.volumes?.some((v) => v.name === m.name), `volumeMount '${m.name}' has no volume`);
  }
});

test("server args, expanded as the kubelet does, parse with the server's own option parser", () => {
  const container = serverContainer();
  const args = container.args ?? [];
  assert.equal(args[0], 'serve');
  // The parser has a default for each flag, so a flag missing here would pass silently: list the knobs.
  for (const flag of ['--model', '--name', '--host', '--port', '--kv-cache-memory', '--block-size', '--max-num-seqs', '--max-model-len', '--max-queue', '--shutdown-timeout']) {
    const at = args.indexOf(flag);
    assert.ok(at > 0 && at + 1 < args.length && !args[at + 1].startsWith('--'), `args lack '${flag} <value>'`);
  }

  const kustomization = kustomizations.get(join(kustomizeDir, 'kustomization.yaml'));
  assert.ok(kustomization, 'deploy/kubernetes/kustomization.yaml did not load');
  const configMapData = (name: string): Record<string, string> => {
    const generated = kustomization.configMapGenerator?.find((g) => g.name === name);
    if (generated) return Object.fromEntries((generated.literals ?? []).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
    return named<IConfigMap & K8sObject>('ConfigMap', name).data ?? {};
  };
  const env = new Map<string, string | undefined>();
  for (const e of container.env ?? []) {
    const ref = e.valueFrom?.configMapKeyRef;
    if (ref) {
      const data = configMapData(ref.name!);
      assert.ok(ref.key in data, `env ${e.name} reads key '${ref.key}' that ConfigMap '${ref.name}' lacks`);
      env.set(e.name, data[ref.key]);
    } else {
      env.set(e.name, e.value);
    }
  }
  // The kubelet leaves an undefined $(VAR) in place, so the server would get the literal text.
  const expanded = args.map((arg) =>
    arg.replace(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g, (_, name: string) => {
      const value = env.get(name);
      assert.ok(value !== undefined, `args use $(${name}) but the container's env gives it no value`);
      return value;
    }),
  );

  const options = parseServeArgs(expanded.slice(1));
  assert.notEqual(options, 'help');
  if (options === 'help') return;
  assert.equal(options.host, '0.0.0.0', 'the server must listen on all interfaces in a pod');
  assert.equal(options.port, container.ports?.find((p) => p.name === 'http')?.containerPort);
  assert.equal(options.models.length, options.names.length, 'give each --model its --name');
  assert.ok(options.kvCacheMemory >= 2 ** 30, `--kv-cache-memory ${options.kvCacheMemory} bytes: under 1 GiB for a GPU replica`);
  const pod = modelServer().spec!.template.spec!;
  const drainBudget = (pod.terminationGracePeriodSeconds ?? 30) - (container.lifecycle?.preStop?.sleep?.seconds ?? 0);
  assert.ok(options.shutdownTimeout + 10 <= drainBudget, `--shutdown-timeout ${options.shutdownTimeout} s does not fit (with 10 s to spare) in the ${drainBudget} s left after preStop`);
});

test('the InferencePool, HTTPRoute, endpoint picker, Services and monitors refer to each other', () => {
  const deployment = modelServer();
  const podLabels = deployment.spec!.template.metadata!.labels!;
  const container = serverContainer();
  const portNames = new Set((container.ports ?? []).map((p) => p.name));
  assert.ok(matches(deployment.spec!.selector.matchLabels!, podLabels), 'the Deployment selector misses its own pods');

  // Pool -> model-server pods and port; pool -> picker Service and port; picker -> pool.
  const pool = named<InferencePool>('InferencePool', 'mla-serve');
  assert.ok(matches(pool.spec.selector.matchLabels, podLabels), 'the InferencePool selector misses the model-server pods');
  assert.deepEqual(pool.spec.targetPorts.map((p) => p.number), [container.ports!.find((p) => p.name === 'http')!.containerPort]);
  const pickerRef = pool.spec.endpointPickerRef;
  assert.equal(pickerRef.kind ?? 'Service', 'Service');
  const pickerService = named<IService & K8sObject>('Service', pickerRef.name);
  assert.ok(pickerService.spec?.ports?.some((p) => p.port === pickerRef.port?.number), `Service ${pickerRef.name} has no port ${pickerRef.port?.number}`);
  assert.ok(['FailOpen', 'FailClose', undefined].includes(pickerRef.failureMode), `failureMode ${pickerRef.failureMode}`);

  const picker = byKind<IDeployment & K8sObject>('Deployment').find((d) =>
    matches(pickerService.spec!.selector!, d.spec?.template.metadata?.labels),
  );
  assert.ok(picker, `no Deployment behind Service ${pickerRef.name}`);
  const eppContainer = picker.spec!.template.spec!.containers[0];
  const eppArgs = eppContainer.args ?? [];
  assert.equal(eppArgs[eppArgs.indexOf('--pool-name') + 1], pool.metadata.name, 'the picker watches another pool');

  // Every Service's named targetPort exists on the pods it selects.
  for (const service of byKind<IService & K8sObject>('Service')) {
    const pods = byKind<IDeployment & K8sObject>('Deployment').filter((d) => matches(service.spec!.selector!, d.spec?.template.metadata?.labels));
    assert.equal(pods.length, 1, `Service ${service.metadata.name} selects ${pods.length} Deployments`);
    const names = new Set(pods[0].spec!.template.spec!.containers.flatMap((c) => (c.ports ?? []).map((p) => p.name)));
    for (const p of service.spec!.ports ?? []) {
      if (typeof p.targetPort === 'string') assert.ok(names.has(p.targetPort), `Service ${service.metadata.name} targets missing port '${p.targetPort}'`);
    }
  }

  // The picker's config: mounted file exists in its ConfigMap, parses, and each pluginRef names a declared plugin.
  const configFile = eppArgs[eppArgs.indexOf('--config-file') + 1];
  const mount = eppContainer.volumeMounts?.find((m) => configFile.startsWith(`${m.mountPath}/`));
  assert.ok(mount, `--config-file ${configFile} is not on a mounted volume`);
  const configMapName = picker.spec!.template.spec!.volumes!.find((v) => v.name === mount.name)?.configMap?.name;
  const pickerConfig = named<IConfigMap & K8sObject>('ConfigMap', configMapName!).data?.[configFile.slice(mount.mountPath.length + 1)];
  assert.ok(pickerConfig, `ConfigMap ${configMapName} has no ${configFile}`);
  const parsed = parseYaml(pickerConfig) as {
    kind: string;
    plugins: { type: string; name?: string }[];
    schedulingProfiles: { plugins: { pluginRef: string }[] }[];
  };
  assert.equal(parsed.kind, 'EndpointPickerConfig');
  const declared = new Set(parsed.plugins.map((p) => p.name ?? p.type));
  for (const ref of parsed.schedulingProfiles.flatMap((s) => s.plugins.map((p) => p.pluginRef))) {
    assert.ok(declared.has(ref), `scheduling profile uses undeclared plugin '${ref}'`);
  }
  for (const scraper of ['metrics-data-source', 'core-metrics-extractor']) assert.ok(declared.has(scraper), `picker config lacks ${scraper}`);

  // The picker's RBAC: binding -> Role and the ServiceAccount it runs as.
  const binding = byKind<IRoleBinding & K8sObject>('RoleBinding').find((b) => b.subjects?.some((s) => s.name === picker.spec!.template.spec!.serviceAccountName));
  assert.ok(binding, `no RoleBinding for ServiceAccount ${picker.spec!.template.spec!.serviceAccountName}`);
  named('ServiceAccount', picker.spec!.template.spec!.serviceAccountName!);
  named('Role', binding.roleRef.name);

  // Route -> pool.
  const route = named<IHTTPRoute & K8sObject>('HTTPRoute', 'mla-serve');
  const poolRefs = (route.spec.rules ?? []).flatMap((r) => r.backendRefs ?? []).filter((b) => b.kind === 'InferencePool');
  assert.ok(poolRefs.length > 0, 'the HTTPRoute has no InferencePool backendRef');
  for (const ref of poolRefs) {
    assert.equal(ref.group, 'inference.networking.k8s.io');
    named('InferencePool', ref.name);
  }

  // Monitors -> pods and ports.
  const podMonitor = named<IPodMonitor & K8sObject>('PodMonitor', 'mla-serve');
  assert.ok(matches(podMonitor.spec.selector.matchLabels ?? {}, podLabels), 'the PodMonitor misses the model-server pods');
  for (const endpoint of podMonitor.spec.podMetricsEndpoints ?? []) {
    assert.ok(portNames.has(endpoint.port), `PodMonitor scrapes missing port '${endpoint.port}'`);
    assert.equal(endpoint.path, '/metrics');
  }
  for (const monitor of byKind<IServiceMonitor & K8sObject>('ServiceMonitor')) {
    const service = byKind<IService & K8sObject>('Service').find((s) => matches(monitor.spec.selector.matchLabels ?? {}, s.metadata.labels));
    assert.ok(service, `ServiceMonitor ${monitor.metadata.name} selects no Service`);
    for (const endpoint of monitor.spec.endpoints ?? []) {
      assert.ok(service.spec?.ports?.some((p) => p.name === endpoint.port), `ServiceMonitor scrapes missing Service port '${endpoint.port}'`);
    }
  }
});

test('kustomization: lists every manifest beside it, and its images and replicas name real objects', () => {
  for (const [file, kustomization] of kustomizations) {
    const dir = resolve(file, '..');
    const listed = new Set((kustomization.resources ?? []).map((r) => resolve(dir, r)));
    for (const path of listed) assert.ok(existsSync(path), `${relative(projectRoot, file)} lists missing ${relative(projectRoot, path)}`);
    const beside = readdirSync(dir).filter((n) => /\.ya?ml$/.test(n) && n !== 'kustomization.yaml').map((n) => join(dir, n));
    for (const path of beside) assert.ok(listed.has(path), `${relative(projectRoot, path)} is not in ${relative(projectRoot, file)}'s resources`);

    const inDir = manifests.filter((m) => m.where.startsWith(relative(projectRoot, dir) + '/'));
    const images = byKind<IDeployment & K8sObject>('Deployment', inDir).flatMap((d) => d.spec!.template.spec!.containers.map((c) => c.image!));
    for (const image of kustomization.images ?? []) {
      assert.ok(images.some((i) => i === image.name || i.startsWith(`${image.name}:`)), `images entry '${image.name}' matches no container image`);
    }
    for (const r of kustomization.replicas ?? []) named('Deployment', r.name, inDir);
  }
});

test('kubectl kustomize renders objects that pass the same schemas', async (t) => {
  const probe = spawnSync('kubectl', ['version', '--client'], { encoding: 'utf8' });
  if (probe.error || probe.status !== 0) {
    t.skip('kubectl is not installed: the kustomize render is not checked (the per-file checks above still ran)');
    return;
  }
  const render = spawnSync('kubectl', ['kustomize', kustomizeDir], { encoding: 'utf8', timeout: 30_000 });
  assert.equal(render.status, 0, `kubectl kustomize failed:\n${render.stderr}`);
  const rendered = parseYamlFile(join(kustomizeDir, '(kustomize build)'), render.stdout).map((o, i) => ({
    where: `kustomize#${i}`,
    object: asK8sObject(o, `kustomize#${i}`),
  }));
  assert.equal(rendered.length, manifests.filter((m) => m.where.startsWith('deploy/kubernetes/')).length + 1, 'render = files + the generated ConfigMap');
  assert.deepEqual(await schemaFailures(rendered), []);
  assert.deepEqual(typeErrors(rendered.map((m) => ({ label: label(m), object: m.object }))), []);

  const kustomization = kustomizations.get(join(kustomizeDir, 'kustomization.yaml'))!;
  for (const m of rendered) {
    if (m.object.kind !== 'Namespace') assert.equal(m.object.metadata.namespace, kustomization.namespace, `${label(m)} not in the namespace`);
  }
  // The generated ConfigMap gets a content hash in its name, and the Deployment's env refers to that name.
  const generated = byKind<IConfigMap & K8sObject>('ConfigMap', rendered).find((c) => c.metadata.name.startsWith('mla-serve-config-'));
  assert.ok(generated, 'no generated mla-serve-config-<hash> ConfigMap');
  const server = named<IDeployment & K8sObject>('Deployment', 'mla-serve', rendered).spec!.template.spec!.containers[0];
  const refs = new Set((server.env ?? []).flatMap((e) => (e.valueFrom?.configMapKeyRef ? [e.valueFrom.configMapKeyRef.name] : [])));
  assert.deepEqual([...refs], [generated.metadata.name]);
});
