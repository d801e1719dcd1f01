"""The OpenAI-compatible HTTP API, the HTTP host that also mounts the web chat, and `serve`'s relay in front of it.

May import: raytp.runtime (requests, errors), raytp.ui. Never raytp.actors: the front end hands itself in.
"""
