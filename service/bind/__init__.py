"""Knowing that the new hardware bound: the push listener and the watch decisions."""
