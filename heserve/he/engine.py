"""The encrypted inner loop: W·u over an encrypted query.

The catalog's diagonals are encoded once, at the query's level, when a catalog is
loaded (`encode_catalog`); a query then costs the baby rotations of the query,
shared by every chunk, plus per chunk d' plaintext multiplications, one rescale
per giant step and the giant rotations (see heserve.he.plan and docs/engine.md).

The multiplications are the bulk of the work for any catalog of more than a few
chunks. SEAL does them one `multiply_plain` + `add_inplace` per diagonal, each
reducing every product; the native kernel (`_mac.c`) does all of a chunk's in one
call over the same NTT-form residues, summing products exactly in 128 bits and
reducing once per inner sum: the same bits, several times faster. SEAL keeps
key switching, rescaling and serialization. `Engine(native=False)` runs SEAL's
loop: the reference the kernel is tested against, and the fallback where the
kernel cannot see SEAL's memory (see heserve.he.limbs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import tenseal.sealapi as seal

from heserve.he.plan import DiagonalPlan
from heserve.protocol import limbs, wire
from heserve.protocol.params import CkksParameters
from heserve.protocol.slots import RowArray, imaginary_signs

try:
    from heserve.he import _mac

    _KERNEL_BUILT = True
except ImportError:  # a source tree that was never built: SEAL's loop only
    _KERNEL_BUILT = False

I64Array = npt.NDArray[np.int64]

Progress = Callable[[int, int], None]
"""Called as progress(done, total) while long work runs."""


class QueryError(ValueError):
    """A query the engine cannot score (wrong level, scale, size or transparent)."""


@dataclass(frozen=True)
class EncodedChunk:
    """The pre-rotated diagonals of up to 2S rows, as SEAL plaintexts; None marks an
    all-zero diagonal (SEAL refuses a zero plaintext, and it adds nothing)."""

    row_count: int
    diagonals: tuple[seal.Plaintext | None, ...]


@dataclass(frozen=True)
class ResidueChunk:
    """The same diagonals as the native kernel reads them: the NTT-form residues of
    the diagonals that are not all zero, one (primes, N) block each, in one array;
    `index[j]` is diagonal j's block, -1 for an all-zero one."""

    row_count: int
    residues: limbs.U64Array
    index: I64Array

    @property
    def diagonals(self) -> tuple[limbs.U64Array | None, ...]:
        """Diagonal j's residues, or None: the shape of `EncodedChunk.diagonals`."""
        return tuple(None if row < 0 else self.residues[row] for row in self.index)


Chunk = EncodedChunk | ResidueChunk | RowArray
"""A chunk of up to 2S rows: encoded ahead of time, or rows to encode per query."""


def native_kernel_available() -> bool:
    """Whether the native kernel was built and can view SEAL's memory here."""
    return _KERNEL_BUILT and limbs.supported()


def encoded_chunk_bytes(params: CkksParameters, plan: DiagonalPlan) -> int:
    """Memory one encoded chunk takes: d' plaintexts of N coefficients per data prime."""
    return plan.padded_dimension * params.poly_modulus_degree * params.data_prime_count * 8


class Engine:
    """Encodes catalogs and scores encrypted queries under one set of parameters."""

    def __init__(self, params: CkksParameters, native: bool | None = None) -> None:
        """`native`: use the native kernel (None: wherever it is available)."""
        self.params = params
        self.context = params.seal_context()
        self._encoder = seal.CKKSEncoder(self.context)
        self._evaluator = seal.Evaluator(self.context)
        self._query_parms_id = self.context.first_parms_id()
        self._minus_i_cache: dict[tuple[int, ...], seal.Plaintext] = {}
        if native and not native_kernel_available():
            raise RuntimeError("the native kernel is not built for this Python")
        self.native = native_kernel_available() if native is None else native
        query_level = self.context.get_context_data(self._query_parms_id).parms()
        self._moduli = [modulus.value() for modulus in query_level.coeff_modulus()]

    def encode_rows(self, plan: DiagonalPlan, rows: RowArray) -> EncodedChunk | ResidueChunk:
        """Encode the complex diagonals of up to 2S rows at the query's level: as
        residues for the native kernel, else as SEAL plaintexts."""
        chunk = self.encode_plaintexts(plan, rows)
        return self.to_residues(chunk) if self.native else chunk

    def to_residues(self, chunk: EncodedChunk) -> ResidueChunk:
        """Copy a chunk's plaintexts' residues into one array the kernel reads."""
        n = self.params.poly_modulus_degree
        present = [d for d in chunk.diagonals if d is not None]
        residues: limbs.U64Array = np.empty((len(present), len(self._moduli), n), np.uint64)
        index: I64Array = np.full(len(chunk.diagonals), -1, dtype=np.int64)
        row = 0
        for j, plaintext in enumerate(chunk.diagonals):
            if plaintext is not None:
                residues[row] = limbs.plaintext_limbs(plaintext, n)
                index[j] = row
                row += 1
        return ResidueChunk(chunk.row_count, residues, index)

    def encode_plaintexts(self, plan: DiagonalPlan, rows: RowArray) -> EncodedChunk:
        """Encode the complex diagonals of up to 2S rows as SEAL plaintexts."""
        diagonals: list[seal.Plaintext | None] = []
        for values in plan.diagonals(rows):
            if not values.any():
                diagonals.append(None)  # SEAL refuses a zero plaintext; it adds nothing
                continue
            plaintext = seal.Plaintext()
            self._encoder.encode(
                values.tolist(), self._query_parms_id, self.params.catalog_scale, plaintext
            )
            if plaintext.is_zero():
                # values too small for the catalog scale encode to zero; SEAL would refuse
                # the transparent product, and it adds nothing
                diagonals.append(None)
                continue
            diagonals.append(plaintext)
        if all(d is None for d in diagonals):
            raise QueryError(
                "every embedding in this chunk is zero; an all-zero chunk cannot be scored "
                "without a transparent (unencrypted) result"
            )
        return EncodedChunk(row_count=rows.shape[0], diagonals=tuple(diagonals))

    def encode_chunks(
        self,
        plan: DiagonalPlan,
        rows: Sequence[RowArray],
        memory_budget: int | None = None,
        progress: Progress | None = None,
    ) -> list[Chunk]:
        """Encode chunks of rows once, in order, while they fit `memory_budget` bytes.

        Chunks past the budget stay as rows and are encoded on the fly per query:
        slower, but a catalog larger than memory still serves.
        """
        chunk_bytes = encoded_chunk_bytes(self.params, plan)
        affordable = len(rows) if memory_budget is None else max(0, memory_budget) // chunk_bytes
        chunks: list[Chunk] = []
        for index, chunk_rows in enumerate(rows):
            if index < affordable:
                chunks.append(self.encode_rows(plan, chunk_rows))
            else:
                chunks.append(np.ascontiguousarray(chunk_rows))
            if progress is not None:
                progress(index + 1, len(rows))
        return chunks

    def encode_catalog(
        self,
        plan: DiagonalPlan,
        embeddings: RowArray,
        progress: Progress | None = None,
        memory_budget: int | None = None,
    ) -> list[Chunk]:
        """Encode a whole catalog's chunks; see `encode_chunks`."""
        return self.encode_chunks(plan, plan.chunk_rows(embeddings), memory_budget, progress)

    def serialize(self, ciphertext: seal.Ciphertext) -> bytes:
        """A ciphertext this engine made, as the wire carries it (SEAL 4.1, uncompressed):
        straight from its residues where the kernel can view them, else through SEAL's
        own serialization (a temporary file, compressed, then inflated again)."""
        if self.native:
            with contextlib.suppress(limbs.LayoutError):
                residues = limbs.ciphertext_limbs(ciphertext)
                return wire.ciphertext_bytes(
                    ciphertext.parms_id(),
                    ciphertext.is_ntt_form(),
                    ciphertext.size(),
                    self.params.poly_modulus_degree,
                    residues.shape[1],
                    ciphertext.scale,
                    residues.data,
                )
        return wire.ciphertext_to_wire(wire.to_bytes(ciphertext))

    def check_query(self, query: seal.Ciphertext) -> None:
        """Refuse a ciphertext this engine cannot score correctly."""
        if query.parms_id() != self._query_parms_id:
            raise QueryError("query is not at the top data level of the server's parameters")
        if query.size() != 2:
            raise QueryError(f"query must have size 2, got {query.size()}")
        if not query.is_ntt_form():
            raise QueryError("query must be in NTT form")
        if query.is_transparent():
            raise QueryError("query is transparent (not encrypted)")
        # Written so that NaN fails: NaN compares false, and `> 1e-6` let it through.
        if not abs(query.scale / self.params.scale - 1) <= 1e-6:
            raise QueryError(f"query scale must be 2^{self.params.scale_bits}")

    def baby_rotations(
        self, plan: DiagonalPlan, query: seal.Ciphertext, keys: seal.GaloisKeys
    ) -> list[seal.Ciphertext]:
        """rot(q, k) for k = 0 .. b-1, one single-step rotation each."""
        babies = [query]
        for _ in range(1, plan.baby_step):
            rotated = seal.Ciphertext()
            self._evaluator.rotate_vector(babies[-1], 1, keys, rotated)
            babies.append(rotated)
        return babies

    def inner_sums(
        self,
        plan: DiagonalPlan,
        chunk: EncodedChunk | ResidueChunk,
        babies: Sequence[seal.Ciphertext],
    ) -> list[seal.Ciphertext | None]:
        """Σ_k D[g·b + k] ⊙ rot(q, k) for each giant step g (None: no diagonal in it)."""
        if isinstance(chunk, ResidueChunk):
            return self._native_inner_sums(plan, chunk, [babies])[0]
        evaluator, b = self._evaluator, plan.baby_step
        sums: list[seal.Ciphertext | None] = []
        term = seal.Ciphertext()  # reused: SEAL keeps its allocation between products
        for g in range(plan.giant_count):
            inner: seal.Ciphertext | None = None
            for k in range(b):
                plaintext = chunk.diagonals[g * b + k]
                if plaintext is None:
                    continue
                if inner is None:
                    inner = seal.Ciphertext()
                    evaluator.multiply_plain(babies[k], plaintext, inner)
                else:
                    evaluator.multiply_plain(babies[k], plaintext, term)
                    evaluator.add_inplace(inner, term)
            sums.append(inner)
        return sums

    def _native_inner_sums(
        self,
        plan: DiagonalPlan,
        chunk: ResidueChunk,
        queries_babies: Sequence[Sequence[seal.Ciphertext]],
    ) -> list[list[seal.Ciphertext | None]]:
        """The inner sums of several queries (each its baby rotations) in one pass:
        each diagonal is read once for all of them. Each output is made by SEAL
        (the query negated: parameters, level and NTT form as a product's), then the
        kernel overwrites its residues, and it gets the scale SEAL's multiply_plain
        would give it."""
        giants = plan.giant_count
        present = [bool(row.max() >= 0) for row in chunk.index.reshape(giants, plan.baby_step)]
        outputs: list[list[seal.Ciphertext | None]] = []
        views: list[limbs.U64Array] = []
        baby_views: list[limbs.U64Array] = []
        for babies in queries_babies:
            baby_views.extend(limbs.ciphertext_limbs(baby) for baby in babies)
            scale = babies[0].scale * self.params.catalog_scale
            row: list[seal.Ciphertext | None] = []
            for g in range(giants):
                inner = seal.Ciphertext()
                self._evaluator.negate(babies[0], inner)
                inner.scale = scale
                views.append(limbs.ciphertext_limbs(inner))
                row.append(inner if present[g] else None)
            outputs.append(row)
        _mac.inner_sums(
            chunk.residues, chunk.index[None, :], baby_views, views, self._moduli, plan.baby_step
        )
        return outputs

    def giant_steps(
        self, plan: DiagonalPlan, sums: Sequence[seal.Ciphertext | None], keys: seal.GaloisKeys
    ) -> seal.Ciphertext:
        """Σ_g rot(sums[g], g·b): the chunk's scores from its inner sums.

        Each inner sum is rescaled (when the parameters have a prime to drop) before
        its giant rotation, as key switching at the lower level is cheaper; the giant
        steps are folded Horner-style so one key (step b) serves them all.
        """
        evaluator, b = self._evaluator, plan.baby_step
        result: seal.Ciphertext | None = None
        for g in reversed(range(plan.giant_count)):
            inner = sums[g]
            if inner is not None and self.params.rescales:
                evaluator.rescale_to_next_inplace(inner)
            if result is None:
                result = inner
                continue
            evaluator.rotate_vector_inplace(result, b, keys)
            if inner is not None:
                evaluator.add_inplace(result, inner)
        assert result is not None  # encode_rows refuses all-zero chunks
        return result

    def split_complex(
        self, scores: seal.Ciphertext, keys: seal.GaloisKeys
    ) -> tuple[seal.Ciphertext, seal.Ciphertext]:
        """Two ciphertexts with real slots from one complex one: for real-only decoders.

        With z_j = a_j + i s_j b_j (s = imaginary_signs): z + conj(z) = 2a and
        (z - conj(z)) * (-i s) = 2b. The plaintext -i s at scale 1 is the monomial
        -X^(N/2), encoded exactly, so the scale is kept; doubling the recorded scale
        halves both results: no precision is spent. Needs the conjugation key
        (Galois element 2N - 1).
        """
        evaluator = self._evaluator
        conjugate = seal.Ciphertext()
        evaluator.complex_conjugate(scores, keys, conjugate)
        imaginary = seal.Ciphertext()
        evaluator.sub(scores, conjugate, imaginary)
        evaluator.multiply_plain_inplace(imaginary, self._minus_i(scores.parms_id()))
        real = seal.Ciphertext()
        evaluator.add(scores, conjugate, real)
        for part in (real, imaginary):
            part.scale = 2 * scores.scale
        return real, imaginary

    def _minus_i(self, parms_id: list[int]) -> seal.Plaintext:
        key = tuple(parms_id)
        plaintext = self._minus_i_cache.get(key)
        if plaintext is None:
            plaintext = seal.Plaintext()
            monomial = -1j * imaginary_signs(self.params.slot_count)
            self._encoder.encode(monomial.tolist(), parms_id, 1.0, plaintext)
            self._minus_i_cache[key] = plaintext
        return plaintext

    def score(
        self,
        plan: DiagonalPlan,
        chunks: Iterable[Chunk],
        query: seal.Ciphertext,
        keys: seal.GaloisKeys,
    ) -> Iterator[seal.Ciphertext]:
        """Yield one score ciphertext per chunk, in order, as each completes."""
        for results in self.score_many(plan, chunks, [query], keys):
            yield results[0]

    def score_many(
        self,
        plan: DiagonalPlan,
        chunks: Iterable[Chunk],
        queries: Sequence[seal.Ciphertext],
        keys: seal.GaloisKeys,
    ) -> Iterator[list[seal.Ciphertext]]:
        """Yield, per chunk in order, one score ciphertext per query.

        The queries share the pass over the catalog: with the native kernel each
        encoded diagonal is read once for all of them. A chunk given as rows (past
        the memory budget, or re-ranking candidates) is encoded on the fly.
        """
        for query in queries:
            self.check_query(query)
        babies = [self.baby_rotations(plan, query, keys) for query in queries]
        for chunk in chunks:
            encoded = (
                chunk
                if isinstance(chunk, EncodedChunk | ResidueChunk)
                else self.encode_rows(plan, chunk)
            )
            if isinstance(encoded, ResidueChunk):
                sums = self._native_inner_sums(plan, encoded, babies)
            else:
                sums = [self.inner_sums(plan, encoded, rotations) for rotations in babies]
            yield [self.giant_steps(plan, query_sums, keys) for query_sums in sums]
