"""Manifests: a table of labelled files, its columns as named or mapped by `data.columns`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from operator import itemgetter
from pathlib import Path
from string import Formatter

from audioclf.index import MULTI_LABEL_SEPARATOR, Clip, DatasetError, Listing
from audioclf.layouts import SPLIT_NAMES, read_csv

MANIFEST_COLUMNS = ("path", "label", "split", "fold", "group")


def _manifest_columns(
    manifest: Path, header: list[str], columns: Mapping[str, str | None] | None
) -> dict[str, Callable[[dict[str, str]], str]]:
    """For each of path, label, split, fold, group that the manifest provides, a function
    from a row (header name -> cell) to the value.

    Without `columns`, the header must name them as they are (path,label[,...]); any
    other column is an error, so a misspelt `Split` is not silently ignored. With `columns`
    (`data.columns`), each maps to a header column, or to a template such as
    `audio/fold{fold}/{slice_file_name}` filled from the row; other columns are not read.
    """
    if columns is None:
        missing = [name for name in ("path", "label") if name not in header]
        if missing:
            raise DatasetError(
                f"{manifest}, line 1: header {header} lacks column(s) {missing} (need path,label, "
                "or map yours with data.columns)"
            )
        unknown = [name for name in header if name not in MANIFEST_COLUMNS]
        if unknown:
            raise DatasetError(
                f"{manifest}, line 1: unknown column(s) {unknown}; known: "
                f"{list(MANIFEST_COLUMNS)} (data.columns maps other headers, e.g. "
                "{path: filename, label: category, fold: fold})"
            )
        return {name: itemgetter(name) for name in MANIFEST_COLUMNS if name in header}
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
    return readers


def _fill(template: str, row: dict[str, str]) -> str:
    return template.format_map(row)


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
    """A CSV manifest with a header naming columns `path,label[,split][,fold][,group]`, or
    others mapped to those by `columns` (see `_manifest_columns`). Rows with the same `group`
    (a speaker, a source recording) land in one split.

    With `multi_label`, a label cell holds labels separated by ';' (FSD50K style); they are
    kept sorted and without repeats, so `b;a;a` is `a;b`. An empty cell is a clip that no
    class applies to (a negative: all targets 0).

    Paths are relative to `root`, or to the manifest's folder when `root` is None. With
    `test_fold` set, rows of that fold are the test split and rows of `val_fold` (if set) the
    validation split; otherwise a `split` column decides (with no `val` row, `val_fraction`
    of the training rows are held out, as for a folder without val/); otherwise a ratio
    split. A short or long row, an empty path or label, an unknown split, or a fold that no
    row has names the manifest and the line or the fold.
    """
    base = root if root is not None else manifest.parent
    rows = read_csv(manifest)
    if not rows:
        raise DatasetError(f"{manifest}: empty manifest (need a header: path,label)")
    header = [name.strip() for name in rows[0]]
    readers = _manifest_columns(manifest, header, columns)
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
    for line, values in enumerate(rows[1:], start=2):
        if not values:
            continue
        where = f"{manifest}, line {line}"
        if len(values) != len(header):
            raise DatasetError(
                f"{where}: {len(values)} field(s), the header has {len(header)} "
                f"({','.join(header)})"
            )
        cells = {name: value.strip() for name, value in zip(header, values, strict=True)}
        row = {name: read(cells) for name, read in readers.items()}
        for name in ("path", "label"):
            if not row[name] and not (name == "label" and multi_label):
                raise DatasetError(f"{where}: empty {name}")
        if multi_label and row["label"]:
            labels = [label.strip() for label in row["label"].split(MULTI_LABEL_SEPARATOR)]
            if not all(labels):
                raise DatasetError(f"{where}: empty label in {row['label']!r}")
            row["label"] = MULTI_LABEL_SEPARATOR.join(sorted(set(labels)))
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
        clips.append(Clip(base / row["path"], row["label"], split, where, row.get("group") or None))
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


def manifest_folds(manifest: Path, columns: Mapping[str, str | None] | None = None) -> list[str]:
    """The distinct values of a manifest's fold column, in numeric order where numeric."""
    rows = read_csv(manifest)
    header = [name.strip() for name in rows[0]] if rows else []
    readers = _manifest_columns(manifest, header, columns)
    if "fold" not in readers:
        raise DatasetError(
            f"{manifest}: cross-validation needs a 'fold' column (or data.columns.fold)"
        )
    read = readers["fold"]
    return _fold_order(
        {
            read({name: value.strip() for name, value in zip(header, row, strict=True)})
            for row in rows[1:]
            if len(row) == len(header)
        }
    )


def _fold_order(folds: set[str]) -> list[str]:
    return sorted(
        folds, key=lambda fold: (not fold.isdigit(), int(fold) if fold.isdigit() else 0, fold)
    )
