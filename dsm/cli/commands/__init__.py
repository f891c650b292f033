"""The commands, one module a group; importing them registers them on `app`, in the order
`dsm --help` lists them."""

from . import definitions, test, run, submit, worker, instances, schedule, api  # noqa: F401, I001  (help order)
