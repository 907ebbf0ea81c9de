"""The edge fleet stack: one signed edge image per profile of the site (stacks/DESIGN.md §2, EdgeImage)."""
