"""Portcullis portcullis package."""
