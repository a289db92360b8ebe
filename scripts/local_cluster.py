"""Run one command as N processes of one tinker_jax engine on this machine (a local stand-in for N hosts).

    python scripts/local_cluster.py -n 2 --devices 4 -- python my_training_script.py
    python scripts/local_cluster.py -n 2 --devices 4 -- tinker-jax serve --config configs/cpu-mesh8.yaml

Each process gets TINKER_JAX_COORDINATOR (a free loopback port), TINKER_JAX_NUM_PROCESSES and
TINKER_JAX_PROCESS_ID, which tinker_jax.distributed reads, and `--devices` simulated CPU devices (XLA_FLAGS). Output
is prefixed with the process id, and each process's pid is printed first (`[launcher] process I: pid P`). If one
process fails, the others are stopped (unless --keep-going: e.g. to watch process 0 outlive a killed follower), and
the exit status is the first failure's (so CI and shells see it).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(pid: int, stream, out) -> None:
    for line in iter(stream.readline, b""):
        out.write(f"[{pid}] {line.decode(errors='replace')}")
        out.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--num-processes", type=int, default=2)
    ap.add_argument("--devices", type=int, default=None, help="simulated CPU devices per process (XLA_FLAGS)")
    ap.add_argument("--timeout", type=float, default=None, help="stop everything after this many seconds")
    ap.add_argument("--keep-going", action="store_true", help="when a process fails, leave the others running")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command every process runs (after --)")
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command to run after --")
    coordinator = f"127.0.0.1:{free_port()}"
    procs = []
    for pid in range(args.num_processes):
        env = dict(os.environ, TINKER_JAX_COORDINATOR=coordinator,
                   TINKER_JAX_NUM_PROCESSES=str(args.num_processes), TINKER_JAX_PROCESS_ID=str(pid))
        if args.devices:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                                f" --xla_force_host_platform_device_count={args.devices}").strip()
            env.setdefault("JAX_PLATFORMS", "cpu")
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        print(f"[launcher] process {pid}: pid {p.pid}", flush=True)
        threading.Thread(target=_pump, args=(pid, p.stdout, sys.stdout), daemon=True).start()
        procs.append(p)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    def stop(_signum, _frame) -> None:  # stopping the launcher stops the job (process 0 first: it tells the others)
        procs[0].send_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = 0
    while any(p.poll() is None for p in procs):
        failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
        if (failed and not args.keep_going) or (deadline is not None and time.monotonic() > deadline):
            status = failed[0] if failed else 124
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            break
        time.sleep(0.1)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return status or next((p.returncode for p in procs if p.returncode), 0)


if __name__ == "__main__":
    sys.exit(main())
