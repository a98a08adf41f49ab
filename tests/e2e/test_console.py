"""What a person sees of a search: in a terminal (a pseudo-terminal here), in a log, with --verbose, and
through `| head`."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pyarrow.fs as pafs
import pytest

from search.tuning.storage import saved_latest_checkpoints
from tests.helpers import ROOT, run_command

TINY = ["--space", "convnet", "--data", "demo", "--num-samples", "3", "--max-epochs", "2", "--grace-epochs", "1",
        "--train-fraction", "0.3", "--no-final", "--no-report", "--seed", "3"]
RAY_NOISE = ("Checkpoint successfully created", "Trial status:", "started with configuration",
             "Token authentication", "Traceback", "repeated", "SystemExit", "Configuration for experiment",
             "View detailed results", "driver_artifacts")


def _in_a_terminal(args, timeout=300) -> tuple[int, str]:
    """Run `python -m search.run args` with a 160-column pseudo-terminal as its stdin, stdout and stderr;
    Ray's token-auth mode left as a user has it (unset)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env["PYTHONPATH"] = str(ROOT)
    p = subprocess.Popen([sys.executable, "-m", "search.run", *args], stdin=slave, stdout=slave, stderr=slave,
                         cwd=ROOT, env=env, close_fds=True, start_new_session=True)
    os.close(slave)
    out, deadline, quiet_since = bytearray(), time.time() + timeout, None
    try:
        while time.time() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every holder of the terminal has closed it
                    break
                if not chunk:
                    break
                out += chunk
                quiet_since = None
            elif p.poll() is not None:  # Ray's own processes may hold the terminal a moment longer
                quiet_since = quiet_since or time.time()
                if time.time() - quiet_since > 3:
                    break
        return p.wait(timeout=60), out.decode(errors="replace")
    finally:
        os.close(master)
        if p.poll() is None:
            os.killpg(p.pid, 9)


@pytest.mark.slow
def test_a_search_in_a_terminal_shows_a_live_status_line_and_one_line_per_trial_event(tmp_path):
    code, out = _in_a_terminal([*TINY, "--results", str(tmp_path), "--name", "tty"])
    assert code == 0, out[-3000:]
    assert "\r" in out  # the status line is redrawn in place
    assert re.search(r"\[\d+:\d\d\] trials: \d+ completed, \d+ running, \d+ stopped, \d+ failed \(of 3\)", out), out
    assert len(re.findall(r"trial \w+ started: convnet w\d+x\d", out)) == 3, out
    assert len(re.findall(r"trial \w+ (completed 2 epochs|stopped by ASHA at rung 1 \(epoch 1\)): PublicTest", out)) \
        == 3, out
    for noise in RAY_NOISE:
        assert noise not in out, noise
    # Each trial keeps the one checkpoint Tune's saved state names (what --resume restores).
    tune = tmp_path / "tty" / "tune"
    latest = saved_latest_checkpoints(pafs.LocalFileSystem(), str(tune))
    assert len(latest) == 3
    for tid, named in latest.items():
        assert [p.name for p in (tune / f"trial_{tid}").glob("checkpoint_*")] == [named]


@pytest.mark.slow
def test_verbose_shows_rays_own_tables(tmp_path):
    r = run_command("search.run", *TINY, "--results", str(tmp_path), "--name", "v", "--verbose")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Trial status:" in r.stdout and "started with configuration" in r.stdout
    assert "Configuration for experiment" in r.stdout
    assert "\r" not in r.stdout and "trial " in r.stdout  # a log: one line per event, no redraws


@pytest.mark.slow
@pytest.mark.parametrize("command", ["search.run", "search.report"])
def test_piping_into_head_ends_quietly(tmp_path, command):
    args = [*TINY, "--results", str(tmp_path), "--name", "h"] if command == "search.run" else ["--help"]
    shell = (f"{sys.executable} -m {command} {' '.join(args)} | head -n 2 > {tmp_path / 'head.txt'}; "
             f"exit ${{PIPESTATUS[0]}}")
    r = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr[-3000:]
    assert len((tmp_path / "head.txt").read_text().splitlines()) == 2
