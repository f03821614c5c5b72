"""udev/: the rules pass `udevadm verify` (systemd 254 from bookworm-backports: Debian 12's udev
252 has no verify), and the helper names EqualLogic volumes from ID_PATH. The rules are also
exercised with the real kernel on the QEMU guest (test_host_iscsi_realhost.py: /dev/eql/<vol>)."""
import os
import subprocess
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent
RULES = TOP / "udev" / "61-oneiscsi-eql.rules"
HELPER = TOP / "udev" / "oneiscsi-eql-volume"
CACHE = Path(os.environ.get("ONEISCSI_BPO_CACHE", "/var/cache/oneiscsi-bpo"))


@pytest.fixture(scope="session")
def udevadm_254():
    """udevadm from bookworm-backports, unpacked with dpkg -x (nothing installed system-wide)."""
    root = CACHE / "root"
    udevadm = root / "bin" / "udevadm"
    if not udevadm.exists():
        mirror = ""
        for line in Path("/etc/apt/sources.list.d/debian.sources").read_text().splitlines():
            if line.startswith("URIs:"):
                mirror = line.split()[1]
                break
        assert mirror, "no Debian mirror in /etc/apt/sources.list.d/debian.sources"
        for d in ("lists/partial", "cache/archives/partial", "debs"):
            (CACHE / d).mkdir(parents=True, exist_ok=True)
        (CACHE / "sources.list").write_text(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s bookworm-backports main\n" % mirror)
        opts = ["-o", "Dir::Etc::SourceList=%s" % (CACHE / "sources.list"), "-o", "Dir::Etc::SourceParts=/dev/null",
                "-o", "Dir::State::Lists=%s" % (CACHE / "lists"), "-o", "Dir::Cache=%s" % (CACHE / "cache")]
        subprocess.run(["apt-get", *opts, "-q", "update"], check=True, capture_output=True)
        subprocess.run(["apt-get", *opts, "download", "udev/bookworm-backports",
                        "libsystemd-shared/bookworm-backports"], check=True, capture_output=True, cwd=CACHE / "debs")
        for deb in (CACHE / "debs").glob("*.deb"):
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    lib = next(root.glob("usr/lib/*/systemd"))
    return [str(udevadm)], {"LD_LIBRARY_PATH": str(lib)}


def test_rules_pass_udevadm_verify(udevadm_254, tmp_path):
    cmd, env = udevadm_254
    res = subprocess.run(cmd + ["verify", str(RULES)], capture_output=True, text=True, env=dict(os.environ, **env))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Success: 1" in res.stdout + res.stderr
    bad = tmp_path / "99-bad.rules"  # the checker really checks
    bad.write_text('SUBSYSTEM=="block", PROGRAM="/x", SYMLINK+="eql/%c" BOGUSKEY="1"\n')
    res = subprocess.run(cmd + ["verify", str(bad)], capture_output=True, text=True, env=dict(os.environ, **env))
    assert res.returncode != 0


@pytest.mark.parametrize("id_path,volume", [
    ("ip-10.0.0.5:3260-iscsi-iqn.2001-05.com.equallogic:0-8a0906-83bcb3401-16e0002fd0a46f3d-centos-test-lun-0",
     "centos-test"),
    ("ip-10.0.0.5:3260-iscsi-iqn.2001-05.com.equallogic:0-8a0906-83bcb3401-16e0002fd0a46f3d-ubuntu-22-04.7-lun-0",
     "ubuntu-22-04.7"),
    ("ip-10.0.0.5:3260-iscsi-iqn.2001-05.com.equallogic:0-8a0906-83bcb3401-16e0002fd0a46f3d-a-lun-b.3-12-lun-1",
     "a-lun-b.3-12"),  # a name containing "-lun" stays whole (the seed's helper cut it)
    ("ip-[fd00::5]:3260-iscsi-iqn.2001-05.com.equallogic:0-8a0906-83bcb3401-16e0002fd0a46f3d-v6vol-lun-0", "v6vol"),
])
def test_helper_names_equallogic_volumes(id_path, volume):
    res = subprocess.run(["sh", str(HELPER), id_path], capture_output=True, text=True)
    assert (res.returncode, res.stdout) == (0, volume + "\n")


@pytest.mark.parametrize("id_path", [
    "ip-10.0.0.5:3260-iscsi-iqn.2024-01.org.example:disk1-lun-1",
    "pci-0000:00:1f.2-ata-1",
    "ip-10.0.0.5:3260-iscsi-iqn.2001-05.com.equallogic:not-the-group-format-lun-0",
    "",
])
def test_helper_ignores_other_devices(id_path):
    res = subprocess.run(["sh", str(HELPER), id_path], capture_output=True, text=True)
    assert res.returncode == 1 and res.stdout == ""
