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

    def __len__(self) -> int:
        return self._table.num_rows

    def column(self, name: str) -> list[Any]:
        """A scalar column as Python values (ids, texts)."""
        return list(self._table.column(name).to_pylist())

    def numbers(self, name: str) -> np.ndarray:
        return np.asarray(self._table.column(name).to_numpy())

    def arrays(self, name: str, indices: Sequence[int] | None = None) -> list[np.ndarray]:
        """A list column as one numpy array per row (of the rows `indices`, or all)."""
        column = self._table.column(name)
        if indices is not None:
            column = column.take(pa.array(indices, type=pa.int64()))
        lists = column.combine_chunks()
        offsets = lists.offsets.to_numpy()
        values = lists.values.to_numpy(zero_copy_only=False)
        return [values[offsets[i] : offsets[i + 1]] for i in range(len(lists))]

    def rows(self, indices: Sequence[int], columns: Sequence[str]) -> dict[str, list[Any]]:
        """The rows `indices`, column by column (list columns as numpy arrays)."""
        picked: dict[str, list[Any]] = {}
        for name in columns:
            if pa.types.is_list(self._table.schema.field(name).type):
                picked[name] = self.arrays(name, indices)
            else:
                picked[name] = self._table.column(name).take(pa.array(indices, type=pa.int64())).to_pylist()
        return picked

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Every row as a dict (list columns as numpy arrays): for checks, not for training."""
        columns = self._table.column_names
        for index in range(len(self)):
            yield {name: values[0] for name, values in self.rows([index], columns).items()}
