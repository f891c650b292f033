"""`python cli.py ...` from a checkout: the same as the `dsm` command (which lives in `dsm.cli`)."""

from dsm.cli import main

if __name__ == "__main__":
    main()
