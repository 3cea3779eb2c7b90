"""Measurements built on the library: the memory estimate, the forgetting study, probes, the demo."""
