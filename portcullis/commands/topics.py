"""`portcullis topics`: Create or check every Portcullis topic."""

from __future__ import annotations

import argparse

from portcullis.cli import CommandError, command
from portcullis.settings import Settings


@command("topics", "Create or check every Portcullis topic.")
class Command:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        pass

    @staticmethod
    def run(args: argparse.Namespace, settings: Settings) -> int:
        raise CommandError("not built yet (issue 3); nothing was done")
