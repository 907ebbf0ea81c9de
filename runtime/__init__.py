"""Baked-in services of the appliance: gateway, core server, edge agent, and what they share."""
