#!/usr/bin/env bash
# The tests that start mpiexec, once more under Open MPI (README's test command runs this after
# the whole suite under MPICH): Debian's Open MPI, and a second virtual environment,
# .venv-openmpi, without the mpich wheel, so that its mpi4py loads the system's Open MPI and
# kfac_mn.communicators.mpiexec picks Open MPI's mpiexec.  Outside CI, a machine that has no
# Open MPI and cannot install it (not root, no apt-get) skips this part, saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
# every test file that starts mpiexec (tests/test_layering.py checks that none is missing)
FILES="tests/test_communicators.py tests/test_distributed_kfac.py tests/test_scale_model.py
       tests/test_train_runs.py tests/test_train_faults.py tests/test_readme_commands.py"
if ! command -v ompi_info > /dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
        install="apt-get install -y -q --no-install-recommends openmpi-bin libopenmpi-dev"
        $install > /dev/null 2>&1 || { apt-get update -q > /dev/null && $install > /dev/null; }
    elif [ -n "${CI:-}" ]; then
        echo "test_openmpi.sh: Open MPI is not installed and cannot be here (needs root and" \
             "apt-get: apt install openmpi-bin libopenmpi-dev)" >&2
        exit 1
    else
        echo "test_openmpi.sh: Open MPI is not installed (Debian: sudo apt install" \
             "openmpi-bin libopenmpi-dev); the Open MPI run is skipped"
        exit 0
    fi
fi
python -m venv .venv-openmpi
.venv-openmpi/bin/pip install -q -e '.[test]'
echo "test_openmpi.sh: $(.venv-openmpi/bin/python -c 'from mpi4py import MPI; print(MPI.Get_library_version().strip(chr(0)).splitlines()[0])')"
# shellcheck disable=SC2086
.venv-openmpi/bin/python -m pytest -q -p no:cacheprovider $FILES
