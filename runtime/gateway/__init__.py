"""The gateway: mTLS front door of the core node (identity, RBAC, licensing, rate limits, audit)."""
