"""The DR stack: the S3 side of the site's DR targets (stacks/DESIGN.md §2 "DrBuckets")."""
