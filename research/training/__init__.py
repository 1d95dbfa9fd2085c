"""The training loop floor: one loop for every method (loop.py), its random draws (draws.py), resumable
states (checkpoints.py) and the hooks that plug validation and tracking in (hooks.py).

It sits on the methods and the blocks; the experiments (research/experiments/) sit on it.
"""
