"""Portcullis streams package."""
