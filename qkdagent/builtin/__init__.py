"""Plugins that ship with the core; loaded through the same entry points as external ones."""
