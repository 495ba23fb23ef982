"""Argument handling shared by several commands (loading particles, choosing a device)."""

from __future__ import annotations

import argparse

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks ``cuda`` when a GPU is present, else ``cpu``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_table_from_args(args: argparse.Namespace):
    """Particle table from ``args.particles`` with ``--datadir``, ``--poses``, ``--ctf``, ``--ind``, ``--first``."""
    from cryoscape.io.particles import load_particles, select_particles

    table = load_particles(
        args.particles,
        datadir=getattr(args, "datadir", None),
        poses_path=getattr(args, "poses", None),
        ctf_path=getattr(args, "ctf", None),
    )
    return select_particles(table, ind=getattr(args, "ind", None), first=getattr(args, "first", None))
