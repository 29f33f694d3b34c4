"""Parquet catalogs: what embedding pipelines (Spark, pandas, Polars, BigQuery exports)
write, read without holding the file twice in memory.

A catalog file has an id column and an embedding column: a fixed-size list of floats,
or a plain list whose rows all have the same length (pandas writes those); optionally
a popularity column (one number an item, higher first, as an .npz's `popularity`).
The file is read a batch of rows at a time (`ParquetFile.iter_batches`) straight into
one preallocated float32 n × d array, so a 1,000,000 × 128 file needs its 512 MB
array plus one batch, not an Arrow table and a copy of it.

Column names default to `id`, `embedding` and `popularity` (used when present). Other
names follow the path after `#`: `books.parquet#item_id:vector` or
`books.parquet#item_id:vector:score` (an empty name keeps the default). That form works
wherever a catalog path does (`--catalog`, HESERVE_CATALOG, the config file), so no
setting is needed for it.

pyarrow is an optional extra (`pip install 'heserve[parquet]'`), imported only when a
Parquet catalog is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from heserve.domain.catalog import CatalogError, repeated_rows
from heserve.protocol.slots import RowArray

PARQUET_SUFFIX = ".parquet"
BATCH_ROWS = 8_192
"""Rows a batch: at d = 128, 4 MiB of float32 (8 MiB while a float64 column converts)."""
READ_BUFFER_BYTES = 1 << 20
INSTALL_HINT = "pip install 'heserve[parquet]'"


@dataclass(frozen=True)
class ParquetColumns:
    """Which columns of a Parquet file hold what."""

    id: str = "id"
    embedding: str = "embedding"
    popularity: str = "popularity"
    popularity_required: bool = False
    """True when the popularity column was named: then it must exist; the default name
    is used only when the file has it."""


@dataclass(frozen=True)
class ParquetCatalog:
    """What a Parquet catalog file holds, ready for `Catalog`."""

    embeddings: RowArray
    ids: tuple[str, ...]
    popularity: tuple[float, ...] | None


def split_columns(path: Path) -> tuple[Path, ParquetColumns] | None:
    """(the file, its columns) for a Parquet catalog path, with or without a `#id:embedding
    [:popularity]` suffix (a colon, not a comma: the environment's lists are
    comma-separated); None for a path that names no Parquet file."""
    base, sep, spec = path.name.rpartition("#")
    if not sep:
        return (path, ParquetColumns()) if path.suffix == PARQUET_SUFFIX else None
    if not base.endswith(PARQUET_SUFFIX):
        return None
    names = [name.strip() for name in spec.split(":")]
    if len(names) > 3:
        raise CatalogError(
            f"{path}: after '#' come at most three column names: id:embedding[:popularity]"
        )
    names += [""] * (3 - len(names))
    default = ParquetColumns()
    columns = ParquetColumns(
        id=names[0] or default.id,
        embedding=names[1] or default.embedding,
        popularity=names[2] or default.popularity,
        popularity_required=bool(names[2]),
    )
    return path.with_name(base), columns


def read_parquet(
    path: Path, columns: ParquetColumns = ParquetColumns(), batch_rows: int = BATCH_ROWS
) -> ParquetCatalog:
    """Read a Parquet catalog a batch at a time into one float32 array.

    Every error names the row (0-based, in file order) and, where it has one, its id:
    a null id or embedding, an embedding of the wrong length, NaN or infinity, a
    duplicate id (both rows), a missing column (with the columns the file has).
    """
    pa, pc, pq = _pyarrow(path)
    try:
        # No pre-buffering (pyarrow's default caches whole row groups, and keeps them
        # until the file closes: the file's size again), and pages read through a
        # buffered stream rather than a column chunk at a time.
        parquet_file = pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER_BYTES)
    except (OSError, pa.ArrowException) as exc:
        raise CatalogError(f"{path}: not a readable Parquet file: {exc}") from None
    schema = parquet_file.schema_arrow
    present = list(schema.names)
    popularity_column = columns.popularity if columns.popularity in present else None
    wanted = [columns.id, columns.embedding]
    if columns.popularity_required:
        wanted.append(columns.popularity)
    missing = [name for name in wanted if name not in present]
    if missing:
        raise CatalogError(
            f"{path}: no column {missing[0]!r}; the file's columns are {present} "
            f"(name others as PATH#id_column:embedding_column)"
        )
    _check_types(path, pa, schema, columns, popularity_column)
    fixed = pa.types.is_fixed_size_list(schema.field(columns.embedding).type)
    dimension: int | None = schema.field(columns.embedding).type.list_size if fixed else None

    row_count = int(parquet_file.metadata.num_rows)
    embeddings: RowArray | None = None
    ids: list[str] = []
    popularity: list[float] | None = [] if popularity_column else None
    read_columns = [columns.id, columns.embedding] + (
        [popularity_column] if popularity_column else []
    )
    start = 0
    try:
        for batch in parquet_file.iter_batches(batch_size=batch_rows, columns=read_columns):
            batch_ids = _ids(path, pa, batch.column(columns.id), start)
            ids.extend(batch_ids)
            vectors = batch.column(columns.embedding)
            _no_nulls(path, vectors, start, batch_ids, "embedding")
            if dimension is None:
                dimension = _first_length(path, pc, vectors, start, batch_ids)
            if embeddings is None:
                embeddings = np.empty((row_count, dimension), dtype=np.float32)
            if not fixed:
                _same_lengths(path, pc, vectors, dimension, start, batch_ids)
            values = vectors.flatten()
            if values.null_count:
                at = _first_null(values) // dimension
                raise CatalogError(
                    f"{path}: row {start + at} ({_id(batch_ids, at)}): the embedding holds a "
                    "null value"
                )
            block = values.to_numpy(zero_copy_only=False).reshape(len(batch_ids), dimension)
            finite = np.isfinite(block).all(axis=1)
            if not finite.all():
                at = int(np.flatnonzero(~finite)[0])
                raise CatalogError(
                    f"{path}: row {start + at} ({_id(batch_ids, at)}): the embedding holds "
                    "NaN or infinity"
                )
            if start + len(batch_ids) > row_count:
                raise CatalogError(f"{path}: more rows than the file's metadata says ({row_count})")
            embeddings[start : start + len(batch_ids)] = block
            if popularity is not None:
                popularity.extend(
                    _popularity(path, batch.column(popularity_column), start, batch_ids)
                )
            start += len(batch_ids)
    except (OSError, pa.ArrowException) as exc:
        raise CatalogError(f"{path}: reading row {start} onwards: {exc}") from None
    if embeddings is None or start == 0:
        raise CatalogError(f"{path}: the file holds no rows")
    if start != row_count:
        raise CatalogError(f"{path}: {start} rows read, the file's metadata says {row_count}")
    _unique(path, ids)
    return ParquetCatalog(embeddings, tuple(ids), None if popularity is None else tuple(popularity))


def _pyarrow(path: Path) -> tuple[Any, Any, Any]:
    """pyarrow, pyarrow.compute and pyarrow.parquet, or one line saying how to get them."""
    try:
        import pyarrow
        import pyarrow.compute
        import pyarrow.parquet
    except ImportError:
        raise CatalogError(
            f"{path}: Parquet catalogs need pyarrow, which is not installed: {INSTALL_HINT}"
        ) from None
    return pyarrow, pyarrow.compute, pyarrow.parquet


def _check_types(
    path: Path, pa: Any, schema: Any, columns: ParquetColumns, popularity: str | None
) -> None:
    """Refuse column types up front, before any row is read."""
    id_type = schema.field(columns.id).type
    if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type)) and not (
        pa.types.is_integer(id_type)
    ):
        raise CatalogError(
            f"{path}: column {columns.id!r} holds {id_type}; ids are strings or integers"
        )
    vector_type = schema.field(columns.embedding).type
    is_list = (
        pa.types.is_fixed_size_list(vector_type)
        or pa.types.is_list(vector_type)
        or pa.types.is_large_list(vector_type)
    )
    if not is_list or not pa.types.is_floating(vector_type.value_type):
        raise CatalogError(
            f"{path}: column {columns.embedding!r} holds {vector_type}; an embedding is a "
            "list of floats (fixed-size, or every row the same length)"
        )
    if popularity is not None:
        popularity_type = schema.field(popularity).type
        if not (pa.types.is_floating(popularity_type) or pa.types.is_integer(popularity_type)):
            raise CatalogError(
                f"{path}: column {popularity!r} holds {popularity_type}; popularity is one "
                "number an item"
            )


def _ids(path: Path, pa: Any, column: Any, start: int) -> list[str]:
    if column.null_count:
        raise CatalogError(f"{path}: row {start + _first_null(column)}: the id is null")
    values = column.to_pylist()
    if pa.types.is_integer(column.type):
        return [str(value) for value in values]
    return list(values)


def _no_nulls(path: Path, column: Any, start: int, ids: Sequence[str], what: str) -> None:
    if column.null_count:
        at = _first_null(column)
        raise CatalogError(f"{path}: row {start + at} ({_id(ids, at)}): the {what} is null")


def _first_length(path: Path, pc: Any, column: Any, start: int, ids: Sequence[str]) -> int:
    """A plain list column's dimension: its first row's length."""
    length = int(pc.list_value_length(column.slice(0, 1))[0].as_py())
    if length == 0:
        raise CatalogError(f"{path}: row {start} ({_id(ids, 0)}): the embedding is empty")
    return length


def _same_lengths(
    path: Path, pc: Any, column: Any, dimension: int, start: int, ids: Sequence[str]
) -> None:
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    wrong = np.flatnonzero(lengths != dimension)
    if wrong.size:
        at = int(wrong[0])
        raise CatalogError(
            f"{path}: row {start + at} ({_id(ids, at)}): the embedding has {int(lengths[at])} "
            f"values, the rows before it {dimension}"
        )


def _popularity(path: Path, column: Any, start: int, ids: Sequence[str]) -> list[float]:
    _no_nulls(path, column, start, ids, "popularity")
    values = [float(value) for value in column.to_pylist()]
    for at, value in enumerate(values):
        if not math.isfinite(value):
            raise CatalogError(f"{path}: row {start + at} ({_id(ids, at)}): popularity is {value}")
    return values


def _unique(path: Path, ids: list[str]) -> None:
    """Refuse a repeated id, naming both rows."""
    repeated = repeated_rows(ids)
    if repeated is not None:
        first, again = repeated
        raise CatalogError(
            f"{path}: id {ids[again][:40]!r} is in rows {first} and {again}; ids must be unique"
        )


def _first_null(column: Any) -> int:
    return int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])


def _id(ids: Sequence[str], at: int) -> str:
    return f"id {ids[at][:40]!r}"
