"""Side-by-side benchmarks of fedpatch and anomalib's PatchCore (run with ``python -m benchmarks.run``).

Every measurement runs in its own subprocess (``benchmarks.worker``) so that peak resident
memory is per implementation and per configuration. See ``benchmarks/README.md``.
"""
