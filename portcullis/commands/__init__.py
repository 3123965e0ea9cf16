"""Every subcommand lives in a module of its own here; importing them registers them."""

from portcullis.commands import (  # noqa: F401
    apply,
    audit,
    bench,
    broker,
    demo,
    enforce,
    flows,
    process,
    topics,
    watch,
)
