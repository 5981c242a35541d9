"""Runs one jsim command as N cooperating JAX processes on this machine.

    python launch/local_multiprocess.py --num_processes=2 -- \
        python -m jsim.main --config=configs/tiny.py --workdir=/tmp/jsim_mp

Each child gets JSIM_COORDINATOR=127.0.0.1:<port>, JSIM_NUM_PROCESSES=N and
JSIM_PROCESS_ID=i, which jsim.parallel.maybe_initialize_distributed() turns into
jax.distributed.initialize(): the N processes form one JAX runtime (CPU
collectives over gloo; NCCL on GPUs), exactly as N hosts would.

  * Output: every line of child i is printed with a "[i] " prefix (--quiet_others
    keeps only process 0's lines; the others still go to --log_dir if given).
  * Signals: SIGINT / SIGTERM are forwarded to every child (jsim saves a
    checkpoint and exits 0 on the first one); a second Ctrl-C kills them.
  * Exit code: 0 if every child exits 0; otherwise the first failing child's
    code (negative codes, death by signal, become 128 + signal). When one child
    fails, the others are terminated after --grace_s seconds: a lone survivor
    would wait forever in a collective.
  * GPUs: --gpus_per_process=K gives child i CUDA_VISIBLE_DEVICES=iK..iK+K-1
    (e.g. one process per GPU); by default children see every device.
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
  """A TCP port that nothing listens on right now (for the coordinator)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(base: dict, process_id: int, num_processes: int, coordinator: str, gpus_per_process: int = 0) -> dict:
  """The environment of child `process_id`: the JSIM_* variables (and its GPUs)."""
  env = dict(base)
  env.update(JSIM_COORDINATOR=coordinator, JSIM_NUM_PROCESSES=str(num_processes), JSIM_PROCESS_ID=str(process_id))
  if gpus_per_process:
    first = process_id * gpus_per_process
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + k) for k in range(gpus_per_process))
  return env


def _pump(stream, prefix: str, echo: bool, log_path: str | None) -> None:
  log = open(log_path, "w") if log_path else None
  try:
    for line in iter(stream.readline, ""):
      if echo:
        sys.stdout.write(prefix + line)
        sys.stdout.flush()
      if log:
        log.write(line)
        log.flush()
  finally:
    if log:
      log.close()


def exit_status(returncode: int) -> int:
  """A child's return code as a shell exit status (killed by signal s -> 128 + s)."""
  return 128 - returncode if returncode < 0 else returncode


def launch(
  command: list[str],
  num_processes: int,
  *,
  port: int = 0,
  gpus_per_process: int = 0,
  log_dir: str | None = None,
  quiet_others: bool = False,
  grace_s: float = 30.0,
) -> int:
  """Starts `command` num_processes times and returns the combined exit status."""
  if num_processes < 1:
    raise ValueError(f"--num_processes={num_processes}: must be >= 1")
  if not command:
    raise ValueError("no command given; put it after '--'")
  coordinator = f"127.0.0.1:{port or free_port()}"
  if log_dir:
    os.makedirs(log_dir, exist_ok=True)
  procs, pumps = [], []
  signals_seen = []  # (signal, how many children had started then)

  def send(sig, children):
    for p in children:
      if p.poll() is None:
        try:
          p.send_signal(sig)
        except ProcessLookupError:
          pass

  def forward(signum, frame):
    signals_seen.append((signum, len(procs)))
    # The first signal asks for a clean stop (checkpoint); a second one kills.
    send(signum if len(signals_seen) == 1 else signal.SIGKILL, procs)

  # Before the first child: a signal that comes while they start is forwarded, not fatal.
  previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  status, failed_at = 0, None
  try:
    for i in range(num_processes):
      env = child_env(os.environ, i, num_processes, coordinator, gpus_per_process)
      # A new session each: a terminal's Ctrl-C reaches only us, and we forward it once.
      p = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True
      )
      procs.append(p)
      t = threading.Thread(
        target=_pump,
        args=(
          p.stdout,
          f"[{i}] ",
          i == 0 or not quiet_others,
          os.path.join(log_dir, f"process_{i}.log") if log_dir else None,
        ),
        daemon=True,
      )
      t.start()
      pumps.append(t)
    if signals_seen:  # one that came while they started reaches the later ones too
      signum, started = signals_seen[0]
      send(signum if len(signals_seen) == 1 else signal.SIGKILL, procs[started:])
    while any(p.poll() is None for p in procs):
      for p in procs:
        rc = p.poll()
        if rc is not None and rc != 0 and failed_at is None:
          status, failed_at = exit_status(rc), time.monotonic()
      if failed_at is not None and time.monotonic() - failed_at > grace_s:
        for p in procs:
          if p.poll() is None:
            p.terminate()
        failed_at = float("inf")  # terminate once; kill below if they still hang
      time.sleep(0.1)
    for p in procs:
      if status == 0 and p.returncode != 0:
        status = exit_status(p.returncode)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for t in pumps:
      t.join(timeout=5)
    for s, h in previous.items():
      signal.signal(s, h)
  return status


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if "--" in argv:
    cut = argv.index("--")
    own, command = argv[:cut], argv[cut + 1 :]
  else:
    own, command = argv, []
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], usage="%(prog)s [options] -- command [args...]")
  ap.add_argument("--num_processes", "-n", type=int, default=2)
  ap.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
  ap.add_argument(
    "--gpus_per_process",
    type=int,
    default=0,
    help="give each child its own K GPUs via CUDA_VISIBLE_DEVICES (0: all visible)",
  )
  ap.add_argument("--log_dir", default=None, help="also write process_<i>.log files here")
  ap.add_argument("--quiet_others", action="store_true", help="print only process 0's output")
  ap.add_argument("--grace_s", type=float, default=30.0, help="seconds the others get to finish after one child fails")
  args = ap.parse_args(own)
  try:
    return launch(
      command,
      args.num_processes,
      port=args.port,
      gpus_per_process=args.gpus_per_process,
      log_dir=args.log_dir,
      quiet_others=args.quiet_others,
      grace_s=args.grace_s,
    )
  except ValueError as e:
    print(f"local_multiprocess: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
