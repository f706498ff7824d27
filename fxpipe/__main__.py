"""``python -m fxpipe``: the same command as ``fxpipe`` (see :mod:`fxpipe.cli`)."""

from fxpipe.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
