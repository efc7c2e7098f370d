"""Indexing: list a dataset's labelled files, check them for duplicates and leakage, split them.

A dataset is first listed (`index_fsdd`, `index_folder`, `index_manifest`): every clip with the
split its layout fixes, or none when a seeded ratio split assigns it. The main job then drops
bad files, and only then splits (`split_listing`), so a dropped file never leaves a split short
of a class unnoticed. No file, by resolved path or by content, may sit in two splits.
"""

from __future__ import annotations

import csv
import io
import logging
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from operator import itemgetter
from pathlib import Path
from string import Formatter

from audioclf.audio import file_digest

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".mp3", ".aif", ".aiff", ".opus"})
MANIFEST_COLUMNS = ("path", "label", "split", "fold", "group")
MULTI_LABEL_SEPARATOR = ";"


class DatasetError(ValueError):
    """A dataset that cannot be indexed as configured (missing folder, bad manifest, labels)."""


@dataclass(frozen=True)
class Clip:
    """One labelled audio file.

    `split` is the split the dataset's layout puts it in (None: the ratio split decides);
    `origin` says where it was listed (a manifest line), for messages. Clips of one `group`
    (a speaker, a source recording) are never split apart.
    """

    path: Path
    label: str
    split: str | None = None
    origin: str = field(default="", compare=False)
    group: str | None = field(default=None, compare=False)

    @property
    def labels(self) -> tuple[str, ...]:
        """The clip's labels: one, or for multi-label data those joined by ';' in `label`."""
        return tuple(self.label.split(MULTI_LABEL_SEPARATOR))

    @property
    def where(self) -> str:
        """The clip's origin and path, as messages name it."""
        return f"{self.origin} ({self.path})" if self.origin else str(self.path)


@dataclass
class Listing:
    """A dataset's clips before splitting.

    `fractions` are the val/test shares of the clips whose split is None; the rest train.
    """

    source: str
    clips: list[Clip]
    fractions: dict[str, float] = field(default_factory=dict)


@dataclass
class DatasetIndex:
    """The clips of each split and the class order (sorted training labels)."""

    classes: list[str]
    splits: dict[str, list[Clip]]

    def counts(self) -> dict[str, int]:
        """Clips per split."""
        return {split: len(clips) for split, clips in self.splits.items()}


# ---------------------------------------------------------------- listing


def _audio_files(folder: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in AUDIO_EXTENSIONS and path.is_file()
    )


_FSDD_NAME = re.compile(r"^(?P<digit>\d)_(?P<speaker>[a-z]+)_(?P<index>\d+)$")


def index_fsdd(root: Path) -> Listing:
    """The Free Spoken Digit Dataset: `{digit}_{speaker}_{index}.wav`.

    Test: index 0-4 (the official split). Validation: index 5-9, carved from the official
    training part (every digit and speaker, 10% of it). Training: index 10-49.
    """
    clips = []
    for path in _audio_files(root):
        match = _FSDD_NAME.match(path.stem)
        if match is None:
            raise DatasetError(f"{path}: not an FSDD file name ({{digit}}_{{speaker}}_{{index}})")
        index = int(match["index"])
        split = "test" if index < 5 else "val" if index < 10 else "train"
        clips.append(Clip(path, match["digit"], split))
    return Listing(str(root), clips)


SPEECH_COMMANDS_LISTS = {"val": "validation_list.txt", "test": "testing_list.txt"}


def index_speech_commands(root: Path) -> Listing:
    """Google's Speech Commands (v0.01, v0.02) as unpacked: `root/WORD/SPEAKER_nohash_N.wav`.

    The official split: files named in `validation_list.txt` and `testing_list.txt` (paths
    relative to root) are validation and test, the rest train. The lists assign whole
    speakers (by a hash of the speaker id), and each clip's `group` is its speaker, so a
    speaker in two splits is an error. Folders starting with `_` (`_background_noise_`)
    hold no class. A listed file that is not there is an error naming the list and line.
    """
    listed: dict[str, str] = {}
    for split, name in SPEECH_COMMANDS_LISTS.items():
        path = root / name
        if not path.is_file():
            raise DatasetError(
                f"{root}: no {name}; data=speech_commands needs the unpacked Speech Commands "
                "folder (WORD/*.wav and its validation_list.txt and testing_list.txt)"
            )
        for line, entry in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            entry = entry.strip()
            if not entry:
                continue
            if not (root / entry).is_file():
                raise DatasetError(f"{path}, line {line}: {entry} is not under {root}")
            if entry in listed:
                raise DatasetError(
                    f"{path}, line {line}: {entry} is in {SPEECH_COMMANDS_LISTS[listed[entry]]} "
                    "too; a file has one split"
                )
            listed[entry] = split
    clips = []
    for word in sorted(folder for folder in root.iterdir() if folder.is_dir()):
        if word.name.startswith("_"):
            continue
        for path in _audio_files(word):
            relative = path.relative_to(root).as_posix()
            speaker = path.name.split("_nohash_")[0] if "_nohash_" in path.name else None
            clips.append(Clip(path, word.name, listed.get(relative, "train"), group=speaker))
    return Listing(str(root), clips)


def index_folder(root: Path, val_fraction: float, test_fraction: float) -> Listing:
    """A folder per class, under top-level train/ val/ test/ folders or split by ratio.

    With `root/train/` present, its sibling `val/` and `test/` give those splits; a missing
    `val/` is carved from training by `val_fraction`. Without it, `root/CLASS/` folders are
    split by `val_fraction` and `test_fraction`.
    """

    def clips_under(folder: Path, split: str | None) -> list[Clip]:
        return [
            Clip(path, class_dir.name, split)
            for class_dir in sorted(folder.iterdir())
            if class_dir.is_dir()
            for path in _audio_files(class_dir)
        ]

    if not (root / "train").is_dir():
        return Listing(
            str(root), clips_under(root, None), {"val": val_fraction, "test": test_fraction}
        )
    has_val = (root / "val").is_dir()
    clips = clips_under(root / "train", "train" if has_val else None)
    for split in ("val", "test"):
        if (root / split).is_dir():
            clips += clips_under(root / split, split)
    if not (root / "test").is_dir():
        log.warning("%s has no test/ folder: the test split is empty", root)
    return Listing(str(root), clips, {} if has_val else {"val": val_fraction})


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
    """For each of path, label, split, fold that the manifest provides, a function from a row
    (header name -> cell) to the value.

    Without `columns`, the header must name them as they are (path,label[,split][,fold]); any
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
        fields = [field for _, field, _, _ in Formatter().parse(source) if field is not None]
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

    With `multi_label`, a label cell holds one or more labels separated by ';' (FSD50K
    style); they are kept sorted and without repeats, so `b;a;a` is `a;b`.

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
            if not row[name]:
                raise DatasetError(f"{where}: empty {name}")
        if multi_label:
            labels = [label.strip() for label in row["label"].split(MULTI_LABEL_SEPARATOR)]
            if not all(labels):
                raise DatasetError(f"{where}: empty label in {row['label']!r}")
            row["label"] = MULTI_LABEL_SEPARATOR.join(sorted(set(labels)))
        if test_fold is not None:
            seen_folds.add(row["fold"])
            split = folds.get(row["fold"], "train" if val_fold is not None else None)
        elif "split" in row:
            split = row["split"].lower()
            if split not in SPLITS:
                raise DatasetError(f"{where}: split {row['split']!r} is not one of {SPLITS}")
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


# ---------------------------------------------------------------- duplicates and leakage


def drop_duplicates(listing: Listing) -> Listing:
    """The listing without exact duplicates (same file, label and split), each dropped with a
    warning naming it; the same file in two splits or under two labels is a DatasetError
    naming both places. Files are compared by resolved path."""
    first_seen: dict[Path, Clip] = {}
    kept = []
    for clip in listing.clips:
        resolved = clip.path.resolve()
        earlier = first_seen.setdefault(resolved, clip)
        if earlier is clip:
            kept.append(clip)
            continue
        if earlier.split != clip.split:
            raise DatasetError(
                f"{listing.source}: {resolved} is listed in two splits: "
                f"{_split_name(earlier)} at {earlier.where} and {_split_name(clip)} at "
                f"{clip.where}"
            )
        if earlier.label != clip.label:
            raise DatasetError(
                f"{listing.source}: {resolved} is listed with two labels: {earlier.label!r} at "
                f"{earlier.where} and {clip.label!r} at {clip.where}"
            )
        log.warning("dropping duplicate of %s: %s", earlier.where, clip.where)
    return replace(listing, clips=kept)


def _split_name(clip: Clip) -> str:
    return clip.split or "the ratio split"


def check_groups(splits: dict[str, list[Clip]]) -> None:
    """Raise DatasetError naming both clips when one group (a speaker, a source recording)
    has clips in two splits, as a fixed split (a split or fold column) can put them."""
    owner: dict[str, tuple[str, Clip]] = {}
    for split, clips in splits.items():
        for clip in clips:
            if clip.group is None:
                continue
            first = owner.setdefault(clip.group, (split, clip))
            if first[0] != split:
                raise DatasetError(
                    f"group {clip.group!r} is in {first[0]} and {split}: {first[1].where} and "
                    f"{clip.where} (a group's clips must share a split)"
                )


def _together(clips: Sequence[Clip], digest: Callable[[Path], str]) -> Callable[[Clip], str]:
    """A key that is equal for clips that must share a split: identical content or one
    group, transitively (union-find over both)."""
    parent: dict[str, str] = {}

    def find(node: str) -> str:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for clip in clips:
        content = "content:" + digest(clip.path)
        if clip.group is not None:
            parent[find("group:" + clip.group)] = find(content)
        find(content)
    return lambda clip: find("content:" + digest(clip.path))


def check_leakage(splits: dict[str, list[Clip]], digest: Callable[[Path], str]) -> None:
    """Raise DatasetError naming both files when identical audio content sits in two splits."""
    owner: dict[str, tuple[str, Clip]] = {}
    for split, clips in splits.items():
        for clip in clips:
            first = owner.setdefault(digest(clip.path), (split, clip))
            if first[0] != split:
                raise DatasetError(
                    f"identical audio in {first[0]} and {split}: {first[1].where} and "
                    f"{clip.where} have the same content (a test clip must not train)"
                )


# ---------------------------------------------------------------- splitting


def stratified_split(
    clips: Sequence[Clip],
    fractions: dict[str, float],
    seed: int,
    group: Callable[[Clip], str] | None = None,
) -> dict[str, list[Clip]]:
    """Split clips per class by seeded shuffling; `fractions` maps split names to shares.

    What the fractions leave goes to "train". Each class gives about round(n * fraction)
    clips to a split, so small classes keep their proportions; the result depends only on the
    clips and the seed. Clips with the same `group` key (identical content, a speaker) stay
    together; when a group holds several classes (a speaker's words), whole groups are dealt
    out by the same shares of all clips, stratified only as far as the groups allow.
    """
    rng = random.Random(seed)
    result: dict[str, list[Clip]] = {"train": [], **{name: [] for name in fractions}}
    units: dict[str, list[Clip]] = {}
    for clip in sorted(clips, key=lambda clip: (clip.label, str(clip.path))):
        units.setdefault(group(clip) if group is not None else str(clip.path), []).append(clip)
    pools: list[dict[str, list[Clip]]]
    if all(len({clip.label for clip in unit}) == 1 for unit in units.values()):
        by_label: dict[str, dict[str, list[Clip]]] = {}
        for key, unit in units.items():
            by_label.setdefault(unit[0].label, {})[key] = unit
        pools = list(by_label.values())
    else:
        pools = [units]
    for pool in pools:
        members = list(pool.values())
        rng.shuffle(members)
        total = sum(len(members_) for members_ in members)
        for name, fraction in fractions.items():
            take, taken = round(total * fraction), 0
            while members and taken < take:
                chosen = members.pop(0)
                result[name].extend(chosen)
                taken += len(chosen)
        result["train"].extend(clip for chosen in members for clip in chosen)
    return {name: sorted(split, key=lambda clip: str(clip.path)) for name, split in result.items()}


def split_listing(
    listing: Listing,
    seed: int,
    digest: Callable[[Path], str] | None = None,
    multi_label: bool = False,
) -> DatasetIndex:
    """Split a (checked) listing into train / val / test and fix the class order.

    Clips with a fixed split keep it; the others are split by `listing.fractions`, stratified
    by class and seeded, with files of identical content, and clips of one `group`, kept
    together. Then: identical content or one group in two splits, a validation or test label
    that training lacks, and a non-empty validation or test split that lacks a class are each
    a DatasetError naming them.
    `digest` maps a file to a content digest (default: a BLAKE2 digest of its bytes). With
    `multi_label`, classes are the single labels of ';'-joined label sets, and a small split
    missing a class is a warning (rare tags), not an error.
    """
    digest = digest or (lambda path: file_digest(path)[0])
    listing = drop_duplicates(listing)
    splits: dict[str, list[Clip]] = {split: [] for split in SPLITS}
    unassigned = []
    for clip in listing.clips:
        if clip.split is None:
            unassigned.append(clip)
        else:
            splits[clip.split].append(clip)
    if unassigned:
        carved = stratified_split(
            unassigned, listing.fractions, seed, _together(unassigned, digest)
        )
        for split, clips in carved.items():
            splits[split] += [replace(clip, split=split) for clip in clips]
    check_leakage(splits, digest)
    check_groups(splits)
    return _finish_index(splits, listing.source, multi_label)


def _finish_index(splits: dict[str, list[Clip]], source: str, multi_label: bool) -> DatasetIndex:
    if not splits["train"]:
        raise DatasetError(f"{source}: no training clips found")

    def labels_in(clips: list[Clip]) -> set[str]:
        if multi_label:
            return {label for clip in clips for label in clip.labels}
        return {clip.label for clip in clips}

    classes = sorted(labels_in(splits["train"]))
    if len(classes) < 2:
        raise DatasetError(
            f"{source}: the training clips have one class ({classes[0]!r}); a classifier "
            "needs at least 2"
        )
    for split in ("val", "test"):
        labels = labels_in(splits[split])
        unknown = sorted(labels - set(classes))
        if unknown:
            raise DatasetError(
                f"{source}: labels {unknown} appear in the {split} split but not in training"
            )
        absent = sorted(set(classes) - labels)
        if labels and absent and multi_label:
            # Rare tags often miss a small split in multi-label sets: say so, go on.
            log.warning("%s: the %s split has no clip tagged %s", source, split, absent)
        elif labels and absent:
            raise DatasetError(
                f"{source}: the {split} split has no clip of class(es) {absent} "
                f"({len(splits[split])} clips; add clips, or raise data.{split}_fraction for "
                "a ratio split)"
            )
    return DatasetIndex(classes, splits)
