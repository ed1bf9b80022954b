"""What a save leaves on disk (norga.checkpoint.files): atomic replacement, no temporary files, fsync order,
the mode of a plain open(), and messages naming the path and the cause."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch

import norga
from norga.checkpoint import files


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=3
    )
    norga.patch_vit(model, layers=[0, 1], prompt=norga.PrefixPool(2, 2, 4, 192), gate="tanh")
    return model


def _tmp_name(pid: int, host: str | None = None) -> str:
    host = files._host() if host is None else host
    return f".norga-{pid}-{host}-{'0' * 16}.safetensors.tmp"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_ended_processes_are_removed_by_the_next_save(tmp_path: Path) -> None:
    dead = tmp_path / _tmp_name(_dead_pid())
    alive_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = tmp_path / _tmp_name(alive_proc.pid)
        other_host = tmp_path / _tmp_name(_dead_pid(), host="another-host")
        unrelated = tmp_path / ".norga-notes.tmp"
        for p in (dead, alive, other_host, unrelated):
            p.write_bytes(b"partial")
        norga.save_prompts(_model(), tmp_path / "p.safetensors")
        left = sorted(os.listdir(tmp_path))
    finally:
        alive_proc.kill()
        alive_proc.wait()
    # the ended process's file is gone; a running save's, another host's and a foreign file stay
    assert left == sorted(["p.safetensors", alive.name, other_host.name, unrelated.name])


@pytest.mark.slow
def test_a_save_killed_mid_write_leaves_old_or_new_content_and_the_next_save_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "p.safetensors"
    norga.save_prompts(_model(0), target)
    old = target.read_bytes()
    # a child that saves a large file over and over; SIGKILL lands while it writes
    script = textwrap.dedent(
        f"""
        import os, sys, torch, timm, norga
        from norga.checkpoint import files
        real = os.write
        def slow(fd, data):  # announce the write, then write in small pieces so that the kill lands inside it
            print("writing", flush=True)
            n = 0
            for i in range(0, len(data), 4096):
                n += real(fd, bytes(data[i:i + 4096]))
            return n
        files.os.write = slow
        torch.manual_seed(1)
        m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=3)
        norga.patch_vit(m, layers=[0, 1], prompt=norga.PrefixPool(64, 2, 4, 192), gate="tanh")
        while True:
            norga.save_prompts(m, {str(target)!r})
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait()
    temporaries = [n for n in os.listdir(tmp_path) if n.endswith(".safetensors.tmp")]
    assert temporaries, "the kill should have left the child's temporary file"
    content = target.read_bytes()
    assert content == old or norga.checkpoint.read_prompt_metadata(target)["pool"]["num_tasks"] == 64
    norga.save_prompts(_model(2), target)  # the next save into the folder removes the dead child's file
    assert sorted(os.listdir(tmp_path)) == ["p.safetensors"]


def test_the_file_is_fsynced_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync folder" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    norga.save_prompts(_model(), tmp_path / "p.safetensors")
    assert events == ["fsync file", "rename", "fsync folder"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_a_new_file_gets_the_mode_of_a_plain_open(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain", "w"):
            pass
        norga.save_prompts(_model(), tmp_path / "p.safetensors")
    finally:
        os.umask(old)
    plain = (tmp_path / "plain").stat().st_mode & 0o777
    assert plain == 0o666 & ~umask
    assert (tmp_path / "p.safetensors").stat().st_mode & 0o777 == plain


def test_replacing_a_file_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    norga.save_prompts(_model(0), path)
    os.chmod(path, 0o640)
    norga.save_prompts(_model(1), path)
    assert path.stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("when", ["write", "fsync", "rename"])
@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_a_failed_save_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str, error: type[BaseException]
) -> None:
    path = tmp_path / "p.safetensors"
    norga.save_prompts(_model(0), path)
    old = path.read_bytes()

    def fail(*args: object) -> None:
        raise error(5, "Input/output error") if error is OSError else error()

    monkeypatch.setattr(os, {"write": "write", "fsync": "fsync", "rename": "replace"}[when], fail)
    with pytest.raises(error):
        norga.save_prompts(_model(1), path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["p.safetensors"]


def test_messages_name_the_path_and_the_cause(tmp_path: Path) -> None:
    model = _model()
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(IsADirectoryError, match=r"path '.*folder' is a folder, expected a file name"):
        norga.save_prompts(model, tmp_path / "folder")
    with pytest.raises(IsADirectoryError, match=r"'.*folder' is a folder, expected a file"):
        norga.load_prompts(model, tmp_path / "folder")
    with pytest.raises(FileNotFoundError, match=r"its folder '.*missing' does not exist; create it first"):
        norga.save_prompts(model, tmp_path / "missing" / "p.safetensors")
    with pytest.raises(NotADirectoryError, match=r"'.*afile' is a file, not a folder|a component of its folder"):
        norga.save_prompts(model, tmp_path / "afile" / "p.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no such file: '.*nope.safetensors'"):
        norga.load_prompts(model, tmp_path / "nope.safetensors")


# Run as an unprivileged user: root passes every permission check. Prints one JSON line per case.
_PERMISSIONS = """
import json, os, sys, torch, timm, norga
root = sys.argv[1]
torch.manual_seed(0)
m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=3)
norga.patch_vit(m, layers=[0, 1], prompt=norga.PrefixPool(2, 2, 4, 192))
cases = {
    "unreachable": lambda: norga.save_prompts(m, os.path.join(root, "locked", "inner", "p.safetensors")),
    "read-only folder": lambda: norga.save_prompts(m, os.path.join(root, "readonly", "p.safetensors")),
    "unreadable file": lambda: norga.load_prompts(m, os.path.join(root, "secret.safetensors")),
    "unreachable file": lambda: norga.load_prompts(m, os.path.join(root, "locked", "inner", "q.safetensors")),
}
for name, call in cases.items():
    try:
        call()
        print(json.dumps([name, None, ""]))
    except Exception as e:
        print(json.dumps([name, type(e).__name__, str(e)]))
"""


def _without_dac_override() -> None:
    """In the child, before exec: drop the capabilities that let root pass file permission checks
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) from the bounding set, so that the program runs with the permission
    checks any user gets. A no-op for a process without them."""
    if os.geteuid() != 0:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_permission_messages(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "locked" / "inner").mkdir(parents=True)
    (root / "readonly").mkdir()
    norga.save_prompts(_model(), root / "secret.safetensors")
    norga.save_prompts(_model(), root / "locked" / "inner" / "q.safetensors")
    os.chmod(root / "secret.safetensors", 0o000)
    os.chmod(root / "readonly", 0o555)
    os.chmod(root / "locked", 0o600)  # readable listing, but no search permission: nothing inside is reachable
    for p in (tmp_path, root):
        os.chmod(p, 0o755)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", _PERMISSIONS, str(root)],
        capture_output=True,
        text=True,
        preexec_fn=_without_dac_override,
        env=env,
        timeout=300,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    got = {name: (kind, msg) for name, kind, msg in map(json.loads, out.stdout.splitlines())}
    locked = str(root / "locked")
    assert got["unreachable"][0] == "PermissionError"
    assert f"cannot reach its folder '{locked}/inner'" in got["unreachable"][1]
    assert f"permission denied on '{locked}'" in got["unreachable"][1]
    assert got["read-only folder"] == (
        "PermissionError",
        f"path '{root}/readonly/p.safetensors': cannot write into its folder '{root}/readonly': permission denied",
    )
    assert got["unreadable file"] == ("PermissionError", f"cannot read '{root}/secret.safetensors': permission denied")
    assert got["unreachable file"][0] == "PermissionError"
    assert f"permission denied on '{locked}'" in got["unreachable file"][1]
    assert os.listdir(root / "readonly") == []


def test_host_names_in_temporary_names_are_safe() -> None:
    assert files._TMP.match(_tmp_name(123)) is not None
    assert all(c.isalnum() or c in "_." for c in files._host()), socket.gethostname()
