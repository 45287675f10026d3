"""The launchers: syntax, shellcheck when installed, and the commands their dry runs print."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["launch/tpu.sh", "launch/gpu.sh", "launch/local.sh", ".ci/run"]


def _run(args, env=None, cwd=ROOT):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GENMASK_"))}
    full_env.update(env or {})
    return subprocess.run(["bash", *args], cwd=cwd, capture_output=True, text=True, env=full_env)


def _executable(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax(script):
    assert _run(["-n", script]).returncode == 0


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck():
    out = subprocess.run(["shellcheck", *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_tpu_dry_run_prints_every_step():
    out = _run(["launch/tpu.sh", "--dry-run", "--name", "gm", "--zone", "us-west4-a", "--accelerator",
                "v5litepod-16", "--create", "--delete", "--", "python", "-m", "genmask_jax.train",
                "--workdir=gs://b/r"])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("+ gcloud compute tpus tpu-vm create gm --zone us-west4-a "
                               "--accelerator-type v5litepod-16 --version v2-alpha-tpuv5-lite")
    assert any("tpu-vm scp" in line and "--worker=all" in line for line in lines)
    ssh = next(line for line in lines if "tpu-vm ssh" in line)
    assert "--worker=all" in ssh and "GENMASK_DISTRIBUTED=1" in ssh and "jax\\[tpu\\]" in ssh
    assert "genmask_jax.train" in ssh
    assert lines[-1] == "+ gcloud compute tpus tpu-vm delete gm --zone us-west4-a --quiet"


@pytest.mark.parametrize("spot", [[], ["--spot"]])
def test_tpu_create_asks_for_a_spot_slice_only_when_told(spot):
    out = _run(["launch/tpu.sh", "--dry-run", "--name", "gm", "--zone", "z", "--accelerator", "v4-8",
                "--create", *spot])
    assert out.returncode == 0, out.stderr
    create = ("+ gcloud compute tpus tpu-vm create gm --zone z --accelerator-type v4-8 "
              "--version tpu-ubuntu2204-base")
    assert out.stdout.splitlines() == [create + " --spot" * bool(spot)]


@pytest.mark.parametrize("script", ["launch/tpu.sh", "launch/gpu.sh"])
def test_no_array_that_starts_empty_is_expanded_bare(script):
    """Under `set -u`, bash < 4.4 (macOS's /bin/bash is 3.2) stops at "${a[@]}" of an empty array with
    'a[@]: unbound variable'. No bash that old is here to run the scripts with, so this reads them: an
    array assigned `()` is only expanded as ${a[@]+"${a[@]}"}."""
    text = (ROOT / script).read_text()
    starts_empty = set(re.findall(r"\b(\w+)=\(\)", text))
    bare = set(re.findall(r'(?<!\+)"\$\{(\w+)\[@\]\}"', text))
    assert not starts_empty & bare


def test_tpu_requires_name_and_zone():
    out = _run(["launch/tpu.sh", "--dry-run", "--", "python", "-c", "1"])
    assert out.returncode == 2 and "--name and --zone" in out.stderr


def test_gpu_dry_run_multi_node_flags(tmp_path):
    venv = tmp_path / "venv"  # not installed: process 0 installs
    out = _run(["launch/gpu.sh", "--dry-run", "--cuda", "13", "--venv", str(venv), "--coordinator", "n0:1234",
                "--num-processes", "2", "--process-id", "0", "--", "python", "-m", "genmask_jax.train"])
    assert out.returncode == 0, out.stderr
    assert "jax\\[cuda13\\]" in out.stdout
    for line in ("GENMASK_COORDINATOR_ADDRESS=n0:1234", "GENMASK_NUM_PROCESSES=2", "GENMASK_PROCESS_ID=0"):
        assert f"+ export {line}" in out.stdout
    assert out.stdout.splitlines()[-1] == f"+ {venv}/bin/python -m genmask_jax.train"


def test_gpu_single_node_sets_no_distributed_env():
    out = _run(["launch/gpu.sh", "--dry-run", "--no-install", "--", "python", "-c", "1"])
    assert out.returncode == 0 and "GENMASK_" not in out.stdout


def test_gpu_partial_multi_node_flags_fail():
    out = _run(["launch/gpu.sh", "--dry-run", "--coordinator", "n0:1", "--", "python", "-c", "1"])
    assert out.returncode == 2 and "together" in out.stderr


def test_runtime_requirements_include_gcsfs():
    """gs:// workdirs, checkpoints and compilation caches go through etils.epath -> fsspec, which needs
    gcsfs ("Please install gcsfs to access Google Storage" otherwise)."""
    names = [re.split(r"[\s<>=!~\[;#]", line.strip(), maxsplit=1)[0].lower()
             for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert "gcsfs" in names


def test_libtpu_is_required_only_where_it_has_wheels():
    """libtpu ships Linux x86_64 wheels only: unconditional, it stopped `launch/local.sh test` from
    installing on macOS and Linux aarch64 (the tests that need it skip there)."""
    from packaging.requirements import Requirement

    lines = (ROOT / "requirements-tpu.txt").read_text().splitlines()
    libtpu = next(Requirement(line) for line in lines if line.startswith("libtpu"))
    assert libtpu.marker is not None

    def wanted(platform, machine):
        return libtpu.marker.evaluate({"sys_platform": platform, "platform_machine": machine})

    assert wanted("linux", "x86_64")
    assert not any(wanted(*where) for where in [("darwin", "arm64"), ("darwin", "x86_64"),
                                                ("linux", "aarch64"), ("win32", "AMD64")])


def test_a_wheel_holds_the_toy_vae_and_requires_the_runtime_stack(tmp_path):
    """`pip install .` (not editable) installs a wheel: it carries the toy VAE that configs/demo.py loads
    from the package, and pulls in requirements.txt."""
    pytest.importorskip("setuptools", minversion="68")  # the build backend pyproject.toml names
    from packaging.requirements import Requirement

    src = tmp_path / "src"
    for name in ("genmask_jax", "convert", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(ROOT / name, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          str(src), "-w", str(tmp_path / "dist")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        files = set(archive.namelist())
        metadata = archive.read(next(f for f in files if f.endswith(".dist-info/METADATA"))).decode()
    assets = {p.relative_to(ROOT).as_posix() for p in (ROOT / "genmask_jax/assets").rglob("*") if p.is_file()}
    assert "genmask_jax/assets/toy_vae/config.json" in assets and assets <= files
    required = {str(Requirement(line.split(":", 1)[1])) for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")}
    listed = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert required == {str(Requirement(line)) for line in listed if line}


def test_gs_paths_get_the_gcsfs_backend_without_network():
    gcsfs = pytest.importorskip("gcsfs")
    import fsspec
    from etils import epath

    path = epath.Path("gs://bucket/run1") / "checkpoints"
    assert os.fspath(path) == "gs://bucket/run1/checkpoints" and path.parent.name == "run1"
    assert issubclass(fsspec.get_filesystem_class("gs"), gcsfs.GCSFileSystem)
    assert isinstance(fsspec.filesystem("gs", token="anon"), gcsfs.GCSFileSystem)  # no credentials asked


# launch/tpu.sh: what every worker runs.


def _tpu_worker_script(*cmd):
    out = _run(["launch/tpu.sh", "--dry-run", "--name", "gm", "--zone", "z", "--", *cmd])
    assert out.returncode == 0, out.stderr
    ssh = shlex.split(next(line for line in out.stdout.splitlines() if "tpu-vm ssh" in line)[2:])
    return ssh[ssh.index("--command") + 1]


def test_tpu_workers_get_a_python_311_or_newer_venv_and_stop_on_any_failed_step():
    steps = _tpu_worker_script("python", "-m", "genmask_jax.train").split(";")
    assert steps[0] == "set -eo pipefail"
    # TPU VM images have Python 3.10: the venv comes from uv with a Python it may download.
    assert any("uv venv" in step and "--python 3.12" in step for step in steps)
    assert any("sys.version_info >= (3, 11)" in step for step in steps)
    installs = [step for step in steps if "pip install" in step and "uv" in step.split()[:1]]
    assert len(installs) == 2 and not any("&&" in step for step in installs)
    assert steps[-1] == "python -m genmask_jax.train"


_FAKE_UV = """#!/bin/bash
echo "uv $*" >> "$HOME/uv.log"
case "$1" in
  --version) echo "uv 0.0.0 (fake)" ;;
  venv) mkdir -p "${@: -1}/bin" && ln -sf "$FAKE_PYTHON" "${@: -1}/bin/python" ;;
  pip) exit "${FAKE_PIP_RC:-0}" ;;
esac
"""


@pytest.mark.parametrize("pip_rc", [0, 1])
def test_tpu_worker_script_runs_the_command_only_after_every_step_succeeds(tmp_path, pip_rc):
    """The worker script, run here with a fake uv: a failed install stops it before the command (the
    old `pip install ... && pip install -e .` list let `set -e` go on to run it in a broken venv)."""
    import sys
    import tarfile

    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir(), bin_dir.mkdir()
    (bin_dir / "uv").write_text(_FAKE_UV)
    (bin_dir / "uv").chmod(0o755)
    with tarfile.open(home / "genmask_jax.tar.gz", "w:gz") as tar:
        tar.add(ROOT / "requirements.txt", arcname="requirements.txt")
    old_venv = home / "genmask_jax_run" / ".venv" / "bin"  # left by a run with the image's Python 3.10
    old_venv.mkdir(parents=True)
    (old_venv / "python").write_text("#!/bin/sh\nexit 1\n")
    (old_venv / "python").chmod(0o755)
    script = _tpu_worker_script("python", "-c", "open('ran', 'w').close()")
    env = {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_PYTHON": sys.executable,
           "FAKE_PIP_RC": str(pip_rc)}
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    log = (home / "uv.log").read_text().splitlines()
    assert any(line.startswith("uv venv") for line in log)  # the old venv was replaced
    ran = (home / "genmask_jax_run" / "ran").exists()
    if pip_rc:
        assert out.returncode != 0 and not ran
    else:
        assert out.returncode == 0 and ran, out.stderr
        assert [line.split()[:2] for line in log].count(["uv", "pip"]) == 2


def test_tpu_worker_removes_files_the_previous_bundle_shipped_and_this_one_does_not(tmp_path):
    """A module deleted here must not stay importable on the workers; their venv and runs stay. A directory
    entry (a nested repository's) that leaves the bundle does not stop the launch."""
    import sys
    import tarfile

    home, bin_dir, src = tmp_path / "home", tmp_path / "bin", tmp_path / "src"
    for d in (home, bin_dir, src / "pkg", src / "nested"):
        d.mkdir(parents=True)
    (bin_dir / "uv").write_text(_FAKE_UV)
    (bin_dir / "uv").chmod(0o755)
    (src / "requirements.txt").write_text("")
    (src / "pkg" / "kept.py").write_text("")
    (src / "pkg" / "old name.py").write_text("")
    (src / "nested" / "x.py").write_text("")
    env = {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_PYTHON": sys.executable}
    script = _tpu_worker_script("true")
    run_dir = home / "genmask_jax_run"
    first = ["requirements.txt", "pkg/kept.py", "pkg/old name.py", "nested"]  # "nested": a directory entry
    for files in (first, first[:2]):
        with tarfile.open(home / "genmask_jax.tar.gz", "w:gz") as tar:
            for name in files:
                tar.add(src / name, arcname=name)
        out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        (run_dir / "runs").mkdir(exist_ok=True)
        (run_dir / "runs" / "metrics.jsonl").write_text("{}")
    assert (run_dir / "pkg" / "kept.py").exists() and not (run_dir / "pkg" / "old name.py").exists()
    assert not (run_dir / "nested" / "x.py").exists()
    assert (run_dir / "runs" / "metrics.jsonl").exists() and (run_dir / ".venv" / "bin" / "python").exists()


# launch/tpu.sh on this machine: a throwaway repository and a gcloud that logs its calls.

_FAKE_GCLOUD = """#!/bin/bash
echo "gcloud $*" >> "$GCLOUD_LOG"
case "$4" in
  describe) exit 1 ;;
  scp) tar -tzf "$5" > "$GCLOUD_LOG.bundle" ;;
  ssh) exit "${FAKE_SSH_RC:-0}" ;;
  delete) exit "${FAKE_DELETE_RC:-0}" ;;
esac
"""


def _tpu_repo(tmp_path):
    """A git repository with launch/tpu.sh and two tracked files, and the env to run it with a fake gcloud."""
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    shutil.copy(ROOT / "launch" / "tpu.sh", repo / "launch")
    for name in ("kept.py", "gone.py"):
        (repo / name).write_text("")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "files"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    _executable(tmp_path / "bin" / "gcloud", _FAKE_GCLOUD)
    (tmp_path / "tmp").mkdir()
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "TMPDIR": str(tmp_path / "tmp"),
           "GCLOUD_LOG": str(tmp_path / "gcloud.log")}
    return repo, env


def _gcloud_calls(env):
    return [line.split()[4] for line in Path(env["GCLOUD_LOG"]).read_text().splitlines()]


def test_tpu_bundle_leaves_out_tracked_files_deleted_in_the_working_tree(tmp_path):
    """`git ls-files --cached` still lists them; tar could not read them and the launch stopped."""
    repo, env = _tpu_repo(tmp_path)
    (repo / "gone.py").unlink()
    out = _run(["launch/tpu.sh", "--name", "gm", "--zone", "z", "--", "python", "-c", "1"], env, cwd=repo)
    assert out.returncode == 0, out.stderr
    bundle = Path(env["GCLOUD_LOG"] + ".bundle").read_text().split()
    assert "kept.py" in bundle and "launch/tpu.sh" in bundle and "gone.py" not in bundle


@pytest.mark.parametrize(("ssh_rc", "delete_rc"), [(0, 0), (3, 0), (0, 5), (3, 5)])
def test_tpu_delete_runs_whatever_the_command_returns(tmp_path, ssh_rc, delete_rc):
    """A failed command must not leave the slice billing; tpu.sh exits with the command's status (the
    delete's when only the delete failed)."""
    repo, env = _tpu_repo(tmp_path)
    env.update(FAKE_SSH_RC=str(ssh_rc), FAKE_DELETE_RC=str(delete_rc))
    out = _run(["launch/tpu.sh", "--name", "gm", "--zone", "z", "--accelerator", "v5litepod-8", "--create",
                "--delete", "--", "python", "-c", "1"], env, cwd=repo)
    assert _gcloud_calls(env) == ["describe", "create", "scp", "ssh", "delete"]
    assert out.returncode == (ssh_rc or delete_rc)
    assert ("deleting gm failed" in out.stderr) == bool(delete_rc)


def test_tpu_create_without_accelerator_deletes_nothing(tmp_path):
    repo, env = _tpu_repo(tmp_path)
    out = _run(["launch/tpu.sh", "--name", "gm", "--zone", "z", "--create", "--delete"], env, cwd=repo)
    assert out.returncode == 2 and "--create needs --accelerator" in out.stderr
    assert not Path(env["GCLOUD_LOG"]).exists()


def test_tpu_leaves_no_temporary_files(tmp_path):
    repo, env = _tpu_repo(tmp_path)
    for dry in (["--dry-run"], []):
        out = _run(["launch/tpu.sh", *dry, "--name", "gm", "--zone", "z", "--", "true"], env, cwd=repo)
        assert out.returncode == 0, out.stderr
        assert list((tmp_path / "tmp").iterdir()) == []


# launch/gpu.sh: one install per shared venv.


def _fake_venv(tmp_path):
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    for tool in ("pip", "python", "python3"):
        (venv / "bin" / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\n')
        (venv / "bin" / tool).chmod(0o755)
    return venv, log


def test_gpu_process_zero_installs_once_and_the_others_wait_for_it(tmp_path):
    venv, log = _fake_venv(tmp_path)
    flags = ["launch/gpu.sh", "--venv", str(venv), "--coordinator", "n0:1", "--num-processes", "2"]
    command = ["--", "python", "-c", "1"]
    quick = {"GENMASK_INSTALL_WAIT_S": "1"}

    out = _run([*flags, "--process-id", "1", *command], env=quick)  # nothing installed yet
    assert out.returncode == 1 and "waited 1s for process 0" in out.stderr and not log.exists()

    out = _run([*flags, "--process-id", "0", *command])
    assert out.returncode == 0, out.stderr
    calls = log.read_text().splitlines()
    assert [c.split()[:2] for c in calls] == [["pip", "install"], ["pip", "install"], ["python", "-c"]]

    log.unlink()  # installed, nothing changed: nobody installs again, nobody waits
    for pid in ("0", "1"):
        assert _run([*flags, "--process-id", pid, *command], env=quick).returncode == 0
    assert log.read_text().splitlines() == ["python -c 1", "python -c 1"]


def _fake_scontrol(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$3" | tr , "\\n"\n')  # show hostnames LIST
    (bin_dir / "scontrol").chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def test_gpu_under_slurm_the_step_nodes_coordinate_and_only_process_zero_installs(tmp_path):
    slurm = {"PATH": _fake_scontrol(tmp_path), "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
             "SLURM_JOB_NODELIST": "login,gpu1,gpu2", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2",
             "SLURM_STEP_NODELIST": "gpu1,gpu2"}
    out = _run(["launch/gpu.sh", "--dry-run", "--", "python", "-c", "1"], env=slurm)
    assert out.returncode == 0, out.stderr
    assert "+ export GENMASK_COORDINATOR_ADDRESS=gpu1:12355" in out.stdout
    assert "+ export GENMASK_NUM_PROCESSES=2" in out.stdout and "+ export GENMASK_PROCESS_ID=1" in out.stdout
    assert "pip" not in out.stdout and "(process 0 installs)" in out.stdout

    out = _run(["launch/gpu.sh", "--dry-run", "--", "python", "-c", "1"], env={**slurm, "SLURM_LOCALID": "1"})
    assert out.returncode == 2 and "--ntasks-per-node=1" in out.stderr


@pytest.mark.parametrize("batch_step_ids", [{"SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, {}])
def test_gpu_in_a_slurm_batch_script_or_salloc_shell_runs_one_process(tmp_path, batch_step_ids):
    """Outside an srun step SLURM_NTASKS is the allocation's, but one process runs: as process 0 of 8 it
    would wait for peers that never start (and without SLURM_PROCID, an salloc shell, it died)."""
    slurm = {"PATH": _fake_scontrol(tmp_path), "SLURM_JOB_ID": "77", "SLURM_NTASKS": "8",
             "SLURM_JOB_NODELIST": "gpu1", **batch_step_ids}
    out = _run(["launch/gpu.sh", "--dry-run", "--no-install", "--", "python", "-c", "1"], env=slurm)
    assert out.returncode == 0, out.stderr
    assert "GENMASK_" not in out.stdout
    assert len(out.stderr.splitlines()) == 1 and "srun --ntasks-per-node=1" in out.stderr


def test_gpu_command_runs_with_the_venv_first_on_path(tmp_path):
    """Not only a leading `python`: `env VAR=1 python`, `bash -c`, a profiler's child get the venv's python,
    also after changing directory (a relative --venv is made absolute)."""
    venv, log = _fake_venv(tmp_path)
    flags = ["launch/gpu.sh", "--no-install", "--venv", os.path.relpath(venv, ROOT), "--"]
    assert _run([*flags, "env", "FOO=1", "python", "-c", "1"]).returncode == 0
    out = _run([*flags, "bash", "-c", 'cd / && python3 -c 2 && python -c 3 && echo "$VIRTUAL_ENV"'])
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve() == venv.resolve()
    assert log.read_text().splitlines() == ["python -c 1", "python3 -c 2", "python -c 3"]


@pytest.mark.parametrize("script", ["launch/tpu.sh", "launch/gpu.sh"])
def test_help_prints_the_header_comment_only(script):
    out = _run([script, "--help"])
    assert out.returncode == 0 and out.stdout.startswith("Runs a GenMask-JAX command")
    assert "set -euo pipefail" not in out.stdout and "cd " not in out.stdout


# launch/local.sh: the venv stamp.


def _local_repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    shutil.copy(ROOT / "launch" / "local.sh", repo / "launch")
    for name in ("requirements.txt", "requirements-tpu.txt", "requirements-test.txt"):
        shutil.copy(ROOT / name, repo)
    return repo


def test_local_test_venv_reinstalls_when_an_included_requirements_file_changes(tmp_path):
    repo = _local_repo(tmp_path)
    venv, log = _fake_venv(tmp_path)

    def run_tests():
        out = subprocess.run(["bash", "launch/local.sh", "test", "-q"], cwd=repo, capture_output=True,
                             text=True, env={**os.environ, "GENMASK_TEST_VENV": str(venv)})
        assert out.returncode == 0, out.stderr
        calls = log.read_text().splitlines()
        log.unlink()
        return sum("pip install" in c for c in calls)

    assert run_tests() == 3  # pip itself, the requirements, the package
    assert run_tests() == 0
    with open(repo / "requirements-tpu.txt", "a") as f:  # included by requirements-test.txt
        f.write("# a changed pin\n")
    assert run_tests() == 3


def _fake_python(path, version, log):
    """A python that says it is `version`, logs its calls, and copies itself into DIR/bin on -m venv DIR."""
    old = tuple(map(int, version.split(".")[:2])) < (3, 11)
    return _executable(path, f"""#!/bin/sh
echo "python{version} $*" >> "{log}"
case "$1 $2" in
  "--version "*) echo "Python {version}" ;;
  "-c "*version_info*) exit {int(old)} ;;
  "-m venv") mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && touch "$3/pyvenv.cfg" ;;
esac
""")


def test_local_needs_python_311_or_newer(tmp_path):
    repo, venv, log = _local_repo(tmp_path), tmp_path / "venv", tmp_path / "calls.log"
    env = {"GENMASK_TEST_VENV": str(venv), "PYTHON": str(_fake_python(tmp_path / "py310", "3.10.13", log))}
    out = _run(["launch/local.sh", "test"], env, cwd=repo)
    assert out.returncode == 2 and not venv.exists()
    assert len(out.stderr.splitlines()) == 1 and "Python 3.10.13" in out.stderr and "PYTHON=" in out.stderr


def test_local_makes_a_venv_with_an_older_python_again(tmp_path):
    """A venv left by a Python 3.10 used to stay, whatever PYTHON the rerun was given."""
    repo, venv, log = _local_repo(tmp_path), tmp_path / "venv", tmp_path / "calls.log"
    subprocess.run([_fake_python(tmp_path / "py310", "3.10.13", log), "-m", "venv", venv], check=True)
    env = {"GENMASK_TEST_VENV": str(venv)}

    out = _run(["launch/local.sh", "test"], {**env, "PYTHON": str(tmp_path / "py310")}, cwd=repo)
    assert out.returncode == 2 and "PYTHON=" in out.stderr  # no newer python: the old venv stays
    assert (venv / "bin" / "python").exists()

    py312 = _fake_python(tmp_path / "py312", "3.12.1", log)
    out = _run(["launch/local.sh", "test"], {**env, "PYTHON": str(py312)}, cwd=repo)
    assert out.returncode == 0, out.stderr
    assert subprocess.run([venv / "bin" / "python", "--version"], capture_output=True, text=True).stdout == \
        "Python 3.12.1\n"
    assert any(line.startswith("python3.12.1 -m pip install") for line in log.read_text().splitlines())


# Where the command runs: the caller's directory, so that its relative paths are the caller's.


def test_gpu_runs_the_command_in_the_callers_directory(tmp_path):
    """gpu.sh changed into the repository first: `--workdir=runs/a` (and a relative --venv) landed in the
    checkout, not where the user stood."""
    venv, log = _fake_venv(tmp_path)
    caller = tmp_path / "caller"
    caller.mkdir()
    script = str(ROOT / "launch" / "gpu.sh")
    out = _run([script, "--no-install", "--venv", "../venv", "--", "bash", "-c", "pwd && python -c 1"],
               cwd=caller)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve() == caller.resolve()
    assert log.read_text().splitlines() == ["python -c 1"]

    command = ["python", "-m", "genmask_jax.train", "--workdir=runs/a"]
    out = _run([script, "--dry-run", "--venv", "v", "--", *command], cwd=caller)
    assert out.returncode == 0, out.stderr
    assert f"-r {ROOT}/requirements.txt" in out.stdout and f"-e {ROOT}\n" in out.stdout
    assert out.stdout.splitlines()[-1] == f"+ {caller}/v/bin/python -m genmask_jax.train --workdir=runs/a"


def _cwd_python(path, log):
    """A Python 3.12 that logs `cwd | args` and copies itself into DIR/bin on -m venv DIR."""
    return _executable(path, f"""#!/bin/sh
echo "$(pwd -P) | $*" >> "{log}"
case "$1 $2" in
  "--version "*) echo "Python 3.12.1" ;;
  "-m venv") mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && touch "$3/pyvenv.cfg" ;;
esac
""")


def test_local_runs_demo_and_python_in_the_callers_directory_and_tests_in_the_repository(tmp_path):
    """The venvs stay in the repository and `test` runs the repository's tests from its root (the README
    and CI call `bash launch/local.sh demo|test` from there); `demo` and `python` run where they are
    called, so their relative paths are the caller's."""
    repo, caller, log = _local_repo(tmp_path), tmp_path / "caller", tmp_path / "calls.log"
    caller.mkdir()
    env = {"PYTHON": str(_cwd_python(tmp_path / "py312", log))}
    script = str(repo / "launch" / "local.sh")
    runs = {  # the arguments, and the venv python's
        ("python", "-m", "genmask_jax.train", "--workdir=runs/a"): "-m genmask_jax.train --workdir=runs/a",
        ("demo", "--workdir", "runs/d"): "-m genmask_jax.demo --workdir runs/d",
        ("test", "-q", "tests/test_launchers.py"): "-m pytest -q tests/test_launchers.py",
    }
    for args, ran in runs.items():
        for cwd in (caller, repo):
            out = _run([script, *args], env, cwd=cwd)
            assert out.returncode == 0, out.stderr
            where = repo if args[0] == "test" else cwd
            assert log.read_text().splitlines()[-1] == f"{where.resolve()} | {ran}", args
    assert (repo / ".venv" / "bin" / "python").exists() and (repo / ".venv-test" / "bin" / "python").exists()
    assert not (caller / ".venv").exists() and not (caller / ".venv-test").exists()
    installs = [line.split(" | ")[1] for line in log.read_text().splitlines() if "pip install -q -" in line]
    assert f"-m pip install -q -r {repo.resolve()}/requirements.txt" in installs
    assert f"-m pip install -q --no-deps -e {repo.resolve()}" in installs


@pytest.mark.parametrize("script", ["launch/tpu.sh", "launch/gpu.sh"])
def test_help_from_another_directory(script):
    out = _run([f"{ROOT.name}/{script}", "--help"], cwd=ROOT.parent)
    assert out.returncode == 0 and out.stdout.startswith("Runs a GenMask-JAX command"), out.stderr


# Flag values: a clear line, not bash's "$2: unbound variable" or an arithmetic error.


def _multi(nproc, pid):
    return ["--coordinator", "n0:1", "--num-processes", nproc, "--process-id", pid, "--", "python"]


PROCESS_ID = "--process-id must be a whole number from 0 to 1"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--process-id"], {}, "--process-id needs a value"),
        (["--venv", "--", "python"], {}, "--venv needs a value"),
        (["--coordinator", "--num-processes", "2", "--", "python"], {}, "--coordinator needs a value"),
        (_multi("two", "0"), {}, "--num-processes must be a whole number >= 1"),
        (_multi("2", "x"), {}, PROCESS_ID),
        (_multi("2", "2"), {}, PROCESS_ID),
        (_multi("2", "1"), {"GENMASK_INSTALL_WAIT_S": "30m"}, "GENMASK_INSTALL_WAIT_S must be a whole"),
    ],
)
def test_gpu_flag_values_are_checked(args, env, message):
    out = _run(["launch/gpu.sh", "--dry-run", *args], env)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith(f"gpu.sh: {message}")


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--name"], "--name needs a value"), (["--name", "gm", "--zone", "--create"], "--zone needs a value")],
)
def test_tpu_flag_values_are_checked(args, message):
    out = _run(["launch/tpu.sh", "--dry-run", *args])
    assert out.returncode == 2 and out.stderr == f"tpu.sh: {message}\n"
