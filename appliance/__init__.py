"""Membria Appliance control plane: site model, PKI, embedded lab services and the CLI."""

__version__ = "0.1.0"
