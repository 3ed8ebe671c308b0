"""Command line: argument parsing (``cli_parser``), the device picked once for every verb, and
one-line error reporting only; each sub-command (``cli_commands``) calls one library function.
Defaults are the config dataclasses' own; library errors name arguments in library terms
(``layers``), which this module maps to the flags (``--layers``)."""
from __future__ import annotations

import argparse
import json
import os
import select
import sys
from pathlib import Path

from .cli_commands import COMMANDS
from .cli_parser import build_parser
from .errors import DfkdError
from .models import user_code
from .runtime import pick_device


def _flag(parser: argparse.ArgumentParser, args: argparse.Namespace, where: str) -> str:
    """A library argument name as the sub-command's flag (``layers`` -> ``--layers``)."""
    aliases = getattr(args, "aliases", {})
    if where in aliases:
        return aliases[where]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    flags = {a.dest: a.option_strings[0] for a in sub._actions if a.option_strings}
    return flags.get(where, where)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed "dfkd: <argument>: <problem>" on one line
        return int(e.code or 0)
    try:
        if getattr(args, "device", None) is not None:  # picked once, here; every verb runs on it
            args.device = str(pick_device(args.device))
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a reader that has gone (dfkd inspect ... | head) is met here, not at exit
        return code
    except DfkdError as e:
        print(f"dfkd: {_flag(parser, args, e.where)}: {e.problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dfkd: {args.command}: interrupted; {_AFTER_INTERRUPT.get(args.command, _STARTS_OVER)}", file=sys.stderr)
        return 130
    except OSError as e:  # a file the library did not name itself (e.g. read by a user's own code)
        if isinstance(e, BrokenPipeError) and _stdout_gone():
            return 141  # quietly, as a tool killed by SIGPIPE: the shell's 128 + 13
        print(f"dfkd: {e.filename or args.command}: {e.strerror or e}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"dfkd: {args.command}: out of memory; try a smaller --batch-size", file=sys.stderr)
        return 2
    except Exception as e:  # a bug in dfkd (or in the user's model code): one line, the traceback on request
        if os.environ.get("DFKD_TRACEBACK"):
            raise
        if isinstance(e, RuntimeError) and "alloc" in str(e) and "memory" in str(e):
            print(f"dfkd: {args.command}: out of memory; try a smaller --batch-size", file=sys.stderr)
            return 2
        where = _user_frame(e)
        print(f"dfkd: {where or args.command}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
              f" ({'in your code' if where else 'a dfkd bug; please report it'}; DFKD_TRACEBACK=1 shows the traceback)",
              file=sys.stderr)
        return 2 if where else 1


_STARTS_OVER = "run the same command again to start over"
# what running an interrupted command again does: these resume (docs/robustness.md), the others start over
_AFTER_INTERRUPT = {
    "train": "run the same command again to resume from its last finished epoch",
    "distill": "run the same command again to resume from its last finished epoch",
    "reconstruct": "run the same command again to resume from its last finished shard",
    "run": "run the same command again to resume where it stopped (finished steps are kept)",
    "record": "record is one pass and does not resume: run the same command again to start over",
}


def _stdout_gone() -> bool:
    """Whether the reader of stdout has gone (``dfkd inspect ... | head``); if so stdout is pointed at
    /dev/null, so that Python's own flush at exit stays quiet too."""
    try:
        fd = sys.stdout.fileno()
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        if not any(ev & select.POLLERR for _, ev in poll.poll(0)):
            return False
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    except (OSError, ValueError, AttributeError):  # no stdout of our own (captured), or no poll here
        return False
    return True


def _user_frame(e: BaseException) -> str | None:
    """``file:line`` of the innermost frame in the user's code: the model code the user named
    (``models.user_code``, wherever installed), or any file outside dfkd, the standard library and
    the installed packages (torch, numpy, ...)."""
    import traceback
    pkg = str(Path(__file__).resolve().parent)
    skip = (pkg, str(Path(json.__file__).resolve().parent.parent), str(Path(sys.prefix).resolve()),
            str(Path(sys.base_prefix).resolve()))
    mine = user_code()
    for fr in reversed(traceback.extract_tb(e.__traceback__)):
        f = str(Path(fr.filename).resolve())
        if fr.filename.startswith("<") or f.startswith(pkg + os.sep):
            continue
        if any(f == m or f.startswith(m + os.sep) for m in mine) or not f.startswith(skip):
            return f"{fr.filename}:{fr.lineno}"
    return None
