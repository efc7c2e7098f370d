"""The Hydra config tree: every option composes, typos stop at start, CLI overrides work."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from audioclf.cli import CONFIG_DIR
from audioclf.overrides import compose_config, normalise_override, unknown_key_hints
from audioclf.pipeline import build_model, feature_params
from audioclf.settings import ConfigError, load_settings
from conftest import REPO

GROUPS = ["model", "teacher_model", "data", "features"]
MODELS = [
    "efficientnet_v2",
    "efficientnet_v2_qat",
    "efficientnet_v2_micro",
    "ghost_efficientnet_v2",
    "panns_cnn14",
    "panns_mobilenetv1",
    "panns_mobilenetv2",
]
OPTIONS = [
    (group, path.stem) for group in GROUPS for path in sorted((CONFIG_DIR / group).glob("*.yaml"))
]


def test_primary_config_has_every_section(compose_config):
    config = compose_config()
    assert {"system", "data", "model", "training", "run", "augmentations"} <= set(config)


@pytest.mark.parametrize("group", ["model", "teacher_model"])
def test_model_groups_hold_every_architecture(group):
    assert sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml")) == sorted(MODELS)


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_group_option_composes(compose_config, group, option):
    overrides = [f"{group}={option}"]
    if group == "teacher_model":
        overrides.append("teacher_model.checkpoint_path=teacher.pth")
    if option in ("folder", "manifest"):
        overrides.append("data.root=somewhere")
        overrides.append("data.manifest=somewhere.csv")
    if option in ("esc50", "urbansound8k", "speech_commands", "speech_commands_12", "fsd50k"):
        overrides.append("data.root=somewhere")
    config = compose_config(*overrides)
    section = config[group]
    if group in ("model", "teacher_model"):
        assert section.name.replace("_qat", "") in option
        assert "params" in section
    elif group == "features":
        assert section.preset == option
        assert feature_params(load_settings(config)).n_mels > 0
    elif group == "data":
        assert section.name == option
        assert section.format in option or section.format == "manifest"
        if section.format == "manifest":
            assert load_settings(config).data.manifest.startswith("somewhere")
    else:
        assert section.format == option


@pytest.mark.parametrize("option", MODELS)
def test_every_model_option_builds_its_architecture(compose_config, option):
    config = compose_config(f"model={option}")
    model = build_model(load_settings(config).model, num_classes=4, n_mels=64)
    assert model.num_classes == 4
    assert type(model).__module__.startswith("audioclf.model.")


def test_teacher_model_matches_its_model_option(compose_config):
    config = compose_config("teacher_model=panns_cnn14", "teacher_model.checkpoint_path=t.pth")
    assert config.teacher_model.params == compose_config("model=panns_cnn14").model.params


def test_unknown_override_key_stops_at_start(compose_config):
    with pytest.raises(ConfigCompositionException, match="batchsize"):
        compose_config("training.batchsize=3")


def test_unknown_key_added_to_a_section_is_named(compose_config):
    config = compose_config("+data.sample_rte=16000")
    with pytest.raises(ConfigError, match=r"data\.sample_rte"):
        load_settings(config)


def test_unknown_feature_parameter_is_named(compose_config):
    config = compose_config("+features.n_melz=40")
    with pytest.raises(ConfigError, match="n_melz"):
        load_settings(config)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.columns={path:a,label:b}", "data.columns maps manifest columns; data=fsdd"),
        ("data.columns={label:b}", "missing key data.columns.path"),
        ("data.columns={path:a,label:b,speaker:c}", r"unknown key\(s\) \['data.columns.speaker'\]"),
    ],
)
def test_data_columns_are_checked_at_start(compose_config, override, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(compose_config(override))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.classes=[a]", "data.classes has 1; a classifier needs at least 2"),
        ("data.classes=[a,b,a]", r"data.classes names \['a'\] twice"),
        ("data.classes=[1,'1']", r"data.classes names \['1'\] twice"),
        ("data.classes=[a,' ']", "data.classes has an empty name"),
        ("data.classes=[1.5,2]", r"data.classes\[0\] must be text or a whole number, not 1.5"),
    ],
)
def test_data_classes_are_checked_at_start(compose_config, override, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(compose_config(override))


def test_numbers_in_data_classes_are_the_labels_they_spell(compose_config):
    # FSDD's classes are the folders' digits: data.classes=[2,1] means "2", "1".
    data = load_settings(compose_config("data.classes=[2,1]")).data
    assert data.class_names == ["2", "1"]


@pytest.mark.parametrize("monitor", ["val_mAP", "val_roc_auc"])
def test_a_multi_label_monitor_on_multi_class_data_is_named(compose_config, monitor):
    with pytest.raises(ConfigError, match=rf"training.monitor={monitor} .*multi-label data only"):
        load_settings(compose_config(f"training.monitor={monitor}"))
    load_settings(compose_config(f"training.monitor={monitor}", "data.multi_label=true"))


def test_feature_override_replaces_the_preset_value(compose_config):
    config = compose_config("features=panns", "data.sample_rate=32000", "features.n_mels=128")
    params = feature_params(load_settings(config))
    assert (params.n_mels, params.frame_length, params.hop_length) == (128, 1024, 320)


def _main(*arguments: str) -> subprocess.CompletedProcess:
    """`python main.py ARGUMENTS` from the repository root, its output captured."""
    return subprocess.run(
        [sys.executable, "main.py", *arguments],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_augmentation_probability_override_from_the_cli():
    result = _main("augmentations.audio.transforms[0].p=0.125", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "p: 0.125" in result.stdout


def test_help_says_what_the_app_is_and_lists_the_groups():
    result = _main("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("audioclf: train, test, quantise and export")
    assert "model: efficientnet_v2, efficientnet_v2_micro, efficientnet_v2_qat," in result.stdout
    assert "audioclf-predict MODEL FILE_OR_DIR" in result.stdout
    assert "cli is powered by Hydra" not in result.stdout


def test_typo_on_the_command_line_fails_with_the_key_named():
    result = _main("training.batchsize=3")
    assert result.returncode == 1
    assert "training.batchsize: no such key; did you mean training.batch_size?" in result.stderr


MEANT = "no such key; did you mean"


@pytest.mark.parametrize(
    ("arguments", "hints"),
    [
        (["training.batchsize=3"], [f"training.batchsize: {MEANT} training.batch_size?"]),
        (["model=panns_cnn14", "features.fmax=1"], [f"features.fmax: {MEANT} features.fmax_hz?"]),
        (["training.lr=1", "+training.x=1", "hydra.job.name=j", "model=panns_cnn14"], []),
        # A key of another option of the group: which options have it, and the chosen one's.
        (
            ["model.params.ghost_ratio=3", "model=panns_mobilenetv1", "model.params.dropout=0"],
            [
                "model.params.ghost_ratio: not a key of model=panns_mobilenetv1, but of "
                "model=ghost_efficientnet_v2 (model.params of panns_mobilenetv1: n_mels, "
                "dropout, pretrained_path, freeze_backbone, gradient_checkpointing)"
            ],
        ),
        (
            ["teacher_model.checkpoint_path=t.pth"],
            [
                "teacher_model.checkpoint_path: no teacher_model is chosen; choose one first: "
                "teacher_model=efficientnet_v2|efficientnet_v2_micro|efficientnet_v2_qat|"
                "ghost_efficientnet_v2|panns_cnn14|panns_mobilenetv1|panns_mobilenetv2"
            ],
        ),
        (["teacher_model=panns_cnn14", "teacher_model.checkpoint_path=t.pth"], []),
        (
            ["augmentations.audio.transforms.7.p=0.5"],
            [
                "augmentations.audio.transforms.7.p: "
                "augmentations.audio.transforms has 5 items, 0 to 4"
            ],
        ),
        (["zzz.qqq=1"], ["zzz.qqq: no such key"]),
    ],
)
def test_an_unknown_key_is_named_with_the_keys_it_was_probably_meant_to_be(arguments, hints):
    assert unknown_key_hints(arguments) == hints


def test_an_unknown_key_added_with_plus_is_named_with_the_close_key(compose_config):
    with pytest.raises(
        ConfigError, match=r"\['training.batchsize'\]; did you mean training.batch_size"
    ):
        load_settings(compose_config("+training.batchsize=3"))


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("augmentations.audio.transforms[0].p=0.5", "augmentations.audio.transforms.0.p=0.5"),
        ("a.b[1][2]=x[3]", "a.b.1.2=x[3]"),
        ("training.epochs=5", "training.epochs=5"),
        ("--cfg", "--cfg"),
    ],
)
def test_list_index_in_an_override_key_becomes_a_dotted_index(argument, expected):
    assert normalise_override(argument) == expected


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        # PANNs' release names its checkpoints so; Hydra's grammar stops at a bare '='.
        ("model.params.pretrained_path=/m/Cnn14_mAP=0.431.pth", "/m/Cnn14_mAP=0.431.pth"),
        ("model.params.pretrained_path=/m/a\\=b=c.pth", "/m/a=b=c.pth"),
        ("model.params.pretrained_path='/m/x=1.pth'", "/m/x=1.pth"),
    ],
)
def test_an_equals_sign_in_a_value_reaches_the_config(compose_config, argument, value):
    config = compose_config("model=panns_cnn14", normalise_override(argument))
    assert config.model.params.pretrained_path == value


def test_compose_config_takes_overrides_as_the_command_line_does():
    config = compose_config(
        [
            "model=panns_cnn14",
            "model.params.pretrained_path=/m/Cnn14_mAP=0.431.pth",
            "augmentations.audio.transforms[0].p=0.5",
            "system.output_dir=/runs/one",
        ]
    )
    assert config.model.params.pretrained_path == "/m/Cnn14_mAP=0.431.pth"
    assert config.augmentations.audio.transforms[0].p == 0.5
    assert "hydra" not in config
    assert load_settings(config).system.output_dir == "/runs/one"


def test_compose_config_gives_each_run_a_folder_below_the_working_directory(tmp_path, monkeypatch):
    """Outside the command line nothing fills in `${hydra:runtime.output_dir}`: the config
    did not load."""
    monkeypatch.chdir(tmp_path)
    folders = [load_settings(compose_config()).system.output_dir for _ in range(2)]
    for folder in folders:
        relative = str(Path(folder).relative_to(tmp_path))
        assert re.fullmatch(r"outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d-\d{6}", relative)
    assert folders[0] != folders[1]


def test_compose_config_names_a_mistyped_key_and_a_missing_option():
    with pytest.raises(ConfigError, match=r"^training.epoch: no such key; did you mean training"):
        compose_config(["training.epoch=3"])
    with pytest.raises(ConfigError, match=r"Could not find 'model/nope'") as raised:
        compose_config(["model=nope"])
    assert "panns_cnn14" in str(raised.value)  # the options there are
    assert "search path" not in str(raised.value)


def test_compose_config_inside_an_applications_hydra_leaves_it_set_up():
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        assert compose_config(["training.epochs=3"]).training.epochs == 3
        assert compose("config", overrides=["training.epochs=4"]).training.epochs == 4


def test_the_default_dataset_is_the_bundled_fsdd_from_any_directory(tmp_path, monkeypatch):
    # `audioclf` run outside the repository stopped at "data.root: no such folder
    # 'data/fsdd/recordings'": the bundled dataset's path started at the current directory.
    import audioclf.settings
    from audioclf.pipeline import list_dataset

    monkeypatch.chdir(tmp_path)
    data = load_settings(compose_config()).data
    assert Path(data.root) == REPO / "data" / "fsdd" / "recordings"
    assert len(list_dataset(data).clips) == 3000
    # Installed without the repository (a wheel): below the current directory, as before.
    monkeypatch.setattr(audioclf.settings, "PROJECT_DATA_DIR", tmp_path / "site-packages")
    assert load_settings(compose_config()).data.root == "data/fsdd/recordings"
    # Given on the command line, a relative data.root still starts at the current directory.
    assert load_settings(compose_config(["data.root=clips"])).data.root == "clips"
