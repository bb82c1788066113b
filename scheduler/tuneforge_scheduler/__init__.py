"""Tuneforge scheduler: short idempotent arq tasks plus a reconcile loop over the DB."""
