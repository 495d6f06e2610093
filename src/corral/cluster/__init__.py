"""Cluster identity and lifecycle: files, certificates, join API client, CLI verbs."""
