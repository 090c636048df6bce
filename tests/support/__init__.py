"""Test helpers that are more than fixtures: servers of our own that tests run on loopback."""
