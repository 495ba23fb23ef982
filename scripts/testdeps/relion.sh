#!/usr/bin/env bash
# RELION 3.1 (Debian's `relion` package: relion_refine, relion_reconstruct,
# relion_particle_symmetry_expand) for the tests that compare with RELION
# (tests/geometry/test_symmetry.py, tests/classical/test_relion_files.py) and for bench/refine.py,
# bench/classify.py, bench/backproject.py.  Idempotent: does nothing when relion_refine is on PATH.
# Exits 0 whatever happens: when it cannot install, it says why and those tests skip with the reason.
if command -v relion_refine >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "relion.sh: no relion_refine and no apt-get here; install RELION 3.1 or the RELION tests skip"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "relion.sh: not root and no password-less sudo; cannot apt-get install relion, the RELION tests skip"
        exit 0
    fi
fi
lock() {  # run "$@" under the dpkg lock file of this machine's shared setup when flock exists
    if command -v flock >/dev/null 2>&1; then flock /tmp/apt.lock "$@"; else "$@"; fi
}
echo "relion.sh: installing Debian's relion package (RELION 3.1, CPU)"
if ! lock $SUDO apt-get update -qq >/dev/null 2>&1; then
    echo "relion.sh: apt-get update failed (no network?); the RELION tests skip"
    exit 0
fi
if ! DEBIAN_FRONTEND=noninteractive lock $SUDO apt-get install -y -qq relion >/dev/null 2>&1; then
    echo "relion.sh: apt-get install relion failed; the RELION tests skip"
    exit 0
fi
command -v relion_refine >/dev/null 2>&1 || echo "relion.sh: relion installed but relion_refine is not on PATH"
exit 0
