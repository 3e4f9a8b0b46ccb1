"""Subcommand groups of the CLI; each module defines ``register(subparsers)``."""
