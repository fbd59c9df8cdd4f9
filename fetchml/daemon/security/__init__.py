"""Security: who may connect (auth, users, network policy), rate limits, the audit log."""
