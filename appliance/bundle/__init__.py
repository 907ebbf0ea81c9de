"""Offline install bundles: what goes in, how it is described, signed, split and joined."""
