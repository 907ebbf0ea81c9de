"""Core node provisioning: site file -> Ansible inventory -> `roles/playbooks/core.yml` through ansible-runner.

See DESIGN.md in this package for the pieces and the variable contract between the inventory and the roles.
"""
