"""`portcullis process`: Run the membership stream processor (Faust)."""

from __future__ import annotations

import argparse

from portcullis.cli import CommandError, command
from portcullis.settings import Settings


@command("process", "Run the membership stream processor (Faust).")
class Command:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        pass

    @staticmethod
    def run(args: argparse.Namespace, settings: Settings) -> int:
        raise CommandError("not built yet (issue 4); nothing was done")
