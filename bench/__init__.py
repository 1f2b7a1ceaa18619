"""`make bench`: throughput, budget use, memory, latency, start/stop of the real service."""
