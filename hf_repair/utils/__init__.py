"""Helpers below everything else: one-or-many-process collectives, atomic writes, the version."""
