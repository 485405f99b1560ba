"""Checkpoint folders that appear only complete: write into a staging folder, fsync, rename.

The Trainer writes `checkpoint-N` file by file; a process killed half-way leaves a folder that
`get_last_checkpoint` (and `resume_from_checkpoint=True`) then picks and fails on. HeterMoECallback makes
the Trainer write into `<run_dir>/.hetermoe-staging-N/checkpoint-N` instead and, once every rank has written
its files, this module fsyncs them and renames the folder to `<run_dir>/checkpoint-N` (one rename on the same
filesystem: atomic). Dot-prefixed folders never match the Trainer's `checkpoint-*` patterns, so rotation and
resume never see a staging folder.

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


# ---- the Trainer side ---------------------------------------------------------------------------------------
TRAINER_METHODS = ("_save_checkpoint", "_get_output_dir", "_push_from_checkpoint")
_MISSING = object()


def install_atomic_checkpoints(trainer) -> None:
    """Route `trainer._save_checkpoint` (on this instance only) through a staging folder; recover the output
    folder now, so `resume_from_checkpoint=True` never picks an interrupted save. Every attention rank calls
    this (it is collective: barriers keep the ranks' files and the rename in order)."""
    if trainer.args.should_save:
        recover(trainer.args.output_dir)
    trainer.accelerator.wait_for_everyone()
    original = trainer._save_checkpoint

    def save_checkpoint(model, trial):
        from transformers import trainer as hf_trainer
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        args = trainer.args
        run_dir = trainer._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
        final = os.path.join(run_dir, name)
        root = staging_root(run_dir, trainer.state.global_step)
        if args.should_save:
            prepare(run_dir, trainer.state.global_step)
        trainer.accelerator.wait_for_everyone()  # the staging root exists before any rank writes into it

        pushes: list[str] = []
        saved = {attr: trainer.__dict__.get(attr, _MISSING) for attr in ("_get_output_dir", "_push_from_checkpoint")}
        # The stock method builds its folder from _get_output_dir; pushing waits until the folder is final.
        trainer._get_output_dir = lambda trial=None: root
        trainer._push_from_checkpoint = pushes.append
        try:
            original(model, trial)
        finally:
            for attr, value in saved.items():
                if value is _MISSING:
                    trainer.__dict__.pop(attr, None)
                else:
                    trainer.__dict__[attr] = value
        trainer.accelerator.wait_for_everyone()  # every rank's files (rng_state_<i>.pth, ...) are written
        staged = os.path.join(root, name)
        if args.should_save:
            publish(staged, final)
        trainer.accelerator.wait_for_everyone()
        if args.local_process_index == 0 and os.path.isdir(staged):
            publish(staged, final)  # a node that does not share the saver's filesystem keeps its own files too

        best = trainer.state.best_model_checkpoint
        if best is not None and os.path.dirname(best) == root:
            trainer.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
        if pushes:
            trainer._push_from_checkpoint(final)
        if args.should_save:
            hf_trainer.rotate_checkpoints(output_dir=run_dir, save_total_limit=args.save_total_limit,
                                          best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=True)

    trainer._save_checkpoint = save_checkpoint
