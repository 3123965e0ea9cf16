"""Portcullis watchers package."""
