"""Portcullis topics package."""
