"""Google's Speech Commands: its official split, and the keyword-spotting task made from it.

`index_speech_commands` lists every word as a class (30 on v0.01, 35 on v0.02). Given `words`,
it lists TensorFlow's keyword task instead (the "12-class" Speech Commands that papers report:
ten words, `_unknown_` and `_silence_`), as TensorFlow's `speech_commands/input_data.py` builds
it: the other words become `_unknown_`, sampled down to `unknown_fraction` of each split's
keyword clips, and `silence_fraction` as many `_silence_` clips are cut from
`_background_noise_` at a random volume up to 0.1 (and, in training, some all zeros: a muted
microphone). Those are written once as WAV files under `silence_dir` (data like any other:
cached, checked, digested), so a run, its resume and a later test of its checkpoint all read the
same silence.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import soundfile

from audioclf.audio import file_digest, read_audio
from audioclf.index import SPLITS, Clip, DatasetError, Listing
from audioclf.layouts import audio_files_below

log = logging.getLogger(__name__)

LISTS = {"val": "validation_list.txt", "test": "testing_list.txt"}
UNKNOWN = "_unknown_"
SILENCE = "_silence_"
BACKGROUND = "_background_noise_"
#: The loudest a silence clip's background slice is kept at (TensorFlow's background_volume).
MAX_SILENCE_GAIN = 0.1
#: A muted microphone gives exact zeros, which no slice of noise is: one training silence clip
#: in this many is all zeros. Only training's: identical files in two splits would be leakage.
ZERO_SILENCE_EVERY = 10
#: Draws of a slice that comes out all zeros (a silent stretch of a sound) before giving up.
_DRAWS = 100
#: Changes whenever the way silence clips are cut does, so older folders are not reused.
_SILENCE_VERSION = "3"


def index_speech_commands(
    root: Path,
    words: list[str] | None = None,
    *,
    unknown_fraction: float = 0.1,
    silence_fraction: float = 0.1,
    seed: int = 0,
    silence_dir: Path | None = None,
    sample_rate: int = 16000,
    clip_seconds: float = 1.0,
) -> Listing:
    """Speech Commands (v0.01, v0.02) as unpacked: `root/WORD/SPEAKER_nohash_N.wav`.

    The official split: files named in `validation_list.txt` and `testing_list.txt` (paths
    relative to root) are validation and test, the rest train. The lists assign whole
    speakers (by a hash of the speaker id), and each clip's `group` is its speaker, so a
    speaker in two splits is an error. Folders starting with `_` (`_background_noise_`)
    hold no class. A listed file that is not there is an error naming the list and line.

    `words`: the keyword task (module docstring); `unknown_fraction`, `silence_fraction`,
    `seed` (which unknown clips and silence slices), and where the silence clips go, at what
    rate and length. Without `words` those are not used.
    """
    clips = _official_split(root)
    if words is None:
        return Listing(str(root), clips)
    return _keyword_task(
        root,
        clips,
        words,
        unknown_fraction=unknown_fraction,
        silence_fraction=silence_fraction,
        seed=seed,
        silence_dir=silence_dir,
        sample_rate=sample_rate,
        clip_seconds=clip_seconds,
    )


def _official_split(root: Path) -> list[Clip]:
    listed: dict[str, str] = {}
    for split, name in LISTS.items():
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
                    f"{path}, line {line}: {entry} is in {LISTS[listed[entry]]} too; a file "
                    "has one split"
                )
            listed[entry] = split
    clips = []
    for word in sorted(folder for folder in root.iterdir() if folder.is_dir()):
        if word.name.startswith("_"):
            continue
        for path in audio_files_below(word):
            relative = path.relative_to(root).as_posix()
            speaker = path.name.split("_nohash_")[0] if "_nohash_" in path.name else None
            clips.append(Clip(path, word.name, listed.get(relative, "train"), group=speaker))
    return clips


def _keyword_task(
    root: Path,
    clips: list[Clip],
    words: list[str],
    *,
    unknown_fraction: float,
    silence_fraction: float,
    seed: int,
    silence_dir: Path | None,
    sample_rate: int,
    clip_seconds: float,
) -> Listing:
    found = sorted({clip.label for clip in clips})
    missing = [word for word in words if word not in found]
    if missing:
        raise DatasetError(
            f"{root}: data.words names {missing}, which it has no folder for; its words are {found}"
        )
    wanted = set(words)
    keyword_counts = dict.fromkeys(SPLITS, 0)
    others: dict[str, list[Clip]] = {split: [] for split in SPLITS}
    task = []
    for clip in clips:
        if clip.label in wanted:
            task.append(clip)
            keyword_counts[clip.split] += 1
        else:
            others[clip.split].append(clip)
    for split in SPLITS:
        count = min(math.ceil(keyword_counts[split] * unknown_fraction), len(others[split]))
        chosen = random.Random(f"{seed}:{UNKNOWN}:{split}").sample(others[split], count)
        task += [replace(clip, label=UNKNOWN) for clip in chosen]
    silence_counts = {
        split: math.ceil(keyword_counts[split] * silence_fraction) for split in SPLITS
    }
    if any(silence_counts.values()):
        if silence_dir is None:
            raise ValueError("silence_dir: where to write the _silence_ clips")
        task += silence_clips(
            root / BACKGROUND, silence_counts, silence_dir, sample_rate, clip_seconds, seed
        )

    def counted(split: str) -> str:
        labels = [clip.label for clip in task if clip.split == split]
        unknown, silence = labels.count(UNKNOWN), labels.count(SILENCE)
        return f"{split} {len(labels) - unknown - silence} + {unknown} + {silence}"

    log.info(
        "%s: the keyword task on %d words; clips of the words + %s + %s: %s",
        root,
        len(words),
        UNKNOWN,
        SILENCE,
        ", ".join(counted(split) for split in SPLITS),
    )
    return Listing(str(root), task)


def silence_clips(
    background: Path,
    counts: dict[str, int],
    silence_dir: Path,
    sample_rate: int,
    clip_seconds: float,
    seed: int,
) -> list[Clip]:
    """`counts[split]` `_silence_` clips of that split, cut from the sounds in `background`
    and written (once) below `silence_dir`.

    Each sound's length is shared out among the splits in proportion to their counts, so no
    stretch of background noise is in two splits; each clip is a `clip_seconds` slice at a
    random place in its split's stretch of a random sound, times a random gain in
    (0, MAX_SILENCE_GAIN], or zeros (one training clip in ZERO_SILENCE_EVERY). The folder is
    named by a digest of the sounds and every parameter: the same data and settings find the
    same files, and a change writes new ones.
    """
    sounds = audio_files_below(background) if background.is_dir() else []
    if not sounds:
        raise DatasetError(
            f"{background}: no background sounds; the {SILENCE} clips of the keyword task "
            "are cut from them (or set data.silence_fraction=0)"
        )
    digest = hashlib.blake2b(digest_size=8)
    for part in (_SILENCE_VERSION, sample_rate, clip_seconds, seed, sorted(counts.items())):
        digest.update(repr(part).encode())
    for sound in sounds:
        digest.update(f"{sound.name}:{file_digest(sound)[0]}".encode())
    folder = silence_dir / digest.hexdigest()
    plan = [(split, n) for split in SPLITS for n in range(counts.get(split, 0))]
    paths = [folder / split / f"silence_{n:05d}.wav" for split, n in plan]
    if not folder.is_dir():
        _write_silence(folder, background, sounds, counts, sample_rate, clip_seconds, seed)
    absent = [path for path in paths if not path.is_file()]
    if absent:
        raise DatasetError(
            f"{folder}: {len(absent)} of its {SILENCE} clips are gone ({absent[0]}, ...); "
            "delete the folder to have them written again"
        )
    return [
        Clip(path, SILENCE, split, origin=f"cut from {background}")
        for (split, _), path in zip(plan, paths, strict=True)
    ]


def _cut(
    rng: random.Random,
    waveforms: list[np.ndarray],
    background: Path,
    split: str,
    shares: tuple[float, float],
    length: int,
) -> np.ndarray:
    """A random slice of `length` samples (or the whole stretch, if shorter) from the stretch
    between the two `shares` of a random sound's length, at a random gain. Never zeros:
    drawn again where a sound is silent, since zeros are training's muted microphone, and a
    file of them in another split would be leakage."""
    start_share, end_share = shares
    for _ in range(_DRAWS):
        waveform = waveforms[rng.randrange(len(waveforms))]
        begin = math.floor(start_share * len(waveform))
        end = max(begin + 1, math.floor(end_share * len(waveform)))
        size = min(length, end - begin)
        offset = rng.randrange(begin, end - size + 1)
        gain = MAX_SILENCE_GAIN * (1.0 - rng.random())
        slice_ = (waveform[offset : offset + size] * gain).astype(np.float32)
        if slice_.any():
            return slice_
    raise DatasetError(
        f"{background}: {_DRAWS} slices of its sounds for {split} {SILENCE} clips were "
        "all zeros; give it sounds that are not silent (or set data.silence_fraction=0)"
    )


def _write_silence(
    folder: Path,
    background: Path,
    sounds: list[Path],
    counts: dict[str, int],
    sample_rate: int,
    clip_seconds: float,
    seed: int,
) -> None:
    """Write the clips into a fresh folder beside `folder`, then rename it into place: another
    process (a torchrun rank) writing the same files meanwhile leaves one whole copy."""
    waveforms = [read_audio(sound, sample_rate)[0] for sound in sounds]
    length = round(clip_seconds * sample_rate)
    total = sum(counts.values())
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as error:
        raise DatasetError(
            f"{folder.parent}: cannot write the {SILENCE} clips there "
            f"({error.strerror or error}); set system.cache_dir to a folder this user can write"
        ) from error
    try:
        start_share = 0.0
        for split in SPLITS:
            count = counts.get(split, 0)
            end_share = start_share + count / total
            rng = random.Random(f"{seed}:{SILENCE}:{split}")
            (staging / split).mkdir()
            for n in range(count):
                if split == "train" and n % ZERO_SILENCE_EVERY == 0:
                    slice_ = np.zeros(length, np.float32)
                else:
                    slice_ = _cut(
                        rng, waveforms, background, split, (start_share, end_share), length
                    )
                path = staging / split / f"silence_{n:05d}.wav"
                soundfile.write(path, slice_, sample_rate, subtype="FLOAT")
            start_share = end_share
        try:
            os.rename(staging, folder)
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("wrote %d %s clips to %s", total, SILENCE, folder)
