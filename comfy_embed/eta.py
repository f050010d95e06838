"""The measured ETA and deadline admission.

:class:`Estimator` learns how long a workflow *shape*
(:func:`comfy_embed.prepare.shape.workflow_shape`) executes on this
instance: the median of its last ``window`` runs, as the executor thread
measured them. Before a shape has run here, a prior read once, off the loop,
from the reports of the shared task log's recent tasks stands in (each
report carries its ``shape`` and its ``execution`` seconds); a shape seen
nowhere takes the median of the last runs of any shape
(``COMFY_EMBED_ETA_FALLBACK=median``), or has no estimate (``none``). A
forecast with an unknown estimate in it is None: no ETA is made up.

:class:`Eta` is what the engine holds: it sets ``Job.estimate`` and
``Job.deadline`` as a job is queued, refuses one that cannot finish by its
deadline (:class:`~comfy_embed.errors.DeadlineUnmeetable`, 429), and
forecasts a queued job's start and finish from the jobs ahead of it, in the
order the executor will run them (``Executor.pending()``). Every
per-request step is a few dict lookups: no disk, no lock held while waiting.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable

from comfy_embed.errors import DeadlineUnmeetable
from comfy_embed.executor import Executor, Job, Outcome
from comfy_embed.observe.report import TaskReport
from comfy_embed.prepare.options import RunOptions
from comfy_embed.tasklog.files import read_final
from comfy_embed.tasklog.index import INDEX_FOLDER

__all__ = ["Estimator", "Eta", "Forecast", "load_prior", "parse_deadline", "queue_fields",
           "recent_reports"]

log = logging.getLogger(__name__)

#: Runs of any shape the fallback median is taken over.
_RECENT = 100
#: A deadline further than this (seconds, a year) is refused as a typo.
MAX_DEADLINE = 366 * 86400.0


class Estimator:
    """Execution seconds per shape: the median of its last ``window`` runs.

    ``observe`` runs on the executor thread, ``estimate`` on the loop: a
    lock guards the windows; each median is computed when a run is
    observed, so an estimate is one dict lookup.
    """

    def __init__(self, window: int = 20, fallback: str = "median") -> None:
        self.window = window
        self.fallback = fallback
        self._lock = threading.Lock()
        self._runs: dict[str, collections.deque[float]] = {}
        self._median: dict[str, float] = {}
        self._recent: collections.deque[float] = collections.deque(maxlen=_RECENT)
        self._recent_median: float | None = None
        #: Runs learned from the shared log's reports at boot (the prior).
        self.prior_runs = 0

    def observe(self, shape: str, seconds: float) -> None:
        """One run of ``shape`` executed for ``seconds``."""
        if not shape or not math.isfinite(seconds) or seconds < 0:
            return
        with self._lock:
            runs = self._runs.get(shape)
            if runs is None:
                runs = self._runs[shape] = collections.deque(maxlen=self.window)
            runs.append(seconds)
            self._median[shape] = statistics.median(runs)
            self._recent.append(seconds)
            self._recent_median = statistics.median(self._recent)

    def prior(self, records: Iterable[tuple[str, float]]) -> int:
        """Runs from before this instance (oldest first): taken as older
        than every run observed here, so a shape's own runs win. Returns how
        many were taken."""
        older: dict[str, list[float]] = {}
        every: list[float] = []
        for shape, seconds in records:
            if shape and math.isfinite(seconds) and seconds >= 0:
                older.setdefault(shape, []).append(seconds)
                every.append(seconds)
        with self._lock:
            for shape, times in older.items():
                mine = list(self._runs.get(shape, ()))
                runs = collections.deque(times + mine, maxlen=self.window)
                self._runs[shape] = runs
                self._median[shape] = statistics.median(runs)
            if every:
                self._recent = collections.deque(every + list(self._recent), maxlen=_RECENT)
                self._recent_median = statistics.median(self._recent)
            self.prior_runs += len(every)
        return len(every)

    def estimate(self, shape: str | None) -> float | None:
        """Expected execution seconds of ``shape``; the fallback when it has
        not run (None with ``fallback="none"``, or before any run at all)."""
        known = self._median.get(shape) if shape else None
        if known is not None:
            return known
        return self._recent_median if self.fallback == "median" else None

    def known(self, shape: str) -> bool:
        """Whether ``shape`` has runs of its own (here or in the prior)."""
        return shape in self._median

    @property
    def shapes(self) -> int:
        return len(self._median)


@dataclass(frozen=True)
class Forecast:
    """Where a job stands: ``position`` jobs ahead of it (the running one
    included); it should start in ``start`` and finish in ``finish`` seconds
    from now (None: some job on the way has no estimate)."""

    position: int
    start: float | None
    finish: float | None

    def fields(self) -> dict[str, Any]:
        """``{"eta_start", "eta_finish"}``: the keys every answer carries."""
        return {"eta_start": _round(self.start), "eta_finish": _round(self.finish)}


def queue_fields(forecast: Forecast | None) -> dict[str, Any]:
    """``{"position", "eta_start", "eta_finish"}`` of an answer (None each: unknown)."""
    if forecast is None:
        return {"position": None, "eta_start": None, "eta_finish": None}
    return {"position": forecast.position, **forecast.fields()}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class Eta:
    """The ETA of the jobs of one executor, and deadline admission."""

    def __init__(self, executor: Executor, estimator: Estimator,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.executor = executor
        self.estimator = estimator
        self._clock = clock

    def _expected(self, job: Job) -> float | None:
        """A job's expected execution seconds, as known now."""
        fresh = self.estimator.estimate(job.shape) if job.shape else None
        return fresh if fresh is not None else job.estimate

    def _left(self, job: Job, now: float) -> float | None:
        """Seconds the running ``job`` should still take (0 once over its estimate)."""
        expected = self._expected(job)
        if expected is None:
            return None
        started = job.started_at if job.started_at is not None else now
        return max(0.0, expected - (now - started))

    def _ahead(self, job: Job | None, joining: bool = False) -> tuple[int, float | None]:
        """How many jobs are ahead of ``job`` (queued, or ``joining``: about to
        be, where the queue would put it; None: behind all) and the seconds
        until it starts."""
        now = self._clock()
        queued = self.executor.pending(job if joining else None)
        running = self.executor.current
        if job is not None and job in queued:
            queued = queued[:queued.index(job)]
        total: float | None = 0.0
        if running is not None:
            total = self._left(running, now)
        for other in queued:
            expected = self._expected(other)
            total = None if total is None or expected is None else total + expected
        return len(queued) + (running is not None), total

    def forecast(self, job: Job) -> Forecast:
        """The forecast of ``job``: queued, running, or done (0 ahead)."""
        if job.state == "running":
            left = self._left(job, self._clock())
            return Forecast(0, 0.0, left)
        if job.state != "queued":
            return Forecast(0, 0.0, 0.0)
        position, start = self._ahead(job)
        expected = self._expected(job)
        finish = None if start is None or expected is None else start + expected
        return Forecast(position, start, finish)

    def backlog(self) -> float | None:
        """Seconds of work this instance holds (running plus queued): when a
        job queued now would start. None: some of it has no estimate."""
        return self._ahead(None)[1]

    def learn(self, job: Job, seconds: float, outcome: Outcome) -> None:
        """``Executor.on_executed``: a run that succeeded teaches its shape
        (a failed or cancelled one ended early: it says nothing of the shape)."""
        if outcome.success and job.cancel_reason is None:
            self.estimator.observe(job.shape, seconds)

    def admit(self, job: Job, options: RunOptions, report: TaskReport | None = None
              ) -> Callable[[], Forecast]:
        """Stamp ``job`` (its shape set) with its estimate and deadline (and
        the report with both, as the next boot's prior); raise
        DeadlineUnmeetable when the forecast says it cannot finish by
        ``options.deadline``. A job whose forecast is unknown is admitted:
        nothing says it will be late. Returns the job's live forecast."""
        # The job's variant hook knows N whichever way it was asked
        # (?variants= or extra_data.variants, v2's only way).
        runs = len(getattr(job.run, "variants", ())) or _runs(getattr(options, "variants", None))
        if runs > 1:  # N variants execute N times in one job: a shape of their own
            job.shape = f"{job.shape}x{runs}"
        job.estimate = self.estimator.estimate(job.shape)
        job.deadline = options.deadline
        if report is not None:
            report.shape, report.estimate = job.shape, job.estimate
        if options.deadline is not None:
            self._check(job, options.deadline)
        return functools.partial(self.forecast, job)

    def _check(self, job: Job, deadline: float) -> None:
        position, start = self._ahead(job, joining=True)
        if start is None or job.estimate is None:
            return
        finish = start + job.estimate
        left = deadline - self._clock()
        if finish <= left:
            return
        # Once the jobs ahead have run down by the excess it would fit; a job
        # longer than its whole deadline fits only on an idle instance.
        wait = finish - left if job.estimate <= left else start
        raise DeadlineUnmeetable(
            f"this job would finish in about {finish:.1f}s ({position} ahead, "
            f"{start:.1f}s until it starts, about {job.estimate:.1f}s to run); "
            f"its deadline is in {max(left, 0.0):.1f}s",
            retry_after=max(1, math.ceil(wait)),
            details={"position": position, **Forecast(position, start, finish).fields(),
                     "estimate": _round(job.estimate), "deadline_in": _round(left)})


def _runs(variants: Any) -> int:
    """How many executions a job makes (``RunOptions.variants``: N or N seeds)."""
    if isinstance(variants, int) and not isinstance(variants, bool):
        return max(variants, 1)
    return len(variants) if isinstance(variants, (tuple, list)) and variants else 1


def parse_deadline(value: str, *, wall: float | None = None, mono: float | None = None) -> float:
    """``X-Deadline`` / ``?deadline=``: seconds from now (``30``, ``2.5``) or
    an RFC 3339 time with its offset (``2026-01-01T12:00:00Z``), as a
    ``time.monotonic()`` value. ValueError saying what is wrong."""
    wall = time.time() if wall is None else wall
    mono = time.monotonic() if mono is None else mono
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    else:
        if not math.isfinite(seconds) or not 0 < seconds <= MAX_DEADLINE:
            raise ValueError(f"must be seconds > 0 and at most {MAX_DEADLINE:.0f}, "
                             f"or an RFC 3339 time; got {value[:64]!r}")
        return mono + seconds
    try:
        when = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise ValueError("must be seconds from now or an RFC 3339 time "
                         f"(2026-01-01T12:00:00Z); got {value[:64]!r}") from None
    if when.tzinfo is None:
        raise ValueError(f"an RFC 3339 time needs its offset (Z or +hh:mm); got {value[:64]!r}")
    seconds = when.timestamp() - wall
    if seconds > MAX_DEADLINE:
        raise ValueError(f"is more than {MAX_DEADLINE:.0f}s away; got {value[:64]!r}")
    return mono + seconds  # a past time stays past: unmeetable, not malformed


def recent_reports(root: Path, limit: int) -> list[tuple[str, float]]:
    """``(shape, execution seconds)`` of up to ``limit`` of the shared log's
    most recently finished successful tasks whose report has a shape, oldest
    first (blocking: call off the loop). Reads the done index's newest
    buckets and each task's ``final`` file, nothing else."""
    done = Path(root) / INDEX_FOLDER / "done"
    try:
        buckets = sorted((n for n in os.listdir(done) if n.isdigit()), key=int, reverse=True)
    except OSError:
        return []
    found: list[tuple[str, float]] = []
    read = 0
    for bucket in buckets:
        try:
            names = sorted(os.listdir(done / bucket), reverse=True)
        except OSError:
            continue
        for task_id in names:
            if read >= 4 * limit or len(found) >= limit:
                return found[::-1]
            read += 1
            record = _report_record(root / task_id)
            if record is not None:
                found.append(record)
    return found[::-1]


def _report_record(folder: Path) -> tuple[str, float] | None:
    final = read_final(folder)
    data = (final.event or {}).get("data") if final is not None else None
    if not isinstance(data, dict) or data.get("status") != "success":
        return None
    report = data.get("report")
    if not isinstance(report, dict):
        return None
    shape, seconds = report.get("shape"), report.get("execution")
    if isinstance(shape, str) and shape and isinstance(seconds, (int, float)) and seconds > 0:
        return shape, float(seconds)
    return None


def load_prior(estimator: Estimator, root: Path, limit: int) -> None:
    """Read the prior into ``estimator`` in a daemon thread (boot must not wait)."""
    if limit <= 0:
        return

    def load() -> None:
        try:
            taken = estimator.prior(recent_reports(root, limit))
            log.info("eta: %d runs of %d shapes read from the task log's reports",
                     taken, estimator.shapes)
        except Exception:
            log.exception("eta: reading the task log's reports failed; no prior")

    threading.Thread(target=load, name="eta-prior", daemon=True).start()
