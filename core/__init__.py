"""The foundation every package stands on: config, errors, storage, Ray set-up and pools, resource plans,
watchdogs, the allocator, and the stage contract. Imports nothing of ours (tests/unit/test_layers.py)."""

__version__ = "0.1.0"
