"""``farebox demo``: a scripted day at a simulated terminal."""

import click


@click.command()
def demo() -> None:
    """Run a scripted session on a simulated card (not yet)."""
    raise click.ClickException("demo: not implemented yet")
