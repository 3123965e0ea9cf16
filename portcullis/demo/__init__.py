"""`portcullis demo`: the whole pipeline on a small simulated cluster, for a new user.

Layers, each of which runs for real on its own (a stage whose pieces are missing raises
`DemoError` naming them):

* `scenario`  the cluster (namespaces, pods, outside servers), the example policies, and
  the expected verdict of every connection (pure: `policy.verdict`);
* `pipeline`  the embedded broker, the topics, publishing as the watcher does, reading
  topics back, and the processor and enforcer as subprocesses with their logs;
* `netsim`    network namespaces, veth pairs, TCP servers and real connections;
* `table`     the connection table as text (aligned, ✔/✘, colours only on a tty);
* `runner`    the order of play, cleanup on every exit (Ctrl-C and SIGTERM too).
"""

from __future__ import annotations


class DemoError(RuntimeError):
    """The demo cannot go on: says which stage, what is missing and where the logs are."""
