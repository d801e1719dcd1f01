"""The OpenAI-compatible HTTP API and the HTTP host that also mounts the web chat.

May import: raytp.runtime (requests, errors), raytp.ui. Never raytp.actors: the front end hands itself in.
"""
