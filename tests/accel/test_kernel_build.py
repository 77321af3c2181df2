"""Building uio's CPU kernels (uio.accel.cpu_kernels.load): a folder per environment and source version,
builds killed part-way, and first loads that do not wait for the build.

The builds here run in child processes, through a compiler wrapper that holds each compiler call
while a file exists, so that a build can be caught part-way; the one build completed is of a
small source file, not of the kernels."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from uio.accel import cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels.unsupported_reason() is not None or shutil.which("c++") is None,
                                reason="uio's CPU kernels are not built here")
WAIT_S = 120  # for a child process to reach a state (loaded machines start torch slowly)
BUILD_S = 600  # for the small build to complete
SMALL_SOURCE = """#include <torch/library.h>
TORCH_LIBRARY(uio_build_test, m) { m.def("ping(Tensor x) -> Tensor"); }
"""
# A child's load: of the small source (argv[1]) with wait=True, or of the kernels without waiting.
LOAD = """import sys
from uio.accel import cpu_kernels
if len(sys.argv) > 1:
    cpu_kernels.SOURCES, cpu_kernels.HEADER = [sys.argv[1]], sys.argv[1]
loaded = cpu_kernels.load(wait=len(sys.argv) > 1)
if loaded and len(sys.argv) > 1:
    import torch
    torch.ops.uio_build_test.ping
print(loaded, cpu_kernels.failure())
"""


@pytest.fixture
def build_env(tmp_path, monkeypatch) -> dict:
    """The environment of a child whose builds go to ``tmp_path/extensions`` through a compiler
    wrapper that waits while ``tmp_path/hold`` exists (and says it was called in ``tmp_path/called``);
    also set here, for :func:`cpu_kernels.build_folder` to name the same folder."""
    wrapper = tmp_path / "c++"
    wrapper.write_text(f'#!/bin/sh\ntouch "{tmp_path}/called"\nwhile [ -e "{tmp_path}/hold" ]; do sleep 0.1; done\n'
                       f'exec "{shutil.which("c++")}" "$@"\n')
    wrapper.chmod(0o755)
    (tmp_path / "hold").touch()
    (tmp_path / "small.cpp").write_text(SMALL_SOURCE)
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), "CXX": str(wrapper)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return {**os.environ, **env}


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def lock_held_elsewhere(folder: Path) -> bool:
    with cpu_kernels._build_lock(folder, wait=False) as held:
        return not held


def kill_group(pid: int) -> None:
    """End what a child left running (its compiler wrapper), by its process group."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_the_build_folder_is_per_environment_and_source_version(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = cpu_kernels.build_folder()
    assert folder.parent == tmp_path and folder.name.startswith("uio_cpu_kernels-")
    assert cpu_kernels.build_folder() == folder
    source = tmp_path / "gemv.cpp"
    source.write_text(Path(cpu_kernels.SOURCES[0]).read_text() + "\n// changed\n")
    compiler = tmp_path / "c++"
    compiler.write_text(f'#!/bin/sh\nexec "{shutil.which("c++")}" "$@"\n')
    compiler.chmod(0o755)
    changes = [(cpu_kernels, "SOURCES", [str(source), *cpu_kernels.SOURCES[1:]]), (sys, "prefix", "/another/venv"),
               (torch, "__version__", "0.0.0"), (sys, "version", "3.0.0")]
    folders = {folder}
    for owner, name, value in changes:
        with monkeypatch.context() as changed:
            changed.setattr(owner, name, value)
            folders.add(cpu_kernels.build_folder())
    with monkeypatch.context() as changed:
        changed.setenv("CXX", str(compiler))
        folders.add(cpu_kernels.build_folder())
    assert len(folders) == len(changes) + 2


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_build_killed_part_way_holds_no_lock_and_the_next_load_builds_again(tmp_path, build_env, monkeypatch,
                                                                              signal_number):
    """A build killed while compiling (a closed terminal, a CI timeout) leaves its lock free and
    nothing to load; the next load builds and loads."""
    load = [sys.executable, "-c", LOAD, str(tmp_path / "small.cpp")]
    monkeypatch.setattr(cpu_kernels, "SOURCES", load[-1:])
    monkeypatch.setattr(cpu_kernels, "HEADER", load[-1])
    folder = cpu_kernels.build_folder()
    killed = subprocess.Popen(load, env=build_env, start_new_session=True, stdout=subprocess.DEVNULL)
    try:
        wait_until((tmp_path / "called").exists, "the build to call the compiler")
        killed.send_signal(signal_number)
        killed.wait(timeout=WAIT_S)
        assert [p.name for p in folder.parent.iterdir() if p.is_dir()] == [f"{folder.name}.part-{killed.pid}"]
        assert not lock_held_elsewhere(folder)
        (tmp_path / "hold").unlink()
        result = subprocess.run(load, env=build_env, capture_output=True, text=True, timeout=BUILD_S, check=False)
        assert result.stdout.split() == ["True", "None"], result.stderr
        assert [p.name for p in folder.parent.iterdir() if p.is_dir()] == [folder.name]
    finally:
        kill_group(killed.pid)


def test_a_first_load_does_not_wait_for_the_build(tmp_path, build_env):
    """A process finding no build starts one in the background and goes on with torch's kernels; so
    does the next while it runs, without starting another; the builder outlives them both."""
    folder = cpu_kernels.build_folder()
    builders = []
    try:
        for _ in range(2):
            result = subprocess.run([sys.executable, "-c", LOAD], env=build_env, capture_output=True, text=True, check=False,
                                    timeout=WAIT_S)
            assert result.stdout.strip() == "False being built in a background process", result.stderr
            assert "building uio's CPU kernels in the background" in result.stderr
            wait_until((tmp_path / "called").exists, "the background build to call the compiler")
            builders = [p for p in folder.parent.iterdir() if p.name.startswith(f"{folder.name}.part-")]
            assert len(builders) == 1 and lock_held_elsewhere(folder) and not folder.exists()
    finally:
        for builder in builders:
            kill_group(int(builder.name.rpartition("-")[2]))
    wait_until(lambda: not lock_held_elsewhere(folder), "the killed builder's lock to be released")


def test_the_command_builds_or_loads_the_kernels_and_says_where():
    """``python -m uio.accel.cpu_kernels``, a deployment step: here the build the tests loaded."""
    if not cpu_kernels.available():
        pytest.skip(f"uio's CPU kernels are not loaded here: {cpu_kernels.failure()}")
    result = subprocess.run([sys.executable, "-m", "uio.accel.cpu_kernels"], capture_output=True, text=True,
                            timeout=WAIT_S, check=False)
    assert result.stdout.strip() == f"uio's CPU kernels: loaded from {cpu_kernels.build_folder()}", result.stderr


@pytest.mark.skipif(not Path("/proc/self/autogroup").is_file(), reason="no Linux autogroups here")
def test_the_background_build_yields_the_cpu_across_sessions():
    # The build runs in a session of its own, which Linux schedules as a group beside the user's:
    # only a lowered group nice (not the process's own) keeps it from halving a first call's CPU.
    lowered = subprocess.run([sys.executable, "-c", ("from uio.accel import cpu_kernels\n"
                              "cpu_kernels._lower_priority()\nprint(open('/proc/self/autogroup').read())")],
                             capture_output=True, text=True, timeout=WAIT_S, start_new_session=True, check=True)
    assert lowered.stdout.split()[-2:] == ["nice", "19"], lowered.stdout
    assert os.getpriority(os.PRIO_PROCESS, 0) < 19  # the test process itself was left alone
