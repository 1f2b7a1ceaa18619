"""Fault tests: crashes, broker restarts, platform outages, rebalances, poison input."""
