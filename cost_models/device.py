"""Device specs for the cost models: datasheet presets for GPUs, and this machine's CPU measured once and cached."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from fxpipe.errors import ConfigError

__all__ = ["DeviceSpec", "PRESETS", "get_device", "measure_cpu", "cache_dir", "host_fingerprint"]

GB = 10**9
GiB = 2**30


@dataclass(frozen=True)
class DeviceSpec:
    """What a cost model needs to know about one accelerator (or this CPU).

    Example::

        >>> a100 = get_device("a100-80gb")
        >>> a100.peak(torch.bfloat16)          # dense tensor-core FLOP/s
        312000000000000.0
        >>> slow = a100.replace(inter_node_bandwidth=12.5e9)   # a user override
    """

    name: str
    peak_flops: dict[str, float] = field(default_factory=dict, hash=False)  # dtype name -> FLOP/s
    mem_bandwidth: float = 1e11           # device memory bytes/s
    memory_bytes: int = 16 * GiB          # device memory as the driver reports it (get_device_properties(i)
                                          # .total_memory: a little under the datasheet's, 16160 MiB on a V100-16GB)
    memory_reserved: int = 0              # of memory_bytes, what a training process holds before its first tensor:
                                          # CUDA context (kernel images), cuBLAS/cuDNN workspaces, NCCL buffers
    memory_headroom: float = 0.0          # fraction of memory_bytes a plan leaves free for what M_s does not
                                          # count: the allocator's fragmentation, one op's temporaries (presets: 0.05)
    intra_node_bandwidth: float = 1e10    # bytes/s between two devices of one node (one direction)
    inter_node_bandwidth: float = 1e10    # bytes/s one device gets between nodes (one direction) while all
                                          # devices of its node use the network at once: NIC rate x NICs / devices
    devices_per_node: int = 8             # devices that share a node (intra_node_bandwidth among them)
    gpus_per_nic: int = 1                 # devices sharing one network link: when fewer of them use it at
                                          # once, each gets up to gpus_per_nic x inter_node_bandwidth
    link_latency: float = 1e-5            # seconds per transfer
    kernel_overhead: float = 5e-6         # seconds per launched aten kernel (dispatch + launch)

    def __post_init__(self) -> None:
        if not self.peak_flops:
            raise ConfigError(f"DeviceSpec {self.name!r} has no peak_flops; give at least "
                              "peak_flops={'float32': FLOP/s}")
        for k in ("mem_bandwidth", "intra_node_bandwidth", "inter_node_bandwidth"):
            v = getattr(self, k)
            if not v > 0:
                raise ConfigError(f"DeviceSpec {self.name!r}: {k} must be > 0 bytes/s, got {v!r}")
        for k in ("devices_per_node", "gpus_per_nic"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"DeviceSpec {self.name!r}: {k} must be an int >= 1, got {v!r}")
        for k in ("link_latency", "kernel_overhead"):
            v = getattr(self, k)
            if not v >= 0:
                raise ConfigError(f"DeviceSpec {self.name!r}: {k} must be >= 0 seconds, got {v!r}")
        for k in ("memory_bytes", "memory_reserved"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"DeviceSpec {self.name!r}: {k} must be an int >= 0 bytes, got {v!r}")
        h = self.memory_headroom
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0 <= h < 1:
            raise ConfigError(f"DeviceSpec {self.name!r}: memory_headroom must be a fraction in [0, 1) of memory_bytes "
                              f"(0.05 keeps 5% free for the allocator's fragmentation), got {h!r}")
        if not self.memory_reserved + self.headroom_bytes < self.memory_bytes:
            raise ConfigError(f"DeviceSpec {self.name!r}: memory_reserved={self.memory_reserved} B and memory_headroom="
                              f"{h!r} ({self.headroom_bytes} B) leave nothing of memory_bytes={self.memory_bytes} B; "
                              "memory_reserved is the part of the device's memory the CUDA context and libraries "
                              "hold (a few hundred MiB) and memory_headroom a small fraction, not the usable part")
        for k, v in self.peak_flops.items():
            if not v > 0:
                raise ConfigError(f"DeviceSpec {self.name!r}: peak_flops[{k!r}] must be > 0, got {v!r}")

    @property
    def headroom_bytes(self) -> int:
        """``memory_headroom`` of ``memory_bytes``, in bytes."""
        return int(self.memory_headroom * self.memory_bytes)

    @property
    def usable_memory(self) -> int:
        """Bytes a plan may fill per device (the default memory_limit): ``memory_bytes - memory_reserved``
        less the headroom, e.g. a V100-16GB: 16160 MiB - 1280 MiB - 5% (808 MiB) = 14072 MiB (13.74 GiB)."""
        return self.memory_bytes - self.memory_reserved - self.headroom_bytes

    def peak(self, dtype: torch.dtype | str) -> float:
        """Peak FLOP/s for ``dtype`` (a torch dtype or a name like ``"bfloat16"``).

        Dtypes without an entry (integers, complex, fp8...) fall back to ``float32``,
        or to the slowest entry when there is no ``float32``.
        """
        key = str(dtype).removeprefix("torch.")
        if key in self.peak_flops:
            return float(self.peak_flops[key])
        if "float32" in self.peak_flops:
            return float(self.peak_flops["float32"])
        return float(min(self.peak_flops.values()))

    def replace(self, **overrides: Any) -> "DeviceSpec":
        """A copy with some fields changed, e.g. ``spec.replace(memory_bytes=40 * 2**30)``.

        Raises:
            ConfigError: a field name is unknown.
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise ConfigError(f"DeviceSpec has no field(s) {sorted(unknown)}; fields are {sorted(names)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MiB = 2**20
# What a PyTorch training process holds on a GPU before its first tensor: the CUDA context, which before
# CUDA 11.7 loaded every kernel image of the library (> 1000 MB; since 11.7's lazy loading about 300 MB:
# pytorch/pytorch#107667), plus NCCL's buffers (4 MiB per channel and peer by default) and cuBLAS/cuDNN
# workspaces, taken as 256 MiB. Estimates: measure yours as total - free of torch.cuda.mem_get_info() after
# one step's first collective, less torch.cuda.memory_reserved(), and set DeviceSpec.memory_reserved.
_RESERVED_EAGER = 1024 * MiB + 256 * MiB   # CUDA < 11.7 (PyTorch <= 1.12 wheels; the PipeDream-2BW paper's V100s)
_RESERVED_LAZY = 512 * MiB + 256 * MiB     # CUDA >= 11.7, lazy module loading (PyTorch 2.x)
# What M_s does not count and a real run still needs: the caching allocator's fragmentation (blocks cached but
# too small for the next request; up to 43% in LLM training with recompute, arXiv 2507.16274) and one op's
# temporaries (e.g. a GPT head's fp16 logits beside their fp32 copy). The PipeDream-2BW paper measured that GPipe
# with 64 samples a flush of GPT-2.2B at 8 stages does not fit a V100-16GB (its Appendix B.1: "only a batch size
# of 32 fits"), where M_s counts 13.95 GiB of the 14.53 left after _RESERVED_EAGER: at least 0.58 GiB, 3.7% of
# the device, unmodelled. The presets keep 5% free (vLLM's default gpu_memory_utilization keeps 10%).
_HEADROOM = 0.05


def _gpu(name: str, *, fp64: float, fp32: float, tf32: float, bf16: float, fp16: float, hbm: float,
         mem: int, nvlink: float, ib_gbit: float, gpus_per_nic: int = 1, reserved: int = _RESERVED_LAZY) -> DeviceSpec:
    return DeviceSpec(
        name=name,
        peak_flops={"float64": fp64, "float32": fp32, "tfloat32": tf32, "bfloat16": bf16, "float16": fp16},
        mem_bandwidth=hbm, memory_bytes=mem, memory_reserved=reserved, memory_headroom=_HEADROOM,
        intra_node_bandwidth=nvlink,
        inter_node_bandwidth=ib_gbit * 1e9 / 8 / gpus_per_nic, devices_per_node=8, gpus_per_nic=gpus_per_nic,
        link_latency=1e-5,
        kernel_overhead=5e-6,
    )


# Datasheet numbers, SXM parts, dense (no sparsity). float32 is the CUDA-core rate
# (PyTorch does not use TF32 for matmuls by default); tfloat32 is there for users who do.
# NVLink is per direction (half the bidirectional figure NVIDIA quotes); one IB NIC per GPU, 8 GPUs a node,
# except v100-16gb: the PipeDream-2BW paper's servers (AWS p3.16xlarge: 8 V100-16GB with NVLink, one
# 25 Gbit/s link per server, so 25/8 Gbit/s per GPU when all eight talk to other servers at once).
# Memory is what torch.cuda.get_device_properties reports (MiB as torch prints it): V100-SXM2-16GB 16160,
# A100-SXM4-40GB 40536, A100-SXM4-80GB 81920, H100 80GB HBM3 81082-81090, H200 143156 (public logs).
PRESETS: dict[str, DeviceSpec] = {
    "v100-16gb": _gpu("v100-16gb", fp64=7.8e12, fp32=15.7e12, tf32=15.7e12, bf16=15.7e12, fp16=125e12,
                      hbm=900 * GB, mem=16160 * MiB, nvlink=150 * GB, ib_gbit=25, gpus_per_nic=8,
                      reserved=_RESERVED_EAGER),
    "a100-40gb": _gpu("a100-40gb", fp64=19.5e12, fp32=19.5e12, tf32=156e12, bf16=312e12, fp16=312e12,
                      hbm=1555 * GB, mem=40536 * MiB, nvlink=300 * GB, ib_gbit=200),
    "a100-80gb": _gpu("a100-80gb", fp64=19.5e12, fp32=19.5e12, tf32=156e12, bf16=312e12, fp16=312e12,
                      hbm=2039 * GB, mem=81920 * MiB, nvlink=300 * GB, ib_gbit=200),
    "h100-80gb": _gpu("h100-80gb", fp64=67e12, fp32=67e12, tf32=494.7e12, bf16=989.4e12, fp16=989.4e12,
                      hbm=3350 * GB, mem=81082 * MiB, nvlink=450 * GB, ib_gbit=400),
    "h200-141gb": _gpu("h200-141gb", fp64=67e12, fp32=67e12, tf32=494.7e12, bf16=989.4e12, fp16=989.4e12,
                       hbm=4800 * GB, mem=143156 * MiB, nvlink=450 * GB, ib_gbit=400),
}

_MEASURE_VERSION = "measure v2"  # bump when measure_cpu changes: older cache entries are ignored

# gloo over loopback between two local processes (docs/cost-model.md: a 4 MB send/recv ~12 ms).
_CPU_LINK_BANDWIDTH = 3.5e8
_CPU_LINK_LATENCY = 2e-4


def cache_dir() -> Path:
    """Where fxpipe caches measurements: ``$FXPIPE_CACHE_DIR`` or ``~/.cache/fxpipe``."""
    return Path(os.environ.get("FXPIPE_CACHE_DIR") or Path.home() / ".cache" / "fxpipe")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def host_fingerprint() -> str:
    """CPU model + torch version + thread count: what the ``cpu`` measurement depends on."""
    return f"{_cpu_model()}|torch {torch.__version__}|threads {torch.get_num_threads()}"


def _best_time(fn: Any, budget: float, min_reps: int = 3) -> float:
    """Shortest of repeated runs within ``budget`` seconds (a peak rate wants the best run)."""
    fn()  # warm-up: thread pool start, first-call initialisation
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < budget:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return min(times)


def measure_cpu() -> DeviceSpec:
    """Measure this CPU once (< 2 s): matmul FLOP/s (float32, float64), copy bandwidth, op overhead.

    Returns:
        A DeviceSpec named ``"cpu"``. bfloat16/float16 get the float32 rate (CPUs
        without AMX run them no faster). Links model gloo between local processes.
    """
    n = 1024
    rates: dict[str, float] = {}
    for dt in (torch.float32, torch.float64):
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        out = torch.empty(n, n, dtype=dt)
        t = _best_time(lambda: torch.mm(a, b, out=out), 0.4)
        rates[str(dt).removeprefix("torch.")] = 2 * n**3 / t
    rates["bfloat16"] = rates["float16"] = rates["float32"]
    src = torch.empty(64 * 2**20 // 4, dtype=torch.float32).fill_(1.0)  # 64 MiB: beyond the caches
    dst = torch.empty_like(src).fill_(0.0)
    t = _best_time(lambda: dst.copy_(src), 0.3)
    bandwidth = 2 * src.nbytes / t  # read + write
    x, y = torch.ones(1, requires_grad=True), torch.ones(1)  # a training op: autograd records it
    t_op = _best_time(lambda: [torch.add(x, y) for _ in range(100)], 0.1) / 100
    return DeviceSpec(name="cpu", peak_flops=rates, mem_bandwidth=bandwidth,
                      memory_bytes=_host_memory(), intra_node_bandwidth=_CPU_LINK_BANDWIDTH,
                      inter_node_bandwidth=_CPU_LINK_BANDWIDTH, devices_per_node=1, link_latency=_CPU_LINK_LATENCY,
                      kernel_overhead=t_op)


def _host_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * GiB


@lru_cache(maxsize=4)
def _cpu_spec(fingerprint: str, directory: str) -> DeviceSpec:
    path = Path(directory) / "devices.json"
    table: dict[str, Any] = {}
    try:
        table = json.loads(path.read_text())
        d = table[fingerprint]
        return DeviceSpec(**d)
    except (OSError, ValueError, KeyError, TypeError, ConfigError):
        pass
    spec = measure_cpu()
    table[fingerprint] = spec.to_dict()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=2, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home still gets the measured spec, just not cached
    return spec


def get_device(spec: str | DeviceSpec | None = None) -> DeviceSpec:
    """Resolve a device argument to a DeviceSpec.

    Args:
        spec: a DeviceSpec (returned as is), a preset name (``"a100-80gb"``, case
            insensitive), ``"cpu"`` or None for this machine (measured once, cached
            in ``$FXPIPE_CACHE_DIR`` or ``~/.cache/fxpipe/devices.json``).

    Returns:
        The DeviceSpec.

    Raises:
        ConfigError: ``spec`` is an unknown name or of the wrong type.
    """
    if isinstance(spec, DeviceSpec):
        return spec
    if spec is None:
        spec = "cpu"
    if not isinstance(spec, str):
        raise ConfigError(f"device must be a preset name, a DeviceSpec or None, got {type(spec).__name__} "
                          f"{spec!r}; valid names: {['cpu', *PRESETS]}")
    key = spec.strip().lower()
    if key == "cpu":
        return _cpu_spec(f"{host_fingerprint()}|{_MEASURE_VERSION}", str(cache_dir()))
    if key in PRESETS:
        return PRESETS[key]
    raise ConfigError(f"unknown device {spec!r}; valid names: {['cpu', *PRESETS]}, or pass "
                      "fxpipe.cost_models.device.DeviceSpec(name=..., peak_flops={...}, ...)")
