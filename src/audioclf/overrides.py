"""Command-line overrides: rewritten as Hydra's grammar takes them, composed into a run's
config from Python as the command line composes it, and, when Hydra refuses a key, the known
keys it was probably meant to be."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from audioclf.settings import CONFIG_DIR
from audioclf.typed_config import ConfigError, close_matches

_LIST_INDEX = re.compile(r"\[(\d+)\]")
_BARE_EQUALS = re.compile(r"(?<!\\)=")


def normalise_override(argument: str) -> str:
    """Rewrite an override as Hydra's grammar takes it.

    List indices in the key: `a.b[0].c=1` -> `a.b.0.c=1` (Hydra reaches list items only as
    `.0`; users write `[0]`). An `=` in an unquoted value is escaped: PANNs' checkpoints are
    named `Cnn14_mAP=0.431.pth`, and Hydra's grammar stops at a bare `=` in a value.
    """
    if argument.startswith("-") or "=" not in argument:
        return argument
    key, value = argument.split("=", 1)
    if not value.startswith(("'", '"')):
        value = _BARE_EQUALS.sub(r"\\=", value)
    return _LIST_INDEX.sub(r".\1", key) + "=" + value


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The config that `python main.py *overrides` runs, composed for `audioclf.job.run` in
    Python.

    Overrides are written as on the command line (`augmentations.audio.transforms[0].p=0.5`,
    `model.params.pretrained_path=Cnn14_mAP=0.431.pth`). Unless one sets `system.output_dir`,
    the run gets a folder of its own as the command line's does (`hydra.run.dir`,
    `outputs/<date>/<time>` below the working directory); on the command line Hydra fills that
    key in, and outside it nothing would. A key that no option has, or an option that does not
    exist, is a ConfigError naming what it was probably meant to be.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    arguments = [normalise_override(override) for override in overrides]
    outer = GlobalHydra.instance().hydra  # an application's own Hydra, set up around this call
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            config = compose("config", overrides=arguments, return_hydra_config=True)
    except HydraException as error:
        hints = unknown_key_hints(arguments)
        # Hydra's own message (an option that does not exist: the options there are), without
        # its search path, which names this package's folders, not the user's mistake.
        message = "; ".join(hints) or str(error).split("\nConfig search path")[0].strip()
        raise ConfigError(message) from error
    finally:
        if outer is not None:
            GlobalHydra.instance().initialize(outer)
    with open_dict(config):
        if "system.output_dir" not in override_keys(arguments):
            # Absolute, as Hydra's: the folder stays put if the caller changes directory.
            config.system.output_dir = str(Path(config.hydra.run.dir).absolute())
        del config["hydra"]
    return config


#: The keys that name files or folders (`system.output_dir` when given: Hydra's own is
#: absolute; each of a section's values, for `data.manifest` per split), and in each audio
#: augmentation, its options named `*_path`.
PATH_KEYS = (
    "system.output_dir",
    "system.cache_dir",
    "data.root",
    "data.manifest",
    "model.params.pretrained_path",
    "teacher_model.checkpoint_path",
    "run.checkpoint_path",
    "run.resume",
)


def from_launch_directory(config: DictConfig, launch_dir: str | Path) -> list[str]:
    """Make the relative paths in `config` start at `launch_dir`, the directory the command
    ran in: under `hydra.job.chdir=true` the job runs in its output folder, where
    `data.root=data/clips` would not be found and a relative `system.cache_dir` would start
    an empty cache in every run. A value interpolated from another key (`${data.root}/...`)
    follows that key. Returns the keys changed."""
    keys = []
    for key in PATH_KEYS:
        value = OmegaConf.select(config, key)
        if isinstance(value, DictConfig | ListConfig):  # data.manifest per split, or lists
            keys += _leaf_keys(OmegaConf.to_container(value, resolve=False), key)
        elif value is not None:
            keys.append(key)
    transforms = OmegaConf.select(config, "augmentations.audio.transforms") or []
    keys += [
        f"augmentations.audio.transforms.{index}.{option}"
        for index, transform in enumerate(transforms)
        if isinstance(transform, DictConfig)
        for option in transform
        if str(option).endswith("_path")
    ]
    changed = []
    for key in keys:
        parent_key, _, name = key.rpartition(".")
        parent = OmegaConf.select(config, parent_key)
        leaf = int(name) if isinstance(parent, ListConfig) else name
        if OmegaConf.is_interpolation(parent, leaf):
            continue
        value = parent[leaf]
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            parent[leaf] = str(Path(launch_dir) / value)
            changed.append(key)
    return changed


def config_groups() -> list[str]:
    """The config groups (`data`, `features`, `model`, `teacher_model`)."""
    return sorted(path.name for path in CONFIG_DIR.iterdir() if path.is_dir())


def option_keys() -> tuple[list[str], dict[str, dict[str, list[str]]]]:
    """Every key of the config, composed by Hydra as a run would compose it with each option
    of each group: the keys outside the groups, and by group and option the keys under the
    group (`model` -> `panns_cnn14` -> [`model.name`, `model.params.n_mels`, ...]), each in
    the config's order."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    groups = config_groups()
    common: dict[str, None] = {}
    by_option: dict[str, dict[str, list[str]]] = {group: {} for group in groups}
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        for group in groups:
            for option in sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml")):
                config = compose("config", overrides=[f"{group}={option}"])
                keys = list(_leaf_keys(OmegaConf.to_container(config, resolve=False)))
                by_option[group][option] = [k for k in keys if k.startswith(f"{group}.")]
                common.update(dict.fromkeys(k for k in keys if k.split(".")[0] not in groups))
    return list(common), by_option


def chosen_options(arguments: Iterable[str]) -> dict[str, str | None]:
    """Each group's option for a command line: config.yaml's defaults, then `group=option`
    (or `+group=`, `++group=`) and `~group` overrides (None: no option, as `teacher_model`)."""
    groups = set(config_groups())
    chosen: dict[str, str | None] = {}
    primary = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "config.yaml"))
    for entry in primary.get("defaults", []):
        if isinstance(entry, dict):
            chosen.update((group, option) for group, option in entry.items() if group in groups)
    for argument in arguments:
        key, _, option = argument.lstrip("+").partition("=")
        if key.startswith("~") and key[1:] in groups:
            chosen[key[1:]] = None
        elif key in groups and option:
            chosen[key] = None if option == "null" else option
    return chosen


def _leaf_keys(value: Any, key: str = "") -> Iterator[str]:
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for name, child in items:
        child_key = f"{key}.{name}" if key else str(name)
        if isinstance(child, dict | list) and child:
            yield from _leaf_keys(child, child_key)
        else:
            yield child_key


def override_keys(arguments: Iterable[str]) -> list[str]:
    """The keys that plain overrides (`key=value`, not `+key`, `~key` or a group's option)
    set, leaving Hydra's own (`hydra.*`) out."""
    groups = set(config_groups())
    keys = []
    for argument in arguments:
        if argument.startswith(("-", "+", "~")) or "=" not in argument:
            continue
        key = argument.split("=", 1)[0]
        if key in groups or key.startswith("hydra.") or "/" in key:
            continue
        keys.append(key)
    return keys


def unknown_key_hints(arguments: Sequence[str]) -> list[str]:
    """A line for each override whose key no config option has, naming the keys it was
    probably meant to be (`training.batchsize` -> `training.batch_size`), or, for a list
    item past the end, the items the list has; none when every key is known."""
    keys = override_keys(arguments)
    if not keys:
        return []
    common, by_option = option_keys()
    chosen = chosen_options(arguments)
    # The keys of the config this command line composes, when its options exist.
    known = set(common)
    for group, option in chosen.items():
        known.update(by_option.get(group, {}).get(option or "", []))
    hints = []
    for key in keys:
        if not _is_known(key, known):
            group = key.split(".")[0]
            other = _other_option_hint(key, group, chosen.get(group), by_option.get(group, {}))
            hints.append(other or _hint(key, known))
    return hints


def _other_option_hint(
    key: str, group: str, option: str | None, options: dict[str, list[str]]
) -> str | None:
    """For a key that other options of its group have (`model.params.width_mult` with
    model=panns_cnn14): which, and the keys beside it that the chosen option has."""
    having = [name for name, keys in options.items() if _is_known(key, set(keys))]
    if not having:
        return None
    if option is None:
        return f"{key}: no {group} is chosen; choose one first: {group}={'|'.join(having)}"
    if option not in options:
        return None  # Hydra names the option it cannot find
    parent = key.rsplit(".", 1)[0]
    beside = dict.fromkeys(
        k.removeprefix(f"{parent}.").split(".")[0]
        for k in options[option]
        if k.startswith(f"{parent}.")
    )
    return f"{key}: not a key of {group}={option}, but of {group}={', '.join(having)}" + (
        f" ({parent} of {option}: {', '.join(beside)})" if beside else ""
    )


def _is_known(key: str, known: set[str]) -> bool:
    return key in known or any(k.startswith(f"{key}.") for k in known)


def _hint(key: str, known: set[str]) -> str:
    parts = key.split(".")
    for position, part in enumerate(parts):
        prefix = ".".join(parts[:position])
        if part.isdigit() and prefix and _is_known(prefix, known):
            items = {k.split(".")[position] for k in known if k.startswith(f"{prefix}.")}
            if part not in items:
                return f"{key}: {prefix} has {len(items)} items, 0 to {len(items) - 1}"
    close = close_matches(key, known)
    return f"{key}: no such key" + (f"; did you mean {' or '.join(close)}?" if close else "")
