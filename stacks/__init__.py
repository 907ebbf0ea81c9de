"""Pulumi stacks for the core node, DR and the edge fleet (stacks/DESIGN.md). An installed package, so the
dynamic providers' pickles (by reference) load in the provider host."""
