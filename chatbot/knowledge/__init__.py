"""Persona knowledge: lorebook entries that fire on keys, and documents retrieved by meaning."""
