"""The core stack: the site's PKI and node identities in Vault, then every core node provisioned, one by one."""
