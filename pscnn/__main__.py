"""The ``pscnn`` console script (and ``python -m pscnn``): :func:`pscnn.cli.main`, with Ctrl-C and the
stop signals noted while pscnn.cli's own modules load (argparse, json, logging, ...: a tenth of a
second on a busy machine), where Ctrl-C was a KeyboardInterrupt traceback and SIGTERM a kill (-15).
Nothing but ``signal`` and ``sys`` is imported before the handlers are set."""
import signal
import sys


def main() -> int:
    noted: list[int] = []

    def note(signum, frame):
        noted.append(signum)
    # SIGINT only where it has Python's handler: not where a background shell ignores it (SIG_IGN)
    ctrl_c = (signal.SIGINT,) if signal.getsignal(signal.SIGINT) is signal.default_int_handler else ()
    for sig in (signal.SIGTERM, signal.SIGHUP, *ctrl_c):
        signal.signal(sig, note)
    from pscnn.cli import main as cli_main  # noqa: PLC0415  (after the handlers: see above)
    return cli_main(signals_before=noted)


if __name__ == "__main__":
    sys.exit(main())
