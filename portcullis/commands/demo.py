"""`portcullis demo`: Show the whole pipeline on a small simulated cluster."""

from __future__ import annotations

import argparse

from portcullis.cli import CommandError, command
from portcullis.settings import Settings


@command("demo", "Show the whole pipeline on a small simulated cluster.")
class Command:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        pass

    @staticmethod
    def run(args: argparse.Namespace, settings: Settings) -> int:
        raise CommandError("not built yet (issue 7); nothing was done")
