"""Shared helpers of the benchmark scripts in bench/ (not part of the cryoscape package).

What lives here
---------------
* :func:`run_timed` runs one command as a child process and measures its wall time and its peak
  resident memory (``os.wait4`` returns the rusage of exactly that child, so ``ru_maxrss`` is its
  own high-water mark, plus that of any children it reaped).
* :func:`thread_env` gives every tool of a comparison the same thread settings (and hides or shows
  the GPU); :func:`machine_name` names the CPU (and GPU) a benchmark ran on.
* :func:`ensure_cryodrgn` finds, or creates, the separate virtual environment holding the peer
  tool cryoDRGN (installed from the package registry; its code is never imported by ours).
* :func:`simulate_dataset` writes (or reuses) a ``cryoscape simulate`` dataset.
* :func:`compare_to_reference` reports a map's FSC to a ground-truth map: resolution at a threshold
  and the area under the curve, optionally inside a soft mask made from the ground truth.

Every figure a benchmark prints goes through :func:`print_figure`, one per line, so that the
output can be grepped or parsed (``name: value unit``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

DEFAULT_CRYODRGN_VENV = Path("/tmp/cryodrgn-venv")
CRYODRGN_VERSION = "4.3.1"
CRYODRGN_TORCH_VERSION = "2.13.0"


# --------------------------------------------------------------------------- processes
@dataclass
class RunResult:
    """Wall time, peak memory and exit status of one child process."""

    command: list[str]
    wall_s: float
    peak_rss_mb: float
    returncode: int
    log_path: Path
    peak_anon_mb: float | None = None
    peak_file_mb: float | None = None

    def tail(self, n_lines: int = 20) -> str:
        """Last lines of the child's combined output."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n_lines:])


def thread_env(threads: int | None, gpu: bool = False) -> dict[str, str]:
    """Environment with the same thread settings for every tool (``None``: leave as inherited).

    Without ``gpu`` every tool is measured on this machine's CPU, even where a GPU is present (the
    GPU is hidden); with it the GPU stays visible and each tool picks it as its default device.
    """
    env = dict(os.environ)
    if threads is not None:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[name] = str(threads)
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def machine_name(gpu: bool = False) -> str:
    """The CPU model and its bfloat16 support (lscpu), and with ``gpu`` the CUDA device's name."""
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    flags = next((line for line in cpu.splitlines() if line.startswith("Flags")), "")
    name = (f"CPU {model} ({'avx512_bf16' if 'avx512_bf16' in flags else 'no avx512_bf16'}, "
            f"{'amx' if 'amx_tile' in flags else 'no amx'})")
    if gpu:
        import torch

        name += f", GPU {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none found'}"
    return name


def run_timed(
    command: Sequence[str],
    *,
    log_path: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
    poll_memory: bool = False,
) -> RunResult:
    """Run ``command``, its output going to ``log_path``; measure wall time and peak RSS.

    The peak RSS is sampled from ``/proc`` every 20 ms: the largest sum of ``VmRSS`` over the
    child and its descendants (torchrun workers, a peer's subprocesses), or the child's own
    ``VmHWM`` if larger.  ``wait4``'s ``ru_maxrss`` is only the fallback (a child too short to
    sample, or no ``/proc``): on Linux it includes this process's own peak, which the child
    inherits when it is spawned.  With ``poll_memory`` the child's peaks of ``RssAnon`` (heap,
    tensors, arrays read into memory) and ``RssFile`` (mapped files, e.g. memory-mapped stacks;
    reclaimable) are also reported (``peak_anon_mb``, ``peak_file_mb``).

    Raises
    ------
    RuntimeError
        With ``check``, when the command exits non-zero (the error names the log file).
    """
    command = [str(c) for c in command]
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0, "tree": 0}
        done = threading.Event()
        poller = threading.Thread(target=_poll_status, args=(proc.pid, peaks, done), daemon=True)
        poller.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    sampled_kb = max(peaks["tree"], peaks["VmHWM"])
    peak_kb = sampled_kb if sampled_kb > 0 else usage.ru_maxrss
    result = RunResult(command, wall, peak_kb / 1024.0, proc.returncode, log_path)
    if poll_memory:
        result.peak_anon_mb = peaks["RssAnon"] / 1024.0
        result.peak_file_mb = peaks["RssFile"] / 1024.0
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited with status {result.returncode}; see {log_path}:\n"
            + result.tail()
        )
    return result


def _poll_status(pid: int, peaks: dict[str, int], done: threading.Event) -> None:
    """Track, until ``done``, the peaks (kB) of the child's ``RssAnon``, ``RssFile`` and ``VmHWM`` and,
    as ``peaks["tree"]``, of the summed ``VmRSS`` of the child and its descendants."""
    while not done.is_set():
        own = _status_kb(pid, ("RssAnon", "RssFile", "VmHWM"))
        if own is None:
            return
        for key, value in own.items():
            peaks[key] = max(peaks[key], value)
        tree = sum((_status_kb(p, ("VmRSS",)) or {}).get("VmRSS", 0) for p in _process_tree(pid))
        peaks["tree"] = max(peaks["tree"], tree)
        done.wait(0.02)


def _status_kb(pid: int, keys: Sequence[str]) -> dict[str, int] | None:
    """The fields ``keys`` (kB) of ``/proc/PID/status``; None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in keys}
    except (OSError, ValueError, IndexError):
        return None


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its living descendants (from ``/proc/PID/task/TID/children``)."""
    pids, i = [pid], 0
    while i < len(pids):
        p, i = pids[i], i + 1
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    pids.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return pids


def best_of(runs: Sequence[RunResult]) -> RunResult:
    """The fastest of repeated runs (the least disturbed by other work on a shared machine)."""
    return min(runs, key=lambda r: r.wall_s)


# --------------------------------------------------------------------------- tools
def relion_auto_refine_command(threads: int, particles, out_prefix, reference, *, ini_high_angstrom: float,
                               particle_diameter_angstrom: float, healpix_order: int, local_healpix_order: int,
                               offset_range_pixel: float, offset_step_pixel: float, extra: Sequence = ()) -> list:
    """``mpirun ... relion_refine_mpi --auto_refine`` as the RELION benchmarks run it (bench/refine.py,
    bench/pose_relion_local.py).  RELION splits random halves only under MPI, so a leader and ``threads``
    followers of one thread each are its equivalent of ``--j threads`` (the leader only hands out work);
    CTF, solvent flattening, norm and scale corrections, C1, halves joined below 40 A."""
    return ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", threads + 1,
            "relion_refine_mpi", "--i", particles, "--o", out_prefix, "--ref", reference,
            "--ini_high", ini_high_angstrom, "--auto_refine", "--split_random_halves",
            "--particle_diameter", particle_diameter_angstrom, "--ctf", "--flatten_solvent", "--zero_mask",
            "--oversampling", 1, "--healpix_order", healpix_order, "--auto_local_healpix_order", local_healpix_order,
            "--offset_range", offset_range_pixel, "--offset_step", offset_step_pixel, "--sym", "C1",
            "--low_resol_join_halves", 40, "--norm", "--scale", "--j", 1, "--pool", 30, "--pad", 2,
            "--dont_combine_weights_via_disc", *extra]


def cryoscape_command() -> list[str]:
    """How to call our CLI: the ``cryoscape`` script beside this interpreter, else ``-m``."""
    script = Path(sys.executable).with_name("cryoscape")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "cryoscape.cli.main"]


def ensure_cryodrgn(path: str | os.PathLike | None = None) -> Path:
    """Path of a working ``cryodrgn`` executable; create the default venv when it is missing.

    ``path`` may name the executable itself or a virtual environment holding it.  Without it,
    ``/tmp/cryodrgn-venv/bin/cryodrgn`` is used, and that venv is created with
    ``python3 -m venv`` and ``pip install torch==2.13.0`` then ``cryodrgn==4.3.1`` if absent.
    """
    if path is not None:
        p = Path(path)
        exe = p / "bin" / "cryodrgn" if p.is_dir() else p
        if not exe.exists():
            raise FileNotFoundError(f"{exe} does not exist; pass the cryodrgn executable or its venv")
        return exe
    exe = DEFAULT_CRYODRGN_VENV / "bin" / "cryodrgn"
    if exe.exists():
        return exe
    print(f"# creating {DEFAULT_CRYODRGN_VENV} with cryodrgn=={CRYODRGN_VERSION} (once)", flush=True)
    python3 = shutil.which("python3") or sys.executable
    subprocess.run([python3, "-m", "venv", str(DEFAULT_CRYODRGN_VENV)], check=True)
    pip = [str(DEFAULT_CRYODRGN_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [f"torch=={CRYODRGN_TORCH_VERSION}"], check=True)
    subprocess.run(pip + [f"cryodrgn=={CRYODRGN_VERSION}"], check=True)
    if not exe.exists():
        raise RuntimeError(f"installing cryodrgn into {DEFAULT_CRYODRGN_VENV} left no {exe}")
    return exe


def tool_version(command: Sequence[str], env: dict[str, str] | None = None) -> str:
    """``COMMAND --version`` output, or ``unknown``."""
    try:
        out = subprocess.run([*map(str, command), "--version"], capture_output=True, text=True,
                             env=env, timeout=120)
        return (out.stdout or out.stderr).strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


# --------------------------------------------------------------------------- data
def simulate_dataset(
    outdir: Path,
    *,
    box_size: int,
    n_images: int,
    snr: float = 0.1,
    shift_max_pixel: float = 0.0,
    seed: int = 0,
    heterogeneity: str = "none",
    env: dict[str, str] | None = None,
) -> tuple[Path, RunResult | None]:
    """A ``cryoscape simulate`` dataset in ``outdir``, reused when its parameters match.

    The built-in molecule; homogeneous by default, or ``heterogeneity="hinge"`` (its 1-D hinge
    motion, the ground truth per image in ``ground_truth.npz``).  Returns ``(outdir, run)`` where
    ``run`` is ``None`` when an existing dataset was reused.
    """
    outdir = Path(outdir)
    params = dict(box_size=box_size, n_images=n_images, snr=snr,
                  shift_max_pixel=shift_max_pixel, seed=seed, heterogeneity=heterogeneity)
    stamp = outdir / "bench_params.json"
    needed = ["particles.mrcs", "particles.star", "poses.pkl", "ctf.pkl", "gt_volumes/vol_000.mrc",
              "ground_truth.npz"]
    if stamp.exists() and all((outdir / f).exists() for f in needed):
        try:
            if json.loads(stamp.read_text()) == params:
                return outdir, None
        except (OSError, ValueError):
            pass
    if outdir.exists():
        shutil.rmtree(outdir)
    outdir.parent.mkdir(parents=True, exist_ok=True)
    run = run_timed(
        [*cryoscape_command(), "simulate", "-o", outdir, "-n", n_images, "-D", box_size,
         "--snr", snr, "--heterogeneity", heterogeneity, "--shift-max-pixel", shift_max_pixel,
         "--seed", seed],
        log_path=outdir.parent / f"{outdir.name}.simulate.log", env=env,
    )
    stamp.write_text(json.dumps(params))
    return outdir, run


# --------------------------------------------------------------------------- maps
def read_map(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """``(volume float64 [z, y, x], pixel size in angstrom)`` of an MRC map."""
    from cryoscape.io.mrc import read_mrc

    volume, pixel = read_mrc(path)
    return np.asarray(volume, dtype=np.float64), float(pixel)


def soft_mask_from_reference(reference: np.ndarray, *, threshold_fraction: float = 0.02,
                             dilate_pixel: int = 3, edge_pixel: int = 4) -> np.ndarray:
    """Soft mask around a clean reference map: threshold, dilate, cosine edge.

    The binary core is ``reference > threshold_fraction * max``, dilated by ``dilate_pixel``; the
    mask falls from 1 to 0 as a raised cosine over ``edge_pixel`` voxels outside the core.
    """
    from scipy import ndimage

    core = reference > threshold_fraction * reference.max()
    if dilate_pixel > 0:  # (iterations=0 would dilate until nothing changes)
        core = ndimage.binary_dilation(core, iterations=dilate_pixel)
    distance = ndimage.distance_transform_edt(~core)
    return np.where(distance >= edge_pixel, 0.0, 0.5 * (1 + np.cos(np.pi * distance / edge_pixel)))


def compare_to_reference(volume: np.ndarray, reference: np.ndarray, *, pixel_size_angstrom: float,
                         mask: np.ndarray | None = None) -> dict:
    """FSC of ``volume`` to ``reference``: resolution at 0.5 and 0.143, and the curve's area.

    ``auc`` is the mean of ``|FSC|`` over shells ``1 .. D//2`` (shell 0, the mean, is left out);
    ``correlation`` is the real-space correlation coefficient (its sign shows an inverted map).
    """
    import torch

    from cryoscape.fourier.fsc import fourier_shell_correlation, resolution_at_threshold

    D = reference.shape[-1]
    freqs, fsc = fourier_shell_correlation(
        torch.as_tensor(volume), torch.as_tensor(reference),
        mask=None if mask is None else torch.as_tensor(mask),
    )
    freqs, fsc = freqs.numpy(), fsc.numpy()
    res05 = float(resolution_at_threshold(freqs, fsc, 0.5))
    res0143 = float(resolution_at_threshold(freqs, fsc, 0.143))
    return dict(
        res_0_5_cycles_per_pixel=res05,
        res_0_5_angstrom=pixel_size_angstrom / res05 if res05 > 0 else float("inf"),
        res_0_143_cycles_per_pixel=res0143,
        auc=float(np.abs(fsc[1 : D // 2 + 1]).mean()),
        correlation=float(np.corrcoef(volume.ravel(), reference.ravel())[0, 1]),
        fsc=fsc,
    )


# --------------------------------------------------------------------------- output
def warm_start_seconds(run_dir: Path) -> float | None:
    """Seconds of a cryoscape run's warm start ("warm start: ... in X s" in run.log), None without one."""
    path = Path(run_dir) / "run.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    hit = re.search(r"warm start: .*? in ([\d.]+) s", text)
    return float(hit.group(1)) if hit else None


def teacher_seconds(run_dir: Path) -> float | None:
    """Seconds of a cryoscape run's automatic teacher ("teacher: N epochs in X s" in run.log; "1 epoch"), None
    without one."""
    path = Path(run_dir) / "run.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    hit = re.search(r"teacher: \d+ epochs? in ([\d.]+) s", text)
    return float(hit.group(1)) if hit else None


def print_figure(name: str, value: float | str, unit: str = "", *, fmt: str = ".2f") -> None:
    """One figure per line: ``name: value unit``."""
    text = value if isinstance(value, str) else format(value, fmt)
    print(f"{name}: {text}{(' ' + unit) if unit else ''}", flush=True)


def print_note(text: str) -> None:
    """A comment line (starts with ``#``), not a figure."""
    print(f"# {text}", flush=True)
