"""The `raytp` command: pull, plan, generate, chat, serve and bench.

Every argument is checked before Ray starts (raytp.cli.checks). Every command that runs a model then joins a
running Ray cluster (`--address` or RAY_ADDRESS, as its owner configured it) or starts a local one that listens
on 127.0.0.1 only with Ray's token authentication, and shuts it down on exit (raytp.cli.session). Errors caused by
the input (a bad device spec, a model that does not fit, a prompt longer than the context...) print one line naming
the value and the fix, never a traceback.

May import: everything (the top of the package map); nothing below imports it.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from raytp.cli.bench import cmd_bench
from raytp.cli.checks import check_args
from raytp.cli.common import DriverDied, user_message
from raytp.cli.generate import cmd_chat, cmd_generate
from raytp.cli.parser import build_parser
from raytp.cli.plan import cmd_plan
from raytp.cli.pull import cmd_pull
from raytp.cli.serve import cmd_serve

COMMANDS = {"pull": cmd_pull, "plan": cmd_plan, "generate": cmd_generate, "chat": cmd_chat, "bench": cmd_bench,
            "serve": cmd_serve}


def _no_color_reset_at_exit() -> None:
    """Ray imports colorama, whose exit handler writes ESC[0m to a terminal's stdout after the command's output;
    raytp prints no colors to reset."""
    import atexit

    if "colorama.initialise" in sys.modules:
        atexit.unregister(sys.modules["colorama.initialise"].reset_all)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # `raytp` alone: what it can do
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    args.started = started  # "ready in N s" counts from here
    logging.basicConfig(level=logging.INFO, format="raytp: %(message)s", stream=sys.stderr)
    try:
        check_args(args)
        COMMANDS[args.command](args)
        sys.stdout.flush()  # here, where a closed pipe can still be handled
    except BrokenPipeError:  # `raytp plan --json | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 141  # as a shell reports a command ended by SIGPIPE
    except KeyboardInterrupt:
        return 130
    except DriverDied as e:
        print(f"raytp: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - input errors become one line; anything else keeps its traceback
        message = user_message(e)
        if message is None:
            raise
        print(f"raytp: error: {message}", file=sys.stderr)
        return 2
    finally:
        _no_color_reset_at_exit()
    return 0
