"""A prepared split: an Arrow stream file, written once and memory-mapped by every start (pyarrow only: the
`datasets` library, its pandas and its fsspec are not needed to read or write it; the file is the one
`datasets.Dataset.from_file` reads too). No torch.

Columns: id (string), text (string: the words WER is scored against), input_values (list<float32>: the
normalised 16 kHz audio), labels (list<int32>), length (int64: samples).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("input_values", pa.list_(pa.float32())),
        ("labels", pa.list_(pa.int32())),
        ("length", pa.int64()),
    ]
)
ROWS_PER_BATCH = 64


class TableWriter:
    """Appends prepared rows to an Arrow stream file, a batch at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, SCHEMA)
        self._rows: list[dict[str, Any]] = []

    def write(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        if len(self._rows) >= ROWS_PER_BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_batch(pa.RecordBatch.from_pylist(self._rows, schema=SCHEMA))
            self._rows = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._sink.close()


class Table:
    """A prepared split, memory-mapped (zero copy): columns as Python lists or numpy, and rows by index."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with pa.memory_map(str(self.path)) as source:
            self._table = pa.ipc.open_stream(source).read_all()
        self._lists: dict[str, _ListColumn] = {}
        self._scalars: dict[str, list[Any]] = {}

    def __len__(self) -> int:
        return self._table.num_rows

    def column(self, name: str) -> list[Any]:
        """A scalar column as Python values (ids, texts)."""
        return list(self._table.column(name).to_pylist())

    def numbers(self, name: str) -> np.ndarray:
        chunks = self._table.column(name).chunks
        return np.concatenate([_view(chunk) for chunk in chunks]) if chunks else np.array([], np.int64)

    def arrays(self, name: str, indices: Sequence[int] | None = None) -> list[np.ndarray]:
        """A list column as one read-only numpy array per row (of the rows `indices`, or all): views of the
        memory-mapped file, no copy (a `take` would copy every picked row once more, ~9 ms per 32 rows)."""
        if name not in self._lists:
            self._lists[name] = _ListColumn(self._table.column(name))
        return self._lists[name].rows(range(len(self)) if indices is None else indices)

    def rows(self, indices: Sequence[int], columns: Sequence[str]) -> dict[str, list[Any]]:
        """The rows `indices`, column by column (list columns as numpy arrays)."""
        picked: dict[str, list[Any]] = {}
        for name in columns:
            if pa.types.is_list(self._table.schema.field(name).type):
                picked[name] = self.arrays(name, indices)
            else:  # a `take` would import pyarrow.compute and, through it, pandas: 0.3 s
                if name not in self._scalars:
                    self._scalars[name] = self.column(name)
                picked[name] = [self._scalars[name][i] for i in indices]
        return picked

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Every row as a dict (list columns as numpy arrays): for checks, not for training."""
        columns = self._table.column_names
        for index in range(len(self)):
            yield {name: values[0] for name, values in self.rows([index], columns).items()}


class _ListColumn:
    """A list column's chunks as numpy views (values and offsets), and where each chunk's rows start."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        chunks = column.chunks
        self.starts = np.cumsum([0, *(len(chunk) for chunk in chunks)])
        # A chunk's `offsets` (its own rows', sliced or not) index its whole `values` buffer directly.
        self.offsets = [_view(chunk.offsets) for chunk in chunks]
        self.values = [_view(chunk.values) for chunk in chunks]

    def rows(self, indices: Sequence[int]) -> list[np.ndarray]:
        rows = np.asarray(indices, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.starts[-1]):
            raise IndexError(f"rows {rows.min()}..{rows.max()} of a table of {self.starts[-1]}")
        chunk_of = np.searchsorted(self.starts, rows, side="right") - 1
        picked = []
        for row, chunk in zip(rows.tolist(), chunk_of.tolist(), strict=True):
            offsets, local = self.offsets[chunk], row - int(self.starts[chunk])
            picked.append(self.values[chunk][offsets[local] : offsets[local + 1]])
        return picked


def _view(array: pa.Array) -> np.ndarray:
    """A primitive array without nulls as a read-only numpy view of its buffer (pyarrow's `to_numpy` imports
    pandas on its first call: 0.2 s of every start)."""
    if array.null_count:
        raise ValueError(f"{array.type} array with {array.null_count} nulls: the prepared tables have none")
    dtype = np.dtype(array.type.to_pandas_dtype())
    data = array.buffers()[1]
    return np.frombuffer(data, dtype, count=len(array), offset=array.offset * dtype.itemsize)
