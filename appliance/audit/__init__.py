"""Compliance audit of core nodes, laptops and images: catalog, checks, runner, signed reports."""
