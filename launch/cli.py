"""The ``facesr`` console script: one subcommand per module in ``launch/``.

Each subcommand module defines ``configure(parser)`` and ``run(args) -> int``.
Modules are imported only when their subcommand runs, so ``facesr info`` never
pays for importing Ray or DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util  # find_spec: the big venv imports it by chance, a bare install does not
import os
import sys
from typing import NoReturn

DEBUG_HELP = "show the traceback of an error, not its one-line message (also FACESR_DEBUG=1)"
# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("launch.info", "shapes, layer counts, parameters and GFLOPs of a preset"),
    "bench": ("launch.bench", "benchmarks that print figures and write JSON"),
    "prep": ("launch.prep", "shard identity folders of faces into WebDataset tars (Ray job)"),
    "train": ("launch.train", "train priors (stage 1) and the SR cascade (stage 2) on Ray + DeepSpeed"),
    "eval": ("launch.eval", "PSNR/SSIM against bicubic, identity preservation, picture grids"),
    "sr": ("launch.sr", "super-resolve an image or a folder with a trained model"),
    "export": ("launch.export", "export the deploy network to TorchScript / ONNX"),
    "demo": ("launch.demo", "the whole pipeline on a face folder, on a local Ray cluster"),
}


def _available() -> dict[str, tuple[str, str]]:
    return {k: v for k, v in COMMANDS.items() if importlib.util.find_spec(v[0]) is not None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="facesr", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    commands = _available()
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_) in commands.items():
        p = sub.add_parser(name, help=help_)
        if name == chosen:  # import only the module that will run
            mod = importlib.import_module(module)
            mod.configure(p)
            p.set_defaults(_run=mod.run)
            _add_debug(p)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = parser.parse_args(argv)
    try:
        if getattr(args, "_run", None) is not None:
            from facesr.hardware import retain_freed_memory

            retain_freed_memory()  # every command's tensors: freed memory kept for the next batch (hardware.py)
        return int(args._run(args) or 0)
    except (Exception, KeyboardInterrupt) as exn:  # every error a user can cause: one line naming the file or key
        if args.debug or os.environ.get("FACESR_DEBUG", "") not in ("", "0"):
            raise
        interrupted = isinstance(exn, KeyboardInterrupt)
        what = "interrupted; what finished is kept, the same command resumes" if interrupted else one_line(exn)
        print(f"facesr {args.command}: {'' if interrupted else 'error: '}{what}"
              f"{'' if interrupted else ' (--debug or FACESR_DEBUG=1 for the traceback)'}", file=sys.stderr)
        return 130 if interrupted else 1


def _add_debug(parser: argparse.ArgumentParser) -> None:
    """``--debug`` after the command too (``facesr eval quality … --debug``), at every level of subcommands."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_debug(sub)


def one_line(exn: BaseException, limit: int = 500) -> str:
    """An exception as one bounded line, control characters escaped (a file name cannot forge output lines)."""
    text = " ".join(line.strip() for line in str(exn).splitlines() if line.strip()) or type(exn).__name__
    if isinstance(exn, OSError) and exn.filename is not None and str(exn.filename) not in text:
        text = f"{exn.filename}: {text}"
    text = printable(text)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"


def printable(text: str) -> str:
    """``text`` with control characters (and undecodable bytes of file names) escaped: one line that a name
    cannot forge or break."""
    return text if text.isprintable() else text.encode("unicode_escape", "backslashreplace").decode("ascii")


def entry() -> NoReturn:
    """The ``facesr`` console script (and ``python -m launch.cli``): ``main()``, then ``exit_now`` its code."""
    exit_now(main())


def exit_now(code: int) -> NoReturn:
    """End the process without Python's finalization, which tears torch's and Ray's modules down object by object:
    ~0.85 s after any command that imported torch (`facesr info` 4.6 -> 3.75 s), ~2.3 s after a training driver of
    a new local Ray (its end after the last line 4.2 -> 2.65 s), at every exit (2 cores; a script calling facesr in
    a loop, or the test suite, pays it each time). What finalization does
    that matters happens first: threads joined as at a normal exit (``threading._shutdown``: non-daemon threads,
    thread pools), atexit handlers run (Ray's shutdown, logging's flush, temporary folders removed), files no
    longer referenced closed, stdout and stderr flushed. Only for a process's own end: never call it from code
    that others import and call (``main`` returns its code instead)."""
    import atexit
    import gc
    import threading

    try:
        getattr(threading, "_shutdown", lambda: None)()  # what Py_FinalizeEx runs first
        atexit._run_exitfuncs()
        gc.collect()  # unreferenced files' finalizers flush and close them
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    finally:
        os._exit(code)


if __name__ == "__main__":
    entry()
