"""`raytp bench`: scaling sweeps, their report and plots, micro-benchmarks, the per-rank step profile, and the
transformers peer.

May import everything below it (actors, runtime, model, parallel, weights); nothing imports raytp.bench.
"""
