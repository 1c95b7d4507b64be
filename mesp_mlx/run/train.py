"""`mesp-mlx train`: one training run as a recipe, read top-down.

    prepare  model + LoRA, data, and the plan the engine executes (prepare.py)
    open     engine, optimizers, governor; the saved state on --resume (session.py)
    loop     the steps (loop.py)
    finish   save, report, test loss, plots, answers (finish.py)

The user's TrainConfig goes in and is never written into; what the run resolved is `run.plan.settings`.
"""

from __future__ import annotations

from pathlib import Path

from .. import backend
from ..adapters.formats import refuse_foreign
from ..distributed import Ranks
from ..io import check_writable, remove_stale_temp_files
from ..lock import FolderLock
from .checks import ConfigError
from .finish import TrainResult, finish, show_answers
from .loop import run_steps
from .prepare import PreparedRun, prepare_run
from .session import open_session
from .signals import Stopped, StopSignals


def train(cfg, log=print) -> TrainResult:
    """Train `cfg` (a TrainConfig) to the end, to a stop signal, or until the budget or a NaN stops it."""
    cfg.validate()
    ranks = Ranks.from_environment()  # size 1 unless started by mlx.launch (distributed.py)
    if cfg.batch_size % ranks.size:
        raise ConfigError(f"--batch-size {cfg.batch_size} (the global batch) is not divisible by the {ranks.size} "
                          "ranks of this run")
    if not ranks.is_writer:  # rank 0 alone writes and reports
        log = _silent
    adapter_path = Path(cfg.adapter_path)
    # a distributed run's ranks must stop after the same step, so there every first signal waits for the loop
    stop = StopSignals(log, at_once=ranks.size == 1)
    lock = None
    try:
        if ranks.is_writer:
            # one run per adapter folder (refused: FolderLocked, exit 75); a folder it had to create goes again
            # when the run is refused before writing into it
            lock = FolderLock(adapter_path, log).acquire()
            refuse_foreign(adapter_path, "mlx-lm", "--adapter-path")
            check_writable(adapter_path)
            removed = remove_stale_temp_files(adapter_path)
            if removed:
                log(f"[mesp-mlx] note: removed {len(removed)} temp file(s) that an interrupted save left in "
                    f"{adapter_path}")
        return _train(cfg, adapter_path, stop, log, ranks)
    except Stopped as e:  # before step 1: nothing of this run to save
        log(f"[mesp-mlx] {e} before step 1; nothing was trained (complete files only were written)")
        return TrainResult(adapter_path, [], [], [], e.status)
    finally:
        stop.restore()
        if lock is not None:
            lock.release()


def _train(cfg, adapter_path: Path, stop: StopSignals, log, ranks: Ranks) -> TrainResult:
    run = prepare_run(cfg, ranks, log)
    log(_banner(run, ranks))
    s = run.settings
    answers_before = show_answers(run.prep, s.demo_prompts, s.demo_max_tokens, "before", log) \
        if s.demo_prompts and ranks.is_writer else []
    run.prep.model.train()
    session = open_session(run, adapter_path, ranks, log)
    try:
        status = run_steps(session, stop, log)
    finally:
        if session.governor is not None:
            session.governor.close()
    try:
        return finish(session, status, stop, answers_before, log)
    except Stopped as e:  # after the final save (the test loss, plots, answers): what was trained is saved
        log(f"[mesp-mlx] {e} after the final save; the adapters in {session.adapter_file} are complete")
        return TrainResult(adapter_path, session.metrics.records, answers_before, [], e.status)


def _banner(run: PreparedRun, ranks: Ranks) -> str:
    s, prep = run.settings, run.prep
    return (f"[mesp-mlx] model {prep.path} | {len(prep.parts.layers)} blocks | method {s.method} | ranks "
            f"{ranks.size} | compute {prep.compute_path} | LoRA params {prep.n_trainable / 1e6:.3f} M | stream weights "
            f"{s.stream_weights} | checkpoints {s.checkpoint_storage} | lanes {s.lanes} | BLAS "
            f"{backend.blas_in_use().split(',')[0] or 'n/a'}")


def _silent(*args, **kwargs) -> None:
    pass
