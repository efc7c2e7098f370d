"""Dataset layouts: each lists its labelled files as a `Listing` for `audioclf.index`.

`index_fsdd` (the bundled FSDD), `index_folder` (a folder per class), `index_manifest` (a CSV
manifest, its columns as named or mapped by `data.columns`), `index_fsd50k` (FSD50K's ground
truth, multi-label); Google's Speech Commands has its own module, `audioclf.speech_commands`.
Each gives every clip the split its layout fixes, or None where the seeded ratio split
decides, and its group (a speaker, a source recording) where the layout knows it.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from operator import itemgetter
from pathlib import Path
from string import Formatter

from audioclf.index import MULTI_LABEL_SEPARATOR, SPLITS, Clip, DatasetError, Listing

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".mp3", ".aif", ".aiff", ".opus"})
MANIFEST_COLUMNS = ("path", "label", "split", "fold", "group")
#: A manifest's split names, as datasets spell them (Hugging Face's "validation", say).
SPLIT_NAMES = {
    **{split: split for split in SPLITS},
    "training": "train",
    "validation": "val",
    "valid": "val",
    "testing": "test",
}


def audio_files_below(folder: Path) -> list[Path]:
    """The audio files below `folder`, by extension. Hidden files and folders (a name that
    starts with "."; macOS writes a `._NAME.wav` of metadata beside each file on some drives)
    and `__MACOSX/` are not clips: they are left out and counted in the log."""
    found, hidden = [], 0
    for path in folder.rglob("*"):
        if path.suffix.lower() not in AUDIO_EXTENSIONS or not path.is_file():
            continue
        if _hidden(path.relative_to(folder)):
            hidden += 1
        else:
            found.append(path)
    if hidden:
        log.info("%s: left out %d hidden audio file(s) (names starting with '.')", folder, hidden)
    return sorted(found)


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in relative.parts)


_FSDD_NAME = re.compile(r"^(?P<digit>\d)_(?P<speaker>[a-z]+)_(?P<index>\d+)$")


def index_fsdd(root: Path) -> Listing:
    """The Free Spoken Digit Dataset: `{digit}_{speaker}_{index}.wav`.

    Test: index 0-4 (the official split). Validation: index 5-9, carved from the official
    training part (every digit and speaker, 10% of it). Training: index 10-49.
    """
    clips = []
    for path in audio_files_below(root):
        match = _FSDD_NAME.match(path.stem)
        if match is None:
            raise DatasetError(f"{path}: not an FSDD file name ({{digit}}_{{speaker}}_{{index}})")
        index = int(match["index"])
        split = "test" if index < 5 else "val" if index < 10 else "train"
        clips.append(Clip(path, match["digit"], split))
    return Listing(str(root), clips)


FSD50K_PARTS = (("dev.csv", "FSD50K.dev_audio", None), ("eval.csv", "FSD50K.eval_audio", "test"))


def index_fsd50k(root: Path) -> Listing:
    """FSD50K as unpacked: `FSD50K.ground_truth/{dev,eval}.csv` (`fname,labels,mids[,split]`)
    and the clips in `FSD50K.dev_audio/` and `FSD50K.eval_audio/`.

    Multi-label: a row's `labels` are comma-separated (kept sorted, joined by ';' as in
    every multi-label listing). dev.csv's `split` (train or val) is the split; eval.csv is the
    test split. A row without labels, an unknown split or a missing column names the file
    and the line.
    """
    truth = root / "FSD50K.ground_truth"
    clips = []
    for name, audio, fixed in FSD50K_PARTS:
        rows = _read_manifest(truth / name)
        header = [column.strip() for column in rows[0]] if rows else []
        needed = ["fname", "labels"] + ([] if fixed else ["split"])
        missing = [column for column in needed if column not in header]
        if missing:
            raise DatasetError(f"{truth / name}, line 1: header {header} lacks {missing}")
        for line, values in enumerate(rows[1:], start=2):
            if not values:
                continue
            where = f"{truth / name}, line {line}"
            if len(values) != len(header):
                raise DatasetError(f"{where}: {len(values)} field(s), the header has {len(header)}")
            row = {column: value.strip() for column, value in zip(header, values, strict=True)}
            labels = sorted({label.strip() for label in row["labels"].split(",")} - {""})
            if not row["fname"] or not labels:
                raise DatasetError(f"{where}: empty fname or labels")
            split = fixed or row["split"].lower()
            if split not in ("train", "val", "test"):
                raise DatasetError(f"{where}: split {row['split']!r} is not train or val")
            path = root / audio / f"{row['fname']}.wav"
            clips.append(Clip(path, MULTI_LABEL_SEPARATOR.join(labels), split, where))
    return Listing(str(root), clips)


def index_folder(root: Path, val_fraction: float, test_fraction: float) -> Listing:
    """A folder per class, under top-level train/ val/ test/ folders or split by ratio.

    With `root/train/` present, its sibling `val/` and `test/` give those splits; a missing
    `val/` is carved from training by `val_fraction`. The split folders may be spelled as
    datasets spell them (`training/`, `validation/`, `valid/`, `testing/`, any case). Without
    a train folder, `root/CLASS/` folders are split by `val_fraction` and `test_fraction`.
    """

    def clips_under(folder: Path, split: str | None) -> list[Clip]:
        _check_loose_files(folder)
        return [
            Clip(path, class_dir.name, split)
            for class_dir in sorted(folder.iterdir())
            if class_dir.is_dir() and not _hidden(Path(class_dir.name))
            for path in audio_files_below(class_dir)
        ]

    folders = {
        path.name: path for path in root.iterdir() if path.is_dir() and not _hidden(Path(path.name))
    }
    split_dirs: dict[str, Path] = {}
    for name, path in sorted(folders.items()):
        split = SPLIT_NAMES.get(name.lower())
        if split in split_dirs:
            raise DatasetError(f"{root}: both {split_dirs[split].name}/ and {name}/ hold {split}")
        if split is not None:
            split_dirs[split] = path
    if "train" not in split_dirs:
        if split_dirs:
            names = sorted(f"{path.name}/" for path in split_dirs.values())
            raise DatasetError(
                f"{root}: has {', '.join(names)} but no train/ folder beside them; add it (or "
                "rename those folders if they are classes)"
            )
        return Listing(
            str(root), clips_under(root, None), {"val": val_fraction, "test": test_fraction}
        )
    others = sorted(set(folders) - {path.name for path in split_dirs.values()})
    if others:
        log.warning("%s: folder(s) %s beside the split folders are not read", root, others)
    has_val = "val" in split_dirs
    clips = clips_under(split_dirs["train"], "train" if has_val else None)
    for split in ("val", "test"):
        if split in split_dirs:
            clips += clips_under(split_dirs[split], split)
    if "test" not in split_dirs:
        log.warning("%s has no test/ folder: the test split is empty", root)
    return Listing(str(root), clips, {} if has_val else {"val": val_fraction})


def _check_loose_files(folder: Path) -> None:
    """Audio files lying in a folder of class folders belong to no class: an error when the
    folder has no class folder at all, else a warning (they are not read)."""
    entries = [path for path in folder.iterdir() if not _hidden(Path(path.name))]
    loose = sorted(p.name for p in entries if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
    if loose and not any(path.is_dir() for path in entries):
        raise DatasetError(
            f"{folder}: {len(loose)} audio file(s) ({loose[0]}, ...) lie in it with no class: "
            f"give each class a folder of its own ({folder}/<class>/*.wav)"
        )
    if loose:
        log.warning(
            "%s: %d audio file(s) in it belong to no class folder; not read", folder, len(loose)
        )


def _read_manifest(manifest: Path) -> list[list[str]]:
    """The CSV rows of a manifest; a BOM is dropped, text that is not UTF-8 names its line."""
    try:
        data = manifest.read_bytes()
    except OSError as error:
        raise DatasetError(f"{manifest}: cannot read manifest ({error})") from error
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DatasetError(
            f"{manifest}, line {line}: not UTF-8 text (byte {data[error.start]:#04x}); "
            "save the manifest as UTF-8"
        ) from error
    return list(csv.reader(io.StringIO(text, newline="")))


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
    rows = _read_manifest(manifest)
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
    rows = _read_manifest(manifest)
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
