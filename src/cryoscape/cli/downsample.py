"""``cryoscape downsample``: Fourier-crop a particle stack, a particle list or a volume."""

from __future__ import annotations

import argparse
import os

from cryoscape.errors import InputError

HELP = "Downsample particle images or a volume by Fourier cropping (pixel size grows by D/D_new)."
EXAMPLE = "cryoscape downsample particles.star -D 128 -o particles.128.mrcs --datadir extract/  # + particles.128.star"

_PARTICLE_LIST_SUFFIXES = (".star", ".cs", ".txt")
_MRC_SUFFIXES = (".mrc", ".mrcs", ".map", ".st")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="particle stack (.mrcs/.mrc), particle list "
                        "(.star/.cs/.txt) or volume (.mrc)")
    parser.add_argument("-D", "--box-size", type=int, required=True,
                        help="new box size in pixels (at most the current one; odd or even)")
    parser.add_argument("-o", "--output", required=True,
                        help="output .mrcs stack (or .mrc for a volume); from a .star file also a .star "
                        "of the same name describing the new stack")
    parser.add_argument("-b", "--batch-size", type=int, default=1000,
                        help="images processed at a time; bounds memory (default: 1000)")
    parser.add_argument("--datadir", default=None,
                        help="folder holding the stacks named in a .star/.cs/.txt file")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--volume", action="store_true",
                      help="treat the input as one volume (default: auto, a cubic .mrc)")
    kind.add_argument("--stack", action="store_true",
                      help="treat the input as an image stack even if it is cubic")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _check_box(D: int, D_new: int, source: str) -> None:
    if D_new < 2:
        raise InputError(f"-D {D_new} is too small for {source}; choose a box of at least 2 "
                         "pixels.", path=source)
    if D_new > D:
        raise InputError(f"{source} has a box of {D} pixels, so -D must be at most {D} "
                         f"(got {D_new}); choose a smaller box (use upsampling tools to enlarge).",
                         path=source)


def _table_pixel_size(table) -> float | None:
    import numpy as np

    value = getattr(table, "pixel_size_angstrom", None)
    if value is None:
        return None
    arr = np.asarray(value, dtype=float).reshape(-1)
    return float(arr[0]) if arr.size and np.isfinite(arr[0]) and arr[0] > 0 else None


def run(args: argparse.Namespace) -> int:
    from cryoscape.data.cache import write_preprocessed_stack
    from cryoscape.data.images import ParticleImages
    from cryoscape.data.preprocess import Preprocessor
    from cryoscape.io.mrc import read_mrc_header

    source = os.fspath(args.input)
    out = os.fspath(args.output)
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1 (got {args.batch_size}).")
    if os.path.exists(out) and os.path.exists(source) and os.path.samefile(source, out):
        raise InputError(f"{out} is also the input; choose a different -o file.", path=out)
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise InputError(f"{out} is in a folder that does not exist; create {out_dir} first.",
                         path=out)

    suffix = os.path.splitext(source)[1].lower()
    pixel_size = table = None
    star_out = os.path.splitext(out)[0] + ".star" if suffix == ".star" else None
    if star_out is not None and os.path.exists(star_out) and os.path.samefile(star_out, source):
        raise InputError(f"{star_out}, the STAR file written with -o {out}, would overwrite the input; "
                         "choose a different -o name.", path=out)
    if suffix in _PARTICLE_LIST_SUFFIXES:
        if args.volume:
            raise InputError(f"{source} is a particle list, not a volume; drop --volume.",
                             path=source)
        from cryoscape.io.particles import load_particles

        table = load_particles(source, datadir=args.datadir)
        reader = ParticleImages(table.image_paths, table.image_indices,
                                box_size=getattr(table, "box_size", None), in_memory=False,
                                table_path=source)
        pixel_size = _table_pixel_size(table)
        if os.path.exists(out) and any(os.path.samefile(p, out) for p in set(table.image_paths.tolist())
                                       if os.path.exists(p)):
            raise InputError(f"{out} holds images that {source} names; choose a different -o file.", path=out)
    else:
        header = read_mrc_header(source)
        is_volume = args.volume or (
            not args.stack
            and not source.lower().endswith(".mrcs")
            and header.nz > 1
            and header.nx == header.ny == header.nz
        )
        if is_volume:
            return _downsample_volume(source, out, args.box_size)
        reader = ParticleImages.from_stack(source, in_memory=False)

    D = reader.box_size
    _check_box(D, args.box_size, source)
    pixel_out = write_preprocessed_stack(
        reader,
        Preprocessor(downsample_box_size=args.box_size),
        out,
        batch_size=args.batch_size,
        pixel_size_angstrom=pixel_size,
        progress=not args.no_progress,
        description="downsampling",
    )
    print(f"wrote {len(reader)} images of {args.box_size}x{args.box_size} at "
          f"{pixel_out:.4f} A/pixel to {out}")
    if star_out is not None:
        from cryoscape.io.star import write_star

        if table.box_size is None:
            table.box_size = D
        write_star(star_out, table.resampled(out, args.box_size))
        print(f"wrote {star_out}: the same particles (poses, CTF, every other column) in the new "
              "stack, pixel sizes and pixel shifts rescaled")
    return 0


def _downsample_volume(source: str, out: str, D_new: int) -> int:
    import torch

    from cryoscape.fourier.resample import downsample_volume, resampled_pixel_size_angstrom
    from cryoscape.io.mrc import read_mrc, write_mrc

    volume, pixel_size = read_mrc(source)
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise InputError(f"{source} is not a cubic volume (shape {volume.shape}); pass a cubic "
                         "map or use --stack for an image stack.", path=source)
    D = volume.shape[0]
    _check_box(D, D_new, source)
    small = downsample_volume(torch.from_numpy(volume), D_new).numpy()
    pixel_out = resampled_pixel_size_angstrom(pixel_size or 1.0, D, D_new)
    write_mrc(out, small, pixel_size_angstrom=pixel_out, is_stack=False)
    print(f"wrote a {D_new}^3 volume at {pixel_out:.4f} A/pixel to {out}")
    return 0
