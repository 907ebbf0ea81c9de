"""Membria's CrossGuard policy pack (`pulumi preview --policy-pack stacks/policy`): the rules live in
membria_policies.py, which imports nothing from `appliance` so the pack can be published on its own."""
