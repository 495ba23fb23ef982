"""The training engine stays easy to change: short functions, no private imports, no probing of decoders."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cryoscape.models.base import VolumeDecoder, decoder_names, build_decoder

TRAIN = Path(__file__).resolve().parents[2] / "src" / "cryoscape" / "train"
MAX_LINES = 80


def _trees():
    for path in sorted(TRAIN.glob("*.py")):
        yield path, ast.parse(path.read_text())


def test_no_function_in_train_is_longer_than_80_lines():
    long = [f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, tree in _trees() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert not long, "functions over 80 lines: " + ", ".join(long)


def test_train_imports_no_private_names_of_other_modules():
    bad = [f"{path.name} imports {alias.name} from {node.module}" for path, tree in _trees()
           for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
           and node.module.startswith("cryoscape.") for alias in node.names if alias.name.startswith("_")]
    assert not bad, "\n".join(bad)


def test_train_never_probes_an_object_with_getattr_or_hasattr():
    bad = [f"{path.name}:{node.lineno}" for path, tree in _trees() for node in ast.walk(tree)
           if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")]
    assert not bad, "getattr/hasattr in train/: " + ", ".join(bad)


@pytest.mark.parametrize("name", decoder_names())
def test_every_training_hook_is_declared_on_the_base_class(name):
    decoder = build_decoder(name, box_size=8, zdim=0)
    for hook in ("optimizer_param_groups", "set_data_spectrum", "warm_start", "regularization_loss",
                 "after_optimizer_step", "adam_eps"):
        assert hook in vars(VolumeDecoder) and callable(getattr(decoder, hook)), hook
    assert isinstance(decoder.wants_warm_start, bool) and isinstance(decoder.wants_data_spectrum, bool)
