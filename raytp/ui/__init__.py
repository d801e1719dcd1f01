"""The web chat served by `raytp serve` next to the OpenAI API (see raytp.ui.chat)."""
