"""Subcommands of ``python -m bolid``; each module has ``add_arguments(parser)`` and ``run(args)``."""
