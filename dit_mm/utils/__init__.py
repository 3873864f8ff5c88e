"""Helpers shared by :mod:`dit_mm.models` and :mod:`dit_mm.accel`
(:mod:`.profiling`: profiler scopes that cost nothing without a profiler)."""
