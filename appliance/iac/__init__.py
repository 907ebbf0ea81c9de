"""The logic behind the Pulumi stacks' resources (stacks/DESIGN.md): content hashes and the dynamic providers'
create/diff/update. Never imports pulumi, so the appliance and its type check stay free of it."""
