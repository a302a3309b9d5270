"""The output folder a training run owns: one train.py at a time (an OS lock), which run's results it holds
(`poolformer_run.json`), and what a new, resumed or overwriting run may do there."""

import json
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from accelerate.utils import broadcast_object_list
from filelock import FileLock, Timeout

from training.checkpoints import run_checkpoints, verify_checkpoint, write_json
from training.utils import UsageError

RUN_FILE = "poolformer_run.json"  # in the output folder: which run owns it
LOCK_FILE = ".train.lock"  # in the output folder: held by the train.py that works there
logger = logging.getLogger("train")


class OutputLock:
    """The output folder's lock (filelock's OS lock on `.train.lock`), held while train.py works there. `release`
    removes the file, then unlocks: a finished run leaves no lock file, and the folder it created for a refused
    command is removed again when it stayed empty."""

    def __init__(self, out: Path):
        self.out, self.created = out, not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(out / LOCK_FILE))

    def release(self, remove_empty_folder: bool = False):
        if self.lock.is_locked:
            (self.out / LOCK_FILE).unlink(missing_ok=True)  # while still held: no other holder can see this file
            self.lock.release(force=True)
        if remove_empty_folder and self.created:
            try:
                self.out.rmdir()
            except OSError:  # something was written there
                pass


def try_lock(out: Path) -> tuple:
    """(the held OutputLock, None) or (None, the error)."""
    lock = OutputLock(out)
    try:
        lock.lock.acquire(timeout=0)
    except Timeout:
        lock.release(remove_empty_folder=True)
        return None, (f"--output_dir {out} is in use by another train.py (it holds {out / LOCK_FILE}): wait for it to "
                      "end, or pick another --output_dir")
    return lock, None


@dataclass
class OutputClaim:
    """What `claim_output_dir` decided: the run that will own the folder, the checkpoint it resumes ('latest'
    resolved, its manifest verified), what of a previous run `take` clears, and the lock (main process only)."""

    out: Path
    run_id: str
    resume: Optional[Path]
    clear: list
    lock: Optional[OutputLock]

    def take(self, accelerator):
        """The folder becomes the run's (at the end of a successful setup): the previous run's results are cleared
        when --overwrite_output_dir allowed it, temporary folders of checkpoints that were never completed (a crash or
        a full disk mid-write) are removed, and `poolformer_run.json` names the run."""
        out = self.out
        accelerator.wait_for_everyone()  # every process has read the folder before the main process changes it
        if accelerator.is_main_process:
            if self.clear:
                logger.warning("--overwrite_output_dir: deleting the previous run's %s in %s", ", ".join(self.clear), out)
                keep = self.resume.resolve() if self.resume else None
                for old in (out / "checkpoints").glob("*"):
                    if keep is None or old.resolve() != keep:
                        shutil.rmtree(old, ignore_errors=True)
                shutil.rmtree(out / "model", ignore_errors=True)
                (out / "train_summary.json").unlink(missing_ok=True)
            for stale in (out / "checkpoints").glob(".tmp_step_*"):
                logger.warning("removing %s: a checkpoint that was never completed", stale)
                shutil.rmtree(stale, ignore_errors=True)
            write_json(out / RUN_FILE, {"run_id": self.run_id})
        accelerator.wait_for_everyone()

    def release(self, remove_empty_folder: bool = False):
        if self.lock is not None:
            self.lock.release(remove_empty_folder)


def claim_output_dir(accelerator, args) -> OutputClaim:
    """Lock the folder, then decide which run will own it. A new run in a folder holding another run's results is
    refused unless --overwrite_output_dir (which clears them); a resumed run continues its checkpoint's id, and
    resuming another run's checkpoint into a folder that holds a run is refused the same way. Nothing in the folder
    changes here: `OutputClaim.take` does that once the whole setup has succeeded, so a command refused in setup (a
    wrong flag, an unreadable dataset) leaves the folder as it was."""
    out = Path(args.output_dir)
    lock, error = try_lock(out) if accelerator.is_main_process else (None, None)
    error = broadcast_object_list([error])[0]
    if error:
        raise UsageError(error)
    try:
        run_id, resume, clear = _decide(out, args)
    except BaseException:
        if lock is not None:
            lock.release(remove_empty_folder=True)
        raise
    run_id = broadcast_object_list([run_id])[0]  # a new run's id is the main process's
    return OutputClaim(out, run_id, resume, clear, lock)


def _decide(out: Path, args) -> tuple:
    """(run id, checkpoint to resume or None, what to clear)."""
    owner = json.loads((out / RUN_FILE).read_text())["run_id"] if (out / RUN_FILE).exists() else None
    previous = [p.name for p in (out / RUN_FILE, out / "checkpoints", out / "model", out / "train_summary.json")
                if p.exists()]
    if not args.resume_from_checkpoint:
        if previous and not args.overwrite_output_dir:
            raise UsageError(
                f"--output_dir {out} holds another run ({', '.join(previous)}). Continue it with "
                "--resume_from_checkpoint latest, start over with --overwrite_output_dir, or pick another --output_dir."
            )
        return uuid.uuid4().hex, None, previous
    if args.resume_from_checkpoint == "latest":
        found = run_checkpoints(out, owner) if owner else []
        if not found:
            raise UsageError(f"--resume_from_checkpoint latest: {out} holds no checkpoint of its run")
        path = found[-1]
    else:
        path = Path(args.resume_from_checkpoint)
    if not path.is_dir():
        raise UsageError(f"--resume_from_checkpoint {path}: no such checkpoint folder")
    try:
        run_id = verify_checkpoint(path)["run_id"]
    except ValueError as e:
        raise UsageError(str(e)) from None
    if previous and owner != run_id and not args.overwrite_output_dir:
        raise UsageError(
            f"--output_dir {out} holds another run ({', '.join(previous)}); resuming {path} (run {run_id}) there "
            "would overwrite it. Pick another --output_dir, or --overwrite_output_dir to replace that run."
        )
    return run_id, path, previous if owner != run_id else []
