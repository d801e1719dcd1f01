"""The Ray layer: one WorkerActor per device, the WorkerGroup that builds them, and the front-end Driver
actor that owns the tokenizer and the requests. Ray is the control plane only: no Ray call per token.

May import: raytp.runtime, model, parallel, weights, serving (the driver hosts the HTTP server).
"""
