"""Portcullis enforcers package."""

#: How much a fetch of the topics waits for on the broker (or for its fetch wait, 50 ms by
#: default): a node reads the whole cluster's churn, and with 1 it fetched at every record
#: the processor produced. Measured with `portcullis bench surge --kafka --sim-nodes 10`
#: (20,000 pods, 100 nodes, 200 pods on the real enforcer's node), at 6,000 pods/min:
#: 1 byte, 18% of a core (5.3-5.4 CPU-s over 30 s, two runs); 65,536, 3.3% (0.99 CPU-s).
#: The price is up to the fetch wait in latency while the cluster is quiet.
DEFAULT_FETCH_MIN_BYTES = 65_536
