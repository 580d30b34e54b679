"""Tuner packages: one folder per method, mirroring PEFT's layout."""
