"""What a worker runs with when it is not told: read by the command line, which must not load the
worker (nor the store and the keys that `config.py` imports) to print its help."""

# Ticks a worker has in flight at once, each from its claim to its commit. A job holds its slot
# through its commit's round trip, so this is how deep the worker's pipeline to etcd is: with 8,
# commits went in batches of a few and a transition cost twice the CPU (docs/benchmarks.md).
DEFAULT_CONCURRENCY = 64

# Ticks a token runs along a line (one token, moving to a state with a tick, due now) before it
# commits them in one transaction, applied in order. Each commit is a transaction, a round trip, a
# watch event and a record written: a run of quick ticks pays for one. A worker that dies loses at
# most a run, whose ticks run again (as any tick whose commit did not apply: a tick runs at least
# once). 1: a commit per tick.
DEFAULT_RUN_AHEAD = 8
# Seconds an outcome of a run waits for its commit at most: a tick that runs past it has the
# outcomes before it committed while it runs (`jobrunner.py`).
RUN_AHEAD_TIME = 0.1
