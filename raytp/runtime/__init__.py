"""What every rank runs, without Ray: the token loop and the sharded sampler, and the typed request
objects that travel from the front end to the ranks.

May import: raytp.model, raytp.parallel, raytp.weights. Never raytp.actors, serving, ui or bench.
"""
