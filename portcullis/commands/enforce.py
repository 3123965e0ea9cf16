"""`portcullis enforce`: Program this node's ipsets and iptables chains from the topics."""

from __future__ import annotations

import argparse

from portcullis.cli import CommandError, command
from portcullis.settings import Settings


@command("enforce", "Program this node's ipsets and iptables chains from the topics.")
class Command:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        pass

    @staticmethod
    def run(args: argparse.Namespace, settings: Settings) -> int:
        raise CommandError("not built yet (issue 5); nothing was done")
