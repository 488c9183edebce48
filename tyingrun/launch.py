"""``tyingrun-launch``: one data-parallel run over several processes that keeps the one-line promise.

It starts the ranks itself (plain processes, ``torch.distributed``'s env:// rendezvous at ``--master-addr`` and
``--master-port``), shows rank 0's output as it comes and holds back every rank's last ``tyingrun:`` line, so
that when the ranks end it prints one line, once, and exits with the status of the rank whose end caused the
rest (docs/launch.md):

* a bad input: every rank refuses it; rank 0's line, exit 2;
* a stop signal to the launcher (SIGTERM from Slurm, ``timeout``, ``kill``; SIGINT from Ctrl-C) goes to every rank;
  they stop at the same step, checkpoint, and rank 0's line names the resume command, exit 128 + signal; the same
  for a stop signal to any one rank (the ranks agree on it every step);
* a rank that dies (SIGKILL, the OOM killer, a crash): named, with the resume command, exit 1.

A rank that outlives the end of another by ``--grace-period`` seconds is stopped (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, List, Optional, Tuple

from tyingrun.errors import EXIT_FAILED, fail
from tyingrun.train.signals import STOP_SIGNALS

# What the launcher needs of tyingrun beyond these two is imported once stop signals are blocked (main), so that
# a stop signal while it imports waits for the ranks and reaches them.

PROGRAM = "tyingrun-launch"
# The lines that end a rank's account of its run: the error, the stop, or a sweep's last words.
FINAL_PREFIXES = ("tyingrun: error:", "tyingrun: stopped by")
POLL_S = 0.05
STOP_STATUSES = frozenset(128 + signum for signum in STOP_SIGNALS)
PR_SET_PDEATHSIG = 1


@dataclass
class Rank:
    """One started rank: its process, and its stderr as far as the launcher keeps it."""

    rank: int
    process: subprocess.Popen
    final: Optional[str] = None
    reader: Optional[threading.Thread] = None
    ended_at: Optional[float] = None
    tail: List[str] = field(default_factory=list)

    def read(self, echo: Optional[IO[str]]) -> None:
        """Hold back the last final line; show every other line (rank 0, ``echo``) or keep the last few."""
        for line in self.process.stderr or ():
            if line.startswith(FINAL_PREFIXES):
                self.final = line.rstrip("\n")
            elif echo is not None:
                echo.write(line)
                echo.flush()
            else:
                self.tail = [*self.tail[-19:], line.rstrip("\n")]

    @property
    def code(self) -> Optional[int]:
        """The exit status (negative: the signal that killed it), None while it runs."""
        return self.process.poll()

    @property
    def ended_with(self) -> int:
        """The exit status of a rank that has ended."""
        return self.process.returncode


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Train one tyingrun run data-parallel over several processes (hardware=ddp or hardware=fsdp "
                    "among the overrides): one line, once, on failure or stop, and the run's exit status.",
    )
    parser.add_argument("--nproc-per-node", type=int, default=2, metavar="N", help="ranks on this node (default 2)")
    parser.add_argument("--nnodes", type=int, default=1, metavar="M", help="nodes, each running this command")
    parser.add_argument("--node-rank", type=int, default=0, metavar="R", help="this node's number, 0 to M-1")
    parser.add_argument("--master-addr", default="127.0.0.1", metavar="HOST",
                        help="the host of node 0, where the ranks meet (default: this machine)")
    parser.add_argument("--master-port", type=int, default=0, metavar="PORT",
                        help="the port they meet at on node 0 (default: a free one; give one with --nnodes > 1)")
    parser.add_argument("--grace-period", type=float, default=30.0, metavar="S",
                        help="seconds the other ranks get to end after one has ended before they are stopped")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="tyingrun overrides (key=value, group=option)")
    args = parser.parse_args(argv)
    world = args.nproc_per_node * args.nnodes
    if args.nproc_per_node < 1 or args.nnodes < 1 or world < 2:
        fail(f"--nproc-per-node={args.nproc_per_node} x --nnodes={args.nnodes} is {world} process(es); "
             f"{PROGRAM} starts 2 or more (for one process, run tyingrun itself)", program=PROGRAM)
    if not 0 <= args.node_rank < args.nnodes:
        fail(f"--node-rank={args.node_rank} is not one of 0 to {args.nnodes - 1} (--nnodes={args.nnodes})",
             program=PROGRAM)
    if args.nnodes > 1 and not args.master_port:
        fail("--nnodes > 1 needs --master-port (the same on every node)", program=PROGRAM)
    if any(arg in ("-m", "--multirun") for arg in args.overrides):
        fail("one run at a time: a sweep (-m) of data-parallel runs is several tyingrun-launch commands",
             program=PROGRAM)
    return args


def run_folder_arguments(args: argparse.Namespace) -> Tuple[List[str], Path]:
    """The overrides every rank gets, and the run folder: named there, so the launcher knows it too (a new one
    when neither hydra.run.dir nor train.resume gives it)."""
    from tyingrun.cli import override_value

    overrides = list(args.overrides)
    given = override_value(overrides, "hydra.run.dir") or override_value(overrides, "train.resume")
    if given:
        return overrides, Path(given).expanduser()
    if args.nnodes > 1:
        fail("with --nnodes > 1 every node must name the same run folder: add hydra.run.dir=<a shared folder>",
             program=PROGRAM)
    folder = time.strftime("outputs/runs/%Y-%m-%d/%H-%M-%S-ddp")
    return [*overrides, f"hydra.run.dir={folder}"], Path(folder)


def launch_command(args: argparse.Namespace) -> str:
    """This launch, as the command the resume line starts with."""
    words = [PROGRAM, f"--nproc-per-node={args.nproc_per_node}"]
    if args.nnodes > 1:
        words += [f"--nnodes={args.nnodes}", f"--node-rank={args.node_rank}", f"--master-addr={args.master_addr}",
                  f"--master-port={args.master_port}"]
    return shlex.join(words)


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def prepare_rank() -> None:
    """In a rank, before it runs: stop signals as they are by default (the launcher blocks them while it starts
    the ranks), and a SIGTERM (a stop) if the launcher itself is killed (Linux)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def start_ranks(args: argparse.Namespace, overrides: List[str]) -> List[Rank]:
    port = args.master_port or free_port(args.master_addr)
    world = args.nproc_per_node * args.nnodes
    ranks = []
    for local in range(args.nproc_per_node):
        rank = args.node_rank * args.nproc_per_node + local
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(local), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(args.nproc_per_node), "GROUP_RANK": str(args.node_rank),
               "MASTER_ADDR": args.master_addr, "MASTER_PORT": str(port)}
        # As torchrun does: one thread per rank unless asked otherwise, so N ranks do not oversubscribe the cores.
        env.setdefault("OMP_NUM_THREADS", "1")
        # Their own session: a terminal's Ctrl-C reaches the launcher alone, which passes it on once.
        process = subprocess.Popen([sys.executable, "-m", "tyingrun.cli", *overrides], env=env, text=True,
                                   stderr=subprocess.PIPE, start_new_session=True, preexec_fn=prepare_rank)
        ranks.append(Rank(rank, process))
    for rank in ranks:
        echo = sys.stderr if rank.rank == 0 else None
        rank.reader = threading.Thread(target=rank.read, args=(echo,), daemon=True)
        rank.reader.start()
    return ranks


def signal_ranks(ranks: List[Rank], signum: int) -> None:
    for rank in ranks:
        if rank.code is None:
            try:
                rank.process.send_signal(signum)
            except ProcessLookupError:
                pass


class Launch:
    """The ranks of one run on this node, watched until every one has ended."""

    def __init__(self, ranks: List[Rank], grace_s: float):
        self.ranks = ranks
        self.grace_s = grace_s
        self.stop_signal: Optional[int] = None  # a stop signal the launcher received and passed on
        self.stopping = False  # the launcher itself is ending the ranks that outlived the first to end

    def on_signal(self, signum: int, frame: object) -> None:
        self.stop_signal = signum
        signal_ranks(self.ranks, signum)

    def wait(self) -> Rank:
        """Wait for every rank; return the first to end with a non-zero status (rank 0 when none did)."""
        first: Optional[Rank] = None
        first_ended = 0.0
        while True:
            now = time.monotonic()
            for rank in self.ranks:
                if rank.ended_at is None and rank.code is not None:
                    rank.ended_at = now
                    if rank.code != 0 and first is None:
                        first, first_ended = rank, now
            if all(rank.ended_at is not None for rank in self.ranks):
                break
            if first is not None and self.stop_signal is None:
                self.stop_survivors(now - first_ended, stopped=first.code in STOP_STATUSES)
            time.sleep(POLL_S)
        for rank in self.ranks:
            if rank.reader is not None:
                rank.reader.join()
        return first or self.ranks[0]

    def stop_survivors(self, since_s: float, stopped: bool) -> None:
        """A rank has ended: the others end on their own (the same bad input, a lost peer) or are stopped. After
        a stop signal to one rank (``stopped``) they are checkpointing at the same step: they get no second one,
        only SIGKILL if they outlive ten grace periods."""
        if since_s > (10 if stopped else 2) * self.grace_s:
            signal_ranks(self.ranks, signal.SIGKILL)
        elif since_s > self.grace_s and not self.stopping and not stopped:
            self.stopping = True
            signal_ranks(self.ranks, signal.SIGTERM)


def died(rank: Rank, launch: Launch) -> bool:
    """Whether ``rank`` was killed by a signal that neither the launcher sent nor the rank could answer."""
    return rank.ended_with < 0 and not launch.stopping and launch.stop_signal is None


def report_dead_rank(rank: Rank, folder: Path, started: float, node_rank: int) -> str:
    from tyingrun.cli import resume_command
    from tyingrun.files import CHECKPOINTS_DIR, CONFIG_FILE
    from tyingrun.run_status import write_status

    name = signal.Signals(-rank.ended_with).name
    if any((folder / CHECKPOINTS_DIR).glob("step_*")):
        then = f"the newest checkpoint is kept, resume with: {resume_command(folder)}"
    else:
        then = "nothing was checkpointed yet; start the run again"
    message = f"rank {rank.rank} died (killed by {name}) and the run stopped; {then}"
    config = folder / CONFIG_FILE
    # The folder's status is this launch's to write when this launch's rank 0 claimed it.
    if node_rank == 0 and config.is_file() and config.stat().st_mtime >= started:
        write_status(folder, "failed", error=message, exit_code=EXIT_FAILED)
    return message


def main(argv: Optional[List[str]] = None) -> None:
    # A stop signal waits (blocked) until the ranks exist, so that it reaches every rank.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    from tyingrun.run_status import LAUNCH_COMMAND_ENV

    args = parse_args(sys.argv[1:] if argv is None else argv)
    overrides, folder = run_folder_arguments(args)
    started = time.time() - 1  # file times may be coarser than the clock
    os.environ[LAUNCH_COMMAND_ENV] = launch_command(args)  # the ranks' resume lines, and this one's
    ranks = start_ranks(args, overrides)
    launch = Launch(ranks, args.grace_period)
    for signum in STOP_SIGNALS:
        signal.signal(signum, launch.on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    cause = launch.wait()
    if died(cause, launch):
        fail(report_dead_rank(cause, folder, started, args.node_rank), EXIT_FAILED, program=PROGRAM)
    code = cause.ended_with if cause.ended_with >= 0 else 128 - cause.ended_with
    rank0 = ranks[0]
    line = rank0.final if rank0.final and rank0.ended_with == cause.ended_with else cause.final
    if line is None and launch.stop_signal is not None:  # a rank stopped before tyingrun could answer
        line = f"tyingrun: stopped by {signal.Signals(launch.stop_signal).name} during start-up; nothing was saved yet"
    if line is None and code != 0:
        line = f"tyingrun: error: rank {cause.rank} exited with status {code}" + (
            f": {cause.tail[-1]}" if cause.tail else "")
    if line is not None and args.node_rank == 0:  # rank 0's node speaks for the run
        sys.stderr.write(line + "\n")
    sys.exit(code)


if __name__ == "__main__":
    main()
