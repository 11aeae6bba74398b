"""The model's one pass over the CIFAR-10 test split, run beside the tests: conftest starts it once per run, as
soon as it knows a test will read it, and runs those tests last, so the pass uses CPU time the rest of the suite
leaves over (its waits on servers, browsers and timeouts).

    python tests/split_pass.py FOLDER

writes the split's labels and the shipped Classifier's outputs (flip-averaged logits and features, exactly
`Classifier.outputs` as the app calls it) to FOLDER/outputs.pt, or the reason it could not to FOLDER/error.
With pytest-xdist, every worker reads the one pass the first of them started.
"""

from __future__ import annotations

import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUTS, ERROR, PID, LOG = "outputs.pt", "error", "pid", "log"


class PassFailed(RuntimeError):
    """The pass wrote no outputs; the message says why (the archive missing, or the process's last words)."""


def start_once(folder: Path) -> None:
    """Start the pass unless a worker of this run already has."""
    try:
        os.close(os.open(folder / "started", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    with open(folder / LOG, "wb") as log:
        process = subprocess.Popen([sys.executable, __file__, str(folder)], cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    (folder / PID).write_text(str(process.pid))


def wait_for(folder: Path) -> Path:
    """The outputs' path once the pass has written them."""
    while True:
        if (folder / OUTPUTS).is_file():
            return folder / OUTPUTS
        if (folder / ERROR).is_file():
            raise PassFailed((folder / ERROR).read_text())
        if (folder / PID).is_file() and not _running(int((folder / PID).read_text())):
            if (folder / OUTPUTS).is_file():
                continue
            raise PassFailed(f"the pass ended without a word: {(folder / LOG).read_text()[-3000:]}")
        time.sleep(0.2)


def stop(folder: Path) -> None:
    """End the pass if it still runs (an interrupted run) and remove its folder."""
    if (folder / PID).is_file() and _running(pid := int((folder / PID).read_text())):
        os.killpg(pid, signal.SIGKILL)
    shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)  # reaps it where this process started it
        return finished == 0
    except ChildProcessError:  # another worker's child: ask the system
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return not Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")


def main(folder: Path) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    import cifar10
    from classifier import load_classifier

    torch.set_num_threads(1)  # the suite keeps the other core busy
    try:
        if not cifar10.SHARED_ARCHIVE.is_file():
            raise FileNotFoundError(f"CIFAR-10 archive not found at {cifar10.SHARED_ARCHIVE}")
        data = cifar10.load_cifar10(str(cifar10.SHARED_ARCHIVE), splits=("test",))
        logits, features = load_classifier().outputs(data["test_x"])
        torch.save({"labels": data["test_y"], "logits": logits, "features": features}, folder / "partial.pt")
        (folder / "partial.pt").replace(folder / OUTPUTS)
    except BaseException as error:
        (folder / ERROR).write_text(f"{type(error).__name__}: {error}")
        raise


if __name__ == "__main__":
    main(Path(sys.argv[1]))
