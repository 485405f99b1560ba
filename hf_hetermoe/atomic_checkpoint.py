"""Checkpoint folders that appear only complete: write into a staging folder, fsync, rename.

The Trainer writes `checkpoint-N` file by file; a process killed half-way leaves a folder that
`get_last_checkpoint` (and `resume_from_checkpoint=True`) then picks and fails on. HeterMoECallback makes
the Trainer write into `<run_dir>/.hetermoe-staging-N/checkpoint-N` instead (the `_save_checkpoint` override in
integrations/trainer_overrides.py) and, once every rank has written its files, this module fsyncs them and
renames the folder to `<run_dir>/checkpoint-N` (one rename on the same filesystem: atomic). Dot-prefixed
folders never match the Trainer's `checkpoint-*` patterns, so rotation and resume never see a staging folder.

Re-saving an existing step moves the old folder aside (`.hetermoe-replaced-checkpoint-N`) for the instant
between two renames; `recover` (run before every save, and when a Trainer starts) puts it back if the new
folder never arrived, and deletes staging folders left by interrupted saves.
"""

from __future__ import annotations

import logging
import os
import shutil

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".hetermoe-staging-"
REPLACED_PREFIX = ".hetermoe-replaced-"


def staging_root(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"{STAGING_PREFIX}{step}")


def prepare(run_dir: str, step: int) -> str:
    """Recover `run_dir`, then create an empty staging root for `step`; returns it."""
    recover(run_dir)
    root = staging_root(run_dir, step)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    return root


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file and folder under `path` (data first, then the folder entries that name it)."""
    for folder, _, files in os.walk(path, topdown=False):
        for name in files:
            _fsync_path(os.path.join(folder, name))
        _fsync_path(folder)


def publish(staged: str, final: str) -> bool:
    """Make the complete folder `staged` appear as `final`; returns False if another rank already did."""
    parent = os.path.dirname(final)
    if not os.path.isdir(staged):
        return False  # published by another process sharing this filesystem
    fsync_tree(staged)
    try:
        if os.path.exists(final):
            replaced = os.path.join(parent, REPLACED_PREFIX + os.path.basename(final))
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final, replaced)
            os.rename(staged, final)
            _fsync_path(parent)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.rename(staged, final)
            _fsync_path(parent)
    except FileNotFoundError:
        if os.path.isdir(final):
            return False  # lost a race with another process publishing the same folder
        raise
    root = os.path.dirname(staged)
    if os.path.basename(root).startswith(STAGING_PREFIX):
        shutil.rmtree(root, ignore_errors=True)
    return True


def recover(run_dir: str) -> list[str]:
    """Undo what an interrupted save left in `run_dir`; returns what was done (for the log)."""
    done: list[str] = []
    if not os.path.isdir(run_dir):
        return done
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if name.startswith(REPLACED_PREFIX):
            final = os.path.join(run_dir, name[len(REPLACED_PREFIX):])
            if os.path.exists(final):
                shutil.rmtree(path, ignore_errors=True)
                done.append(f"removed {name} (replaced by a complete {os.path.basename(final)})")
            else:
                os.rename(path, final)
                done.append(f"restored {os.path.basename(final)} (its replacement was never completed)")
        elif name.startswith(STAGING_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {name} (a save that was interrupted)")
    for line in done:
        logger.warning("hetermoe: %s: %s", run_dir, line)
    return done
