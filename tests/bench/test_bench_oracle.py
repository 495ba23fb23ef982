"""bench/oracle.py: the training command it builds for mixed precision, and which finished runs
``--reuse`` accepts.  Run in a subprocess: oracle.py imports bench/train.py as ``train``, the name of
the tests' own package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _oracle(code: str, notes: bool = False) -> list[str]:
    """Lines printed by ``code`` run with bench/oracle.py imported as ``oracle`` (its ``# `` notes left
    out unless ``notes``)."""
    prelude = "import sys; from pathlib import Path; sys.path.insert(0, 'bench'); import oracle\n"
    lines = subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, check=True, capture_output=True,
                           text=True).stdout.splitlines()
    return [line for line in lines if notes or not line.startswith("# ")]


def test_amp_and_its_emulation_pass_amp_explicitly():
    """Automatic precision is float32 on a CPU without bfloat16, which would measure float32 again."""
    out = _oracle("for argv in ([], ['--amp'], ['--amp', '--emulate-bf16']):\n"
                  "    a = oracle.parse_args(argv)\n"
                  "    print(' '.join(oracle.train_command('basis', Path('d'), Path('o'), a, 2, 10, Path('x'))))\n")
    plain, amp, emulated = (line.split() for line in out)
    assert "--no-amp" in plain and "--amp" not in plain
    assert "--amp" in amp and "--no-amp" not in amp and not any("bf16_emulation" in w for w in amp)
    assert "--amp" in emulated and emulated[1].endswith("bench/bf16_emulation.py")


def test_reuse_accepts_a_run_that_ends_at_the_asked_epoch(tmp_path):
    for name, files in {"ours": ["z.0.npy", "z.1.npy"], "ours_longer": ["z.1.npy", "z.2.npy"],
                        "drgn": ["z.1.pkl", "z.2.pkl"], "drgn_short": ["z.1.pkl"]}.items():
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).touch()
    out = _oracle(f"root = Path({str(tmp_path)!r})\n"
                  "for name, tool in [('ours', 'cryoscape'), ('ours_longer', 'cryoscape'), ('drgn', 'cryodrgn'),\n"
                  "                   ('drgn_short', 'cryodrgn')]:\n"
                  "    print(oracle.finished(root / name, tool, 2))\n")
    assert out == ["True", "False", "True", "False"]


def test_reuse_resumes_an_unfinished_cryodrgn_run_and_keeps_its_earlier_log(tmp_path):
    run = tmp_path / "cryodrgn"
    run.mkdir()
    (run / "weights.1.pkl").touch()
    (run / "z.1.pkl").touch()
    (tmp_path / "cryodrgn.log").write_text("epoch 1\n")
    out = _oracle(
        f"run = Path({str(run)!r}); log = run.parent / 'cryodrgn.log'\n"
        "calls = []\n"
        "class Result:\n"
        "    wall_s = 5.0\n"
        "def fake(command, log_path, env):\n"
        "    calls.append(command); Path(log_path).write_text('epoch 2\\n'); return Result()\n"
        "oracle.run_timed = fake\n"
        "command = ['cryodrgn', 'train_vae', '-n', '2']\n"
        "wall = oracle.train_or_reuse('cryodrgn', command, 2, run, log, 'cryodrgn', {}, True)\n"
        "print(calls[-1][-2:], wall, repr(log.read_text()), run.exists())\n"
        "wall = oracle.train_or_reuse('cryodrgn', command, 2, run, log, 'cryodrgn', {}, False)\n"
        "print(calls[-1][-2:], wall, repr(log.read_text()), run.exists())\n")
    assert out[0] == "['--load', 'latest'] nan 'epoch 1\\nepoch 2\\n' True"
    assert out[1] == "['-n', '2'] 5.0 'epoch 2\\n' False"  # without --reuse: trained afresh, folder removed first


def test_reused_finished_run_is_scored_as_it_is_and_names_its_own_options(tmp_path):
    run = tmp_path / "basis"
    run.mkdir()
    for f in ("z.0.npy", "z.1.npy"):
        (run / f).touch()
    out = _oracle(f"run = Path({str(run)!r})\n"
                  "oracle.run_timed = lambda *a, **k: 1 / 0  # must not train\n"
                  "print(oracle.train_or_reuse('basis', ['cryoscape', 'train'], 2, run, run.parent / 'basis.log', "
                  "'cryoscape', {}, True))\n", notes=True)
    assert out[-1] == "nan" and run.exists()
    assert f"the run's own options are in {run / 'config.yaml'}" in out[0]
