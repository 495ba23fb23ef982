#!/usr/bin/env python
"""Benchmark: training on datasets larger than memory (issue 14, "Scaling up").

What it compares
----------------
(a) **Lazy reading against images in memory.**  ``cryoscape train`` with the voxel basis decoder
    (``--decoder basis --zdim 8``, its defaults otherwise: batch 64, lr 1e-3) trains one epoch on
    the same stack twice or more, in the same run: once with every image loaded into memory, once
    read lazily from disk (``--lazy``), and optionally lazily with the chunked shuffle
    (``--shuffle-chunk``) and from the float16 cache (``--cache-dir``).  The stack is at least
    ``4 x --budget-gb`` (default 1 GiB: 266,240 images of 64 x 64 float32 in 8 stacks, 4.06 GiB),
    and the lazy runs must stay within the budget: their peak resident memory (``ru_maxrss`` of
    the child, which counts memory-mapped file pages too) is printed beside it.  Before every run
    the stacks (and the cache) are dropped from the kernel's page cache
    (``posix_fadvise(DONTNEED)`` after ``fdatasync``), so each run starts cold as on a dataset
    larger than the machine's memory; ``--warm`` leaves them cached.  Speed: training images/s of
    the epoch as ``cryoscape train`` logs it ("epoch 1/1: ... in S s, R img/s", reading and
    training overlapped by the background prefetch; start-up, the normalisation, the noise
    spectrum, the warm start and writing the cache are left out and printed separately as wall
    times).  The goal is lazy / in memory >= 0.8.
    First, ``--read-check``: one random pass over the whole stack reading alone (batches of 64, cold),
    through memory maps as cryoscape read before (``io.mrc.MrcStack``, grouped by file) and through
    ``ParticleImages`` (positional reads), each in a child process with its peak RSS.
(b) **500,000 particles.**  A simulated set of 500,000 images of 64 x 64 in float16 (MRC mode 12),
    written in 10 stacks of 50,000 (4.1 GB) with a ``.txt`` stack list, ``poses.pkl`` and
    ``ctf.pkl``, trained one epoch with the basis decoder (``--lazy``, zdim 8); printed: images/s
    and the peak resident memory (goal: under 4 GB), with the anonymous / file-backed peaks.
(c) **1 and 2 processes** (torch.distributed, gloo): ``cryoscape train`` for one epoch of the
    base set (4,000 images, in memory, float32) as one process with 2 threads and under
    ``torchrun --nproc-per-node 2`` with one thread each, at the same global batch: the neural
    field VAE and the basis VAE, whose voxel-table gradients are summed either as one dense
    all-reduce (the default) or by gathering the touched rows (``--decoder-opt sparse_grad=true``).

Data
----
``cryoscape simulate -D 64 -n 4000 --snr 0.1`` (the built-in hinge, CTF, known poses) is made
once; the large sets tile its images (particle ``i`` is image ``i mod 4000`` plus fresh Gaussian
noise of half the image standard deviation, so that no two images are equal) with that image's
pose and CTF.  Simulating 500,000 projections would take 20 minutes here; the reading and
training costs do not depend on what the pixels show.  The sets live under ``--workdir``
(default ``/tmp/cryoscape-scale``) and are deleted at the end unless ``--keep-data``.

Forcing the data mode
---------------------
``cryoscape train`` loads sets under 2 GiB into memory and reads larger ones lazily; it has no
flag to force a 4 GiB set into memory, so the in-memory run calls the same command line through a
small wrapper that sets ``ParticleDataset(in_memory=True)`` (as bench/backproject.py does for its
lazy run).  The same wrapper passes ``--shuffle-chunk`` / ``--cache-dir`` to the data layer in case
the training engine does not forward them yet (it never overrides a value the engine passed).

Usage::

    flock /tmp/cryoscape-heavy.lock .venv/bin/python bench/scale.py --part a         # ~12 min
    flock /tmp/cryoscape-heavy.lock .venv/bin/python bench/scale.py --part a --runs chunk cache
    flock /tmp/cryoscape-heavy.lock .venv/bin/python bench/scale.py --part b         # ~12 min
    .venv/bin/python bench/scale.py --part a --quick    # 40,000 images, a pipeline check (~3 min)

The ratios (lazy / in memory) are printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    cryoscape_command,
    print_figure,
    print_note,
    run_timed,
    simulate_dataset,
    thread_env,
    tool_version,
)

# Runs the `cryoscape` command line with data-layer options set (see "Forcing the data mode").
DATA_WRAPPER = r"""
import json, sys
options = json.loads(sys.argv[1])
from cryoscape.cli.main import main
from cryoscape.data import training
original = training.ParticleDataset.__post_init__
def post_init(self):
    if options.get("in_memory") is not None:
        self.in_memory = options["in_memory"]
    for name in ("shuffle_chunk", "cache_dir"):
        if options.get(name) and not getattr(self, name):
            setattr(self, name, options[name])
    self.progress = False
    original(self)
training.ParticleDataset.__post_init__ = post_init
sys.exit(main(sys.argv[2:]))
"""

# One random pass over a stack list, reading batches of 64 the old way (memory maps, io.mrc.MrcStack,
# grouped by file) or through data.images.ParticleImages (positional reads); prints images/s.
READ_CHECK = r"""
import sys, time, numpy as np
from cryoscape.io.particles import load_particles
from cryoscape.io.mrc import open_stack
from cryoscape.data.images import ParticleImages
mode, listing = sys.argv[1], sys.argv[2]
table = load_particles(listing)
reader = ParticleImages(table.image_paths, table.image_indices, in_memory=False)
order = np.random.default_rng(0).permutation(len(reader))
stacks = {}
def read_mapped(idx):
    paths, local = table.image_paths[idx], table.image_indices[idx]
    for path in np.unique(paths):
        here = paths == path
        stacks.setdefault(path, open_stack(path)).read(local[here])
t0 = time.perf_counter()
for start in range(0, len(order), 64):
    idx = order[start:start + 64]
    read_mapped(idx) if mode == "memmap" else reader.read(idx)
print(len(order) / (time.perf_counter() - t0))
"""

RUNS = {
    # name: (extra command-line flags, data-layer options)
    "memory": ([], {"in_memory": True}),
    "lazy": (["--lazy"], {"in_memory": False}),
    "chunk": (["--lazy", "--shuffle-chunk", "1024"], {"in_memory": False, "shuffle_chunk": 1024}),
    "cache": (["--lazy", "--cache-dir", "{cache}"], {"in_memory": False, "cache_dir": "{cache}"}),
}
LABELS = {"memory": "in memory", "lazy": "lazy", "chunk": "lazy --shuffle-chunk 1024",
          "cache": "lazy --cache-dir (float16 cache)"}
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+)[^:]*: .*? in ([\d.]+) s, ([\d.]+) img/s")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", nargs="+", choices=["a", "b", "c"], default=["a", "b"],
                   help="which parts to run [a b]")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=["memory", "lazy", "chunk", "cache"],
                   help="part (a): which runs [all four]")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cryoscape-scale"))
    p.add_argument("--budget-gb", type=float, default=1.0,
                   help="part (a): resident memory the lazy runs may use, GiB; the stack is 4x it or more [1]")
    p.add_argument("--n-images-b", type=int, default=500_000, help="part (b): particles [500000]")
    p.add_argument("--threads", type=int, default=2, help="OMP/MKL threads [2]")
    p.add_argument("--warm-start-images", type=int, default=2000,
                   help="passed to every run (the warm start is set-up, not training) [2000]")
    p.add_argument("--warm", action="store_true", help="do not drop the stacks from the page cache before a run")
    p.add_argument("--quick", action="store_true",
                   help="pipeline check: (a) on 40,000 images (no 4x claim), (b) on 50,000")
    p.add_argument("--keep-data", action="store_true", help="keep the generated stacks in --workdir")
    p.add_argument("--subset-a", type=int, default=0, metavar="N",
                   help="part (a): train on N particles drawn at random from the whole stack (--ind), for a "
                        "busy machine [0: all]")
    p.add_argument("--batch-size", type=int, default=None, help="-b of every run [the basis default, 64]")
    p.add_argument("--read-check", action=argparse.BooleanOptionalAction, default=True,
                   help="part (a): first time one random pass of reading alone through memory maps and "
                        "through ParticleImages, with their peak RSS [on]")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- data
def write_tiled_dataset(out: Path, base: Path, *, n_images: int, n_stacks: int, dtype: str,
                        seed: int = 1) -> list[Path]:
    """``n_images`` particles tiled from the simulated ``base`` set (see "Data"), in ``n_stacks`` stacks.

    Writes ``stack_NNN.mrcs``, ``particles.txt``, ``poses.pkl`` and ``ctf.pkl``; returns the stacks.
    Reused when a finished set with the same parameters is there.
    """
    from cryoscape.io.cryodrgn import write_ctf_pkl, write_poses_pkl
    from cryoscape.io.mrc import MrcStackWriter, read_mrc
    from cryoscape.io.particles import load_particles

    params = {"n_images": n_images, "n_stacks": n_stacks, "dtype": dtype, "seed": seed, "base": str(base)}
    stamp = out / "bench_params.json"
    stacks = [out / f"stack_{i:03d}.mrcs" for i in range(n_stacks)]
    if stamp.exists() and json.loads(stamp.read_text()) == params and all(s.exists() for s in stacks):
        return stacks
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    table = load_particles(base / "particles.star")
    images, pixel = read_mrc(base / "particles.mrcs")
    n_base, D = images.shape[0], images.shape[-1]
    sigma = 0.5 * float(images.std())
    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, n_images, n_stacks + 1).astype(np.int64)
    for path, start, stop in zip(stacks, bounds[:-1], bounds[1:]):
        with MrcStackWriter(path, n_images=int(stop - start), box_size=D, pixel_size_angstrom=pixel,
                            dtype=dtype) as writer:
            for s in range(int(start), int(stop), 4096):
                e = min(int(stop), s + 4096)
                noise = rng.standard_normal((e - s, D, D), dtype=np.float32) * np.float32(sigma)
                writer.write(images[np.arange(s, e) % n_base] + noise)
    tile = np.arange(n_images) % n_base
    shifts = None if table.shifts_pixel is None else table.shifts_pixel[tile]
    write_poses_pkl(out / "poses.pkl", table.rotations[tile], shifts, box_size=D)
    write_ctf_pkl(out / "ctf.pkl", table.ctf.to_cryodrgn_array(D, table.pixel_size_angstrom)[tile])
    (out / "particles.txt").write_text("".join(f"{s.name}\n" for s in stacks))
    stamp.write_text(json.dumps(params))
    return stacks


def write_tiled_dataset_in_child(out: Path, base: Path, *, n_images: int, n_stacks: int, dtype: str) -> list[Path]:
    """:func:`write_tiled_dataset` in a child process.

    This process then never imports torch or holds images, which matters for the memory figures:
    on Linux a child's ``ru_maxrss`` starts from its parent's resident memory at ``fork`` (measured
    here: a child running ``pass`` reports 625 MB under a parent holding 600 MB).
    """
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import scale; "
            "scale.write_tiled_dataset(Path(sys.argv[2]), Path(sys.argv[3]), n_images=int(sys.argv[4]), "
            "n_stacks=int(sys.argv[5]), dtype=sys.argv[6])")
    subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent), str(out), str(base),
                    str(n_images), str(n_stacks), dtype], check=True)
    return [out / f"stack_{i:03d}.mrcs" for i in range(n_stacks)]


def drop_from_page_cache(paths) -> None:
    """Write back and drop the files' pages from the kernel's page cache (a cold start)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- runs
def train_command(data: Path, out: Path, args, flags: list[str], options: dict) -> list[str]:
    """``cryoscape train`` (through :data:`DATA_WRAPPER`) on the tiled set in ``data``."""
    extra = ["-b", str(args.batch_size)] if args.batch_size else []
    return [sys.executable, "-c", DATA_WRAPPER, json.dumps(options), "train", str(data / "particles.txt"),
            "--poses", str(data / "poses.pkl"), "--ctf", str(data / "ctf.pkl"), "-o", str(out),
            "--decoder", "basis", "--zdim", "8", "-n", "1", "--no-progress",
            "--warm-start-images", str(args.warm_start_images), *extra, *flags]


def train_once(name: str, data: Path, stacks: list[Path], args, env, *, flags, options) -> dict:
    """One ``cryoscape train`` epoch; its speed from run.log, its wall time and memory peaks."""
    out = args.workdir / "runs" / name
    if out.exists():
        shutil.rmtree(out)
    cache = args.workdir / "cache"
    flags = [f.replace("{cache}", str(cache)) for f in flags]
    options = {k: (v.replace("{cache}", str(cache)) if isinstance(v, str) else v) for k, v in options.items()}
    if not args.warm:
        drop_from_page_cache([*stacks, *sorted(cache.glob("*.mrcs"))])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run_timed(train_command(data, out, args, flags, options), log_path=out.parent / f"{name}.log",
                       env=env, poll_memory=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    text = (out / "run.log").read_text(errors="replace")
    hit = EPOCH_LINE.findall(text)
    loss = re.findall(r"epoch 1/1[^:]*: loss ([-\d.e+]+)", text)
    cache_s = re.findall(r"caching \(float16\).*?(\d+:\d+)", result.log_path.read_text(errors="replace"))
    return {
        "epoch_s": float(hit[-1][2]) if hit else float("nan"),
        "img_s": float(hit[-1][3]) if hit else float("nan"),
        "loss": loss[-1] if loss else "?",
        "wall_s": result.wall_s,
        "cpu_s": cpu_s,
        "rss_mb": result.peak_rss_mb,
        "anon_mb": result.peak_anon_mb,
        "file_mb": result.peak_file_mb,
        "cache_write": cache_s[-1] if cache_s else None,
    }


def report_run(prefix: str, label: str, r: dict) -> None:
    print_figure(f"{prefix} {label}: training images/s", r["img_s"], "img/s", fmt=".1f")
    print_figure(f"{prefix} {label}: epoch", r["epoch_s"], "s", fmt=".1f")
    print_figure(f"{prefix} {label}: whole command", r["wall_s"], "s", fmt=".1f")
    print_figure(f"{prefix} {label}: CPU time of the whole command (user + sys)", r["cpu_s"], "s", fmt=".1f")
    print_figure(f"{prefix} {label}: peak RSS (ru_maxrss)", r["rss_mb"], "MB", fmt=".0f")
    print_figure(f"{prefix} {label}: peak RssAnon / RssFile (polled every 20 ms)",
                 f"{r['anon_mb']:.0f} / {r['file_mb']:.0f}", "MB")
    print_figure(f"{prefix} {label}: epoch loss", r["loss"])
    if r["cache_write"]:
        print_figure(f"{prefix} {label}: writing the cache (tqdm)", r["cache_write"], "min:s")


def part_a(args, env, base: Path) -> dict:
    """Lazy (and chunked, cached) against in memory on a stack of at least 4x the budget."""
    budget_mb = args.budget_gb * 1024
    n = 40_000 if args.quick else int(np.ceil(4 * args.budget_gb * 1024**3 / (64 * 64 * 4) / 1024) * 1024 + 4096)
    data = args.workdir / f"a_{n}"
    stacks = write_tiled_dataset_in_child(data, base, n_images=n, n_stacks=8, dtype="float32")
    size_mb = sum(s.stat().st_size for s in stacks) / 1024**2
    print_note(f"(a) {n} images of 64x64 float32 in {len(stacks)} stacks: {size_mb:.0f} MB = "
               f"{size_mb / budget_mb:.2f}x the budget of {budget_mb:.0f} MB"
               + (" (--quick: below 4x, not the benchmark)" if size_mb < 4 * budget_mb else ""))
    print_note("(a) each run starts with the stacks " + ("in the page cache (--warm)" if args.warm else
                                                          "dropped from the page cache (cold)"))
    if args.read_check:
        read_check(data, stacks, args, env)
    subset = []
    if args.subset_a:
        chosen = np.sort(np.random.default_rng(0).choice(n, size=min(n, args.subset_a), replace=False))
        np.save(data / "subset.npy", chosen)
        subset = ["--ind", str(data / "subset.npy")]
        print_note(f"(a) the runs train on {chosen.size} particles drawn at random from the whole stack "
                   f"(--ind), read from all {len(stacks)} stacks")
    results = {}
    for name in args.runs:
        flags, options = RUNS[name]
        flags = [*subset, *flags]
        results[name] = train_once(f"a_{name}", data, stacks, args, env, flags=flags, options=options)
        report_run("(a)", LABELS[name], results[name])
        if name != "memory":
            within = results[name]["rss_mb"] <= budget_mb
            print_figure(f"(a) {LABELS[name]}: peak RSS within the budget of {budget_mb:.0f} MB",
                         "yes" if within else "NO")
    return results


def read_check(data: Path, stacks: list[Path], args, env) -> None:
    """Reading alone, one random pass over the stack, cold: memory maps against positional reads."""
    for mode, label in (("memmap", "memory maps (io.mrc.MrcStack)"), ("positional", "ParticleImages (preadv)")):
        if not args.warm:
            drop_from_page_cache(stacks)
        log = args.workdir / "runs" / f"read_{mode}.log"
        result = run_timed([sys.executable, "-c", READ_CHECK, mode, str(data / "particles.txt")], log_path=log,
                           env=env, poll_memory=True)
        lines = log.read_text().split()
        print_figure(f"(a) reading only, random pass, {label}: images/s", float(lines[-1]) if lines else float("nan"),
                     "img/s", fmt=".0f")
        print_figure(f"(a) reading only, random pass, {label}: peak RSS (ru_maxrss)", result.peak_rss_mb, "MB",
                     fmt=".0f")
        print_figure(f"(a) reading only, random pass, {label}: peak RssAnon / RssFile",
                     f"{result.peak_anon_mb:.0f} / {result.peak_file_mb:.0f}", "MB")


def part_b(args, env, base: Path) -> dict:
    """One epoch of the basis decoder on 500,000 float16 particles, read lazily."""
    n = 50_000 if args.quick else args.n_images_b
    data = args.workdir / f"b_{n}"
    stacks = write_tiled_dataset_in_child(data, base, n_images=n, n_stacks=10, dtype="float16")
    size_gb = sum(s.stat().st_size for s in stacks) / 1e9
    print_note(f"(b) {n} images of 64x64 float16 (MRC mode 12) in {len(stacks)} stacks, {size_gb:.2f} GB")
    result = train_once("b_lazy", data, stacks, args, env, flags=["--lazy"], options={"in_memory": False})
    report_run("(b)", f"{n} particles, lazy", result)
    print_figure(f"(b) peak RSS under 4 GB (4000 MB)", "yes" if result["rss_mb"] < 4000 else "NO")
    return result


#: (c)'s runs: label, decoder options; the global batch is the same for 1 and 2 processes
PROCESS_RUNS = [
    ("neural field VAE, batch 16", ["--decoder", "neural_field", "--zdim", "8", "-b", "16"]),
    ("basis VAE, batch 64, dense gradient all-reduce", ["--decoder", "basis", "--zdim", "8"]),
    ("basis VAE, batch 64, touched rows gathered", ["--decoder", "basis", "--zdim", "8",
                                                     "--decoder-opt", "sparse_grad=true"]),
]


def part_c_processes(args, env, base: Path) -> dict:
    """(c) images/s with 1 process and with 2 (``torchrun --nproc-per-node 2``, gloo), same data
    (the base set, in memory), same global batch, float32, one epoch each; ratios printed last.

    One process uses both cores (2 threads); each of two processes uses one.  On a GPU machine
    ``--nproc-per-node`` is the number of GPUs (NCCL); none was lent to this session.
    """
    torchrun = Path(sys.executable).with_name("torchrun")
    results = {}
    for label, options in PROCESS_RUNS:
        for procs in (1, 2):
            out = args.workdir / "runs" / f"c_{len(results)}"
            shutil.rmtree(out, ignore_errors=True)
            run_env = dict(env, OMP_NUM_THREADS=str(2 // procs))
            launch = [str(torchrun), "--nproc-per-node", str(procs), "--master-addr", "127.0.0.1",
                      "--master-port", str(29400 + len(results))] if procs > 1 else []
            command = [*launch, *cryoscape_command(), "train", str(base / "particles.star"), "-o", str(out), "-n", "1",
                       "--no-amp", "--no-progress", "--warm-start-images", "0", *options]
            run_timed(command, log_path=out.parent / f"c_{len(results)}.log", env=run_env)
            hit = EPOCH_LINE.findall((out / "run.log").read_text(errors="replace"))
            results[(label, procs)] = float(hit[-1][3]) if hit else float("nan")
            print_figure(f"(c) {label}: {procs} process{'es' if procs > 1 else ''}", results[(label, procs)],
                         "img/s", fmt=".1f")
    for label, _ in PROCESS_RUNS:
        print_figure(f"(c) speed-up {label}: 2 processes / 1 process", results[(label, 2)] / results[(label, 1)])
    return results


def cpu_model() -> str:
    """lscpu's "Model name" (from /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3


def main(argv=None) -> int:
    args = parse_args(argv)
    env = thread_env(args.threads)
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    args.workdir.mkdir(parents=True, exist_ok=True)
    print_note("scale: cryoscape train --decoder basis --zdim 8, one epoch, data read lazily vs in memory")
    print_note(f"cryoscape: {tool_version(cryoscape_command(), env)}; threads {args.threads}; CUDA hidden")
    print_note(f"CPU: {cpu_model()}, {os.cpu_count()} cores; memory {memory_gb():.0f} GiB")
    print_note("load average at start (1/5/15 min): %.1f %.1f %.1f" % os.getloadavg())
    base, _ = simulate_dataset(args.workdir / "base_D64_n4000", box_size=64, n_images=4000, snr=0.1,
                               heterogeneity="hinge", env=env)
    try:
        a = part_a(args, env, base) if "a" in args.part else {}
        if "b" in args.part:
            part_b(args, env, base)
        if "c" in args.part:
            part_c_processes(args, env, base)
    finally:
        if not args.keep_data:
            for path in sorted(args.workdir.glob("[ab]_*")) + [args.workdir / "cache"]:
                shutil.rmtree(path, ignore_errors=True)
    print_note("load average at end (1/5/15 min): %.1f %.1f %.1f" % os.getloadavg())
    if "memory" in a:
        for name in [r for r in a if r != "memory"]:
            print_figure(f"(a) speed ratio {LABELS[name]} / in memory (training images/s; goal >= 0.8)",
                         a[name]["img_s"] / a["memory"]["img_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
