"""Kubernetes as data: manifest builders and the mapping of Job/pod status to run states (pure),
the watch cache (``watch.py``, I/O only through the callables it is given) and the orphan check
against the database (``orphans.py``).

Nothing here holds a client; ``executors/kubernetes.py`` does the I/O.
"""
