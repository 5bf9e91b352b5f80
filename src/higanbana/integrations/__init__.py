"""Higanbana inside other programs: ``kohya`` is the network module of kohya's sd-scripts."""
