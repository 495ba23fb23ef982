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


def load_table_from_args(args: argparse.Namespace):
    """Particle table from ``args.particles`` with ``--datadir``, ``--poses``, ``--ctf``, ``--ind``, ``--first``."""
    from cryoscape.io.particles import load_particles, select_particles

    table = load_particles(
        args.particles,
        datadir=getattr(args, "datadir", None),
        poses_path=getattr(args, "poses", None),
        ctf_path=getattr(args, "ctf", None),
        amplitude_contrast=getattr(args, "amp_contrast", 0.1),
    )
    return select_particles(table, ind=getattr(args, "ind", None), first=getattr(args, "first", None))


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
