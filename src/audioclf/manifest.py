"""Manifests: a table of labelled files, CSV or JSON lines (NeMo's), one file or one per split.

A CSV manifest names its columns in a header (`path,label[,split][,fold][,group]`, or others
mapped by `data.columns`). A JSON-lines manifest (`.json`, `.jsonl`, `.ndjson`: an object per
line, as NeMo writes them; a JSON array of objects reads too) has keys for columns, and takes
NeMo's names for the path (`audio_filepath`, `audio_filename`) and the label (`command`,
`target`). NeMo's `offset` and `duration` (seconds; either format) make a row a part of its
file: a sound event in a long recording, say.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from operator import itemgetter
from pathlib import Path
from string import Formatter
from typing import Any

from audioclf.index import MULTI_LABEL_SEPARATOR, SPLITS, Clip, DatasetError, Listing
from audioclf.layouts import SPLIT_NAMES, read_csv, read_text

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("path", "label", "split", "fold", "group")
#: NeMo's names for a JSON-lines manifest's path and label (its speech-classification
#: manifests), read when the manifest has no key of ours.
NEMO_NAMES = {"path": ("audio_filepath", "audio_filename"), "label": ("command", "target")}
JSON_SUFFIXES = frozenset({".json", ".jsonl", ".ndjson"})
#: NeMo's part of a file, in seconds: read wherever a manifest has them.
SEGMENT_COLUMNS = ("offset", "duration")


class _Cells(dict):
    """A row's cells by column; a missing one is empty (a JSON row without an optional key)."""

    def __missing__(self, key: str) -> str:
        return ""


@dataclass(frozen=True)
class Table:
    """A manifest's rows: each with where it is (for messages) and its cells by column."""

    source: Path
    header: list[str]
    rows: list[tuple[str, _Cells]]
    json: bool = False


def read_table(manifest: Path) -> Table:
    """A manifest's rows, CSV or (by suffix) JSON lines. A CSV row with too few or too many
    fields, and a JSON line that is not an object, name the manifest and the line."""
    if manifest.suffix.lower() in JSON_SUFFIXES:
        return _read_json(manifest)
    rows = read_csv(manifest)
    if not rows:
        return Table(manifest, [], [])
    header = [name.strip() for name in rows[0]]
    cells = []
    for line, values in enumerate(rows[1:], start=2):
        if not values:
            continue
        where = f"{manifest}, line {line}"
        if len(values) != len(header):
            raise DatasetError(
                f"{where}: {len(values)} field(s), the header has {len(header)} "
                f"({','.join(header)})"
            )
        cells.append((where, _Cells(zip(header, (v.strip() for v in values), strict=True))))
    return Table(manifest, header, cells)


def _read_json(manifest: Path) -> Table:
    text = read_text(manifest)
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise DatasetError(
                f"{manifest}, line {error.lineno}: not JSON ({error.msg})"
            ) from error
        numbered = [(f"{manifest}, item {number}", item) for number, item in enumerate(items, 1)]
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((f"{manifest}, line {number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise DatasetError(
                    f"{manifest}, line {number}: not JSON ({error.msg}); a JSON-lines manifest "
                    "has one object per line"
                ) from error
    header: dict[str, None] = {}
    rows = []
    for where, item in numbered:
        if not isinstance(item, dict):
            raise DatasetError(f"{where}: {type(item).__name__} where an object was expected")
        header.update(dict.fromkeys(item))
        rows.append((where, _Cells((key, _json_cell(value)) for key, value in item.items())))
    return Table(manifest, list(header), rows, json=True)


def _json_cell(value: Any) -> str:
    """A JSON value as a cell: text as it is, a list (of labels) joined by ';', null empty."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return MULTI_LABEL_SEPARATOR.join(item.strip() for item in value)
    return json.dumps(value)


def _manifest_columns(
    table: Table, columns: Mapping[str, str | None] | None
) -> dict[str, Callable[[dict[str, str]], str]]:
    """For each of path, label, split, fold, group, offset and duration that the manifest
    provides, a function from a row (column -> cell) to the value.

    Without `columns`, the header must name them as they are (path,label[,...]; a JSON
    manifest may use NeMo's names); any other CSV column is an error, so a misspelt `Split`
    is not silently ignored (a JSON manifest's other keys are logged as not read). With
    `columns` (`data.columns`), each maps to a column, or to a template such as
    `audio/fold{fold}/{slice_file_name}` filled from the row; other columns are not read.
    `offset` and `duration` are read wherever the header has them.
    """
    manifest, header = table.source, table.header
    segment = {name: itemgetter(name) for name in SEGMENT_COLUMNS if name in header}
    if columns is None:
        names = {name: name for name in MANIFEST_COLUMNS if name in header}
        for name, aliases in NEMO_NAMES.items() if table.json else ():
            found = [alias for alias in aliases if alias in header]
            if name not in names and found:
                names[name] = found[0]
        missing = [name for name in ("path", "label") if name not in names]
        if missing:
            nemo = " (or NeMo's audio_filepath and label or command)" if table.json else ""
            raise DatasetError(
                f"{manifest}, line 1: header {header} lacks column(s) {missing} (need "
                f"path,label{nemo}, or map yours with data.columns)"
            )
        unknown = [name for name in header if name not in {*names.values(), *segment}]
        if unknown and table.json:
            log.info("%s: key(s) %s not read", manifest, unknown)
        elif unknown:
            raise DatasetError(
                f"{manifest}, line 1: unknown column(s) {unknown}; known: "
                f"{list(MANIFEST_COLUMNS + SEGMENT_COLUMNS)} (data.columns maps other headers, "
                "e.g. {path: filename, label: category, fold: fold})"
            )
        return {name: itemgetter(source) for name, source in names.items()} | segment
    readers = {}
    for name in MANIFEST_COLUMNS:
        source = columns.get(name)
        if source is None:
            continue
        parts = [part for part in Formatter().parse(source) if part[1] is not None]
        if any(spec or conversion for _, _, spec, conversion in parts):
            raise DatasetError(
                f"{manifest}: data.columns.{name}={source!r}: a template takes plain "
                "{column} fields (no format spec or conversion)"
            )
        fields = [field for _, field, _, _ in parts]
        lacking = [field for field in (fields or [source]) if field not in header]
        if lacking:
            raise DatasetError(
                f"{manifest}, line 1: data.columns.{name}={source!r} names column(s) {lacking} "
                f"that the header {header} lacks"
            )
        readers[name] = itemgetter(source) if not fields else partial(_fill, source)
    return readers | segment


def _fill(template: str, row: dict[str, str]) -> str:
    return template.format_map(row)


def _read_rows(
    table: Table, readers: Mapping[str, Callable[[dict[str, str]], str]], multi_label: bool
) -> Iterator[tuple[str, dict[str, str], float, float | None]]:
    """Each row's place, its values by our column names, and the part of its file it is:
    offset and duration in seconds (None: to the end, also for NeMo's 0, "not measured").
    An empty path or label, or an offset or duration that is not a number, names the
    place."""
    for where, cells in table.rows:
        row = {name: read(cells) for name, read in readers.items()}
        for name in ("path", "label"):
            if not row[name] and not (name == "label" and multi_label):
                raise DatasetError(f"{where}: empty {name}")
        if multi_label and row["label"]:
            labels = [label.strip() for label in row["label"].split(MULTI_LABEL_SEPARATOR)]
            if not all(labels):
                raise DatasetError(f"{where}: empty label in {row['label']!r}")
            row["label"] = MULTI_LABEL_SEPARATOR.join(sorted(set(labels)))
        yield where, row, _seconds(row, "offset", where), _seconds(row, "duration", where) or None


def _seconds(row: dict[str, str], name: str, where: str) -> float:
    text = row.get(name, "")
    if not text:
        return 0.0
    try:
        seconds = float(text)
    except ValueError:
        raise DatasetError(f"{where}: {name} {text!r} is not a number of seconds") from None
    if seconds < 0:
        raise DatasetError(f"{where}: {name} {text} is negative")
    return seconds


def _clip(
    base: Path, where: str, row: dict[str, str], split: str | None, part: tuple[float, float | None]
) -> Clip:
    offset, duration = part
    group = row.get("group") or None
    return Clip(
        base / row["path"], row["label"], split, where, group, offset=offset, duration=duration
    )


def index_manifest(
    manifest: Path,
    root: Path | None,
    val_fraction: float,
    test_fraction: float,
    val_fold: str | int | None = None,
    test_fold: str | int | None = None,
    multi_label: bool = False,
    columns: Mapping[str, str | None] | None = None,
) -> Listing:
    """A manifest (CSV, or JSON lines; see the module) with columns `path,label[,split]
    [,fold][,group]`, or others mapped to those by `columns` (see `_manifest_columns`). Rows
    with the same `group` (a speaker, a source recording) land in one split.

    With `multi_label`, a label cell holds labels separated by ';' (FSD50K style; a JSON
    list of labels too); they are kept sorted and without repeats, so `b;a;a` is `a;b`. An
    empty cell is a clip that no class applies to (a negative: all targets 0).

    Paths are relative to `root`, or to the manifest's folder when `root` is None. With
    `test_fold` set, rows of that fold are the test split and rows of `val_fold` (if set) the
    validation split; otherwise a `split` column decides (with no `val` row, `val_fraction`
    of the training rows are held out, as for a folder without val/); otherwise a ratio
    split. A short or long row, an empty path or label, an unknown split, or a fold that no
    row has names the manifest and the line or the fold.
    """
    base = root if root is not None else manifest.parent
    table = read_table(manifest)
    if not table.header:
        need = "no rows" if table.json else "need a header: path,label"
        raise DatasetError(f"{manifest}: empty manifest ({need})")
    readers = _manifest_columns(table, columns)
    if test_fold is not None and "fold" not in readers:
        raise DatasetError(
            f"{manifest}: data.test_fold is set but there is no 'fold' column "
            "(or data.columns.fold)"
        )
    if test_fold is not None and val_fold is not None and str(test_fold) == str(val_fold):
        raise DatasetError(
            f"{manifest}: fold {test_fold} cannot be both data.test_fold and data.val_fold"
        )
    folds = {} if test_fold is None else {str(test_fold): "test"}
    if test_fold is not None and val_fold is not None:
        folds[str(val_fold)] = "val"
    clips, seen_folds = [], set()
    for where, row, *part in _read_rows(table, readers, multi_label):
        if test_fold is not None:
            seen_folds.add(row["fold"])
            split = folds.get(row["fold"], "train" if val_fold is not None else None)
        elif "split" in row:
            split = SPLIT_NAMES.get(row["split"].strip().lower())
            if split is None:
                raise DatasetError(
                    f"{where}: split {row['split']!r} is not one of {sorted(SPLIT_NAMES)}"
                )
        else:
            split = None
        clips.append(_clip(base, where, row, split, part))
    absent = [f"data.{name}_fold={fold}" for fold, name in folds.items() if fold not in seen_folds]
    if absent:
        raise DatasetError(
            f"{manifest}: no row has {' or '.join(absent)}; its folds are "
            f"{', '.join(_fold_order(seen_folds))}"
        )
    if test_fold is not None:
        fractions = {} if val_fold is not None else {"val": val_fraction}
    elif "split" in readers and not any(clip.split == "val" for clip in clips):
        # Train and test only (as many datasets ship): validation comes out of the training
        # rows, as for a folder without val/.
        clips = [replace(clip, split=None) if clip.split == "train" else clip for clip in clips]
        fractions = {"val": val_fraction}
    else:
        fractions = {"val": val_fraction, "test": test_fraction}
    return Listing(str(manifest), clips, fractions)


def index_split_manifests(
    manifests: Mapping[str, Path | Sequence[Path]],
    root: Path | None,
    val_fraction: float,
    multi_label: bool = False,
    columns: Mapping[str, str | None] | None = None,
) -> Listing:
    """Manifests per split (`{"train": ..., "val": ..., "test": ...}`, as NeMo's
    train/validation/test manifests; a split may have a list of them), each read as
    `index_manifest` reads one; every row of a file is in that file's split. Without a val
    manifest, `val_fraction` of the training rows are held out; without a test manifest, the
    test split is empty. A `split` column in a file is an error (the file says the split);
    paths are relative to `root`, or to each manifest's folder."""
    unknown = sorted(set(manifests) - set(SPLITS))
    if unknown:
        raise DatasetError(f"manifests for unknown split(s) {unknown}; splits: {list(SPLITS)}")
    clips, sources = [], []
    for split, given in manifests.items():
        for manifest in [given] if isinstance(given, Path) else given:
            table = read_table(manifest)
            if not table.header:
                raise DatasetError(f"{manifest}: empty manifest (one of the {split} split's)")
            readers = _manifest_columns(table, columns)
            if "split" in readers:
                raise DatasetError(
                    f"{manifest}: has a split column, but it is a {split} split's manifest "
                    "(every row is in that split): drop the column, or give one manifest for "
                    "all splits"
                )
            base = root if root is not None else manifest.parent
            held_out = split == "train" and "val" not in manifests
            for where, row, *part in _read_rows(table, readers, multi_label):
                clips.append(_clip(base, where, row, None if held_out else split, part))
            sources.append(str(manifest))
    if "train" in manifests and "test" not in manifests:
        log.warning("data.manifest has no test manifest: the test split is empty")
    return Listing(", ".join(sources), clips, {} if "val" in manifests else {"val": val_fraction})


def manifest_folds(manifest: Path, columns: Mapping[str, str | None] | None = None) -> list[str]:
    """The distinct values of a manifest's fold column, in numeric order where numeric."""
    table = read_table(manifest)
    readers = _manifest_columns(table, columns)
    if "fold" not in readers:
        raise DatasetError(
            f"{manifest}: cross-validation needs a 'fold' column (or data.columns.fold)"
        )
    read = readers["fold"]
    return _fold_order({read(cells) for _, cells in table.rows})


def _fold_order(folds: set[str]) -> list[str]:
    return sorted(
        folds, key=lambda fold: (not fold.isdigit(), int(fold) if fold.isdigit() else 0, fold)
    )
