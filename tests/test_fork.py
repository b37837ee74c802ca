"""A forked child works after the parent ran a call on two threads.

GNU libgomp's pool does not survive fork: a child entering the parent's pool waited forever.
Each case runs in a fresh interpreter in its own session, with a hard timeout that kills the
whole process group, so a hang fails the test instead of hanging the suite. The parent runs a
(32, 64, 32, 32) float32 training call at 2 threads, then starts children by one method; each
child makes the same call and sends back its output and its thread count, which are checked
against the parent's output here. A forked child runs on one thread; a spawned one has its own
full count.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import batchnorm as bn

pytestmark = [
    pytest.mark.subprocess,
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"),
]

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import batchnorm as bn

    def work(_=None):
        x = np.random.default_rng(0).standard_normal((32, 64, 32, 32)).astype(np.float32)
        return bn.batch_norm(x, None, None, training=True), bn.get_num_threads()

    def in_children(method):
        if method == "os.fork":
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                y, n = work()
                os.write(w, np.int64(n).tobytes() + y.tobytes())
                os._exit(0)
            os.close(w)
            with os.fdopen(r, "rb") as f:
                data = f.read()
            os.waitpid(pid, 0)
            n = int(np.frombuffer(data[:8], np.int64)[0])
            return [(np.frombuffer(data[8:], np.float32).reshape(32, 64, 32, 32), n)]
        if method == "executor":
            from concurrent.futures import ProcessPoolExecutor
            with ProcessPoolExecutor(2) as pool:
                return list(pool.map(work, range(2)))
        if method == "dataloader":
            import torch
            from torch.utils.data import DataLoader, Dataset
            class Data(Dataset):
                def __len__(self):
                    return 2
                def __getitem__(self, i):
                    y, n = work()
                    return torch.from_numpy(y), n
            loader = DataLoader(Data(), batch_size=None, num_workers=2,
                                multiprocessing_context="fork")
            return [(y.numpy(), int(n)) for y, n in loader]
        import multiprocessing as mp
        with mp.get_context(method).Pool(2) as pool:
            return pool.map(work, range(2))

    if __name__ == "__main__":
        bn.set_num_threads(2)
        parent, _ = work()
        out = [{"maxdiff": float(np.max(np.abs(y - parent))), "threads": n,
                "finite": bool(np.isfinite(y).all())} for y, n in in_children(sys.argv[1])]
        print(json.dumps({"parent_threads": bn.get_num_threads(), "children": out}))
""")


def run_isolated(tmp_path, method, timeout=90):
    """Runs SCRIPT in a new session; on timeout kills every process of it (hung children too)."""
    script = tmp_path / "fork_case.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), method], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{method}: a child hung (killed after {timeout} s)")
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


METHODS = ["os.fork", "fork", "forkserver", "spawn", "executor", "dataloader"]


@pytest.mark.skipif(not bn._core.openmp_enabled(), reason="serial build: no thread pool to fork")
@pytest.mark.parametrize("method", METHODS)
def test_children_after_a_two_thread_call(tmp_path, method):
    if method == "dataloader":
        pytest.importorskip("torch")
    result = run_isolated(tmp_path, method)
    assert result["parent_threads"] == 2
    children = result["children"]
    assert len(children) == (1 if method == "os.fork" else 2)
    for child in children:
        assert child["finite"]
        # Another thread count sums in another order: equal to float32 rounding, not bits.
        assert child["maxdiff"] <= 1e-5, child
        if method in ("os.fork", "fork", "dataloader"):
            assert child["threads"] == 1  # a forked child runs serially
        if method == "spawn":
            assert child["threads"] == default_threads()  # a fresh process: its own default


def default_threads():
    """batchnorm's documented default: OMP_NUM_THREADS's first value, else the usable CPUs."""
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0]
    if first.isdigit() and int(first) >= 1:
        return int(first)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
