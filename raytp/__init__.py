"""raytp: tensor-parallel LLM inference over mismatched devices, one Ray actor per device."""
