"""The runner: the `sts` command (recipes, data, training stages, evaluation, demo, bench, the
embedded model). It is built on the method (`import sts`), which never imports it."""

from sts.cli.commands import main

__all__ = ["main"]
