"""Analyses: studies composed of probes, over one run or many."""
