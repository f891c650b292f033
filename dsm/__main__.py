"""`python -m dsm ...`: the `dsm` command."""

from .cli import main

main()
