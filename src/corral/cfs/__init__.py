"""Replicated configuration filesystem."""
