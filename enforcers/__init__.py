"""Portcullis enforcers package."""
