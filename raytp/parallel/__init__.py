"""How the model is split and how the ranks talk.

    devices.py  the --devices spec
    plan.py     the pure uneven planner and its frozen ShardPlan
    comm/       the Communicator interface, its backends and the factory that opens a group

May import: raytp.kernels. Never raytp.model (a model declares its pieces to the planner), weights, runtime or
above.
"""
