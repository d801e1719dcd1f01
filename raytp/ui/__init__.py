"""The Gradio web chat served by `raytp serve` next to the OpenAI API (see raytp.ui.chat).

May import: raytp.runtime (requests, errors), raytp.parallel.devices. Never raytp.actors or serving.
"""
