"""Argument handling shared by several commands (loading particles, choosing a device, map options)."""

from __future__ import annotations

import argparse

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks ``cuda`` when a GPU is present, else ``cpu``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def add_map_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, amp: bool = True) -> None:
    """The map options of every command that writes maps of a trained run (volumes, analyze,
    traverse): ``--box-size --lowpass --flip --invert --device`` and, with ``amp``, ``--amp/--no-amp``.
    Read them back with :func:`map_options`."""
    parser.add_argument("--box-size", type=int, default=None, help="output box (default: the training box)")
    parser.add_argument("--lowpass", type=float, default=None, metavar="ANGSTROM", help="low-pass filter the maps")
    parser.add_argument("--flip", action="store_true", help="mirror the hand (reverse the z axis)")
    parser.add_argument("--invert", action="store_true", help="negate the density")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda ...")
    if amp:
        parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                            help="bfloat16 decoder arithmetic (default: on where fast, e.g. AVX512-BF16 CPUs and "
                                 "recent GPUs)")


def map_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of the map writers from :func:`add_map_arguments`'s options."""
    options = dict(box_size=args.box_size, lowpass_angstrom=args.lowpass, flip=args.flip, invert=args.invert,
                   device=resolve_device(args.device))
    if hasattr(args, "amp"):
        options["amp"] = args.amp
    return options


def add_particle_arguments(group, *, poses_help: str | None = "cryoDRGN poses.pkl (overrides poses in the metadata)",
                           amp_contrast: bool = True) -> None:
    """The options that say which particles to read and how: ``--poses``, ``--ctf``, ``--datadir``,
    ``--amp-contrast``, ``--ind``, ``--first`` (written once for every command that reads particles).

    ``poses_help=None`` leaves out ``--poses`` (commands that find poses themselves); ``amp_contrast``
    False leaves out ``--amp-contrast`` (commands whose config records the file's own value).
    """
    if poses_help is not None:
        group.add_argument("--poses", help=poses_help)
    group.add_argument("--ctf", help="cryoDRGN ctf.pkl (overrides CTF in the metadata)")
    group.add_argument("--datadir", help="folder to resolve relative stack paths against")
    if amp_contrast:
        group.add_argument("--amp-contrast", type=float, default=0.1,
                           help="amplitude contrast for a .star without rlnAmplitudeContrast (RELION 3.0 exports) [0.1]")
    group.add_argument("--ind", help="index file (.npy/.pkl/.txt) of the particles to use")
    group.add_argument("--first", type=int, help="use only the first N particles (after --ind)")


def load_table_from_args(args: argparse.Namespace):
    """Particle table from ``args.particles`` and the options of :func:`add_particle_arguments` (all of them)."""
    from cryoscape.io.particles import load_particles, select_particles

    table = load_particles(args.particles, datadir=args.datadir, poses_path=args.poses, ctf_path=args.ctf,
                           amplitude_contrast=args.amp_contrast)
    return select_particles(table, ind=args.ind, first=args.first)


def parse_beta(text: str) -> float | str:
    """``--beta``: a non-negative number or ``anneal`` (train and abinit)."""
    if text == "anneal":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--beta must be a number or 'anneal', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"--beta must not be negative, got {text}")
    return value


def parse_key_value(text: str) -> tuple[str, object]:
    """``--decoder-opt KEY=VALUE``: the value read as YAML (numbers, booleans, lists)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--decoder-opt takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    import yaml

    return key.strip(), yaml.safe_load(value)
