"""Is ``last.ckpt`` readable after a SIGKILL during a save? Lightning's writer vs AtomicCheckpointIO.

A forked process saves 32 MB checkpoints in a loop and is killed with SIGKILL at staggered moments,
``--kills`` times per writer; the script counts kills after which the checkpoint does not load or is
incomplete, and the temporary files the killed saves left behind. Lightning's ``TorchCheckpointIO``
is run with the system temporary folder on the checkpoint's file system and on /dev/shm (a tmpfs,
as a stand-in for a node-local /tmp and a network scratch file system).

Usage: ``python benchmarks/atomic_checkpoint_demo.py [--kills 20]`` (Linux; needs /dev/shm).
"""
import argparse
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from pyg_equireann.training.checkpoint import AtomicCheckpointIO

PAYLOAD = 4_000_000  # float64 values: 32 MB


def _save_forever(io, path, tmpdir, pipe):
    tempfile.tempdir = tmpdir
    payload = torch.arange(PAYLOAD, dtype=torch.float64)
    k = 0
    while True:
        k += 1
        io.save_checkpoint({"k": k, "payload": payload + k}, path)
        pipe.send(k)


def trial(io, path: Path, tmpdir: str, kills: int) -> int:
    context = multiprocessing.get_context("spawn")  # a fork of a process that used fsspec can hang
    broken = 0
    for n in range(kills):
        receiver, sender = context.Pipe(duplex=False)
        proc = context.Process(target=_save_forever, args=(io, path, tmpdir, sender), daemon=True)
        proc.start()
        sender.close()  # recv raises EOFError if the writer dies
        if not receiver.poll(300):
            raise RuntimeError("the writer did not finish a save within 300 s")
        receiver.recv()
        time.sleep(0.02 + 0.013 * n)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        try:
            ckpt = torch.load(path, weights_only=True)
            if not torch.equal(ckpt["payload"], torch.arange(PAYLOAD, dtype=torch.float64) + ckpt["k"]):
                broken += 1
        except Exception:
            broken += 1
    return broken


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=20)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ckpt_demo_", dir=Path.cwd()))
    shm = Path(tempfile.mkdtemp(prefix="ckpt_demo_", dir="/dev/shm"))
    try:
        cases = [("TorchCheckpointIO (Lightning), temp folder on the same file system", TorchCheckpointIO(), root / "tmp"),
                 ("TorchCheckpointIO (Lightning), temp folder on /dev/shm", TorchCheckpointIO(), shm),
                 ("AtomicCheckpointIO, temp folder on /dev/shm", AtomicCheckpointIO(), shm)]
        for k, (name, io, tmpdir) in enumerate(cases):
            tmpdir.mkdir(exist_ok=True)
            before = set(tmpdir.iterdir())
            path = root / f"case{k}" / "last.ckpt"
            broken = trial(io, path, str(tmpdir), args.kills)
            stray = len(set(tmpdir.iterdir()) - before) + len([p for p in path.parent.iterdir() if p != path])
            print(f"{name}: {broken}/{args.kills} kills left an unreadable last.ckpt; {stray} stray temporary files")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)


if __name__ == "__main__":
    main()
