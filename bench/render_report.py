"""Render fxpipe's HTML plan report in headless Chromium and check the screenshot is not blank.

    python bench/render_report.py                       # gpt2-small, 4 stages, a100-80gb costs
    python bench/render_report.py --preset bert-large --stages 8 --keep /tmp/report

Writes ``report.html`` with ``fxpipe dump PRESET --format html``, screenshots it with
``chromium --headless --screenshot`` (install: ``apt-get install -y chromium``), decodes
the PNG in pure Python (zlib + struct; numpy only speeds up unfiltering) and prints
the share of non-white pixels, the number of distinct colours, and whether the
timeline's F/B colours and the stage colours are on screen. Exit code 0 = looks right,
1 = blank or missing content, 2 = Chromium not available.
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np

from fxpipe.cli import main as fxpipe_main
from fxpipe.render import _KIND_COLOURS, _PALETTE


def decode_png(data: bytes) -> np.ndarray:
    """An 8-bit RGB/RGBA PNG (non-interlaced) as an ``(h, w, channels)`` uint8 array."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, idat, ihdr = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if ihdr is None:
        raise ValueError("PNG without IHDR")
    w, h, depth, ctype, _, _, interlace = ihdr
    channels = {2: 3, 6: 4, 0: 1, 4: 2}.get(ctype)
    if depth != 8 or channels is None or interlace:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {ctype}, interlace {interlace}")
    raw = zlib.decompress(b"".join(idat))
    stride = w * channels
    out = np.zeros((h, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int64)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=y * (stride + 1) + 1).astype(np.int64)
        if f == 0:
            cur = line
        elif f == 1:   # Sub: running sum per channel
            cur = np.cumsum(line.reshape(w, channels), axis=0).reshape(-1) % 256
        elif f == 2:   # Up
            cur = (line + prev) % 256
        else:          # Average / Paeth: sequential within the row
            cur_l = [0] * stride
            pl = prev.tolist()
            ll = line.tolist()
            for i in range(stride):
                a = cur_l[i - channels] if i >= channels else 0
                b = pl[i]
                if f == 3:
                    cur_l[i] = (ll[i] + (a + b) // 2) & 255
                else:
                    c = pl[i - channels] if i >= channels else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                    cur_l[i] = (ll[i] + pred) & 255
            cur = np.array(cur_l, dtype=np.int64)
        out[y] = cur
        prev = cur
    return out.reshape(h, w, channels)


def _hex(c: str) -> tuple[int, int, int]:
    return int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)


def inspect(img: np.ndarray) -> dict[str, object]:
    rgb = img[..., :3].astype(np.int32)
    flat = rgb.reshape(-1, 3)
    nonwhite = float(np.mean(np.any(flat < 245, axis=1)))
    codes = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    distinct = int(np.unique(codes).size)

    def share(colour: str, tol: int = 6) -> float:
        return float(np.mean(np.all(np.abs(flat - np.array(_hex(colour))) <= tol, axis=1)))

    return {"size": f"{img.shape[1]}x{img.shape[0]}", "nonwhite": nonwhite, "distinct_colours": distinct,
            "forward_px": share(_KIND_COLOURS["F"]), "backward_px": share(_KIND_COLOURS["B"]),
            "stage0_colour_px": share(_PALETTE[0][0], 2)}


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-small")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--device", default="a100-80gb")
    ap.add_argument("--memory-limit", default="16GiB")
    ap.add_argument("--keep", default=None, help="write report.html and report.png here (default: a temp dir)")
    a = ap.parse_args(argv)
    exe = find_chromium()
    if exe is None:
        print("render_report: chromium not found (install: apt-get install -y chromium); skipped")
        return 2
    work = a.keep or tempfile.mkdtemp(prefix="fxpipe_report_")
    os.makedirs(work, exist_ok=True)
    html_path, png_path = os.path.join(work, "report.html"), os.path.join(work, "report.png")
    t0 = time.perf_counter()
    rc = fxpipe_main(["dump", a.preset, "--stages", str(a.stages), "--microbatches", str(a.microbatches),
                      "--device", a.device, "--memory-limit", a.memory_limit, "--format", "html",
                      "-o", html_path])
    if rc != 0:
        print(f"render_report: fxpipe dump failed with exit code {rc}")
        return 1
    t1 = time.perf_counter()
    profile = tempfile.mkdtemp(prefix="fxpipe_chromium_")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", f"--screenshot={png_path}", "--window-size=1400,1800",
           "file://" + os.path.abspath(html_path)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    t2 = time.perf_counter()
    if not os.path.isfile(png_path):
        print(f"render_report: chromium wrote no screenshot (exit {r.returncode}): {r.stderr.strip()[-400:]}")
        return 1
    with open(png_path, "rb") as f:
        stats = inspect(decode_png(f.read()))
    ok = (stats["nonwhite"] > 0.02 and stats["distinct_colours"] > 16 and stats["forward_px"] > 1e-4
          and stats["backward_px"] > 1e-4 and stats["stage0_colour_px"] > 0)
    print(f"render_report: {a.preset} {a.stages} stages x {a.microbatches} microbatches ({a.device}); "
          f"html {os.path.getsize(html_path) / 1024:.0f} KiB in {t1 - t0:.1f} s, screenshot {stats['size']} "
          f"in {t2 - t1:.1f} s; non-white {stats['nonwhite'] * 100:.1f}%, {stats['distinct_colours']} colours, "
          f"F {stats['forward_px'] * 100:.2f}% B {stats['backward_px'] * 100:.2f}% "
          f"stage-0 {stats['stage0_colour_px'] * 100:.2f}% of pixels -> {'OK' if ok else 'BLANK/INCOMPLETE'}")
    print(f"render_report: files in {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
