"""Configs: schemas and range checks, the command line, a sweep's compositions, what stacks."""
