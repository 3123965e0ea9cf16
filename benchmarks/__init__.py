"""Portcullis benchmarks package."""
