"""The stateful optimizer: ``AdamMini``, its step's backends, its state and its checkpoints."""
from .optimizer import AdamMini
from .state import STATE_KEYS

__all__ = ["AdamMini", "STATE_KEYS"]
