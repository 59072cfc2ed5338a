"""Hydra-style multirun: ``python pretrain.py -m precision.recipe=bf16,nvfp4 train.seed=1,2``.

Expansion follows Hydra's basic sweeper: every override whose value is a sweep (``a,b``,
``choice(a,b)``, ``range(1,4)``) is expanded with Hydra's own override parser and the jobs are
the Cartesian product, in command-line order. Each job runs as its own ``pretrain.py`` process (one
process, or ``torchrun --standalone --nproc_per_node=N`` with ``--nproc N``), one after another.

Directories: the sweep directory is ``run_dir=DIR`` (default ``multirun/<UTC date>/<UTC time>``,
Hydra's layout), and each job's run directory is ``DIR/<job name>``, the job name being the swept
overrides joined like Hydra's ``override_dirname`` (``precision.recipe=bf16,train.seed=1``; ``/``
becomes ``_``). The name holds only the swept keys (a key is swept when its value is a list, also
of one value: ``train.seed=choice(1)``), so a job keeps its directory when the sweep is started
again with values added to a swept key or with other fixed overrides (e.g. more steps).

Resume: starting the same sweep again (same ``run_dir``) skips every finished job (its
``result.json`` says the run ended without a signal at its last step) and restarts every other one
in its directory, where ``pretrain.py`` resumes from the newest checkpoint. ``DIR/sweep.json``
records each job's overrides, directory and status; ``DIR/<job>/sweep.log`` its output.

Every job's config is composed and validated before the first job starts (a bad value in any
job exits 2 and launches nothing).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from nvfp4_megatron.cli.compose import ConfigError, compose_config

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN = ROOT / "pretrain.py"


@dataclass(frozen=True)
class Job:
    name: str                  # directory name under the sweep directory
    overrides: tuple[str, ...]  # every override of this job (swept and fixed), no run_dir


def expand(overrides: Sequence[str]) -> tuple[list[Job], str | None]:
    """The jobs of a sweep and the ``run_dir`` override's value (the sweep directory), if any."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as exc:  # Hydra's OverrideParseException and friends
        raise ConfigError(f"invalid override: {exc}") from exc
    lists: list[list[tuple[str, str, bool]]] = []
    sweep_dir = None
    for ov in parsed:
        key = ov.get_key_element()
        if key.lstrip("+~") == "run_dir":
            if ov.is_sweep_override():
                raise ConfigError(f"{ov.input_line!r}: run_dir is the sweep directory and cannot "
                                  "be swept")
            sweep_dir = ov.get_value_element_as_str()
            continue
        if ov.is_sweep_override():
            if not ov.is_discrete_sweep():
                raise ConfigError(f"{ov.input_line!r}: interval sweeps need a sweeper plugin "
                                  "(Optuna, Ax); list the values (a,b,c) or use range(start,stop)")
            lists.append([(f"{key}={v}", f"{key}={v}", True) for v in ov.sweep_string_iterator()])
        else:
            lists.append([(ov.input_line, ov.input_line, False)])
    jobs, names = [], set()
    for combo in itertools.product(*lists) if lists else [()]:
        swept = [name for name, _, is_sweep in combo if is_sweep]
        name = ",".join(swept).replace("/", "_") or "job"
        if len(name.encode()) > 200:  # file-name limit: keep a readable head and a digest
            import hashlib

            name = name[:160] + "-" + hashlib.sha256(name.encode()).hexdigest()[:16]
        if name in names:
            raise ConfigError(f"two jobs of the sweep would share the directory {name!r}; "
                              "a value is listed twice")
        names.add(name)
        jobs.append(Job(name=name, overrides=tuple(ov for _, ov, _ in combo)))
    return jobs, sweep_dir


def run_dir_override(path: Path | str) -> str:
    """``run_dir='...'``: quoted, since job names hold ``=`` and ``,`` (Hydra's grammar)."""
    text = str(path)
    if "'" in text or "\\" in text:
        raise ConfigError(f"sweep job directory {text!r}: quotes and backslashes are not "
                          "supported in a sweep's run_dir or swept values")
    return f"run_dir='{text}'"


def default_sweep_dir() -> str:
    now = datetime.now(timezone.utc)
    return str(Path("multirun") / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S"))


def planned_iters(cfg) -> int:
    from nvfp4_megatron.cli.compose import to_plain
    from nvfp4_megatron.training.optim import total_iters

    c = to_plain(cfg)
    return total_iters(c["train"], seq_length=c["model"]["seq_length"])


def job_status(run_dir: Path, iters: int) -> str:
    """``done`` (result.json: ended without a signal at step >= iters), ``partial`` (a directory
    exists: resume), ``new``."""
    result = run_dir / "result.json"
    if result.is_file():
        try:
            r = json.loads(result.read_text())
        except (OSError, ValueError):
            r = {}
        if r.get("stopped_by_signal") is None and isinstance(r.get("iteration"), int) \
                and r["iteration"] >= iters:
            return "done"
    return "partial" if run_dir.exists() else "new"


def launch_command(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(PRETRAIN)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", str(PRETRAIN)]


_stop = {"signal": None}


def _on_signal(signum, _frame):
    _stop["signal"] = signal.Signals(signum).name
    child = _stop.get("child")
    if child is not None and child.poll() is None:
        child.send_signal(signal.SIGTERM)  # the trainer saves a checkpoint and exits 0


def run_job(job: Job, run_dir: Path, nproc: int, *, deadline: float | None = None) -> int:
    """Run one job to its end (or to ``deadline``, a ``time.time()`` value: the trainer then gets
    SIGTERM, saves a checkpoint and exits); its output goes to stdout and ``run_dir/sweep.log``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [*launch_command(nproc), *job.overrides, run_dir_override(run_dir)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(run_dir / "sweep.log", "a", encoding="utf-8") as log:
        log.write(f"\n# {datetime.now(timezone.utc).isoformat()} {' '.join(cmd)}\n")
        log.flush()
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, env=env, cwd=os.getcwd())
        _stop["child"] = child
        sent = False
        try:
            import selectors

            sel = selectors.DefaultSelector()
            sel.register(child.stdout, selectors.EVENT_READ)
            while True:
                if deadline is not None and not sent and time.time() >= deadline:
                    child.send_signal(signal.SIGTERM)
                    sent = True
                if sel.select(timeout=1.0):
                    line = child.stdout.readline()
                    if not line:
                        break
                    sys.stdout.write(line)
                    sys.stdout.flush()
                    log.write(line)
                    log.flush()
            return child.wait()
        finally:
            _stop["child"] = None


def run_sweep(overrides: Sequence[str], *, nproc: int = 1, deadline: float | None = None,
              log=print) -> int:
    """Compose and validate every job, then run them in order; exit code 0 when all are done."""
    jobs, sweep_dir = expand(overrides)
    root = Path(sweep_dir or default_sweep_dir())
    plans = []
    for job in jobs:
        try:
            cfg = compose_config([*job.overrides, run_dir_override(root / job.name)])
            if cfg.run_dir != str(root / job.name):
                raise ConfigError(f"run_dir {str(root / job.name)!r} came back as {cfg.run_dir!r}")
        except ConfigError as err:
            raise ConfigError(f"job {job.name!r}: {err}") from err
        plans.append((job, root / job.name, planned_iters(cfg)))
    root.mkdir(parents=True, exist_ok=True)
    log(f"[sweep] {len(jobs)} job(s) in {root} (resume: the same command with run_dir={root})")
    record = {"sweep_dir": str(root), "overrides": list(overrides), "nproc": nproc, "jobs": []}
    prev = {signal.SIGTERM: signal.getsignal(signal.SIGTERM),
            signal.SIGINT: signal.getsignal(signal.SIGINT)}
    for s in prev:
        signal.signal(s, _on_signal)
    failed = 0
    try:
        for i, (job, run_dir, iters) in enumerate(plans):
            entry = {"name": job.name, "overrides": list(job.overrides), "run_dir": str(run_dir),
                     "train_iters": iters}
            before = job_status(run_dir, iters)
            if before == "done":
                entry.update(status="done", skipped=True)
                log(f"[sweep] job {i + 1}/{len(jobs)} {job.name}: finished earlier, skipped")
            elif _stop["signal"] or (deadline is not None and time.time() >= deadline):
                entry.update(status=before, skipped=True)
            else:
                log(f"[sweep] job {i + 1}/{len(jobs)} {job.name}: "
                    + ("resuming" if before == "partial" else "starting") + f" in {run_dir}")
                rc = run_job(job, run_dir, nproc, deadline=deadline)
                status = job_status(run_dir, iters)
                if status != "done" and not (_stop["signal"] or (
                        deadline is not None and time.time() >= deadline)):
                    status = "failed"
                    failed += 1
                entry.update(status=status, exit_code=rc)
                log(f"[sweep] job {i + 1}/{len(jobs)} {job.name}: {status} (exit code {rc})")
            record["jobs"].append(entry)
            (root / "sweep.json").write_text(json.dumps(record, indent=2) + "\n")
    finally:
        for s, h in prev.items():
            signal.signal(s, h)
    done = sum(e["status"] == "done" for e in record["jobs"])
    log(f"[sweep] {done}/{len(jobs)} done, {failed} failed"
        + (f", stopped by {_stop['signal']}" if _stop["signal"] else "")
        + (f"; resume with run_dir={root}" if done < len(jobs) else ""))
    return 0 if done == len(jobs) else 1
