"""What a person watching a command reads: a header, one line per event, and a live status line.

On a terminal the status line (and the final stage's epoch bars) are tqdm bars redrawn in
place, the event lines printed above them; when the output is a file or a pipe (a log, CI)
nothing is redrawn: each event is one line, and the status is printed as a line of its own
every `STATUS_EVERY` seconds. tqdm draws the bars (a kept library; the project hand-draws no
escapes). Ray's own status tables, per-trial boxes and worker logs are behind `--verbose`
(`ray_quiet`, and the Tuner's `verbose` level in `search.run`).
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

STATUS_EVERY = 300.0  # seconds between status lines when the output is not a terminal
REDRAW_EVERY = 1.0    # seconds between redraws of the live status line
# Ray's logger that warns, on every plain local `ray.init`, that token authentication is on.
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def counted(n: int, word: str) -> str:
    """'1 configuration', '2 configurations': a count with its noun (plural by an s)."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def plan_text(top_k: int, seeds: int, epochs: int) -> str:
    """A final-stage plan as every line and table says it: '1 configuration x 2 seeds x 37 epochs'."""
    return f"{counted(top_k, 'configuration')} x {counted(seeds, 'seed')} x {counted(epochs, 'epoch')}"


def clock_text(seconds: float, hours: bool = False) -> str:
    """12:05, or 1:02:05 past an hour (or always with `hours`, to stand beside a clock that has them)."""
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h or hours else f"{rest // 60}:{rest % 60:02d}"


class Console:
    """Event lines and one live status line on `stream` (stdout by default).

    `live` (default: whether `stream` is a terminal) redraws the status line in place;
    otherwise `status` prints it as a line at most every `every` seconds.
    """

    def __init__(self, stream: TextIO | None = None, live: bool | None = None, every: float = STATUS_EVERY):
        self.stream = stream or sys.stdout
        self.live = is_terminal(self.stream) if live is None else live
        self.every, self._printed, self._text = every, -math.inf, ""
        self._bar: tqdm | None = None

    def event(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self.stream)  # above the live line, which is redrawn below it
        else:
            print(line, file=self.stream, flush=True)

    def status(self, text: str, *, force: bool = False) -> None:
        """Show `text` as the status: redrawn in place when live, else printed when due (or `force`)."""
        if text == self._text and not force:
            return
        self._text = text
        if self.live:
            if self._bar is None:
                self._bar = tqdm(total=0, file=self.stream, bar_format="{desc}", dynamic_ncols=True, leave=False)
            self._bar.set_description_str(text, refresh=True)
        elif force or time.monotonic() - self._printed >= self.every:
            self._printed = time.monotonic()
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class RunBars:
    """The final stage's runs: on a terminal one tqdm bar of epochs per run, else one line per epoch."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None):
        self.stream = stream or sys.stdout
        self.live = is_terminal(self.stream) if live is None else live
        self._bars: dict[str, tqdm] = {}

    def epoch(self, run: str, epoch: int, epochs: int, val_acc: float) -> None:
        if not self.live:
            print(f"{run} epoch {epoch}/{epochs}: PublicTest accuracy {val_acc:.4f}", file=self.stream, flush=True)
            return
        bar = self._bars.get(run)
        if bar is None:
            bar = self._bars[run] = tqdm(total=epochs, desc=run, unit="epoch", file=self.stream,
                                         position=len(self._bars), dynamic_ncols=True, leave=True)
        bar.total = epochs  # a run re-planned to fewer epochs
        bar.update(epoch - bar.n)
        bar.set_postfix_str(f"PublicTest {val_acc:.4f}")

    def note(self, line: str) -> None:
        if self._bars:
            tqdm.write(line, file=self.stream)  # above the bars, which are redrawn below it
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


class Tally:
    """A long job made of runs (the benchmarks): each finished run's line as an event, and a status
    "k/n runs done, elapsed, ~left" (redrawn on a terminal, else a line after each run)."""

    def __init__(self, total: int, what: str = "runs", stream: TextIO | None = None):
        self.console = Console(stream, every=0.0)
        self.total, self.what, self.done_count, self.started = total, what, 0, time.monotonic()
        self.console.status(self.text())

    def text(self) -> str:
        elapsed = time.monotonic() - self.started
        left = (f", ~{clock_text(elapsed / self.done_count * (self.total - self.done_count))} left"
                if 0 < self.done_count < self.total else "")
        return f"[{clock_text(elapsed)}] {self.done_count}/{self.total} {self.what} done{left}"

    def done(self, line: str) -> None:
        self.done_count += 1
        self.console.event(line)
        self.console.status(self.text(), force=True)

    def close(self) -> None:
        self.console.close()


def show_progress(event: dict, bars: RunBars) -> None:
    """Show one event a final run sent (`search.final_stage.retrain.retrain`'s `progress`): an epoch or a note."""
    if "epoch" in event:
        bars.epoch(event["run"], event["epoch"], event["epochs"], event["val_acc"])
    else:
        bars.note(event["note"])


def ray_quiet(verbose: bool) -> dict[str, Any]:
    """`ray.init` arguments (and a logger level) for how much of Ray reaches the console.

    Quiet (the default): the workers' output stays in Ray's session logs (`log_to_driver=False`),
    so Ray's "Checkpoint successfully created" lines, its repeated-log notices and the traceback of
    a trial stopped on purpose do not reach the console, and the warning every plain local instance
    prints about token authentication is silenced. A trial's real failure is still reported on the
    console, as one line with its reason (`SearchConsole.on_trial_error`), its traceback in the
    trial's error.txt. Tune's newer console output prints its "Configuration for experiment" box and
    a TensorBoard path into Ray's temporary folder at every verbosity, 0 included; its older one
    (`RAY_AIR_NEW_OUTPUT=0`, read when the Tuner starts) prints nothing at verbosity 0, so quiet
    runs use that.
    """
    logging.getLogger(RAY_AUTH_LOGGER).setLevel(logging.WARNING if verbose else logging.ERROR)
    if not verbose:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    return {"log_to_driver": verbose}


# --------------------------------------------------------------------------- the search's Tune callback

def trial_summary(config: dict) -> str:
    """A trial's 3-4 key hyperparameters, e.g. `convnet w32x3, adamw lr 0.003 onecycle, batch 128, flip_crop`."""
    arch = str(config.get("arch", "?"))
    if arch == "convnet" and "width" in config:
        arch += f" w{config['width']}x{config.get('depth', '?')}"
    if config.get("pretrained"):
        arch += " (ImageNet)"
    lr = "lr range test" if config.get("lr_mode") == "range_test" else f"lr {config.get('lr', float('nan')):.3g}"
    parts = [arch, " ".join(str(p) for p in (config.get("optimizer", "?"), lr, config.get("schedule", "")) if p)]
    if "batch_size" in config:
        parts.append(f"batch {config['batch_size']}")
    if "augment" in config:
        parts.append(str(config["augment"]))
    return ", ".join(parts)


class ProgressBox:
    """The runs' progress events, kept in the order each run sent them until the driver takes them.

    Not `ray.util.queue.Queue`: its `put` waits for the queue actor's answer (`ray.get`), and a Ray
    task blocked in `ray.get` lends its CPU back, so Ray started a waiting run beside the two
    running ones on 2 cores (three runs at once, each slower, the third re-planned ever shorter).
    Calls from one run to this (synchronous) actor run in the order it made them.
    """

    def __init__(self) -> None:
        self.events: list[dict] = []

    def put(self, event: dict) -> None:
        self.events.append(event)

    def take(self) -> list[dict]:
        events, self.events = self.events, []
        return events


class Sender:
    """A run's `progress`: sends each event to the `ProgressBox` actor without waiting for it;
    `flush` waits until every event sent has arrived."""

    def __init__(self, box) -> None:
        self.box, self.last = box, None

    def __call__(self, event: dict) -> None:
        self.last = self.box.put.remote(event)

    def flush(self) -> None:
        import ray

        if self.last is not None:  # calls from one sender run in order: the last one done, all are
            ray.get(self.last)
