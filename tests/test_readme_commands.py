"""README's worked examples, run as written under the MPI that mpi4py uses (MPICH here, Open
MPI again in scripts/test_openmpi.sh), and their output compared with what README shows.

Each command runs through ``bash`` in a fresh directory that links the repository's files, so
``result/`` is the test's own.  ``python`` is this interpreter's, and ``mpiexec`` the launcher
of mpi4py's library (kfac_mn.communicators.mpiexec.find_mpiexec), first on PATH.  The
environment is the one that module gives every launch (no ssh for MPICH; Open MPI's root
variables where running as root, which README asks for as ``--allow-run-as-root``), plus Open
MPI's oversubscription for the 3-rank example on fewer cores, which README also names.
"""
import ast
import os
import re
import subprocess
import sys
import time

import pytest

from kfac_mn.communicators import mpiexec as launcher
from tests.test_communicators import REPO_ROOT, mpi_command

README = REPO_ROOT / "README.md"
LINKED = ("train_imagenet.py", "configs", "scripts", "utils", "models", "kfac_mn")
FORMS = {"# MPICH": "mpich", "# Open MPI": "openmpi"}


def readme_blocks():
    """Every fenced block of README as (language, text, offset of its first line), in order."""
    blocks, opened, offset = [], None, 0
    for line in README.read_text().splitlines(keepends=True):
        if line.startswith("```"):
            if opened is None:
                opened = (line[3:].strip(), offset + len(line), [])
            else:
                blocks.append((opened[0], "".join(opened[2]), opened[1]))
                opened = None
        elif opened is not None:
            opened[2].append(line)
        offset += len(line)
    return blocks


def fenced_blocks(language):
    """The README's code blocks of ``language`` ('' for plain output), in order."""
    return [text for kind, text, _ in readme_blocks() if kind == language]


def block_after(heading, language="bash"):
    """The first ``language`` block after the line that starts with ``heading``."""
    start = README.read_text().index(heading)
    return next(text for kind, text, at in readme_blocks() if kind == language and at > start)


def block_containing(language, text):
    """The first ``language`` block that contains ``text``."""
    return next(block for block in fenced_blocks(language) if text in block)


def output_after(block):
    """The plain block that README shows right after ``block``: what it printed."""
    blocks = readme_blocks()
    index = next(i for i, (_, text, _) in enumerate(blocks) if text == block)
    kind, text, _ = blocks[index + 1]
    assert kind == "", f"README shows no output after {block[:60]!r}"
    return text


def for_this_mpi(block, library):
    """The lines of ``block`` that apply to ``library``: every line outside a '# MPICH' or
    '# Open MPI' part, and the lines of that library's part."""
    kept, part = [], None
    for line in block.splitlines():
        form = next((name for prefix, name in FORMS.items() if line.startswith(prefix)), None)
        if form:
            part = form
        elif part in (None, library):
            kept.append(line)
    return "\n".join(kept) + "\n"


@pytest.fixture(scope="module")
def shell(tmp_path_factory):
    """``run(commands, timeout)``: (exit status, output, seconds) of ``bash -e -c commands`` in
    a directory that links the repository, with README's ``python`` and ``mpiexec``."""
    _, env = mpi_command(2, [])  # skips without mpi4py or a matching launcher
    library = launcher.mpi4py_library()
    work = tmp_path_factory.mktemp("readme")
    for name in LINKED:
        (work / name).symlink_to(REPO_ROOT / name)
    bin_dir = work / "bin"
    bin_dir.mkdir()
    (bin_dir / "mpiexec").write_text(f'#!/bin/sh\nexec "{launcher.find_mpiexec()}" "$@"\n')
    (bin_dir / "mpiexec").chmod(0o755)
    env["PATH"] = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), env["PATH"]])
    if library == "openmpi":
        env["OMPI_MCA_rmaps_base_oversubscribe"] = "1"

    def run(commands, timeout=300):
        start = time.monotonic()
        done = subprocess.run(["bash", "-e", "-c", commands], cwd=work, env=env, timeout=timeout,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return done.returncode, done.stdout, time.monotonic() - start

    run.library, run.work = library, work
    return run


def test_a_launch_form_for_each_mpi_in_every_hostfile_example():
    for block in fenced_blocks("bash"):
        if re.search(r"mpiexec (-f|--hostfile) ", block):
            assert "# MPICH" in block and "# Open MPI" in block, block
            assert re.search(r"mpiexec -f \S+ .*-ppn", for_this_mpi(block, "mpich"))
            assert re.search(r"mpiexec --hostfile \S+ .*--map-by ppr:\d+:node",
                             for_this_mpi(block, "openmpi"))
            assert "-ppn" not in for_this_mpi(block, "openmpi")


def test_the_scaled_down_cluster_example_and_its_log(shell):
    block = block_after("The same command, scaled down")
    status, output, seconds = shell(for_this_mpi(block, shell.library))
    assert status == 0, output
    shown = output_after(block).splitlines()
    assert shown[0] in output.splitlines()  # the first line: model, data, workers, batch
    assert re.search(r"^epoch 2 \(iteration 8\): loss [\d.]+ accuracy [\d.]+ \| validation",
                     output, flags=re.M)
    printing = block_containing("bash", "kfac_32k_tiny/log.jsonl")
    status, printed, _ = shell(printing)
    assert status == 0, printed
    got, want = ast.literal_eval(printed), ast.literal_eval(output_after(printing))
    accuracy = got.pop("validation/main/accuracy")
    want.pop("validation/main/accuracy")
    assert 0 <= accuracy <= 1
    assert got == want  # the config's schedules, step for step
    print(f"scaled-down cluster example under {shell.library}: {seconds:.1f} s")


def test_the_mistakes_shown_stop_with_the_messages_shown(shell):
    examples = [example for block in fenced_blocks("") for example in
                re.findall(r"^\$ (mpiexec .*)\n((?:(?!\$ ).*\n)+)", block, flags=re.M)]
    assert len(examples) >= 2
    for command, message in examples:
        status, output, _ = shell(command)
        assert status == 2, f"{command}:\n{output}"
        for line in message.splitlines():
            assert line in output.splitlines(), f"{command}:\n{output}"


def numbers_close(shown, got, rel=0.1, abs_=0.05):
    """Lines equal but for their numbers, which agree within ``rel`` or ``abs_``: the losses
    of 100 updates depend on the BLAS's summation order."""
    split = re.compile(r"(-?\d+\.\d+)")
    shown_parts, got_parts = split.split(shown), split.split(got)
    return len(shown_parts) == len(got_parts) and all(
        a == b if i % 2 == 0 else abs(float(a) - float(b)) <= abs_ + rel * abs(float(a))
        for i, (a, b) in enumerate(zip(shown_parts, got_parts)))


def assert_prints_as_shown(shown, output):
    got = [line for line in output.splitlines() if line.strip()]
    shown = shown.splitlines()
    assert len(got) == len(shown), output
    for want, line in zip(shown, got):
        assert numbers_close(want, line), f"README shows {want!r}, the run printed {line!r}"


def test_your_own_model_on_one_process_and_on_two(shell):
    single = block_after("Save this as `my_model.py`", language="python")
    (shell.work / "my_model.py").write_text(single)
    status, output, seconds = shell("python my_model.py")
    assert status == 0, output
    assert_prints_as_shown(output_after(single), output)

    # "the script above with its KFAC import replaced by the first two lines below and
    # everything from `optimizer = ...` on by the rest"
    distributed = block_after("On several processes, `DistributedKFAC`", language="python")
    imports, rest = distributed.split("...\n")
    head = single[:single.index("optimizer = ")]
    head = head.replace("from kfac_mn.optimizers import KFAC\n", imports)
    (shell.work / "my_model_mpi.py").write_text(head + rest)
    status, output_mpi, seconds_mpi = shell("mpiexec -n 2 python my_model_mpi.py")
    assert status == 0, output_mpi
    assert_prints_as_shown(output_after(distributed), output_mpi)
    print(f"own model under {shell.library}: {seconds:.1f} s, on two ranks {seconds_mpi:.1f} s")


def test_the_trace_as_written(shell):
    status, output, seconds = shell(block_after("### 3. Follow the data flow"))
    assert status == 0, output
    assert (shell.work / "result" / "trace_dataflow.png").stat().st_size > 10_000
    shown = output_after(block_after("### 3. Follow the data flow")).splitlines()
    assert shown[0] in output and shown[1] in output
    print(f"trace under {shell.library}: {seconds:.1f} s")
