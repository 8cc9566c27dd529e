"""Versions and hardware recorded next to every benchmark figure (see leank._env)."""

from leank._env import environment

__all__ = ["environment"]
