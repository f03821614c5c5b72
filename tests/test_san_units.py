"""Pure parts of the SAN client, config, locks and naming: parsers, command builder, layering."""
from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from oneiscsi import config, locks
from oneiscsi.drivers.eqliscsi import common
from oneiscsi.errors import Invalid
from oneiscsi.san import cli, parse
from oneiscsi.sim import eql_cli, eql_group

IQN = "iqn.2001-05.com.equallogic:0-8a0906-83bcb3401-16e0002fd0a46f3d-centos-test"
LONG = "iqn.2001-05.com.equallogic:0-8a0906-83bcb3401-16e0002fd0a46f3d-" + "a-very-long-volume-name" * 2


# ---- parse ----------------------------------------------------------------------------------
@pytest.mark.parametrize("iqn", [IQN, LONG])
@pytest.mark.parametrize("columns", [255, 80, 40])
def test_target_iqn_plain_and_wrapped(iqn, columns):
    text = "\r\n".join(["Volume creation succeeded."] + eql_cli.wrap("iSCSI target name is %s." % iqn, columns))
    assert parse.target_iqn(parse.lines(text), columns) == iqn


@pytest.mark.parametrize("columns", [255, 80, 30])
def test_iqn_field_wrapped(columns):
    out = ["Name: v", "Size: 5GB"] + eql_cli.wrap("iSCSI Name: " + LONG, columns) + ["Description: x"]
    assert parse.iqn_field(out, columns) == LONG
    assert parse.fields(out)["Description"] == "x" and parse.fields(out)["Size"] == "5GB"
    indented = ["Name: v", "iSCSI Name: ", "  " + LONG[:30], "  " + LONG[30:], "Description: x"]
    assert parse.iqn_field(indented) == LONG


@pytest.mark.parametrize("key", ["Multihost-access", "MultiHostAccess", "multihost access", "MULTIHOST_ACCESS"])
def test_field_names_match_as_a_person_reads_them(key):
    out = ["Name: v", "iSCSI Name: " + IQN, key + ": enabled", "Thin-Provision: disabled"]
    info = parse.fields(out)
    for ask in ("Multihost-access", "MultiHostAccess", "multihost access", "multihostaccess"):
        assert parse.field(info, ask) == "enabled" and info[ask] == "enabled" and ask in info
        assert info.get(ask) == "enabled"
    assert parse.field(info, "thinprovision") == "disabled"
    assert parse.field(info, "Snap-Reserve") == "" and parse.field(info, "x", "dflt") == "dflt"
    assert parse.field(None, "Name") == "" and info.get("nothing") is None and "nothing" not in info
    assert parse.field({"Multihost-access": "on"}, "multihost access") == "on"   # any dict
    camel = [eql_cli.camel_key(k) + ": " + v for k, v in (ln.split(": ", 1) for ln in out)]
    assert camel[1].startswith("iSCSIName: ")
    assert eql_cli.camel_key("Multihost-access") == "MultiHostAccess"
    assert parse.iqn_field(camel) == IQN == parse.iqn_field(out)
    assert parse.field(parse.fields(camel), "thin-provision") == "disabled"


def test_cinder_fixtures():
    assert parse.target_iqn(["iSCSI target name is iqn.2003-10.com.equallogic:group01:25366:fakev."]) == \
        "iqn.2003-10.com.equallogic:group01:25366:fakev"
    stats = ["TotalCapacity: 111GB", "FreeSpace: 11GB", "VolumeReportedSpace: 80GB", "TotalVolumes: 100"]
    assert parse.pool_space(stats) == (111 * 1024, 11 * 1024)
    table = ["ID  Initiator       Ipaddress     AuthMethod UserName   Apply-To",
             "--- --------------- ------------- ---------- ---------- --------",
             "1   iqn.1993-08.org.debian:01:222 *.*.*.*       none        both",
             "       7dab76162"]
    assert parse.access_table(table) == [{"id": 1, "initiator": "iqn.1993-08.org.debian:01:2227dab76162",
                                          "ipaddress": "*.*.*.*", "authmethod": "none", "username": "",
                                          "apply_to": "both"}]
    assert parse.access_table(table[:2]) == []


@pytest.mark.parametrize("text,mb", [("123.0GB", 123 * 1024), ("123.5GB", 126464), ("123.0TB", 123 * 1024 ** 2),
                                     ("1024.0MB", 1024), ("1536.0MB", 1536), ("1.99TB", 2086667), ("100", 100),
                                     ("0.5MB", 1)])
def test_size_mb(text, mb):
    assert parse.size_mb(text) == mb


def test_size_mb_rejects_garbage():
    with pytest.raises(parse.ParseError):
        parse.size_mb("lots")


def test_errors_and_messages():
    assert parse.error_message(["% Error - Volume 'x' does not exist."]) == "Volume 'x' does not exist."
    assert parse.error_message(["ok", "Error: bad thing"]) == "bad thing"
    assert parse.error_message(eql_cli.wrap("% Error - " + "word " * 30, 40), 40) == ("word " * 30).strip()
    assert parse.error_message(["% Error - long", "   wrapped"]) == "long wrapped"
    assert parse.error_message(["Volume creation succeeded."]) is None


def _sim_session():
    g = eql_group.Group("group-0", "10.0.0.1", {"default": "1TB", "pool_b": 500})
    return g, eql_cli.CliSession(g, interactive=True, columns=255)


def test_tables_rendered_by_the_simulator_round_trip():
    g, s = _sim_session()
    names = ["a", "exactly-15-char", "a-very-long-volume-name-that-wraps.12", "x" * 64]
    for n in names:
        g.create_volume(n, "10GB", thin=n == "a")
    g.create_snapshot("a")
    rows = parse.volume_table(parse.lines(s.render(s.execute("volume show").lines)))
    assert [r["name"] for r in rows] == names
    assert rows[0]["thin"] and rows[0]["snapshots"] == 1 and rows[1]["size"] == "10GB"
    snaps = parse.snapshot_table(parse.lines(s.render(s.execute("volume select a snapshot show").lines)))
    assert [r["name"] for r in snaps] == list(g.volumes["a"].snapshots)
    g.add_access("a", initiator=LONG)
    g.add_access("a", ipaddress="10.1.2.*", username="u1", authmethod="chap")
    recs = parse.access_table(parse.lines(s.render(s.execute("volume select a access show").lines)))
    assert [(r["id"], r["initiator"], r["ipaddress"], r["username"]) for r in recs] == \
        [(1, LONG, "*.*.*.*", ""), (2, "", "10.1.2.*", "u1")]
    s.execute("cli-settings displayinMB on")
    total, free = parse.pool_space(s.execute("pool select default show").lines)
    assert (total, free) == (1024 * 1024, g.pool_usage("default")["free"])


def test_strip_echo():
    cmd = "volume select v show"
    assert parse.strip_echo(cmd + "\r\nName: v\r\n", cmd) == "Name: v\r\n"
    wrapped = "\r\n".join(eql_cli.wrap("volume create " + "x" * 70 + " 10MB description 'a b'", 40)) + "\r\nok\r\n"
    assert parse.strip_echo(wrapped, "volume create " + "x" * 70 + " 10MB description 'a b'") == "ok\r\n"
    assert parse.strip_echo("something else\r\n", cmd) == "something else\r\n"


def test_snapshot_created():
    assert parse.snapshot_created(["Snapshot creation succeeded.", "Snapshot name is v-2024-01-01-10:00:00.1"]) == \
        "v-2024-01-01-10:00:00.1"
    assert parse.snapshot_created(["Snapshot name is s.2."]) == "s.2"


# ---- cli --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["", "a b", "a;b", "a\nb", "x" * 65, "-x", "a'b", "a_b", "ü"])
def test_volume_names_refused(bad):
    with pytest.raises(Invalid):
        cli.volume(bad)


def test_commands_are_exact():
    assert cli.volume_create("v.1", 10, "default", "Image 1: it's\nmine", ("thin-provision",)).text == \
        "volume create v.1 10MB description 'Image 1: it-s mine' online pool default thin-provision"
    assert cli.volume_clone("a", "b", unrestricted=True).text == "volume select a clone b online unrestricted"
    assert cli.access_create("v", cli.initiator_record(IQN, "u")).text == \
        "volume select v access create initiator %s authmethod chap username u" % IQN
    assert cli.multihost("v", True).retry_safe and not cli.volume_create("v", 1, "p").retry_safe
    assert [c.text for c in cli.SETUP][:5] == ["stty columns 255", "cli-settings paging off",
                                               "cli-settings confirmation off", "cli-settings events off",
                                               "cli-settings formatoutput off"]


def test_access_records_and_thin_words():
    assert cli.access_records("") == []
    assert cli.access_records("ipaddress 192.168.*.*") == [("ipaddress", "192.168.*.*")]
    assert cli.access_records("apply-to volume authmethod chap username u ipaddress 10.0.0.1 initiator %s, "
                              "ipaddress *.*.*.*" % IQN) == [
        ("apply-to", "volume", "authmethod", "chap", "username", "u", "ipaddress", "10.0.0.1", "initiator", IQN),
        ("ipaddress", "*.*.*.*")]
    for bad in ("ipaddress", "authmethod chap ipaddress 1.2.3.4", "ipaddress 1.2.3", "initiator x",
                "ipaddress 1.2.3.4 ipaddress 1.2.3.5", "username a;b", "ipaddress 1.2.3.4\nvolume delete x"):
        with pytest.raises(Invalid):
            cli.access_records(bad)
    assert cli.thin_words("thin-provision thin-min-reserve 50%") == ("thin-provision", "thin-min-reserve", "50%")
    assert cli.thin_words("yes") == ("thin-provision",) and cli.thin_words("") == ()
    assert cli.thin_words("thin-min-reserve 10%") == ("thin-provision", "thin-min-reserve", "10%")
    for bad in ("thin-min-reserve 500%", "thin-provision; x", "magic"):
        with pytest.raises(Invalid):
            cli.thin_words(bad)


def test_clean_description():
    d = cli.clean_description("Ünïcødé\n'quoted' \"x\" ; `rm` $HOME " + "y" * 200)
    assert d.isascii() and len(d) <= 127 and not set(d) & set("'\"`$;\n")


# ---- naming -------------------------------------------------------------------------------------
def test_volume_names_like_the_seed():
    assert common.volume_name("Ubuntu 22.04", 7) == "ubuntu-22-04.7"
    assert common.volume_name("my_image.v2", 12) == "my-image-v2.12"
    assert common.volume_name("", 3) == "image.3"
    n = common.volume_name("x" * 200, 1234567)
    assert n.endswith(".1234567") and len(n) + len("-4294967295") <= 64
    assert len(common.clone_name(n, 4294967295)) <= 64
    assert common.clone_name("ubuntu-22-04.7", 42) == "ubuntu-22-04.7-42"


@pytest.mark.parametrize("source,volume", [
    ("ubuntu-22-04.7", "ubuntu-22-04.7"),
    ("192.168.0.1:ubuntu-22-04.7", "ubuntu-22-04.7"),
    ("eqlgroup:ubuntu-22-04.7", "ubuntu-22-04.7"),
    ("192.168.0.1:" + IQN, "centos-test"),
    (IQN, "centos-test"),
])
def test_parse_source_forms(source, volume):
    assert common.parse_source(source) == volume


def test_snapshot_names():
    assert common.snapshot_name(3) == "one-snap-3"
    assert common.snapshot_id("one-snap-3") == 3 and common.snapshot_id("v-2024-01-01.1") is None


# ---- config -------------------------------------------------------------------------------------
SAMPLE = """# eqliscsi.conf (seed add-on sample)
EQL_HOST="192.168.0.1"
EQL_POOL="sample_pool"
export EQL_USER='sample_user'
EQL_PASS="sample pass"  # trailing comment
EQL_MULTIHOST="enable"
EQL_SECURITY_ACCESS="ipaddress 192.168.*.*"
EQL_THINPROVISION="thin-provision thin-min-reserve 50%"
EQL_BASE_DEVICE="/dev/iscsi"
#EQL_BASE_DEVICE="/dev/eql"
EQL_IFACE="eql00"
EQL_WAIT_TIME=1
NO_ISCSI=""
EQLADM="EqlCliExec.py"
"""


class _Tpl:
    def __init__(self, **kv):
        self.kv = kv

    def tpl(self, key):
        return self.kv.get(key, "")


def test_parse_conf_seed_sample():
    v = config.parse_conf(SAMPLE)
    assert v["EQL_PASS"] == "sample pass" and v["EQL_USER"] == "sample_user" and v["EQL_WAIT_TIME"] == "1"
    assert v["EQL_BASE_DEVICE"] == "/dev/iscsi" and v["NO_ISCSI"] == ""
    with pytest.raises(Invalid, match="line 2"):
        config.parse_conf("A=1\nB='open")
    with pytest.raises(Invalid, match="line 1"):
        config.parse_conf("echo hello")


def test_layering_and_image_keys(tmp_path, monkeypatch):
    conf = tmp_path / "eqliscsi.conf"
    conf.write_text(SAMPLE)
    os.chmod(str(conf), 0o600)
    monkeypatch.setenv("ONEISCSI_EQL_CONF", str(conf))
    cfg = config.load("/nonexistent", _Tpl(EQL_POOL="ds_pool", EQL_MAX_SESSIONS="3"),
                      _Tpl(EQL_POOL="img-pool", EQL_HOST="evil", EQL_MULTIHOST="disable"))
    assert cfg.pool == "img-pool" and not cfg.multihost and cfg.max_sessions == 3
    assert cfg["EQL_HOST"] == "192.168.0.1" and cfg["EQL_IFACE"] == "eql00"
    assert cfg.access == [("ipaddress", "192.168.*.*")]
    assert cfg.thin == ("thin-provision", "thin-min-reserve", "50%")
    g = cfg.group()
    assert (g.host, g.port, g.user, g.password) == ("192.168.0.1", 22, "sample_user", "sample pass")
    assert cfg.portal() == ("192.168.0.1", 3260)
    os.chmod(str(conf), 0o644)
    with pytest.raises(Invalid, match="chmod 600 %s" % conf):
        config.load("/nonexistent")


def test_defaults_without_conf(monkeypatch, tmp_path):
    monkeypatch.setenv("ONEISCSI_EQL_CONF", str(tmp_path / "none.conf"))
    cfg = config.load("/nonexistent", _Tpl(), None)
    assert cfg.pool == "default" and cfg.multihost and cfg.max_sessions == 7 and cfg.access == []
    with pytest.raises(Invalid, match="EQL_HOST is not set"):
        cfg.group()
    cfg = config.load("/nonexistent", _Tpl(EQL_HOST="[fd00::5]:2222", EQL_USER="u"), None)
    with pytest.raises(Invalid, match="no SAN credentials"):
        cfg.group()
    assert config.generated_initiator().startswith("iqn.2000-01.org.opennebula.oneiscsi:")


def test_default_conf_location(tmp_path, monkeypatch):
    monkeypatch.delenv("ONEISCSI_EQL_CONF", raising=False)
    path = tmp_path / "etc" / "datastore" / "eqliscsi" / "eqliscsi.conf"
    path.parent.mkdir(parents=True)
    path.write_text('EQL_POOL="from-remotes"\n')
    assert config.load(str(tmp_path)).pool == "from-remotes"


# ---- locks ---------------------------------------------------------------------------------------
def _hold(args):
    d, name, slots, log = args
    with locks.semaphore(name, slots, 30, "test", directory=d):
        with open(log, "a") as f:
            f.write("+%f\n" % time.monotonic())
        time.sleep(0.15)
        with open(log, "a") as f:
            f.write("-%f\n" % time.monotonic())


def test_semaphore_bounds_processes(tmp_path):
    log = str(tmp_path / "log")
    with multiprocessing.get_context("fork").Pool(8) as pool:
        pool.map(_hold, [(str(tmp_path), "g", 3, log)] * 8)
    events = sorted((float(line[1:]), line[0]) for line in open(log).read().split())
    now = peak = 0
    for _, kind in events:
        now += 1 if kind == "+" else -1
        peak = max(peak, now)
    assert peak == 3 and len(events) == 16


def test_semaphore_and_lock_time_out_clearly(tmp_path):
    with locks.semaphore("s", 1, 1, "CLI sessions", directory=str(tmp_path)):
        t = time.monotonic()
        with pytest.raises(locks.LockTimeout, match="all 1 slots stayed busy"):
            with locks.semaphore("s", 1, 0.3, "CLI sessions", directory=str(tmp_path)):
                pass
        assert 0.3 <= time.monotonic() - t < 2
    with locks.lock("v/x y", 1, "volume x", directory=str(tmp_path)):
        with pytest.raises(locks.LockTimeout, match="volume x is busy"):
            with locks.lock("v/x y", 0.1, "volume x", directory=str(tmp_path)):
                pass
    assert all("/" not in f[1:] for f in os.listdir(str(tmp_path)))
