"""Portcullis policy package."""
