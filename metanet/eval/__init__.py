"""Metrics of a partition on held-out text (DESIGN.md "Metrics"), tables and plots."""
