"""Executors of the packed inference path (:mod:`.cpu`)."""
