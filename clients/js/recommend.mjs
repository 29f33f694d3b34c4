#!/usr/bin/env node
// Usage: node recommend.mjs TARGET CATALOG VECTOR_JSON_FILE K
//          [--compression none|zlib|zstd] [--encryption symmetric|public] [--timings]
//          [--tls] [--tls-ca PEM] [--tls-cert PEM --tls-key PEM]
//
// An API token, if the server wants one, is read from the HESERVE_TOKEN environment
// variable (never from the command line, where other users can read it). --tls
// speaks TLS (with the system's roots, or --tls-ca's); --tls-cert and --tls-key
// present this client's certificate (mutual TLS).
//
// Prints the top K of CATALOG for the user vector in VECTOR_JSON_FILE (a JSON
// array of numbers) as JSON, [[item_id, score], ...], best first. The vector is
// encrypted here; the server at TARGET (host:port) never sees it.
// --timings writes the phases' timings and byte counts as JSON to stderr.

import { readFileSync } from 'node:fs'
import { parseArgs } from 'node:util'

import { HeserveClient } from './heserve-client.mjs'

const USAGE =
  'usage: node recommend.mjs TARGET CATALOG VECTOR_JSON_FILE K ' +
  '[--compression none|zlib|zstd] [--encryption symmetric|public] [--timings] ' +
  '[--tls] [--tls-ca PEM] [--tls-cert PEM --tls-key PEM]'

function pem(path) {
  return path === undefined ? null : readFileSync(path)
}

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      compression: { type: 'string', default: 'none' },
      encryption: { type: 'string', default: 'symmetric' },
      timings: { type: 'boolean', default: false },
      'timeout-ms': { type: 'string', default: '120000' },
      tls: { type: 'boolean', default: false },
      'tls-ca': { type: 'string' },
      'tls-cert': { type: 'string' },
      'tls-key': { type: 'string' },
    },
  })
  if (positionals.length !== 4) throw new Error(USAGE)
  const [target, catalog, vectorFile, kText] = positionals
  const k = Number.parseInt(kText, 10)
  if (!(k >= 1)) throw new Error(`K must be a positive integer, got ${kText}`)
  const vector = JSON.parse(readFileSync(vectorFile, 'utf8'))
  if (!Array.isArray(vector) || !vector.every((x) => typeof x === 'number')) {
    throw new Error(`${vectorFile} must hold a JSON array of numbers`)
  }
  const started = performance.now()
  const client = await HeserveClient.connect(target, {
    compression: values.compression,
    encryption: values.encryption,
    timeoutMs: Number(values['timeout-ms']),
    token: process.env.HESERVE_TOKEN ?? '',
    tls: values.tls,
    tlsCa: pem(values['tls-ca']),
    tlsCert: pem(values['tls-cert']),
    tlsKey: pem(values['tls-key']),
  })
  let top
  try {
    top = await client.recommend(vector, catalog, k)
  } finally {
    await client.close()
  }
  process.stdout.write(`${JSON.stringify(top)}\n`)
  if (values.timings) {
    const timings = Object.fromEntries(
      Object.entries({ ...client.timings, total_ms: performance.now() - started }).map(([name, ms]) => [
        name,
        Math.round(ms * 10) / 10,
      ]),
    )
    process.stderr.write(
      `${JSON.stringify({ compression: client.compression, encryption: client.encryption, timings, bytes: client.bytes })}\n`,
    )
  }
}

main().catch((error) => {
  process.stderr.write(`recommend: ${error.code ? `${error.code}: ` : ''}${error.message ?? error}\n`)
  process.exit(1)
})
