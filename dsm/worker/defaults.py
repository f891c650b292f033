"""What a worker runs with when it is not told: read by the command line, which must not load the
worker (nor the store and the keys that `config.py` imports) to print its help."""

# Ticks a worker has in flight at once, each from its claim to its commit. A job holds its slot
# through its commit's round trip, so this is how deep the worker's pipeline to etcd is: with 8,
# commits went in batches of a few and a transition cost twice the CPU (docs/benchmarks.md).
DEFAULT_CONCURRENCY = 64
