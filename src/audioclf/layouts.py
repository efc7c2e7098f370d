"""Dataset layouts: each lists its labelled files as a `Listing` for `audioclf.index`.

`index_fsdd` (the bundled FSDD), `index_folder` (a folder per class), `index_fsd50k` (FSD50K's
ground truth, multi-label); manifests (`audioclf.manifest`) and Google's Speech Commands
(`audioclf.speech_commands`) have modules of their own.
Each gives every clip the split its layout fixes, or None where the seeded ratio split
decides, and its group (a speaker, a source recording) where the layout knows it.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from pathlib import Path

from audioclf.index import MULTI_LABEL_SEPARATOR, SPLITS, Clip, DatasetError, Listing

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".mp3", ".aif", ".aiff", ".opus"})
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
        rows = read_csv(truth / name)
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


def read_csv(manifest: Path) -> list[list[str]]:
    """The rows of a CSV file (a manifest, a ground truth); see `read_text`."""
    return list(csv.reader(io.StringIO(read_text(manifest), newline="")))


def read_text(manifest: Path) -> str:
    """The text of a manifest; a BOM is dropped, text that is not UTF-8 names its line."""
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
    return text
