"""Metrics to CSV files (RUN/stageN/metrics.csv) and, when it is installed, TensorBoard; only
the main process writes.

Lists (per-step values) become one column per step: accuracy_1, accuracy_2, ... On resume the
rows written after the checkpoint being resumed are dropped, so the file matches the weights.
"""
from __future__ import annotations

import csv
import functools
import io
import logging
from pathlib import Path
from typing import Optional

from ..atomic import write_failure, write_text

log = logging.getLogger("glancefocus.train")


def flatten(metrics: dict) -> dict:
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, (list, tuple)):
            flat.update({f"{key}_{i}": v for i, v in enumerate(value, start=1)})
        else:
            flat[key] = value
    return flat


class MetricsRecorder:
    def __init__(self, folder: Path, enabled: bool, index_name: str, resume_at: Optional[int] = None,
                 file_name: str = "metrics.csv"):
        """index_name: what a row counts ('epoch' or 'update'); resume_at: the last row to keep
        (None starts a fresh file)."""
        self.enabled, self.index_name = enabled, index_name
        self.path = Path(folder) / file_name
        self.writer = None
        if not enabled:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_failure(self.path.parent, exc) from None
        self._keep_rows_up_to(resume_at)
        self.writer = _tensorboard_writer(Path(folder) / "tensorboard" / self.path.stem)

    def _keep_rows_up_to(self, last: Optional[int]) -> None:
        if last is None or not self.path.exists():
            self.path.unlink(missing_ok=True)
            return
        fields, rows = self._read()
        self._rewrite(fields, [row for row in rows if int(row[self.index_name]) <= last])

    def write(self, index: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {self.index_name: index, **flatten(metrics)}
        self._append(row)
        if self.writer is not None:
            for key, value in row.items():
                if key != self.index_name and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, index)
            self.writer.flush()

    def _append(self, row: dict) -> None:
        new_file = not self.path.exists()
        fields = list(row) if new_file else _header(self.path)
        if not set(row) <= set(fields):
            # a row with columns the first ones lacked (e.g. policy statistics from the first
            # epoch with policy updates on): widen the header, the earlier rows leave them empty
            fields = list(row) + [field for field in fields if field not in row]
            self._rewrite(fields, self._read()[1])
        try:
            with open(self.path, "a", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=fields)
                if new_file:
                    writer.writeheader()
                writer.writerow(row)
        except OSError as exc:
            raise write_failure(self.path, exc) from None

    def _read(self) -> tuple[list[str], list[dict]]:
        with open(self.path, newline="") as handle:
            reader = csv.DictReader(handle)
            return list(reader.fieldnames or []), list(reader)

    def _rewrite(self, fields: list[str], rows: list[dict]) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.path, text.getvalue())  # atomically: the old rows survive a failure

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _header(path: Path) -> list[str]:
    with open(path, newline="") as handle:
        return next(csv.reader(handle))


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        _notice_no_tensorboard()
        return None
    return SummaryWriter(str(folder))


@functools.lru_cache(maxsize=None)
def _notice_no_tensorboard() -> None:
    """Said once per process, however many stages run."""
    log.info("tensorboard is not installed: metrics go to metrics.csv only")
