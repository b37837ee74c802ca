"""What the numbers were measured on: CPU, caches, ISA, library versions, commit."""
from __future__ import annotations

import datetime
import importlib
import os
import pathlib
import platform
import re
import subprocess
import sys
import time

# Flags that decide which kernels can run; the full /proc/cpuinfo list is noise.
_ISA_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16",
    "amx_tile", "asimd", "sve",
)
_ENV_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "BATCHNORM_ISA", "OPENBLAS_CORETYPE",
             "OPENBLAS_L2_SIZE", "MKL_NUM_THREADS")
_FALLBACK_L2_BYTES = 1 << 20
# Share of all CPU time used by others above which a run counts as disturbed.
QUIET_BUSY = 0.1


def _cpuinfo() -> dict[str, str]:
    """First processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip()
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def caches() -> list[dict]:
    """Data and unified caches seen by cpu0 (per-core size for private levels)."""
    found = []
    for index in sorted(pathlib.Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            if kind == "Instruction":
                continue
            found.append({
                "level": int((index / "level").read_text()),
                "type": kind,
                "bytes": _parse_size((index / "size").read_text()),
            })
        except (OSError, ValueError):
            continue
    return found


def l2_bytes() -> int:
    """Per-core L2 size, which decides the channels-first training target."""
    sizes = [c["bytes"] for c in caches() if c["level"] == 2]
    return sizes[0] if sizes else _FALLBACK_L2_BYTES


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except Exception:
        return None


def _batchnorm_backend() -> dict:
    try:
        import batchnorm as bn

        # The kernel variant ("avx512_bf16" where bn.isa() says "avx512"): it decides the speed.
        return {"isa": bn._core.isa(), "threads_default": bn.get_num_threads()}
    except Exception as error:
        return {"error": str(error)}


def _git_commit() -> str | None:
    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!bench"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


_BUSY_LOOP = (
    "import time; t = time.perf_counter()\n"
    "for _ in range(3_000_000): pass\n"
    "print(time.perf_counter() - t)"
)


def parallel_speedup(workers: int = 2) -> float | None:
    """Throughput of `workers` busy processes relative to one (ideal: `workers`).

    Virtual machines may expose cores that share one physical core by time slicing;
    then every thread beyond the first only adds contention, and spin-waiting thread
    pools (OpenMP, ONNX Runtime) collapse. The multi-thread tables need this context.
    """
    def run(count: int) -> float:
        procs = [subprocess.Popen([sys.executable, "-c", _BUSY_LOOP], stdout=subprocess.PIPE,
                                  text=True) for _ in range(count)]
        return max(float(p.communicate()[0]) for p in procs)

    try:
        single = run(1)
        return round(workers * single / run(workers), 2)
    except (OSError, ValueError):
        return None


_SPIN = "while True: pass"


class BusyNeighbour:
    """A process that spins on one CPU (the last this process may use) while the run lasts.

    What a DataLoader worker, a second job or a CI neighbour does to a 2-core machine: the
    multi-thread cells then show what a thread pool loses to a core that is not free.
    """

    def __init__(self) -> None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.cpu = cpus[-1] if cpus else None
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "BusyNeighbour":
        pin = (lambda: os.sched_setaffinity(0, {self.cpu})) if self.cpu is not None else None
        self._proc = subprocess.Popen([sys.executable, "-c", _SPIN], preexec_fn=pin)
        time.sleep(0.3)  # let it reach its loop (and the CPU load meters see it)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()


def busy_processes() -> list[str]:
    """Other processes with high average CPU use: who to blame for a disturbed run."""
    try:
        out = subprocess.run(["ps", "-eo", "pid=,pcpu=,comm="], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    busy = []
    for line in out.splitlines():
        pid, cpu, command = line.split(None, 2)
        if int(pid) != os.getpid() and float(cpu) >= 20.0:
            busy.append(f"{command} ({cpu}% CPU)")
    return busy


def _cpu_counters() -> tuple[int, int]:
    """All CPUs' (total, idle + iowait) clock ticks since boot, from /proc/stat."""
    fields = [int(v) for v in pathlib.Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]


class OthersMeter:
    """Share of all CPUs' time used by other processes between start and share().

    Busy ticks of the whole machine minus this process's own CPU time: a cell measured
    while a build ran next door shows it, instead of silently carrying slower ratios.
    """

    def __init__(self) -> None:
        self._tick_s = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
        try:
            self._start = (_cpu_counters(), time.process_time())
        except (OSError, ValueError, IndexError):
            self._start = None

    def share(self) -> float | None:
        if self._start is None:
            return None
        (total0, idle0), own0 = self._start
        try:
            total1, idle1 = _cpu_counters()
        except (OSError, ValueError, IndexError):
            return None
        total = total1 - total0
        if total <= 0:
            return None
        own_ticks = (time.process_time() - own0) / self._tick_s
        others = (total - (idle1 - idle0)) - own_ticks
        return round(min(1.0, max(0.0, others / total)), 3)


def _cpu_busy_fraction(seconds: float = 0.5) -> float | None:
    """Share of all CPUs' time spent outside idle during the next `seconds`."""
    meter = OthersMeter()
    time.sleep(seconds)
    return meter.share()


def conditions() -> dict:
    """How busy the machine is: recorded before and after the run, so a disturbed run says so."""
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {"cpu_busy": _cpu_busy_fraction(), "load_1min": load,
            "busy_processes": busy_processes()}


def cpu_name() -> str:
    """The CPU's model name (cheap: no measurement)."""
    return str(_cpuinfo().get("model name") or platform.processor() or platform.machine())


def cpu_family_model() -> tuple[str | None, str | None]:
    """The CPU's family and model numbers (x86: cpu family, model; Arm: architecture, part)."""
    info = _cpuinfo()
    return (info.get("cpu family") or info.get("CPU architecture"),
            info.get("model") or info.get("CPU part"))


def cpu_dir(name: str | None = None, family: str | None = None, model: str | None = None) -> str:
    """The results folder of a CPU: its model name in lower case, words joined by '-', then its
    family and model numbers ("AMD EPYC", 25, 1 -> amd-epyc-family25-model1). A virtual
    machine may name every CPU of a vendor alike ("AMD EPYC" on Zen 3 and Zen 5 hosts): the
    numbers keep their results apart. Called with no arguments: this machine's folder; with
    a name only (results recorded before the numbers were): the name alone."""
    if name is None:
        name = cpu_name()
        family, model = cpu_family_model()
    name = re.sub(r"\((r|tm)\)", "", name.lower())
    words = re.findall(r"[a-z0-9]+", name) or ["unknown", "cpu"]
    numbers = [f"{label}{value.lower()}" for label, value in (("family", family), ("model", model)) if value]
    return "-".join(words + numbers)


def describe() -> dict:
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cpu_dir": cpu_dir(),
        "vendor": info.get("vendor_id") or info.get("CPU implementer"),
        "cpu_family": info.get("cpu family") or info.get("CPU architecture"),
        "cpu_model": info.get("model") or info.get("CPU part"),
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "isa_flags": [f for f in _ISA_FLAGS if f in flags],
        "parallel_speedup_2_processes": parallel_speedup(2),
        "caches": caches(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {m: _version(m) for m in
                     ("numpy", "torch", "onnxruntime", "onnx", "matplotlib", "batchnorm")},
        "batchnorm": _batchnorm_backend(),
        "repository_commit": _git_commit(),
        "environment": {k: os.environ[k] for k in _ENV_VARS if k in os.environ},
    }


def disturbed(reading: dict) -> bool:
    return (reading["cpu_busy"] or 0.0) > QUIET_BUSY


def wait_until_quiet(timeout_s: float) -> dict:
    """Poll conditions() until the CPUs are idle or `timeout_s` passed; the last reading."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = conditions()
        if not disturbed(now) or time.monotonic() >= deadline:
            return now
        print(f"waiting for a quiet machine: {now['cpu_busy']:.0%} busy", file=sys.stderr)
        time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
