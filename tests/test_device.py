"""Tests of cost_models/device.py: presets, lookup errors, overrides, the measured and cached CPU spec."""

from __future__ import annotations

import json

import pytest
import torch

import fxpipe.cost_models.device as device_mod
from fxpipe.cost_models.device import PRESETS, DeviceSpec, get_device
from fxpipe.errors import ConfigError


def test_presets_are_realistic() -> None:
    assert set(PRESETS) == {"v100-16gb", "a100-40gb", "a100-80gb", "h100-80gb", "h200-141gb"}
    a100, h100, h200 = get_device("a100-80gb"), get_device("h100-80gb"), get_device("h200-141gb")
    assert a100.peak(torch.bfloat16) == 312e12 and a100.peak("float32") == 19.5e12
    assert h100.peak(torch.bfloat16) > a100.peak(torch.bfloat16) > get_device("v100-16gb").peak(torch.bfloat16)
    assert h200.mem_bandwidth > h100.mem_bandwidth > a100.mem_bandwidth > get_device("a100-40gb").mem_bandwidth
    assert h200.memory_bytes > a100.memory_bytes > get_device("a100-40gb").memory_bytes
    for name, spec in PRESETS.items():
        assert spec.intra_node_bandwidth > spec.inter_node_bandwidth  # NVLink beats InfiniBand
        assert spec.devices_per_node == 8
        if name != "v100-16gb":
            assert 12.5e9 <= spec.inter_node_bandwidth <= 50e9           # 100-400 Gb/s, a NIC per GPU


def test_v100_is_the_papers_server() -> None:
    """PipeDream-2BW's cluster: p3.16xlarge, 8 x V100-16GB over NVLink, 25 Gbit/s per server."""
    v100 = get_device("v100-16gb")
    assert v100.peak("float16") == 125e12 and v100.peak("float32") == 15.7e12
    # 16160 MiB as the driver reports a V100-SXM2-16GB; the paper's CUDA (< 11.7) context loads every kernel;
    # 5% (808 MiB) kept for the allocator's fragmentation
    assert v100.memory_bytes == 16160 * 2**20 and v100.usable_memory == (16160 - 1280 - 808) * 2**20
    assert v100.mem_bandwidth == 900e9 and v100.intra_node_bandwidth == 150e9
    assert v100.inter_node_bandwidth == pytest.approx(25e9 / 8 / 8)  # one 25 Gbit/s NIC shared by 8 GPUs


def test_lookup_is_case_insensitive_and_passes_specs_through() -> None:
    assert get_device("A100-80GB") is PRESETS["a100-80gb"]
    spec = DeviceSpec(name="toy", peak_flops={"float32": 1e12})
    assert get_device(spec) is spec


def test_unknown_device_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown device 'tpu-v9'.*'a100-80gb'.*'h200-141gb'"):
        get_device("tpu-v9")
    with pytest.raises(ConfigError, match=r"got int 3"):
        get_device(3)  # type: ignore[arg-type]


def test_peak_falls_back_to_float32() -> None:
    spec = DeviceSpec(name="toy", peak_flops={"float32": 2e12, "bfloat16": 8e12})
    assert spec.peak(torch.int64) == 2e12 and spec.peak(torch.bfloat16) == 8e12
    assert DeviceSpec(name="t", peak_flops={"float16": 3e12, "bfloat16": 5e12}).peak("float64") == 3e12


def test_replace_and_validation() -> None:
    a100 = get_device("a100-80gb")
    slow = a100.replace(inter_node_bandwidth=12.5e9, name="a100-slow-ib")
    assert slow.inter_node_bandwidth == 12.5e9 and slow.peak_flops == a100.peak_flops
    assert a100.inter_node_bandwidth == 25e9  # presets are frozen
    with pytest.raises(ConfigError, match=r"no field\(s\) \['bandwith'\]"):
        a100.replace(bandwith=1.0)
    with pytest.raises(ConfigError, match=r"mem_bandwidth must be > 0 bytes/s, got -1"):
        a100.replace(mem_bandwidth=-1)
    with pytest.raises(ConfigError, match="no peak_flops"):
        DeviceSpec(name="empty")


def test_cpu_is_measured_once_and_cached(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FXPIPE_CACHE_DIR", str(tmp_path))
    device_mod._cpu_spec.cache_clear()
    cpu = get_device(None)
    assert cpu.name == "cpu" and cpu.peak(torch.float32) > 1e8 and cpu.mem_bandwidth > 1e8
    assert 0 < cpu.kernel_overhead < 1e-3
    table = json.loads((tmp_path / "devices.json").read_text())
    assert list(table) == [f"{device_mod.host_fingerprint()}|{device_mod._MEASURE_VERSION}"]
    assert f"threads {torch.get_num_threads()}" in device_mod.host_fingerprint()

    def no_measuring() -> DeviceSpec:
        raise AssertionError("measured again instead of reading the cache")

    device_mod._cpu_spec.cache_clear()
    monkeypatch.setattr(device_mod, "measure_cpu", no_measuring)
    assert get_device("cpu") == cpu
    device_mod._cpu_spec.cache_clear()


def test_devices_per_node_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"devices_per_node must be an int >= 1, got 0"):
        get_device("a100-80gb").replace(devices_per_node=0)


# ----------------------------------------------------------------------------- the device's memory as the limit


def _mlp_plan(**kw):
    import fxpipe
    from models import MLP

    return fxpipe.plan(MLP(), (torch.randn(16, 16),), num_stages=2, num_microbatches=2, time_limit=2.0, **kw)


def test_device_memory_is_the_default_limit_and_none_lifts_it() -> None:
    from fxpipe.errors import InfeasibleMemoryError

    need = max(s.memory for s in _mlp_plan(device="a100-80gb").stages)
    assert _mlp_plan(device="a100-80gb").memory_limit == (81920 - 768 - 4096) * 2**20 == get_device("a100-80gb").usable_memory
    tiny = get_device("a100-80gb").replace(name="tiny", memory_bytes=need // 4, memory_reserved=0, memory_headroom=0)
    with pytest.raises(InfeasibleMemoryError, match=r"memory_limit"):
        _mlp_plan(device=tiny, recompute=False)
    lifted = _mlp_plan(device=tiny, recompute=False, memory_limit=None)
    assert lifted.memory_limit is None and max(s.memory for s in lifted.stages) > tiny.memory_bytes
    assert _mlp_plan().memory_limit is None  # this machine: no limit unless given


def test_the_default_limit_leaves_the_memory_the_cuda_context_holds() -> None:
    from fxpipe.errors import InfeasibleMemoryError

    need = max(s.memory for s in _mlp_plan(device="a100-80gb").stages)
    # the device has room for the plan, but not once its CUDA context and NCCL buffers are counted
    spec = get_device("a100-80gb").replace(name="snug", memory_bytes=4 * need, memory_reserved=4 * need - need // 4,
                                           memory_headroom=0)
    assert spec.usable_memory == need // 4
    with pytest.raises(InfeasibleMemoryError, match=rf"memory_limit={need // 4}\b"):
        _mlp_plan(device=spec, recompute=False)
    assert _mlp_plan(device=spec, recompute=False, memory_limit=spec.memory_bytes).memory_limit == 4 * need
    with pytest.raises(ConfigError, match=r"memory_reserved=.* leave nothing of memory_bytes="):
        spec.replace(memory_reserved=4 * need)
    with pytest.raises(ConfigError, match=r"memory_reserved must be an int >= 0 bytes, got -1"):
        spec.replace(memory_reserved=-1)


def test_the_default_limit_keeps_the_headroom_free() -> None:
    from fxpipe.errors import InfeasibleMemoryError

    need = max(s.memory for s in _mlp_plan(device="a100-80gb", recompute=False).stages)
    # room for the plan: the presets' 5% headroom is taken off the limit; a 40% one leaves too little
    spec = get_device("a100-80gb").replace(name="tight", memory_bytes=int(need * 1.05), memory_reserved=0)
    assert spec.memory_headroom == 0.05 and spec.usable_memory == int(need * 1.05) - int(0.05 * int(need * 1.05))
    assert _mlp_plan(device=spec, recompute=False).memory_limit == spec.usable_memory
    tight = spec.replace(memory_headroom=0.4)
    with pytest.raises(InfeasibleMemoryError, match=rf"memory_limit={tight.usable_memory}\b"):
        _mlp_plan(device=tight, recompute=False)
    loose = tight.replace(memory_headroom=0)
    assert loose.usable_memory == int(need * 1.05)
    assert max(s.memory for s in _mlp_plan(device=loose, recompute=False).stages) <= loose.usable_memory
    with pytest.raises(ConfigError, match=r"memory_headroom must be a fraction in \[0, 1\).*got 5"):
        spec.replace(memory_headroom=5)
    with pytest.raises(ConfigError, match=r"memory_headroom=0.99 .* leave nothing"):
        spec.replace(memory_reserved=int(need * 0.02), memory_headroom=0.99)


def test_memory_limit_accepts_size_strings() -> None:
    assert _mlp_plan(memory_limit="1GiB").memory_limit == 2**30
    assert _mlp_plan(memory_limit="8e9").memory_limit == 8 * 10**9
    with pytest.raises(ConfigError, match=r"memory_limit '16 gigs' is not a size.*'16GiB'"):
        _mlp_plan(memory_limit="16 gigs")
    with pytest.raises(ConfigError, match=r"memory_limit must be a positive number of bytes or None, got -5"):
        _mlp_plan(memory_limit=-5)


def test_dump_marks_stages_over_the_device_memory(tmp_path, monkeypatch, capsys) -> None:
    from fxpipe import cli

    small = get_device("a100-80gb").replace(name="small", memory_bytes=1, memory_reserved=0, memory_headroom=0)
    monkeypatch.setitem(device_mod.PRESETS, "small-test", small)
    path = tmp_path / "m.py"
    path.write_text("import torch\n"
                    "def make():\n"
                    "    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))\n"
                    "    return m, (torch.randn(4, 8),)\n")
    assert cli.main(["dump", f"{path}:make", "--stages", "2", "--microbatches", "2", "--device", "small-test",
                     "--memory-limit", "none"]) == 0
    out = capsys.readouterr()
    assert "WARNING: stage 0 needs" in out.out and "WARNING: stage 1 needs" in out.out
    assert "more than the 1 B usable on one small" in out.err
