"""The epoch sampler: seeded order, rank shares, and class-balanced draws."""

from __future__ import annotations

import numpy as np
import torch

from audioclf.index import Clip
from audioclf.loading import EpochSampler
from conftest import (
    fsdd_clip,
    fsdd_manifest,
    write_manifest,
)


def test_epoch_sampler_order_depends_on_seed_and_epoch_only():
    first, again, other_epoch = EpochSampler(20, seed=3), EpochSampler(20, seed=3), None
    first.set_epoch(4)
    again.set_epoch(4)
    assert list(first) == list(again)
    other_epoch = EpochSampler(20, seed=3)
    other_epoch.set_epoch(5)
    assert list(first) != list(other_epoch)
    assert sorted(index for index, _ in first) == list(range(20))


def test_ranks_share_the_single_process_order():
    single = list(EpochSampler(10, seed=1))
    ranks = [list(EpochSampler(10, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert [len(share) for share in ranks] == [5, 5]
    interleaved = [key for pair in zip(*ranks, strict=True) for key in pair]
    assert interleaved == single


def test_balanced_sampler_draws_classes_equally():
    from audioclf.loading import balanced_weights

    clips = [Clip(fsdd_clip(0), "a")] * 90 + [Clip(fsdd_clip(1), "b")] * 10
    sampler = EpochSampler(100, seed=0, weights=balanced_weights(clips))
    drawn = [clips[index].label for epoch in range(20) for index, _ in _epoch(sampler, epoch)]
    assert 0.4 < drawn.count("b") / len(drawn) < 0.6


def test_the_main_jobs_balanced_sampler_weighs_multi_label_clips_by_their_labels(
    compose_config, tmp_path
):
    # Six clips tagged a and two tagged a;b: b is the rare label. The main job counted the
    # label *sets* as classes, so a;b clips weighed 1/2 against 1/6, not 5/16 against 1/8.
    from audioclf.pipeline import build_datasets, build_loaders
    from audioclf.settings import load_settings

    rows = [(f"1_jackson_{i}.wav", "a" if i < 16 else "a;b", "train") for i in range(10, 18)]
    rows += [(f"2_jackson_{i}.wav", "a;b", "val") for i in range(10, 12)]
    # Clips with no label weigh as one class together.
    rows += [(f"3_jackson_{i}.wav", "", "train") for i in range(10, 12)]
    path = write_manifest(tmp_path / "m.csv", ["path", "label", "split"], rows)
    settings = load_settings(
        compose_config(
            *fsdd_manifest(path),
            "data.multi_label=true",
            "training.class_balance=sampler",
        )
    )
    _, datasets, _ = build_datasets(settings)
    weights = build_loaders(settings, datasets, torch.device("cpu"))["train"].sampler.weights
    weight = {"a": 1 / 8, "a;b": (1 / 8 + 1 / 2) / 2, "": 1 / 2}
    expected = [weight[clip.label] for clip in datasets["train"].clips]
    np.testing.assert_allclose(weights, expected)


def _epoch(sampler: EpochSampler, epoch: int) -> list:
    sampler.set_epoch(epoch)
    return list(sampler)
