"""Indexing: a dataset's labelled files checked for duplicates and leakage, and split.

A dataset is first listed (`audioclf.layouts`: FSDD, a folder per class, a CSV manifest,
Speech Commands): every clip with the split its layout fixes, or none when a seeded ratio
split assigns it. The main job then drops bad files, and only then splits (`split_listing`),
so a dropped file never leaves a split short of a class unnoticed. No file, by resolved path
or by content, and no group (a speaker, a source recording) may sit in two splits.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from audioclf.audio import file_digest

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MULTI_LABEL_SEPARATOR = ";"


class DatasetError(ValueError):
    """A dataset that cannot be indexed as configured (missing folder, bad manifest, labels)."""


@dataclass(frozen=True)
class Clip:
    """One labelled audio file.

    `split` is the split the dataset's layout puts it in (None: the ratio split decides);
    `origin` says where it was listed (a manifest line), for messages. Clips of one `group`
    (a speaker, a source recording) are never split apart. A clip may be a part of its file:
    `offset` seconds in, `duration` seconds long (None: to the end), as NeMo's manifests give
    them. `sample_rate` and `seconds` are the file's own rate and the clip's length, once
    `audioclf.dataset.check_clips` has read it (None before).
    """

    path: Path
    label: str
    split: str | None = None
    origin: str = field(default="", compare=False)
    group: str | None = field(default=None, compare=False)
    sample_rate: int | None = field(default=None, compare=False)
    seconds: float | None = field(default=None, compare=False)
    offset: float = 0.0
    duration: float | None = None

    @property
    def segment(self) -> tuple[float, float | None] | None:
        """(offset, duration) of the part of its file the clip is; None for the whole file."""
        return None if self.offset == 0 and self.duration is None else (self.offset, self.duration)

    @property
    def labels(self) -> tuple[str, ...]:
        """The clip's labels: one, or for multi-label data those joined by ';' in `label`
        (none for a multi-label clip whose label is empty: a negative, no tag applies)."""
        return tuple(self.label.split(MULTI_LABEL_SEPARATOR)) if self.label else ()

    @property
    def where(self) -> str:
        """The clip's origin and path (and its part of the file), as messages name it."""
        place = str(self.path)
        if self.segment is not None:
            end = "the end" if self.duration is None else f"{self.offset + self.duration:g} s"
            place += f" from {self.offset:g} s to {end}"
        return f"{self.origin} ({place})" if self.origin else place


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


# ---------------------------------------------------------------- duplicates and leakage


def drop_duplicates(listing: Listing) -> Listing:
    """The listing without exact duplicates (same file and part of it, label and split),
    dropped with one warning that counts them and names the first (NeMo's `--rebalance`
    repeats thousands of rows). A file in two splits (whole, or parts of it), or one part
    under two labels, is a DatasetError naming both places. Files are compared by resolved
    path."""
    first_in_file: dict[Path, Clip] = {}
    first_seen: dict[tuple[Path, tuple[float, float | None] | None], Clip] = {}
    kept, dropped = [], []
    for clip in listing.clips:
        resolved = clip.path.resolve()
        in_file = first_in_file.setdefault(resolved, clip)
        if in_file.split != clip.split:
            raise DatasetError(
                f"{listing.source}: {resolved} is listed in two splits: "
                f"{_split_name(in_file)} at {in_file.where} and {_split_name(clip)} at "
                f"{clip.where}"
                + ("" if in_file.segment == clip.segment else " (parts of a file share a split)")
            )
        earlier = first_seen.setdefault((resolved, clip.segment), clip)
        if earlier is clip:
            kept.append(clip)
            continue
        if earlier.label != clip.label:
            raise DatasetError(
                f"{listing.source}: {resolved} is listed with two labels: {earlier.label!r} at "
                f"{earlier.where} and {clip.label!r} at {clip.where}"
            )
        dropped.append(f"{clip.where} repeats {earlier.where}")
    if dropped:
        log.warning(
            "dropped %d repeated listing(s) of a file (same label and split), the first: %s",
            len(dropped),
            dropped[0],
        )
    return replace(listing, clips=kept)


def _split_name(clip: Clip) -> str:
    return clip.split or "the ratio split"


def check_groups(splits: dict[str, list[Clip]]) -> None:
    """Raise DatasetError naming both clips when one group (a speaker, a source recording)
    has clips in two splits, as a fixed split (a split or fold column) can put them."""
    _refuse_in_two_splits(
        splits,
        lambda clip: clip.group,
        lambda first_split, first, split, clip: (
            f"group {clip.group!r} is in {first_split} and {split}: {first.where} and "
            f"{clip.where} (a group's clips must share a split)"
        ),
    )


def _refuse_in_two_splits(
    splits: dict[str, list[Clip]],
    key: Callable[[Clip], str | None],
    message: Callable[[str, Clip, str, Clip], str],
) -> None:
    """Raise DatasetError with `message(first_split, first, split, clip)` for the first two
    clips that share a key (None: no key) across two splits."""
    owner: dict[str, tuple[str, Clip]] = {}
    for split, clips in splits.items():
        for clip in clips:
            value = key(clip)
            if value is None:
                continue
            first_split, first = owner.setdefault(value, (split, clip))
            if first_split != split:
                raise DatasetError(message(first_split, first, split, clip))


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
    _refuse_in_two_splits(
        splits,
        lambda clip: digest(clip.path),
        lambda first_split, first, split, clip: (
            f"identical audio in {first_split} and {split}: {first.where} and "
            f"{clip.where} have the same content (a test clip must not train)"
        ),
    )


def content_digests(clips: Iterable[Clip]) -> set[str]:
    """The content digests of the clips' files (remembered per file: none is read twice)."""
    return {file_digest(clip.path)[0] for clip in clips}


def check_unseen(clips: Sequence[Clip], seen: set[str], model: str, hint: str = "") -> None:
    """Raise DatasetError naming the clips whose content is in `seen`, the digests of the clips
    that trained or validated `model`: a test on them would overstate it."""
    known = [clip for clip in clips if file_digest(clip.path)[0] in seen]
    if known:
        shown = ", ".join(str(clip.where) for clip in known[:3])
        more = f" and {len(known) - 3} more" if len(known) > 3 else ""
        raise DatasetError(
            f"{len(known)} of the {len(clips)} test clips trained or validated {model} "
            f"({shown}{more}): the test would overstate it{hint}"
        )


# ---------------------------------------------------------------- splitting


def stratified_split(
    clips: Sequence[Clip],
    fractions: dict[str, float],
    seed: int,
    group: Callable[[Clip], str] | None = None,
    keep_classes: bool = False,
) -> dict[str, list[Clip]]:
    """Split clips per class by seeded shuffling; `fractions` maps split names to shares.

    What the fractions leave goes to "train". Each class gives about round(n * fraction)
    clips to a split, so small classes keep their proportions; with `keep_classes`, a class
    too small for that (3 clips at 0.1) still gives each split one clip while training keeps
    one, so that no split lacks a class. The result depends only on the clips and the seed.
    Clips with the same `group` key (identical content, a speaker) stay together; when a
    group holds several classes (a speaker's words), whole groups are dealt out by the same
    shares of all clips, stratified only as far as the groups allow.
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
            if keep_classes and fraction > 0 and take == 0 and len(members) > 1:
                take = 1
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
    classes: Sequence[str] | None = None,
    class_order: Sequence[str] | None = None,
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
    `classes`: the classes of a trained model that the data is tested on. The training split
    may then be empty, every label must be one of them, and a split that lacks some is a
    warning.
    `class_order` (`data.classes`): the classes to train, in their output order, in place of
    the training labels sorted: every label must be one of them, and training must have each.
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
            unassigned,
            listing.fractions,
            seed,
            _together(unassigned, digest),
            # A label set of a multi-label clip is not a class: rare sets keep their shares.
            keep_classes=not multi_label,
        )
        for split, clips in carved.items():
            splits[split] += [replace(clip, split=split) for clip in clips]
    check_leakage(splits, digest)
    check_groups(splits)
    return _finish_index(splits, listing.source, multi_label, classes, class_order)


def _absent_message(
    source: str, split: str, absent: list[str], splits: dict[str, list[Clip]]
) -> str:
    """Why a (multi-class) split lacks classes, and what to do: a class with fewer clips in
    all than the splits in use cannot be in each; otherwise the split's share is too small."""
    used = [name for name in SPLITS if splits[name]]
    totals = Counter(clip.label for name in used for clip in splits[name])
    few = [label for label in absent if totals[label] < len(used)]
    message = (
        f"{source}: the {split} split ({len(splits[split])} clips) has no clip of class(es) "
        f"{absent}"
    )
    if not few:
        return f"{message}; add clips, or raise data.{split}_fraction for a ratio split"
    counts = ", ".join(f"{label!r} has {totals[label]}" for label in few)
    return (
        f"{message}: {counts} in all, fewer than the splits ({', '.join(used)}); add clips "
        f"({len(used)} or more a class)"
        + (", or set data.test_fraction=0 (no test split)" if "test" in used else "")
    )


def _finish_index(
    splits: dict[str, list[Clip]],
    source: str,
    multi_label: bool,
    model_classes: Sequence[str] | None = None,
    class_order: Sequence[str] | None = None,
) -> DatasetIndex:
    def labels_in(clips: list[Clip]) -> set[str]:
        if multi_label:
            return {label for clip in clips for label in clip.labels}
        return {clip.label for clip in clips}

    if model_classes is not None:
        classes = list(model_classes)
        known_from = f"the model was trained for classes {classes}"
    elif not splits["train"]:
        raise DatasetError(f"{source}: no training clips found")
    elif class_order is not None:
        classes, known_from = list(class_order), f"not in data.classes {list(class_order)}"
        untrained = [label for label in classes if label not in labels_in(splits["train"])]
        if untrained:
            raise DatasetError(
                f"{source}: data.classes has {untrained}, which no training clip has: the "
                "model could not learn them; add their clips or drop them from data.classes"
            )
    else:
        classes, known_from = sorted(labels_in(splits["train"])), "not in training"
    if len(classes) < 2:
        raise DatasetError(
            f"{source}: the training clips have one class ({classes[0]!r}); a classifier "
            "needs at least 2"
        )
    for split in SPLITS:
        labels = labels_in(splits[split])
        unknown = sorted(labels - set(classes))
        if unknown:
            raise DatasetError(
                f"{source}: labels {unknown} appear in the {split} split but {known_from}"
            )
        absent = sorted(set(classes) - labels)
        if labels and absent and (multi_label or model_classes is not None):
            # Rare tags often miss a small split in multi-label sets, and a test set need not
            # hold every class a model knows: say so, go on.
            log.warning("%s: the %s split has no clip of %s", source, split, absent)
        elif labels and absent:
            raise DatasetError(_absent_message(source, split, absent, splits))
    return DatasetIndex(classes, splits)
