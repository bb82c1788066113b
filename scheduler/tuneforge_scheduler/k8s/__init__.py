"""Kubernetes as pure data: manifest builders and the mapping of Job/pod status to run states.

Nothing here talks to a cluster; ``executors/kubernetes.py`` does the I/O.
"""
