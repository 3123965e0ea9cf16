"""`portcullis watch`: Watch Kubernetes or a host inventory and publish endpoints."""

from __future__ import annotations

import argparse

from portcullis.cli import CommandError, command
from portcullis.settings import Settings


@command("watch", "Watch Kubernetes or a host inventory and publish endpoints.")
class Command:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        pass

    @staticmethod
    def run(args: argparse.Namespace, settings: Settings) -> int:
        raise CommandError("not built yet (issue 6); nothing was done")
