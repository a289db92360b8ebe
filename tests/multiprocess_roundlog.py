"""Run by tests/test_multiprocess.py through scripts/local_cluster.py -n 2: the round log over jax.distributed.

Process 0 publishes N messages; process 1 reads them in order (acknowledging as it goes). Then, once process 1 has
read everything, process 0 publishes more, so the log prunes what every process has read: the oldest messages
are gone from the coordination service, the newest kept. Prints one JSON line per process.
"""

import json
import sys

import jax

from tinker_jax import distributed

N = 3 * distributed._KEEP  # past two pruning points


def main() -> None:
    distributed.initialize(distributed.DistributedConfig())  # from the environment (local_cluster.py)
    log = distributed.RoundLog(namespace="test")
    client = distributed._client()
    out = {"process": jax.process_index()}
    if distributed.is_leader():
        for i in range(N):
            log.publish(("msg", i, b"x" * 100))
        client.wait_at_barrier("read", 120_000)  # process 1 has read all N
        for i in range(N, N + distributed._KEEP):
            log.publish(("msg", i, b""))
        gone = []
        for k in (1, N - distributed._KEEP, N + distributed._KEEP):
            try:
                client.key_value_try_get_bytes(f"{log._prefix}/{k}")
                gone.append(False)
            except Exception:  # noqa: BLE001 - NOT_FOUND
                gone.append(True)
        out["gone"] = gone
    else:
        got = [log.next() for _ in range(N)]
        out["in_order"] = [m[1] for m in got] == list(range(N))
        client.wait_at_barrier("read", 120_000)
    client.wait_at_barrier("done", 120_000)
    print(json.dumps(out), flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
