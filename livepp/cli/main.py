"""Command line: the ``livepp`` group; each command lives in a module of its own."""

from __future__ import annotations

import click

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="livepp")
def main() -> None:
    """Watch a language model's perplexity live while it generates, and act on it."""


def _register_commands() -> None:
    from livepp.cli.car import calibrate_cmd, replay_cmd, route_cmd
    from livepp.cli.generate import generate
    from livepp.cli.score import score
    from livepp.cli.serve import serve_cmd
    from livepp.cli.think import think_cmd
    from livepp.cli.watch import watch_cmd

    for command in (generate, score, calibrate_cmd, route_cmd, replay_cmd, serve_cmd, think_cmd, watch_cmd):
        main.add_command(command)


_register_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
