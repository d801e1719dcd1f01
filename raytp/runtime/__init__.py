"""What every rank runs, without Ray: the token loop, the decode batch it keeps on the device (batch.py), the
sharded sampler, the typed request objects that travel from the front end to the ranks, and the checks
(requests.py) every request passes at the front end before it may travel.

May import: raytp.model, raytp.parallel, raytp.weights. Never raytp.actors, serving, ui or bench.
"""
