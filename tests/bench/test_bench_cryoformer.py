"""bench/cryoformer.py: the precision flag reaches our training commands and not cryoDRGN's.  Run in a
subprocess: cryoformer.py imports bench/train.py as ``train``, the name of the tests' own package."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _commands(argv: list[str]) -> dict[str, list[str]]:
    """``commands()`` of bench/cryoformer.py for ``argv``, as ``{run: command}``."""
    code = ("import sys, json; from pathlib import Path; sys.path.insert(0, 'bench'); import cryoformer as c\n"
            f"a = c.parse_args({argv!r})\n"
            "print(json.dumps(c.commands(a, Path('drgn'), Path('d'), Path('d/p.pkl'), Path('r'))))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def test_amp_flag_is_passed_to_our_runs_only():
    """Without the flag train chooses (bfloat16 on CPUs with AVX512-BF16/AMX); with it every run of ours
    gets the same explicit precision, so float32 can be measured on a bfloat16 CPU."""
    default, f32, amp = (_commands(argv) for argv in ([], ["--no-amp"], ["--amp"]))
    ours = [name for name in default if name != "cryodrgn"]
    assert len(ours) == 4 and "cryodrgn" in default
    for name in ours:
        assert "--amp" not in default[name] and "--no-amp" not in default[name]
        assert "--no-amp" in f32[name] and "--amp" not in f32[name]
        assert "--amp" in amp[name] and "--no-amp" not in amp[name]
    assert not {"--amp", "--no-amp"} & set(f32["cryodrgn"] + amp["cryodrgn"])


def test_skipped_runs_are_not_built():
    cmds = _commands(["--skip", "cryodrgn", "--skip", "basis"])
    assert sorted(cmds) == ["cryoformer", "cryoformer_encoder", "neural_field"]
