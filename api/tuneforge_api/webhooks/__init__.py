"""Webhooks: job events signed in the Standard Webhooks format, delivered from an outbox."""
