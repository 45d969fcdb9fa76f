"""Conversations on top of the engine: message hash chains, chat-template turn deltas, Redis session records."""
