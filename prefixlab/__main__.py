"""`python -m prefixlab <command>`: the command line lives in prefixlab/cli/."""

from prefixlab.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
