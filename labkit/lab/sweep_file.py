"""A sweep's file: JSON Lines, written point by point, so an interrupted or crashed sweep keeps
every point it finished and `resume=` can run the rest.

  {"format": "labkit-sweep/2", "meta": {...}}          the sweep's arguments, environment, ceilings
  {"point": {...}, "raw": {...}, "steps": {...}, ...}   one line per finished point
  {"meta": {...}}                                       a later meta replaces the first (at the end)

A point line holds its row, the raw timings it was derived from, its step log and, when
profiled, its operator tables (DataFrames as columns, dtypes and values; floats written by
Python's json, the shortest exact repr, NaN as null), so a reloaded sweep equals the saved one.
A last line cut short by a crash is skipped. Files of the earlier one-document format
("labkit-sweep/1") load too, without step logs.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd

from labkit.lab.columns import frame
from labkit.lab.points import PointRecord

FORMAT = "labkit-sweep/2"
OLD_FORMAT = "labkit-sweep/1"
log = logging.getLogger("labkit.lab")


def table(df: pd.DataFrame) -> dict:
    """Columns, dtypes and values of a DataFrame, strict JSON."""
    data = {c: [_clean(v) for v in df[c].tolist()] for c in df.columns}
    return {
        "columns": list(df.columns),
        "dtypes": {c: str(t) for c, t in df.dtypes.items()},
        "data": data,
        "index": [_clean(v) for v in df.index.tolist()],
    }


def from_table(t: dict) -> pd.DataFrame:
    df = pd.DataFrame(t["data"], columns=t["columns"]).astype(t["dtypes"])
    if "index" in t:
        df.index = t["index"]
    return df


def _clean(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    if hasattr(v, "item"):  # numpy scalars
        return _clean(v.item())
    return v


def _json(obj) -> str:
    return json.dumps(obj, default=_default, allow_nan=False)


def _default(v):
    if isinstance(v, pd.DataFrame):
        return {"__table__": table(v)}
    if isinstance(v, Path):
        return str(v)
    if hasattr(v, "item"):
        return v.item()
    raise TypeError(f"not JSON: {type(v).__name__}")


def _decode(obj):
    if isinstance(obj, dict):
        if "__table__" in obj:
            return from_table(obj["__table__"])
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def _strict(obj):
    """NaN and infinities as null, recursively (json's allow_nan=False refuses them)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def _nan(obj):
    """null back to NaN inside lists of numbers (the raw timings)."""
    if isinstance(obj, dict):
        return {k: _nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [math.nan if v is None else _nan(v) for v in obj]
    return obj


def point_line(rec: PointRecord) -> str:
    return _json(
        {
            "point": _strict(rec.row),
            "raw": _strict(rec.raw),
            "steps": rec.steps,
            "profile": rec.profile and _strict_profile(rec.profile),
        }
    )


def _strict_profile(p: dict) -> dict:
    return {k: v if isinstance(v, pd.DataFrame) else _strict(v) for k, v in p.items()}


class Writer:
    """Appends to a sweep file as points finish; each line is flushed as it is written."""

    def __init__(self, path: Path, meta: dict, records: list[PointRecord], *, append: bool):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if not append:
            self.rewrite(meta, records)

    def rewrite(self, meta: dict, records: list[PointRecord]) -> None:
        """The whole file anew: its head and `records` (written to a side file, then moved
        over, so a crash mid-write leaves the old file whole)."""
        side = self.path.with_name(self.path.name + ".tmp")
        with open(side, "w") as f:
            f.write(_json({"format": FORMAT, "meta": _strict(meta)}) + "\n")
            for rec in records:
                f.write(point_line(rec) + "\n")
        side.replace(self.path)

    def point(self, rec: PointRecord) -> None:
        with open(self.path, "a") as f:
            f.write(point_line(rec) + "\n")

    def meta(self, meta: dict) -> None:
        with open(self.path, "a") as f:
            f.write(_json({"meta": _strict(meta)}) + "\n")


def write(path: Path, meta: dict, records: list[PointRecord]) -> Path:
    Writer(path, meta, records, append=False).meta(meta)
    return path


def read(path: str | Path) -> tuple[dict, list[PointRecord]]:
    """(meta, records) of a sweep file."""
    text = Path(path).read_text()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and whole.get("format") == OLD_FORMAT:
        rows = from_table(whole["table"]).to_dict("records")
        return whole["meta"], [PointRecord(r, {}) for r in rows]
    lines = text.splitlines()
    try:
        head = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        head = {}
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        fmt = head.get("format") if isinstance(head, dict) else None
        raise ValueError(f"{path}: not a labkit sweep file (format {fmt!r}, expected {FORMAT!r})")
    meta, records = head["meta"], []
    for n, line in enumerate(lines[1:], start=2):
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # cut short by a crash mid-write: the points before it stand
                log.warning("%s: line %d is incomplete; skipped", path, n)
                continue
            raise ValueError(f"{path}: line {n} is not JSON") from None
        if "point" in item:
            row = {k: (math.nan if v is None else v) for k, v in item["point"].items()}
            row["warnings"] = item["point"].get("warnings") or ""
            row["error"] = item["point"].get("error") or ""
            records.append(
                PointRecord(
                    row, _nan(item["raw"]), _decode(item["steps"]), _decode(item.get("profile"))
                )
            )
        elif "meta" in item:
            meta = item["meta"]
    return meta, records


def rows_frame(records: list[PointRecord]) -> pd.DataFrame:
    return frame([r.row for r in records])


def jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False
