"""An alias: the bench lives in tools/bench.py (a tool, not the core); `python -m lib.bench` still runs it."""

if __name__ == "__main__":
    import sys

    from lib.errors import run_cli
    from tools.bench import main

    sys.exit(run_cli(main))
