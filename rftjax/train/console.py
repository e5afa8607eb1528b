"""What `launch.train` shows a person, and the run's full log.

The console (stderr) gets plain lines: fm's sentences as they are (`step 69  ALARM ...`),
information as it is, `warning: ...` and `error: ...`. On a terminal the progress is one
updating bar (tqdm's; the lines print above it); elsewhere (CI, pipes, files) it is a line every
`log_every` steps, without carriage returns. Library chatter (Orbax's INFO lines, jax's backend
probe, transformers' advice) stays off the console.

The full log, in absl's format (level, date and time, thread, file:line) and with that chatter,
goes to `WORKDIR/train.log` once the run holds its workdir (`open_run_log`, called when the
run's logs open); what was logged before is kept until then, so a run refused at the start
writes nothing. A library user who installs no `Console` gets neither: `progress` and
`open_run_log` do nothing.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from typing import TextIO

from absl import logging as absl_logging
from tqdm import tqdm

LOG_NAME = "train.log"
# `extra=` of log calls: fm's sentences print as they are (no "warning: "); progress lines give
# way to the bar on a terminal; a record only for the log file (e.g. a crash's traceback, which
# Python prints on the console anyway).
STORY = {"story": True}
PROGRESS = {"progress": True}
FILE_ONLY = {"file_only": True}
BAR_FORMAT = "step {n}/{total} {percentage:3.0f}%|{bar}| {pace}"


def duration(seconds: float) -> str:
    """'7m30s' under an hour, '2h05m' from an hour on."""
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def pace_text(rate: float | None, eta: float | None) -> str:
    """'2.5 steps/s, ETA 7m30s' (under one step a second: '4.0 s/step, ...'); `rate` None (not
    measured yet): 'measuring speed'."""
    if rate is None:
        return "measuring speed"
    speed = f"{rate:.1f} steps/s" if rate >= 1 else f"{1 / rate:.1f} s/step"
    return f"{speed}, ETA {duration(eta)}"


def bar_line(
    step: int, total: int, rate: float | None, eta: float | None, *, note: str = "", width=80
) -> str:
    """The progress bar as the terminal shows it, `width` characters wide, e.g.
    'step 375/1500  25%|█████               | 2.5 steps/s, ETA 7m30s'. `note` follows the pace
    (e.g. 'reward 0.412')."""
    pace = pace_text(rate, eta) + (f", {note}" if note else "")
    return tqdm.format_meter(step, total, 0, ncols=width, bar_format=BAR_FORMAT, pace=pace)


class _Bar(tqdm):
    """tqdm's bar showing the trainer's pace (steady-state, without compilation) instead of
    tqdm's own rate."""

    pace = "measuring speed"

    @property
    def format_dict(self):
        return {**super().format_dict, "pace": self.pace}


class LibraryNoise(logging.Filter):
    """Keeps off the console the INFO chatter of Orbax (it logs every save) and of jax's backend
    probe (a missing TPU runtime on every CPU start), and transformers' warnings (advice about
    PyTorch and models that rftjax does not use); errors, and the others' warnings, pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("transformers"):
            return record.levelno >= logging.ERROR
        chatter = any(name in record.pathname for name in ("orbax", "xla_bridge"))
        return record.levelno >= logging.WARNING or not chatter


class _Plain(logging.Formatter):
    """The message alone; warnings and errors say so ('warning: ...'), fm's sentences do not."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if getattr(record, "story", False) or record.levelno < logging.WARNING:
            return text
        return ("error: " if record.levelno >= logging.ERROR else "warning: ") + text


class _ConsoleHandler(logging.Handler):
    """Plain lines on `stream`, written through tqdm so that they print above a bar."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console
        self.setFormatter(_Plain())
        self.addFilter(LibraryNoise())

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "file_only", False):
            return
        if getattr(record, "progress", False) and self.console.tty:
            return  # the bar shows it
        try:
            tqdm.write(self.format(record), file=self.console.stream)
        except Exception:  # noqa: BLE001 - logging's own convention
            self.handleError(record)


class _ToRoot(logging.Filter):
    """On transformers' package logger while transformers is imported (it then logs to its own
    stderr handler, not through the root logger, e.g. its advice that PyTorch is absent): hands
    each record to the root logger's handlers (the console's and the log file's) instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        logging.getLogger().handle(record)
        return False


class Console:
    """`with Console():` — the console and the run log of an entry point (see the module).

    stream: where the console goes (stderr); tty: show a bar (default: whether `stream` is a
    terminal)."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.stream.isatty() if tty is None else tty
        self.bar: _Bar | None = None
        self.handler = _ConsoleHandler(self)
        # Records before the run log opens; none is written out by the buffer itself.
        self.early = logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=1 << 30)
        self.file: logging.FileHandler | None = None
        self._replaced: list[logging.Handler] = []
        self._to_root = _ToRoot()
        self._transformers = None  # transformers.utils.logging once its records are routed

    def __enter__(self) -> Console:
        global _active
        root = logging.getLogger()
        absl_handler = absl_logging.get_absl_handler()  # absl's prefixed console lines
        self._replaced = [h for h in root.handlers if h is absl_handler]
        for handler in self._replaced:
            root.removeHandler(handler)
        root.addHandler(self.handler)
        root.addHandler(self.early)
        logging.getLogger("transformers").addFilter(self._to_root)
        self.route_transformers()
        _active = self
        return self

    def route_transformers(self) -> None:
        """Once transformers is imported (call after the import; nothing before): its own
        handler off and its records, its modules' included, through the root logger's handlers
        (transformers' API). Before, only records of its package logger are routed."""
        hf = sys.modules.get("transformers.utils.logging")
        if hf is None or self._transformers is not None:
            return
        logging.getLogger("transformers").removeFilter(self._to_root)
        hf.disable_default_handler()
        hf.enable_propagation()
        self._transformers = hf

    def __exit__(self, *exc) -> None:
        global _active
        _active = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        root = logging.getLogger()
        logging.getLogger("transformers").removeFilter(self._to_root)
        if self._transformers is not None:
            self._transformers.disable_propagation()
            self._transformers.enable_default_handler()
            self._transformers = None
        for handler in (self.handler, self.early, self.file):
            if handler is not None:
                root.removeHandler(handler)
                handler.close()
        for handler in self._replaced:
            root.addHandler(handler)

    def open_run_log(self, workdir: str, *, append: bool) -> None:
        """Starts `WORKDIR/train.log` (appended to by a resumed run) with what was logged so
        far."""
        if self.file is not None:
            return
        path = os.path.join(workdir, LOG_NAME)
        self.file = logging.FileHandler(path, mode="a" if append else "w", encoding="utf-8")
        self.file.setFormatter(absl_logging.PythonFormatter())
        root = logging.getLogger()
        root.removeHandler(self.early)
        self.early.setTarget(self.file)
        self.early.flush()
        self.early.close()
        root.addHandler(self.file)

    def progress(self, step: int, total: int, rate, eta, *, note: str = "") -> None:
        """On a terminal: the bar moves to `step` (back, after a rollback)."""
        if not self.tty:
            return
        if self.bar is None:
            self.bar = _Bar(
                total=total,
                initial=step,
                file=self.stream,
                bar_format=BAR_FORMAT,
                dynamic_ncols=True,
                mininterval=0.2,
            )
        self.bar.pace = pace_text(rate, eta) + (f", {note}" if note else "")
        self.bar.update(step - self.bar.n)


_active: Console | None = None


def progress(step: int, total: int, rate: float | None, eta: float | None, note="") -> None:
    """Moves the active console's bar (nothing without a `Console` or off a terminal)."""
    if _active is not None:
        _active.progress(step, total, rate, eta, note=note)


def open_run_log(workdir: str, *, append: bool) -> None:
    """Starts the active console's `WORKDIR/train.log` (nothing without a `Console`)."""
    if _active is not None:
        _active.open_run_log(workdir, append=append)
