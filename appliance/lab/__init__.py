"""Embedded services for the lab and the tests (see DESIGN.md, "Embedded defaults")."""
