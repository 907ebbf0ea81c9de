"""What every runtime service shares: mTLS, identities, audit schema, vector clocks, the LLM client."""
