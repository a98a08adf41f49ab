"""`python -m search.report results/<name>`: every figure of an experiment, and one self-contained report.html.

The page is built by `search.reporting.page` (see there what it holds); `search.run` and `search.final`
write it when they end, so this command is for an interrupted experiment or a folder copied back
from a cluster.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from search.reporting.page import FIGURES_DIR, TENSORBOARD_DIR, write_report
from search.tuning.cli import Parser, run_cli


def build_parser() -> Parser:
    p = Parser(prog="python -m search.report",
               description="Write every figure of an experiment under <experiment>/figures/ and one self-contained "
                           "<experiment>/report.html; works on finished, interrupted and copied experiments.")
    p.add_argument("experiment", help="the experiment folder, e.g. results/<name>")
    p.add_argument("--data", default=None,
                   help="the dataset, where it is not at the path settings.json names (e.g. a folder copied back "
                        "from a cluster); only its PublicTest split is read")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m search.report`: write the report of one experiment; raises UserError on bad input."""
    a = build_parser().parse_args(argv)
    path = write_report(Path(a.experiment), data=a.data)
    print(f"report: {path}\nfigures: {Path(a.experiment) / FIGURES_DIR}\n"
          f"tensorboard: tensorboard --logdir {Path(a.experiment) / TENSORBOARD_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
