"""Plugins shipped with lightfed; each reaches the core only through its registry entry points."""
