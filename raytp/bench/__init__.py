"""`raytp bench`: scaling sweeps, their report and plots, micro-benchmarks, and the transformers peer.

May import everything below it (actors, runtime, model, parallel, weights); nothing imports raytp.bench.
"""
