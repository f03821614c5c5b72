"""Every fault knob of the simulator during every mutating DS action, and concurrency.

For each action a clean run records the CLI lines it sends; then, on the same
starting state, each line in turn is failed (`% Error`), dropped mid-output, or
never answered (connection dropped when it arrives). Each run must end either
with success and the same group state as the clean run, or with one clear line and
the group exactly as before the action (no orphan volume, no half-made access
record). The restore of snap_revert/snap_flatten is the one point of no return:
a fault after it may fail the action, saying the volume "was reverted".
"""
from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from tests import oneutil
from oneiscsi.san import cli
from tests.test_eqliscsi_ds import MiB, READER, Lab, ds_data, ensure_links, one_line, random_file

SETUP = [c.text for c in cli.SETUP]


def _snapshot(lab, vol, sid):
    s = lab.group.create_snapshot(vol, "image snapshot %d" % sid)
    lab.group.rename_snapshot(vol, s.name, "one-snap-%d" % sid)


def _prepare(lab, action, src):
    """Starting state of the group for `action` -> (DS data, object id)."""
    g = lab.group
    if action in ("cp", "cp-restricted"):
        return ds_data(iid=7, name="Fault Image", path=src), 7
    if action == "mkfs":
        return ds_data(iid=8, name="blank", size_mb=4, fs="raw"), 8
    if action == "clone":
        g.create_volume("base.1", 4, description="OpenNebula image 1: base", unrestricted=True)
        return ds_data(iid=2, name="copy", path="base.1", size_mb=4), 2
    if action == "rm":
        v = g.create_volume("gone.3", 4, description="OpenNebula image 3: gone", unrestricted=True)
        g.add_access(v.name, initiator=READER)
        return ds_data(iid=3, source="gone.3"), 3
    g.create_volume("s.4", 4, description="OpenNebula image 4: s", unrestricted=True)
    _snapshot(lab, "s.4", 0)
    _snapshot(lab, "s.4", 1)
    return ds_data(iid=4, source="s.4", target_snapshot=0), 4


def _reset(lab):
    g = lab.group
    lab.sim.faults.clear()
    with g.lock:
        for name in list(g.volumes):
            g.set_online(name, False)
            g.delete_volume(name)
    del lab.sim.commands[:]


@pytest.fixture(scope="module")
def sim_host_key(tmp_path_factory):
    return str(tmp_path_factory.mktemp("eqlkey") / "ssh_host_rsa_key")


ACTIONS = ["cp", "cp-restricted", "mkfs", "clone", "rm", "snap_delete", "snap_revert", "snap_flatten"]


@pytest.fixture(scope="module")
def fault_lab(tmp_path_factory, sim_host_key):
    root = str(tmp_path_factory.mktemp("eqlfaults"))
    lab = Lab(os.path.join(root, "lab"), sim_host_key)
    remotes = tmp_path_factory.mktemp("remotes") / "r"
    oneutil.build_if_stale()
    oneutil.install(remotes, "6.8")
    src = random_file(os.path.join(root, "src.raw"), MiB)
    try:
        yield lab, remotes, src
    finally:
        lab.stop()


def _run(lab, remotes, action, src, **conf):
    # EQL_CLI_TIMEOUT also bounds how long a create whose answer was lost is looked for
    lab.conf(EQL_CLI_RETRIES="2", EQL_CLI_TIMEOUT="4", **conf)
    b64, oid = _prepare(lab, action, src)
    return b64, oid


def _pattern(cmd):
    """A regex for a recorded command, generic where the group invents names (snapshots)."""
    m = re.match(r"^(volume select \S+ snapshot delete) (?!one-snap-)", cmd)
    if m:
        return "^" + re.escape(m.group(1)) + " (?!one-snap-)"
    return "^" + re.escape(cmd) + "$"


def _conf_for(action):
    if action == "cp-restricted":
        return {"EQL_SECURITY_ACCESS": "initiator %s" % READER}
    return {}


def _clean_run(lab, remotes, action, src):
    _reset(lab)
    b64, oid = _run(lab, remotes, action.split("-")[0], src, **_conf_for(action))
    before = lab.state()
    res = lab.call(remotes, action.split("-")[0], b64, oid)
    assert res.rc == 0, res
    full = list(lab.sim.commands)
    positions = [i for i, c in enumerate(full) if c not in SETUP]
    return before, lab.state(), [full[i] for i in positions], positions


def _cases(action):
    return [(action, knob) for knob in ("fail", "drop_mid", "drop_at")]


@pytest.mark.parametrize("action,knob", [c for a in ACTIONS for c in _cases(a)])
def test_fault_on_every_command(fault_lab, action, knob):
    lab, remotes, src = fault_lab
    verb = action.split("-")[0]
    before, after, commands, positions = _clean_run(lab, remotes, action, src)
    assert commands, "the action sent no command"
    seen = 0
    for k, cmd in enumerate(commands):
        hit = k
        if knob != "drop_at":  # a pattern hits the first line it matches
            hit = next(i for i, c in enumerate(commands) if re.search(_pattern(cmd), c))
            if hit != k:
                continue
        _reset(lab)
        b64, oid = _run(lab, remotes, verb, src, **_conf_for(action))
        assert lab.state() == before
        if knob == "fail":
            lab.sim.faults.fail_next(_pattern(cmd), "Injected failure of this command.")
        elif knob == "drop_mid":
            lab.sim.faults.drop_mid_output(_pattern(cmd))
        else:  # answer every line the clean run sent before this one, then drop the connection
            lab.sim.faults.drop_after(positions[k])
        res = lab.call(remotes, verb, b64, oid)
        state = lab.state()
        where = "%s: %s on %r -> %r" % (action, knob, cmd, res)
        committed = verb in ("snap_revert", "snap_flatten") and _after_restore(commands, hit)
        if res.rc == 0:
            if knob == "fail" and _tolerated(cmd):  # a warning; the group's own snapshot stays
                state = {n: dict(v, snapshots=[x for x in v["snapshots"] if x.startswith("one-snap-")])
                         for n, v in state.items()}
            assert state == after, where
            assert knob != "fail" or committed or _tolerated(cmd), where
        else:
            text = one_line(res, (6, 8))
            if committed:
                assert "was reverted" in text, where
                assert all(v["online"] for v in state.values()) or "online" in text, where
            else:
                assert state == before, where
            seen += 1
        assert os.listdir(lab.staging) == [], where
    if knob == "fail":
        assert seen >= 1


def _after_restore(commands, k):
    restores = [i for i, c in enumerate(commands) if c.endswith(" restore")]
    return bool(restores) and k > restores[0]


def _tolerated(cmd):
    """CLI errors that do not fail the action: deleting the group's own pre-restore snapshot."""
    return bool(re.match(r"^volume select \S+ snapshot delete (?!one-snap-)", cmd))


@pytest.mark.parametrize("action", ACTIONS)
def test_refused_sessions_leave_the_group_alone(fault_lab, action):
    lab, remotes, src = fault_lab
    verb = action.split("-")[0]
    _reset(lab)
    b64, oid = _run(lab, remotes, verb, src, **_conf_for(action))
    lab.conf(EQL_CLI_RETRIES="1", **_conf_for(action))
    before = lab.state()
    lab.sim.faults.refuse_sessions(True)
    res = lab.call(remotes, verb, b64, oid)
    assert "Maximum number of CLI sessions" in one_line(res, (6, 8))
    assert lab.state() == before and lab.sim.sessions_refused >= 2


# ---- a group that answers a mutating command late -----------------------------------------------
MUTATING = re.compile(r"^volume (create|delete) |^volume select \S+ (clone |offline|online|multihost-access |"
                      r"access (create|delete) |size |snapshot (delete |create-now|rename |select \S+ "
                      r"(offline|online|restore|clone )))")


def _late(lab, remotes, action, src, seconds):
    """Clean run; then the same action with its first mutating command answered `seconds` late
    (EQL_CLI_TIMEOUT=1). -> (before, after, first mutating command, failed run's text)."""
    verb = action.split("-")[0]
    before, after, commands, _ = _clean_run(lab, remotes, action, src)
    first = next(c for c in commands if MUTATING.search(c))
    _reset(lab)
    b64, oid = _run(lab, remotes, verb, src, **_conf_for(action))
    lab.conf(EQL_CLI_TIMEOUT="1", EQL_CLI_RETRIES="0", **_conf_for(action))
    assert lab.state() == before
    lab.sim.faults.latency(seconds, "^" + re.escape(first) + "$", times=1)
    t = time.monotonic()
    res = lab.call(remotes, verb, b64, oid)
    text = one_line(res, (6, 8))
    took = time.monotonic() - t
    # the timeout fired on the mutating command itself, not during the terminal set-up
    assert "no answer from group" in text and "within 1 s to %r" % first in text, text
    assert first in lab.sim.commands and took < 15
    _wait_late_done(lab)
    return before, after, first, text, b64, oid


def _wait_late_done(lab):
    """Until the simulator has run the late command (its session ends after it)."""
    deadline = time.monotonic() + 20
    while lab.sim.sessions_now and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lab.sim.sessions_now == 0


@pytest.mark.parametrize("action", ACTIONS)
def test_late_answer_to_the_first_mutating_command(fault_lab, action):
    """The answer comes after EQL_CLI_TIMEOUT but the group still does the command: a volume
    the action was creating is found (it is looked for for EQL_CLI_TIMEOUT more seconds) and
    deleted; any other action is finished by running it again."""
    lab, remotes, src = fault_lab
    verb = action.split("-")[0]
    before, after, first, text, b64, oid = _late(lab, remotes, action, src, 1.5)
    if verb in ("cp", "mkfs", "clone"):
        assert "deleted" in text, text
        assert lab.state() == before, text
    lab.conf(EQL_CLI_TIMEOUT="4", **_conf_for(action))
    res = lab.call(remotes, verb, b64, oid)
    assert res.rc == 0, (first, res)
    assert lab.state() == after, (first, res)


@pytest.mark.parametrize("action", ["cp", "mkfs", "clone"])
def test_create_finished_after_the_check_is_replaced_on_rerun(fault_lab, action):
    """Later than the check: the volume appears after the action failed. A re-run recognises it
    by its exact description (no connection, no snapshot) and makes it again."""
    lab, remotes, src = fault_lab
    before, after, first, text, b64, oid = _late(lab, remotes, action, src, 3.5)
    assert "did not appear within 1 s" in text, text
    state = lab.state()
    orphans = sorted(set(state) - set(before))
    assert len(orphans) == 1, state
    lab.conf(EQL_CLI_TIMEOUT="4")
    res = lab.call(remotes, action, b64, oid)
    assert res.rc == 0, res
    assert "volume %s exists with this image's description" % orphans[0] in open(lab.log).read()
    assert lab.state() == after


def test_volume_of_another_description_is_never_replaced(fault_lab):
    lab, remotes, src = fault_lab
    _reset(lab)
    b64, oid = _run(lab, remotes, "cp", src)
    lab.group.create_volume("fault-image.7", 4, description="OpenNebula image 7: someone else's",
                            unrestricted=True)
    before = lab.state()
    res = lab.call(remotes, "cp", b64, oid)
    assert "already exists" in one_line(res, (6, 8))
    assert lab.state() == before
    lab.group.volumes["fault-image.7"].description = "OpenNebula image 7: Fault Image"
    snap = lab.group.create_snapshot("fault-image.7", "kept")   # a snapshot: not a leftover either
    before = lab.state()
    res = lab.call(remotes, "cp", b64, oid)
    assert "already exists" in one_line(res, (6, 8))
    assert lab.state() == before and snap.name in lab.state()["fault-image.7"]["snapshots"]


def test_slow_group_still_works(fault_lab):
    lab, remotes, src = fault_lab
    _reset(lab)
    b64, oid = _run(lab, remotes, "cp", src)
    lab.sim.faults.latency(0.05)
    res = lab.call(remotes, "cp", b64, oid)
    assert res.rc == 0 and "fault-image.7" in lab.state(), res


# ---- concurrency --------------------------------------------------------------------------------
def test_15_concurrent_actions_never_exceed_max_sessions(tmp_path, sim_host_key):
    lab = Lab(str(tmp_path / "lab"), sim_host_key, max_sessions=3)
    try:
        remotes = tmp_path / "remotes"
        oneutil.install(remotes, "6.8")
        ensure_links(remotes)
        lab.conf(EQL_MAX_SESSIONS="3", EQL_SESSION_WAIT="120")
        lab.group.create_volume("base.1", 2, description="base", unrestricted=True)
        lab.sim.faults.latency(0.01)
        src = random_file(str(tmp_path / "s.raw"), MiB)
        procs = []
        for i in range(15):
            kind = ("cp", "clone", "monitor")[i % 3]
            iid = 100 + i
            if kind == "cp":
                b64 = ds_data(iid=iid, name="c", path=src)
            elif kind == "clone":
                b64 = ds_data(iid=iid, name="k", path="base.1", size_mb=2)
            else:
                b64 = ds_data(image=False)
            e = dict(os.environ)
            e.pop("ONEISCSI_ONE_VERSION", None)
            e.update(lab.env())
            procs.append((kind, subprocess.Popen([str(remotes / "datastore" / "eqliscsi" / kind), str(iid)],
                                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE, text=True, env=e)))
            procs[-1][1].stdin.write(b64)
            procs[-1][1].stdin.close()
        results = [(kind, p.wait(120), p.stdout.read(), p.stderr.read()) for kind, p in procs]
        for kind, p in procs:
            p.stdout.close()
            p.stderr.close()
        assert all(rc == 0 for _, rc, _, _ in results), results
        assert lab.sim.sessions_max_seen <= 3 and lab.sim.sessions_refused == 0
        assert lab.sim.sessions_max_seen >= 2  # they did overlap
        names = sorted(lab.state())
        assert names == sorted(["base.1"] + ["c.%d" % (100 + i) for i in range(0, 15, 3)]
                               + ["k.%d" % (100 + i) for i in range(1, 15, 3)])
    finally:
        lab.stop()
