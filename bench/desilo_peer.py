"""desilofhe peer for heserve's benchmark: encrypted catalog scoring W·u.

The server holds a plaintext catalog ``W`` (n items x d) and receives a CKKS
ciphertext of the user vector ``u``; it returns ``W·u`` encrypted. This module
does that job on DESILO's ``desilofhe`` library (CPU mode) with the same
algorithm heserve uses, so the two can be compared on equal terms:

* Halevi-Shoup diagonal packing: the query ``u`` is zero-padded to ``d'`` (the
  next power of two) and repeated across all ``S`` slots; diagonal ``j`` of a
  chunk holds ``W[row(t), (t + j) mod d']`` at slot ``t``, so
  ``scores = sum_j D_j * rot(q, j)`` with one dense score per slot.
* Complex packing: two catalog rows share a slot (row ``2r`` in the real part,
  ``2r+1`` in the imaginary part); the query is real, so the real and imaginary
  parts of the product are the two rows' scores. Half the products.
* Folding: when the catalog fills fewer than ``S/f`` slots, every row gets ``f``
  slots that each cover ``d'/f`` of the dimensions; ``d'/f`` products plus
  ``log2 f`` rotate-and-add steps replace ``d'`` products on a mostly empty
  ciphertext.
* Baby-step giant-step with hoisted baby rotations (``Engine.rotate_many``,
  which shares the key-switch decomposition of the input among all outputs);
  diagonals are pre-rotated by ``-g*b`` and encoded once, at construction.

Only ``desilofhe``, ``numpy`` and the standard library are imported: nothing of
heserve, so the peer cannot borrow heserve's code by accident.

Measured facts about desilofhe 2.0.0 this design rests on (2-core machine):
``Engine(max_level=1)`` gives N = 8192 (4,096 slots); a fresh or rotated
ciphertext is in coefficient form and ``multiply(ct, pt)`` transforms it and
rescales on every call (~0.7 ms), so products, not rotations, dominate large
catalogs; ``rotate_many`` costs ~1.8 ms per output against ~3 ms for
``rotate``; rotations by ``delta`` move slot ``i + delta`` to slot ``i``
(``numpy.roll(x, -delta)``); ``multiply`` of a level-1 ciphertext lands at level
0, which can still be rotated but not multiplied again.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

import desilofhe
import numpy as np


def _next_pow2(x: int) -> int:
    """Smallest power of two >= x (>= 1)."""
    return 1 << max(0, (int(x) - 1).bit_length())


@dataclass
class Plan:
    """The packing chosen for one catalog; kept so benchmarks can print it."""

    n_items: int
    dim: int
    dim_padded: int
    slots: int
    complex_packing: bool
    slot_rows: int
    chunks: int
    fold: int
    diagonals: int
    baby: int
    giants: int
    baby_deltas: list[int] = field(default_factory=list)
    giant_deltas: list[int] = field(default_factory=list)
    fold_deltas: list[int] = field(default_factory=list)

    @property
    def products(self) -> int:
        """Ciphertext x plaintext products per query (the dominant cost)."""
        return self.chunks * self.diagonals

    @property
    def rotations(self) -> int:
        """Key switches per query: hoisted babies + giants per chunk + folds."""
        return (
            len(self.baby_deltas)
            + self.chunks * len(self.giant_deltas)
            + self.chunks * len(self.fold_deltas)
        )


class DesiloDiagonal:
    """Encrypted ``W·u`` on desilofhe, diagonal BSGS with complex packing.

    The instance plays both parties in one process, but keeps their material
    apart: the client side owns the secret key and (de)serializes the query and
    the response; the server side owns only the encoded catalog and the
    rotation keys, which it receives serialized (their bytes are what a client
    would upload once). ``server_seconds`` times exactly the server's work per
    query: deserialize query -> score -> serialize response, as heserve times
    its own engine; ``end_to_end_seconds`` adds the client's encrypt,
    serialize, deserialize and decrypt.
    """

    # Relative costs used to pick the baby step (measured, ms, N = 8192, 2 threads):
    # one hoisted baby rotation at level 1, one giant/fold rotation at level 0.
    _COST_BABY_MS = 1.8
    _COST_GIANT_MS = 2.2

    def __init__(
        self,
        catalog: np.ndarray,
        threads: int = 2,
        max_level: int | None = 1,
        complex_packing: bool = True,
        baby: int | None = None,
        light_plaintexts: bool = False,
    ) -> None:
        """Create keys, plan the packing and encode every diagonal once.

        ``max_level=1`` is the lean parameter set (N = 8192: one rescale is all
        this product needs); ``max_level=None`` uses desilofhe's default engine
        (N = 16384, level 7), running the query at level 1 all the same so only
        the ring size differs. ``light_plaintexts`` stores ``LightPlaintext``
        (a third of the memory, same product speed in our measurements) instead
        of full RNS plaintexts. ``baby`` overrides the cost-model choice.
        """
        catalog = np.asarray(catalog, dtype=np.float64)
        if catalog.ndim != 2 or catalog.shape[0] == 0 or catalog.shape[1] == 0:
            raise ValueError("catalog must be a non-empty (n, d) array")
        self.catalog_shape: tuple[int, int] = (int(catalog.shape[0]), int(catalog.shape[1]))
        kwargs: dict[str, object] = {"mode": "cpu", "thread_count": int(threads)}
        if max_level is not None:
            kwargs["max_level"] = int(max_level)
        self.engine = desilofhe.Engine(**kwargs)
        # The query lives at level 1: one product (which rescales to level 0)
        # is all the circuit needs, and lower levels are cheaper everywhere.
        self.level = 1
        self.plan = self._make_plan(catalog.shape[0], catalog.shape[1], baby, complex_packing)

        # ---- client: keys -------------------------------------------------
        self._secret_key = self.engine.create_secret_key()
        baby_keys = [
            self.engine.create_fixed_rotation_key(self._secret_key, delta=k, level=self.level)
            for k in self.plan.baby_deltas
        ]
        # Giant and fold rotations act on products, already rescaled to level 0:
        # keys at level 0 are half the size.
        low_deltas = sorted(set(self.plan.giant_deltas) | set(self.plan.fold_deltas))
        low_keys = [
            self.engine.create_fixed_rotation_key(self._secret_key, delta=k, level=0)
            for k in low_deltas
        ]
        key_blobs = [
            bytes(self.engine.serialize_fixed_rotation_key(k)) for k in baby_keys + low_keys
        ]
        self.key_bytes: int = sum(len(b) for b in key_blobs)
        self.key_count: int = len(key_blobs)

        # ---- server: keys from bytes, catalog encoded once ---------------
        loaded = [self.engine.deserialize_fixed_rotation_key(b) for b in key_blobs]
        self._baby_keys = loaded[: len(baby_keys)]
        self._low_keys = dict(zip(low_deltas, loaded[len(baby_keys) :], strict=True))
        self._plaintexts = self._encode_catalog(catalog, light_plaintexts)

        self.query_bytes: int = 0
        self.response_bytes: int = 0
        self.server_seconds: float = float("nan")
        self.end_to_end_seconds: float = float("nan")

    # ------------------------------------------------------------------ plan
    def _make_plan(self, n: int, d: int, baby: int | None, complex_packing: bool) -> Plan:
        """Choose fold, chunks and baby step for this catalog shape.

        Fold ``f``: the largest power of two (<= d') such that every slot-row
        still gets its own ``f`` slots in one ciphertext. Baby step ``b``:
        minimizes hoisted baby rotations + per-chunk giant rotations (products
        are fixed at ``chunks * d'/f`` whatever ``b`` is).
        """
        slots = int(self.engine.slot_count)
        dp = _next_pow2(d)
        if dp > slots:
            raise ValueError(f"dimension {d} exceeds the {slots} slots")
        rows = (n + 1) // 2 if complex_packing else n
        if rows <= slots:
            fold = 1
            while fold < dp and rows * fold * 2 <= slots:
                fold *= 2
            chunks = 1
        else:
            fold = 1
            chunks = -(-rows // slots)
        m = dp // fold  # diagonals per chunk
        if baby is None:
            best: tuple[float, int] | None = None
            b = 1
            while b <= m:
                cost = (b - 1) * self._COST_BABY_MS + chunks * (m // b - 1) * self._COST_GIANT_MS
                if best is None or cost < best[0] - 1e-9:
                    best = (cost, b)
                b *= 2
            assert best is not None
            baby = best[1]
        if baby < 1 or m % baby:
            raise ValueError(f"baby step {baby} must divide the {m} diagonals")
        giants = m // baby
        folds: list[int] = []
        t = m
        while t < dp:
            folds.append(t)
            t *= 2
        return Plan(
            n_items=n,
            dim=d,
            dim_padded=dp,
            slots=slots,
            complex_packing=complex_packing,
            slot_rows=rows,
            chunks=chunks,
            fold=fold,
            diagonals=m,
            baby=baby,
            giants=giants,
            baby_deltas=list(range(1, baby)),
            giant_deltas=[g * baby for g in range(1, giants)],
            fold_deltas=folds,
        )

    def _slot_rows(self) -> np.ndarray:
        """Local slot-row held at each slot (fold layout: blocks of d', row in
        the first d'/f slots of a block, its f sub-blocks share the row)."""
        p = self.plan
        t = np.arange(p.slots)
        pos = t % p.dim_padded
        return (t // p.dim_padded) * p.diagonals + (pos % p.diagonals)

    def _encode_catalog(self, catalog: np.ndarray, light: bool) -> list[list[list[object]]]:
        """Encode diagonals once: ``[chunk][giant][baby]`` plaintexts at level 1.

        Each diagonal is pre-rotated by ``-g*b`` (``numpy.roll(v, g*b)``) so that
        one giant rotation of the inner sum puts every term in place.
        """
        p = self.plan
        n, d = catalog.shape
        per_chunk = p.slots // p.fold
        total_rows = p.chunks * per_chunk
        if p.complex_packing:
            padded = np.zeros((2 * total_rows, p.dim_padded))
            padded[:n, :d] = catalog
            rows = padded[0::2] + 1j * padded[1::2]
        else:
            rows = np.zeros((total_rows, p.dim_padded))
            rows[:n, :d] = catalog
        local = self._slot_rows()
        t = np.arange(p.slots)
        encode = self.engine.encode_to_light_plaintext if light else self.engine.encode
        out: list[list[list[object]]] = []
        for c in range(p.chunks):
            block = rows[c * per_chunk : (c + 1) * per_chunk]
            row_of_slot = block[local]  # (slots, d')
            per_giant: list[list[object]] = []
            for g in range(p.giants):
                per_baby: list[object] = []
                for k in range(p.baby):
                    j = g * p.baby + k
                    diag = row_of_slot[t, (t + j) % p.dim_padded]
                    diag = np.roll(diag, g * p.baby)
                    arr = np.ascontiguousarray(diag)
                    per_baby.append(encode(arr, self.level))
                per_giant.append(per_baby)
            out.append(per_giant)
        return out

    # ---------------------------------------------------------------- client
    def encrypt_query(self, query_vector: np.ndarray) -> bytes:
        """Client: pad u to d', tile it over all slots, encrypt, serialize."""
        p = self.plan
        u = np.asarray(query_vector, dtype=np.float64).reshape(-1)
        if u.shape[0] != p.dim:
            raise ValueError(f"query has {u.shape[0]} dims, catalog has {p.dim}")
        q = np.zeros(p.dim_padded)
        q[: p.dim] = u
        q = np.tile(q, p.slots // p.dim_padded)
        ct = self.engine.encrypt(q, self._secret_key, self.level)
        return bytes(self.engine.serialize_ciphertext(ct))

    def decrypt_scores(self, response: bytes) -> np.ndarray:
        """Client: split the response, decrypt each chunk, read the scores."""
        p = self.plan
        n = p.n_items
        per_chunk = p.slots // p.fold
        # slot of local row r: first sub-block of block r // (d'/f)
        r = np.arange(per_chunk)
        slot_of_row = (r // p.diagonals) * p.dim_padded + (r % p.diagonals)
        scores = np.empty(2 * p.chunks * per_chunk if p.complex_packing else p.chunks * per_chunk)
        off = 0
        for c in range(p.chunks):
            (length,) = struct.unpack_from("<Q", response, off)
            off += 8
            ct = self.engine.deserialize_ciphertext(response[off : off + length])
            off += length
            vals = np.asarray(self.engine.decrypt(ct, self._secret_key))[slot_of_row]
            if p.complex_packing:
                base = 2 * c * per_chunk
                scores[base : base + 2 * per_chunk : 2] = vals.real
                scores[base + 1 : base + 2 * per_chunk : 2] = vals.imag
            else:
                base = c * per_chunk
                scores[base : base + per_chunk] = np.real(vals)
        return scores[:n]

    # ---------------------------------------------------------------- server
    def serve(self, query: bytes) -> bytes:
        """Server: deserialize the query, compute W·u, serialize the result.

        Per query: ``b-1`` hoisted baby rotations shared by all chunks; per
        chunk ``d'/f`` products, ``giants-1`` giant rotations and ``log2 f``
        fold rotations. The response is the chunk ciphertexts, each prefixed
        by its length (8 bytes, little endian).
        """
        e = self.engine
        p = self.plan
        ct = e.deserialize_ciphertext(query)
        babies = [ct]
        if self._baby_keys:
            babies += e.rotate_many(ct, self._baby_keys)
        parts: list[bytes] = []
        for c in range(p.chunks):
            acc = None
            for g in range(p.giants):
                pts = self._plaintexts[c][g]
                inner = e.multiply(babies[0], pts[0])
                for k in range(1, p.baby):
                    e.add(inner, e.multiply(babies[k], pts[k]), inner)
                if g:
                    # rotate() wants and returns coefficient form; products come
                    # out in NTT form, so the unrotated term is converted once.
                    inner = e.rotate(inner, self._low_keys[g * p.baby])
                elif p.giants > 1 or p.fold_deltas:
                    inner = e.intt(inner)
                if acc is None:
                    acc = inner
                else:
                    e.add(acc, inner, acc)
            assert acc is not None
            for t in p.fold_deltas:
                acc = e.add(acc, e.rotate(acc, self._low_keys[t]))
            blob = bytes(e.serialize_ciphertext(acc))
            parts.append(struct.pack("<Q", len(blob)))
            parts.append(blob)
        return b"".join(parts)

    # ------------------------------------------------------------ end to end
    def score(self, query_vector: np.ndarray) -> np.ndarray:
        """Encrypt, serve, decrypt: the scores ``W·u`` (float64, length n).

        Sets ``server_seconds`` (deserialize -> score -> serialize),
        ``end_to_end_seconds`` (everything), ``query_bytes``, ``response_bytes``.
        """
        t0 = time.perf_counter()
        query = self.encrypt_query(query_vector)
        t1 = time.perf_counter()
        response = self.serve(query)
        t2 = time.perf_counter()
        scores = self.decrypt_scores(response)
        t3 = time.perf_counter()
        self.server_seconds = t2 - t1
        self.end_to_end_seconds = t3 - t0
        self.query_bytes = len(query)
        self.response_bytes = len(response)
        return scores

    def top_k(self, query_vector: np.ndarray, k: int = 10) -> np.ndarray:
        """Indices of the ``k`` best items, best first (client-side ranking).

        ``end_to_end_seconds`` then includes the ranking too.
        """
        t0 = time.perf_counter()
        scores = self.score(query_vector)
        k = min(k, scores.shape[0])
        idx = np.argpartition(-scores, k - 1)[:k]
        idx = idx[np.argsort(-scores[idx], kind="stable")]
        self.end_to_end_seconds = time.perf_counter() - t0
        return idx
