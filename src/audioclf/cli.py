"""The Hydra entry point (`python main.py ...`, `audioclf ...`): reads the config, runs the job.

The configuration is read here and only here; the library below takes plain arguments. The
job (`audioclf.job`, with torch and the rest of the library) is imported once the config has
been composed and, without a checkpoint to adopt, checked: a mistyped key or a bad value is
reported in about a second, not after importing all of it.
"""

from __future__ import annotations

import errno
import logging
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from audioclf.overrides import from_launch_directory, normalise_override, unknown_key_hints
from audioclf.settings import CONFIG_DIR, ConfigError, load_settings

log = logging.getLogger("audioclf")


def run(config: DictConfig) -> dict[str, Any]:
    """The main job (`audioclf.job.run`): check the config, prepare the data, build the
    model, train, test, quantise, export. Returns the data summary with the results."""
    from audioclf import job

    return job.run(config)


def run_folds(config: DictConfig) -> dict[str, Any]:
    """`run.folds`: the main job once per test fold (`audioclf.job.run_folds`)."""
    from audioclf import job

    return job.run_folds(config)


def _is_user_error(error: BaseException) -> bool:
    """Whether `error` is the user's input to mend (reported in one line, exit status 2):
    a bad setting, file, checkpoint or model, or a full disk anywhere (events, metrics,
    exports)."""
    if isinstance(error, ConfigError):
        return True
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    from audioclf.job import USER_ERRORS  # imported already when the job raised it

    return isinstance(error, USER_ERRORS)


def _sigterm_received() -> bool:
    """Whether the job got SIGTERM (`audioclf.runtime.sigterm_received`; without the runtime
    imported, the job had not begun and no SIGTERM handler was set)."""
    runtime = sys.modules.get("audioclf.runtime")
    return runtime is not None and runtime.sigterm_received()


_job_started = False  # whether Hydra composed the config and called the job


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(config: DictConfig) -> float | None:
    global _job_started
    _job_started = True
    # Set before the settings are checked, so that DEBUG shows a bad setting's traceback too.
    level = OmegaConf.select(config, "system.log_level", default="INFO")
    if level in logging.getLevelNamesMapping():
        logging.getLogger().setLevel(level)
    try:
        hydra_config = HydraConfig.get()
        launched_in = hydra_config.runtime.cwd
        if hydra_config.job.chdir and Path.cwd() != Path(launched_in):
            for key in from_launch_directory(config, launched_in):
                log.debug("hydra.job.chdir: %s starts at %s", key, launched_in)
        if not OmegaConf.select(config, "run.checkpoint_path"):
            # Checked before the job's imports (a checkpoint's config is adopted first).
            load_settings(config)
        from audioclf.runtime import process_group, sigterm_stops_like_ctrl_c

        device = str(OmegaConf.select(config, "system.device", default="auto"))
        with sigterm_stops_like_ctrl_c(), process_group(device):
            _logs_in_rank_zeros_folder()
            if OmegaConf.select(config, "run.folds") is not None:
                return run_folds(config)["best"]
            summary = run(config)
    except KeyboardInterrupt:
        _stop_interrupted(config)
    except Exception as error:
        if _sigterm_received():
            _stop_interrupted(config)  # what failed followed from the SIGTERM
        if not _is_user_error(error):
            raise
        # One line for the user; the traceback only where it was asked for.
        log.debug("traceback", exc_info=True)
        from audioclf.audio import BadAudioError

        hint = ""
        if (
            isinstance(error, BadAudioError)
            and OmegaConf.select(config, "data.on_bad_file") == "error"
        ):
            hint = " (data.on_bad_file=skip leaves bad files out, and counts and lists them)"
        log.error("%s%s", error, hint)
        raise SystemExit(2) from error
    # A sweeper (`-m`, Optuna) optimises what the app returns: the best monitored value.
    return summary.get("training", {}).get("best")


def _stop_interrupted(config: DictConfig) -> NoReturn:
    """End the job after Ctrl-C or SIGTERM: one line (the traceback at DEBUG) and the shell's
    status for a process ended by that signal, 128 + its number."""
    log.debug("traceback", exc_info=True)
    terminated = _sigterm_received()
    log.error("%s", interrupted_message(config, "stopped by SIGTERM" if terminated else ""))
    raise SystemExit(143 if terminated else 130) from None


def _logs_in_rank_zeros_folder() -> None:
    """Under torchrun, every rank's log in rank 0's run folder (`cli_rank1.log`, ...), and the
    other ranks' own Hydra run folders, which held only that log and Hydra's config copies,
    removed: one folder a run under outputs/, as without torchrun. Ranks that share one
    folder (a `hydra.run.dir` given) keep it as it is."""
    import torch.distributed as dist

    from audioclf.runtime import shared_output_dir

    if not dist.is_initialized() or not HydraConfig.initialized():
        return
    hydra_config = HydraConfig.get()
    if hydra_config.job.chdir:
        return  # each rank works in its own folder: relative paths lead there
    own = Path(hydra_config.runtime.output_dir).resolve()
    rank, folder = dist.get_rank(), Path(shared_output_dir(str(own)))
    if rank == 0 or folder == own:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if not isinstance(handler, logging.FileHandler):
            continue
        log_file = Path(handler.baseFilename)
        if log_file.parent != own:
            continue
        moved = folder / f"{log_file.stem}_rank{rank}{log_file.suffix}"
        handler.close()
        folder.mkdir(parents=True, exist_ok=True)  # another node may not share rank 0's disk
        shutil.move(log_file, moved)
        follower = logging.FileHandler(moved, mode="a", encoding=handler.encoding)
        follower.setLevel(handler.level)
        follower.setFormatter(handler.formatter)
        for log_filter in handler.filters:
            follower.addFilter(log_filter)
        root.removeHandler(handler)
        root.addHandler(follower)
    if {path.name for path in own.iterdir()} <= {".hydra"}:
        shutil.rmtree(own)


def interrupted_message(config: DictConfig, how: str = "") -> str:
    """What an interrupted run leaves: the command that continues it, or, when it saved no
    checkpoint, that there is nothing to continue (`run.resume=true` would look for the
    newest earlier run instead). `how`: what interrupted it (Ctrl-C when empty). Under
    torchrun, rank 0 says it."""
    from audioclf.runtime import is_main_process

    interrupted = f"interrupted ({how})" if how else "interrupted"
    if not is_main_process():
        return interrupted
    output_dir = OmegaConf.select(config, "system.output_dir", default=None)
    saved = output_dir is not None and any(Path(output_dir).rglob("last.pth"))
    if not saved and not OmegaConf.select(config, "run.resume", default=False):
        return (
            f"{interrupted} before the first epoch ended: no checkpoint was saved, so there "
            "is nothing to resume; the same command starts the run again"
        )
    command = resume_command()
    if command.startswith("torchrun --nnodes="):
        command += " (on each node, with the rendezvous options it started with)"
    return (
        f"{interrupted}; checkpoints are written whole or not at all, so the run continues "
        f"from its last finished epoch with: {command}"
    )


def resume_command() -> str:
    """The command that continues this run: its own overrides (a resumed run must train with
    the settings it began with) and run.resume=true; under torchrun, a torchrun command with
    as many processes (on more than one node, the rendezvous options are the user's)."""
    program = sys.argv[0]
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        nodes = int(os.environ["WORLD_SIZE"]) // processes
        words = ["torchrun", *([f"--nnodes={nodes}"] if nodes > 1 else [])]
        words += [f"--nproc_per_node={processes}"]
        words += ["-m", "audioclf"] if program.endswith("__main__.py") else [program]
    elif program.endswith("__main__.py"):
        words = ["python", "-m", "audioclf"]
    elif program.endswith(".py"):
        words = ["python", program]
    else:
        words = [Path(program).name]  # the audioclf console script
    overrides = []
    if HydraConfig.initialized():
        given = HydraConfig.get().overrides
        overrides = [*given.task, *given.hydra]  # hydra.run.dir: where run.resume=true looks
    overrides = [o for o in overrides if not o.startswith(("run.resume=", "hydra.mode="))]
    return shlex.join([*words, *overrides, "run.resume=true"])


def main() -> None:
    """Console entry point."""
    sys.argv[1:] = [normalise_override(argument) for argument in sys.argv[1:]]
    try:
        _hydra_main()
    except SystemExit as stop:
        # Hydra refused the command line before the job began: a mistyped key, most often.
        if stop.code == 1 and not _job_started:
            for line in unknown_key_hints(sys.argv[1:]):
                print(line, file=sys.stderr)
        raise
