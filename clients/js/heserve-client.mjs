// A heserve client in JavaScript, with no Python in it: the wire is
// proto/heserve/v1/scoring.proto loaded as it is by @grpc/proto-loader and
// spoken by @grpc/grpc-js; the cryptography is node-seal (Microsoft SEAL 4.1
// compiled to WebAssembly). It follows the proto's "How one query works":
// everything it needs comes from the proto and the server's answers.
//
// The secret key never leaves this process; the server receives public Galois
// keys and ciphertexts only, in SEAL's own serialization.

import { fileURLToPath } from 'node:url'
import path from 'node:path'

import grpc from '@grpc/grpc-js'
import protoLoader from '@grpc/proto-loader'
import protobuf from 'protobufjs'
import SEAL from 'node-seal'

const HERE = path.dirname(fileURLToPath(import.meta.url))
export const PROTO_ROOT = path.resolve(HERE, '..', '..', 'proto')
const PROTO_FILE = 'heserve/v1/scoring.proto'
const KEY_CHUNK_BYTES = 1 << 20
const CHANNEL_MESSAGE_BYTES = 16 << 20
const ERROR_DOMAIN = 'heserve.v1'
const KEY_NOT_FOUND = 'KEY_NOT_FOUND'
// The catalog was replaced or updated since this client read it: read it again.
const CATALOG_VERSION_CHANGED = 'CATALOG_VERSION_CHANGED'

// google.rpc.Status and ErrorInfo, to read the reason the server attaches to an
// error (grpc-status-details-bin); KEY_NOT_FOUND means "register again".
const statusTypes = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: {
          nested: {
            Any: { fields: { type_url: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } } },
          },
        },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: 'int32', id: 1 },
                message: { type: 'string', id: 2 },
                details: { rule: 'repeated', type: 'google.protobuf.Any', id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: 'string', id: 1 },
                domain: { type: 'string', id: 2 },
              },
            },
          },
        },
      },
    },
  },
})
const StatusType = statusTypes.lookupType('google.rpc.Status')
const ErrorInfoType = statusTypes.lookupType('google.rpc.ErrorInfo')

/**
 * Privacy policies: what a client requires of the server's privacy statement
 * (GetServerInfo.privacy) before it sends anything derived from its user. The same
 * requirements, names and meaning as heserve_client.Policy in Python:
 *   requireTls: the connection must be TLS (this client's, and the server's statement);
 *   maxKeyTtlSeconds: the server may keep idle keys at most this long (null: any);
 *   requireStatement: the server must publish a statement;
 *   forbidLogged: log fields the server must not write, e.g. ['peer'].
 * (This client never sends candidate ids: it has no re-ranking call.)
 * PERMISSIVE requires nothing (the default); MOBILE is for an app on a user's device.
 */
export const PERMISSIVE = Object.freeze({
  requireTls: false,
  maxKeyTtlSeconds: null,
  requireStatement: false,
  forbidLogged: Object.freeze([]),
})
export const MOBILE = Object.freeze({
  requireTls: true,
  maxKeyTtlSeconds: 3600,
  requireStatement: true,
  forbidLogged: Object.freeze(['peer']),
})
const POLICIES = { permissive: PERMISSIVE, mobile: MOBILE }
const TLS_TRANSPORTS = ['TRANSPORT_SECURITY_TLS', 'TRANSPORT_SECURITY_MUTUAL_TLS']
const TRANSPORT_NAMES = {
  TRANSPORT_SECURITY_UNSPECIFIED: 'unspecified',
  TRANSPORT_SECURITY_PLAINTEXT: 'plaintext',
  TRANSPORT_SECURITY_TLS: 'tls',
  TRANSPORT_SECURITY_MUTUAL_TLS: 'mutual_tls',
}

/**
 * The requirements of `policy` a server fails, as [{requirement, explanation}], in
 * the Python names (require_tls, max_key_ttl_seconds, require_statement,
 * forbid_logged); empty: it complies. `statement` is GetServerInfoResponse.privacy
 * (null from a server before statements), `connectionTls` whether this client's
 * channel is TLS.
 */
export function unmetRequirements(policy, statement, { keyTtlSeconds, connectionTls }) {
  const unmet = []
  const add = (requirement, explanation) => unmet.push({ requirement, explanation })
  if (policy.requireTls) {
    if (!connectionTls) add('require_tls', "this client's connection is not TLS")
    else if (statement && !TLS_TRANSPORTS.includes(statement.transport)) {
      add('require_tls', `the server states transport ${TRANSPORT_NAMES[statement.transport] ?? 'unspecified'}`)
    }
  }
  if (policy.maxKeyTtlSeconds !== null && policy.maxKeyTtlSeconds !== undefined) {
    const ttl = statement ? statement.keys.ttl_seconds : keyTtlSeconds
    if (ttl > policy.maxKeyTtlSeconds) {
      add('max_key_ttl_seconds', `the server keeps idle keys ${ttl} s, more than ${policy.maxKeyTtlSeconds} s`)
    }
  }
  if (policy.requireStatement && !statement) add('require_statement', 'the server publishes no privacy statement')
  const forbidden = policy.forbidLogged ?? []
  if (forbidden.length) {
    if (!statement) add('forbid_logged', 'the server publishes no statement of what it logs')
    else {
      const logged = new Set(statement.logs.filter((record) => record.written).flatMap((record) => record.fields))
      const found = forbidden.filter((name) => logged.has(name)).sort()
      if (found.length) add('forbid_logged', `the server logs ${found.join(', ')}`)
    }
  }
  return unmet
}

function policyError(unmet) {
  const error = new HeserveError(
    `the server does not meet this client's policy: ${unmet.map((u) => `${u.requirement}: ${u.explanation}`).join('; ')}`,
    { code: 'POLICY' },
  )
  error.requirements = unmet.map((u) => u.requirement)
  return error
}

/** An error from the server or from this client; `code` is the gRPC status name. */
export class HeserveError extends Error {
  constructor(message, { code = 'UNKNOWN', reason = '' } = {}) {
    super(message)
    this.name = 'HeserveError'
    this.code = code
    this.reason = reason
  }
}

function errorReason(error) {
  const raw = error?.metadata?.get?.('grpc-status-details-bin')?.[0]
  if (!raw) return ''
  try {
    const status = StatusType.decode(raw)
    for (const detail of status.details) {
      if (detail.type_url.endsWith('/google.rpc.ErrorInfo')) {
        const info = ErrorInfoType.decode(detail.value)
        if (info.domain === ERROR_DOMAIN) return info.reason
      }
    }
  } catch {
    // details we cannot read carry no reason we act on
  }
  return ''
}

function fromRpcError(error) {
  if (error instanceof HeserveError || error?.code === undefined) return error
  const code = Object.keys(grpc.status).find((name) => grpc.status[name] === error.code) ?? 'UNKNOWN'
  return new HeserveError(error.details ?? error.message, {
    code,
    reason: errorReason(error),
  })
}

let sealRuntime = null
/** node-seal's WebAssembly runtime, loaded once per process. */
export async function sealLibrary() {
  sealRuntime ??= SEAL()
  return sealRuntime
}

function loadService() {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [PROTO_ROOT],
    keepCase: true,
    longs: Number, // offsets and counts are far below 2^53
    enums: String,
    defaults: true, // an absent message field (GetServerInfoResponse.privacy) reads as null
    oneofs: true,
  })
  return grpc.loadPackageDefinition(definition).heserve.v1.ScoringService
}

/**
 * The slot layout of ScoreRequest.query: with S slots and the catalog's padded
 * dimension d', slot i holds u[i mod d'], u zero-padded from d to d'.
 */
export function querySlots(vector, paddedDimension, slotCount) {
  if (vector.length > paddedDimension) {
    throw new HeserveError(`a vector of ${vector.length} values does not fit d' = ${paddedDimension}`)
  }
  if (slotCount % paddedDimension !== 0) {
    throw new HeserveError(`d' = ${paddedDimension} does not divide the ${slotCount} slots`)
  }
  const slots = new Float64Array(slotCount)
  for (let i = 0; i < slotCount; i++) {
    const j = i % paddedDimension
    slots[i] = j < vector.length ? vector[j] : 0
  }
  return slots
}

/** The k best (index, score) pairs, best first; ties keep catalog order. */
export function topK(scores, k) {
  const order = Array.from(scores.keys())
  order.sort((a, b) => scores[b] - scores[a] || a - b)
  return order.slice(0, Math.min(k, order.length)).map((i) => [i, scores[i]])
}

/**
 * A connection to a heserve server with its own CKKS key pair. Make one with
 * `await HeserveClient.connect(target, options)`, and `close()` it.
 *
 * options.compression: SEAL compression mode of the uploaded keys and queries,
 *   'none', 'zlib' or 'zstd' (the server reads all three; it answers in 'none').
 * options.encryption: 'symmetric' (seeded, half the query size) or 'public'.
 * options.timeoutMs: deadline of each call.
 * options.policy: what the server's privacy statement must meet (PERMISSIVE, the
 *   default; MOBILE, or 'mobile'; or an object of the same fields), checked right
 *   after GetServerInfo, before any key is made or sent; requireTls on a channel that
 *   is not TLS fails before any call. A failure is a HeserveError with code 'POLICY'
 *   and `requirements` naming each failed requirement.
 */
export class HeserveClient {
  static async connect(target, options = {}) {
    const client = new HeserveClient(target, options)
    try {
      await client.#setUp()
    } catch (error) {
      await client.close()
      throw error
    }
    return client
  }

  /**
   * target: host:port. Options: compression and encryption of uploads; timeoutMs per
   * call; token: an API token, sent as `authorization: Bearer TOKEN` on every call;
   * tls: speak TLS (true with the system's roots, or give tlsCa, a PEM Buffer);
   * tlsCert and tlsKey (PEM Buffers): this client's certificate, for mutual TLS.
   */
  constructor(
    target,
    {
      compression = 'none',
      encryption = 'symmetric',
      timeoutMs = 120_000,
      token = '',
      tls = false,
      tlsCa = null,
      tlsCert = null,
      tlsKey = null,
      policy = PERMISSIVE,
    } = {},
  ) {
    this.policy = typeof policy === 'string' ? POLICIES[policy] : { ...PERMISSIVE, ...policy }
    if (!this.policy) throw new HeserveError(`unknown policy ${policy}`)
    if (!['none', 'zlib', 'zstd'].includes(compression)) {
      throw new HeserveError(`unknown compression mode ${compression}`)
    }
    if (!['symmetric', 'public'].includes(encryption)) {
      throw new HeserveError(`unknown encryption mode ${encryption}`)
    }
    this.compression = compression
    this.encryption = encryption
    this.timeoutMs = timeoutMs
    this.timings = {}
    this.bytes = { keys: 0, query: 0, scores: 0 }
    this.keyId = ''
    this.catalogInfo = new Map()
    this.itemIdCache = new Map()
    this.popularityCache = new Map()
    if (/[\s,]/.test(token)) throw new HeserveError('a token holds no blank and no comma')
    if ((tlsCert === null) !== (tlsKey === null)) {
      throw new HeserveError('mutual TLS needs both tlsCert and tlsKey')
    }
    this.metadata = new grpc.Metadata()
    if (token) this.metadata.set('authorization', `Bearer ${token}`)
    const secure = tls || tlsCa !== null || tlsCert !== null
    this.connectionTls = secure
    const credentials = secure
      ? grpc.credentials.createSsl(tlsCa, tlsKey, tlsCert)
      : grpc.credentials.createInsecure()
    const Service = loadService()
    this.stub = new Service(target, credentials, {
      'grpc.max_receive_message_length': CHANNEL_MESSAGE_BYTES,
      'grpc.max_send_message_length': CHANNEL_MESSAGE_BYTES,
    })
    this.sealObjects = []
  }

  #deadline() {
    return new Date(Date.now() + this.timeoutMs)
  }

  #unary(method, request) {
    return new Promise((resolve, reject) => {
      this.stub[method](request, this.metadata, { deadline: this.#deadline() }, (error, reply) =>
        error ? reject(fromRpcError(error)) : resolve(reply),
      )
    })
  }

  #keep(...objects) {
    this.sealObjects.push(...objects)
    return objects[0]
  }

  async #time(name, work) {
    const started = performance.now()
    try {
      return await work()
    } finally {
      this.timings[name] = (this.timings[name] ?? 0) + (performance.now() - started)
    }
  }

  async #setUp() {
    if (this.policy.requireTls && !this.connectionTls) {
      // before any call: not even the token crosses the network in clear
      throw policyError([{ requirement: 'require_tls', explanation: "this client's connection is not TLS" }])
    }
    const seal = await this.#time('seal_init_ms', () => sealLibrary())
    this.seal = seal
    this.info = await this.#time('server_info_ms', () => this.#unary('GetServerInfo', {}))
    this.statement = this.info.privacy ?? null
    const unmet = unmetRequirements(this.policy, this.statement, {
      keyTtlSeconds: this.info.key_retention?.ttl_seconds ?? 0,
      connectionTls: this.connectionTls,
    })
    if (unmet.length) throw policyError(unmet)
    const ckks = this.info.ckks
    await this.#time('keygen_ms', async () => {
      // CoeffModulus.Create(N, coeff_modulus_bits), 128-bit security, as the proto says
      const parms = this.#keep(seal.EncryptionParameters(seal.SchemeType.ckks))
      parms.setPolyModulusDegree(ckks.poly_modulus_degree)
      parms.setCoeffModulus(
        this.#keep(seal.CoeffModulus.Create(ckks.poly_modulus_degree, Int32Array.from(ckks.coeff_modulus_bits))),
      )
      this.context = this.#keep(seal.Context(parms, true, seal.SecurityLevel.tc128))
      if (!this.context.parametersSet()) {
        throw new HeserveError('SEAL refused the server parameters under 128-bit security', {
          code: 'FAILED_PRECONDITION',
        })
      }
      this.encoder = this.#keep(seal.CKKSEncoder(this.context))
      if (this.encoder.slotCount !== ckks.slot_count) {
        throw new HeserveError(`server says ${ckks.slot_count} slots, SEAL has ${this.encoder.slotCount}`)
      }
      this.keyGenerator = this.#keep(seal.KeyGenerator(this.context))
      this.secretKey = this.#keep(this.keyGenerator.secretKey())
      this.publicKey = this.#keep(this.keyGenerator.createPublicKey())
      this.encryptor = this.#keep(seal.Encryptor(this.context, this.publicKey, this.secretKey))
      this.decryptor = this.#keep(seal.Decryptor(this.context, this.secretKey))
    })
    this.scale = 2 ** ckks.scale_bits
  }

  #mode() {
    return this.seal.ComprModeType[this.compression]
  }

  /** Upload Galois keys for ckks.galois_steps in chunks of at most 1 MiB; returns the key_id. */
  async registerKeys() {
    const blob = await this.#time('galois_keys_ms', async () => {
      const steps = Int32Array.from(this.info.ckks.galois_steps)
      const keys = this.keyGenerator.createGaloisKeysSerializable(steps)
      try {
        return keys.saveArray(this.#mode())
      } finally {
        keys.delete()
      }
    })
    const chunkBytes = Math.min(KEY_CHUNK_BYTES, Number(this.info.limits.max_key_chunk_bytes) || KEY_CHUNK_BYTES)
    const reply = await this.#time('register_keys_ms', () =>
      new Promise((resolve, reject) => {
        const call = this.stub.RegisterKeys(this.metadata, { deadline: this.#deadline() }, (error, response) =>
          error ? reject(fromRpcError(error)) : resolve(response),
        )
        for (let start = 0; start < blob.length; start += chunkBytes) {
          call.write({ galois_keys_chunk: Buffer.from(blob.subarray(start, start + chunkBytes)) })
        }
        call.end()
      }),
    )
    this.bytes.keys += blob.length
    this.keyId = reply.key_id
    return reply.key_id
  }

  /** Ask the server to forget this client's keys now (right to erasure). */
  async deleteKeys() {
    if (!this.keyId) return false
    const keyId = this.keyId
    this.keyId = ''
    const reply = await this.#unary('DeleteKeys', { key_id: keyId })
    return reply.deleted
  }

  /**
   * Forget this user: erase the keys on the server now and report what was erased,
   * {server, erased: [keyId], alreadyGone: [keyId]}. This client keeps no file, so
   * nothing else is left; an app that stored anything of its own erases it too.
   */
  async forgetMe() {
    const keyId = this.keyId
    const report = { erased: [], alreadyGone: [] }
    if (keyId) {
      const deleted = await this.deleteKeys()
      ;(deleted ? report.erased : report.alreadyGone).push(keyId)
    }
    return report
  }

  /**
   * The k first items of the catalog's published non-personalized order (by the
   * popularity ListItems publishes, ties in catalog order; catalog order if none):
   * for a user who has not opted in. Only ListItems is called: nothing derived from
   * the user is sent.
   */
  async popular(catalog, k = 10) {
    if (!(k >= 1)) throw new HeserveError('k must be at least 1')
    const ids = await this.itemIds(catalog)
    const popularity = this.popularityCache.get(catalog) ?? null
    if (!popularity) return ids.slice(0, k)
    return topK(Float64Array.from(popularity), k).map(([index]) => ids[index])
  }

  /** Every catalog the server serves, page by page. */
  async catalogs() {
    const infos = []
    let token = ''
    do {
      const page = await this.#unary('ListCatalogs', { page_token: token })
      infos.push(...page.catalogs)
      token = page.next_page_token
    } while (token)
    this.catalogInfo = new Map(infos.map((info) => [info.name, info]))
    return infos
  }

  async catalog(name) {
    if (!this.catalogInfo.has(name)) await this.catalogs()
    const info = this.catalogInfo.get(name)
    if (!info) throw new HeserveError(`the server has no catalog named ${name}`, { code: 'NOT_FOUND' })
    return info
  }

  /** All item ids of a catalog, in catalog order (cached per catalog version). */
  async itemIds(catalog) {
    const info = await this.catalog(catalog)
    const cacheKey = `${catalog}\u0000${info.version}`
    if (this.itemIdCache.has(cacheKey)) return this.itemIdCache.get(cacheKey)
    const popularity = []
    const ids = await this.#time('list_items_ms', async () => {
      const all = []
      let token = ''
      do {
        const page = await this.#unary('ListItems', {
          catalog,
          page_size: this.info.limits.max_page_size,
          page_token: token,
        })
        if (page.catalog_version && page.catalog_version !== info.version) {
          throw new HeserveError(`catalog ${catalog} changed while its ids were listed`, {
            code: 'FAILED_PRECONDITION',
          })
        }
        for (const id of page.item_ids ?? []) all.push(id)
        for (const value of page.popularity ?? []) popularity.push(value)
        token = page.next_page_token
      } while (token)
      return all
    })
    if (ids.length !== info.item_count) {
      throw new HeserveError(`catalog ${catalog} listed ${ids.length} ids for ${info.item_count} items`)
    }
    this.itemIdCache.set(cacheKey, ids)
    this.popularityCache.set(catalog, popularity.length === ids.length && ids.length ? popularity : null)
    return ids
  }

  /** The encrypted query: SEAL Ciphertext bytes at the top level, scale 2^scale_bits. */
  encryptQuery(vector, info) {
    const slots = querySlots(vector, info.padded_dimension, this.info.ckks.slot_count)
    const plaintext = this.seal.PlainText()
    try {
      this.encoder.encode(slots, this.scale, plaintext)
      if (this.encryption === 'symmetric') {
        const serializable = this.encryptor.encryptSymmetricSerializable(plaintext)
        try {
          return serializable.saveArray(this.#mode())
        } finally {
          serializable.delete()
        }
      }
      const ciphertext = this.encryptor.encrypt(plaintext)
      try {
        return ciphertext.saveArray(this.#mode())
      } finally {
        ciphertext.delete()
      }
    } finally {
      plaintext.delete()
    }
  }

  /** Decrypt and decode one ScoreResponse.scores into its slot values. */
  decryptScores(bytes) {
    const ciphertext = this.seal.CipherText()
    const plaintext = this.seal.PlainText()
    try {
      ciphertext.loadArray(this.context, new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength))
      this.decryptor.decrypt(ciphertext, plaintext)
      return this.encoder.decode(plaintext)
    } finally {
      ciphertext.delete()
      plaintext.delete()
    }
  }

  #scoreOnce(request, expected) {
    return new Promise((resolve, reject) => {
      const scores = new Float64Array(expected)
      const covered = new Uint8Array(expected)
      let failed = false
      const fail = (error) => {
        if (failed) return
        failed = true
        call.cancel()
        reject(error)
      }
      const call = this.stub.Score({ ...request, key_id: this.keyId }, this.metadata, {
        deadline: this.#deadline(),
      })
      call.on('data', (reply) => {
        if (failed) return
        try {
          const offset = Number(reply.offset)
          const count = reply.count
          if (offset + count > expected || count > this.info.ckks.slot_count) {
            throw new HeserveError('the server returned scores past the end of the request')
          }
          const started = performance.now()
          const values = this.decryptScores(reply.scores)
          this.timings.decrypt_ms = (this.timings.decrypt_ms ?? 0) + (performance.now() - started)
          scores.set(values.subarray(0, count), offset)
          covered.fill(1, offset, offset + count)
          this.bytes.scores += reply.scores.length
        } catch (error) {
          fail(error instanceof HeserveError ? error : new HeserveError(`cannot decrypt scores: ${error.message ?? error}`))
        }
      })
      call.on('error', (error) => fail(fromRpcError(error)))
      call.on('end', () => {
        if (failed) return
        if (!covered.every((c) => c === 1)) {
          reject(new HeserveError('the server did not return a score for every item'))
        } else {
          resolve(scores)
        }
      })
    })
  }

  /**
   * The scores W·u of a catalog, decrypted here, in catalog order. Each query is pinned
   * to the catalog version this client read (so scores and ids cannot come from two
   * versions); if the catalog changed since, the client reads it again and scores the
   * new version, once.
   */
  async score(vector, catalog) {
    try {
      return await this.#scoreVersion(vector, catalog)
    } catch (error) {
      if (error.reason !== CATALOG_VERSION_CHANGED) throw error
      await this.catalogs()
      return await this.#scoreVersion(vector, catalog)
    }
  }

  async #scoreVersion(vector, catalog) {
    const info = await this.catalog(catalog)
    if (vector.length !== info.dimension) {
      throw new HeserveError(`catalog ${catalog} has dimension ${info.dimension}; got ${vector.length} values`)
    }
    if (!vector.every(Number.isFinite)) throw new HeserveError('the vector contains NaN or infinity')
    if (!this.keyId) await this.registerKeys()
    const query = await this.#time('encrypt_ms', async () => this.encryptQuery(vector, info))
    this.bytes.query = query.length
    const request = { catalog, query: Buffer.from(query), catalog_version: info.version }
    const started = performance.now()
    const decryptBefore = this.timings.decrypt_ms ?? 0
    try {
      try {
        return await this.#scoreOnce(request, info.item_count)
      } catch (error) {
        if (error.reason !== KEY_NOT_FOUND) throw error
        await this.registerKeys() // the server forgot our keys (expiry, restart): once more
        return await this.#scoreOnce(request, info.item_count)
      }
    } finally {
      const decrypting = (this.timings.decrypt_ms ?? 0) - decryptBefore
      this.timings.score_call_ms = performance.now() - started - decrypting
    }
  }

  /** The k best items for `vector`, best first: [[item_id, score], ...]. */
  async recommend(vector, catalog, k = 10) {
    if (!(k >= 1)) throw new HeserveError('k must be at least 1')
    const scores = await this.score(vector, catalog)
    const ids = await this.itemIds(catalog)
    return topK(scores, k).map(([index, score]) => [ids[index], score])
  }

  /** Ask the server to forget the keys (errors ignored: nothing left to erase), then close. */
  async close() {
    if (this.keyId) {
      try {
        await this.deleteKeys()
      } catch {
        // the server may be gone or may have forgotten already
      }
    }
    this.stub?.close()
    for (const object of this.sealObjects.reverse()) object.delete?.()
    this.sealObjects = []
  }
}
