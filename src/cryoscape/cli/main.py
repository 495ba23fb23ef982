"""The ``cryoscape`` command: one subcommand per module in this package.

Each command module defines ``HELP`` (one line), ``EXAMPLE`` (a shell line), ``add_arguments(parser)``
and ``run(args) -> int | None``.  Modules parse arguments and call one library function; no
logic lives here.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from cryoscape import __version__
from cryoscape.errors import InputError
from cryoscape.train.allocator import keep_large_allocations

# command name -> module in cryoscape.cli (``import`` is a Python keyword, hence ``import_``)
COMMANDS: dict[str, str] = {
    "simulate": "simulate",
    "import": "import_",
    "downsample": "downsample",
    "backproject": "backproject",
    "fsc": "fsc",
    "train": "train",
    "volumes": "volumes",
    "analyze": "analyze",
    "traverse": "traverse",
    "select": "select",
    "landscape": "landscape",
    "evaluate": "evaluate",
    "abinit": "abinit",
    "micrograph-em": "micrograph_em",
    "refine": "refine",
    "classify": "classify",
    "postprocess": "postprocess",
    "dashboard": "dashboard",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryoscape",
        description="Reconstruct distributions of 3-D structures from cryo-EM particle images.",
    )
    parser.add_argument("--version", action="version", version=f"cryoscape {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(f"cryoscape.cli.{module_name}")
        except ModuleNotFoundError as err:
            if err.name == f"cryoscape.cli.{module_name}":
                continue  # command not built yet
            raise
        cmd = sub.add_parser(
            name,
            help=module.HELP,
            description=module.HELP,
            epilog=f"example:\n  {module.EXAMPLE}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Busy-waiting OpenMP threads make small tensor operations 20-80x slower on shared or
    # oversubscribed machines; yielding costs nothing measurable otherwise.  Must precede the
    # first torch import (a user's own setting wins).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    keep_large_allocations()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    try:
        code = int(args._run(args) or 0)
    except InputError as err:
        print(f"cryoscape {args.command}: error: {err}", file=sys.stderr)
        code = 2
    from cryoscape.train.distributed import finish_process

    return finish_process(code)


if __name__ == "__main__":
    sys.exit(main())
