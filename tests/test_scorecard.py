"""The isolation scorecard (labkit.lab.scorecard) on the real kernel: each set-up gives
the outcome its mechanisms promise, the set-ups that share the host only ever run the
harmless probes, and a set-up that cannot run is n/a with its reason."""

from __future__ import annotations

import os

import pytest

from labkit.lab import scorecard

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the scorecard needs root")

ATTEMPT = {a.name: a for a in scorecard.ATTEMPTS}
SETUP = {s.key: s for s in scorecard.SETUPS}


def card(setups: list[str], attempts: list[str]) -> scorecard.Card:
    return scorecard.run(tuple(SETUP[k] for k in setups), tuple(ATTEMPT[a] for a in attempts), prefix="nb09-test")


def test_labkit_run_denies_mount_and_privileged_allows_it():
    c = card(["default", "privileged"], ["mount a tmpfs", "sethostname", "unshare -U (a user namespace)"])
    assert c.outcome["mount a tmpfs"] == {"default": "denied", "privileged": "contained"}, c.output
    assert c.outcome["sethostname"] == {"default": "denied", "privileged": "contained"}, c.output
    # Docker's seccomp profile: no user namespace without CAP_SYS_ADMIN
    assert c.outcome["unshare -U (a user namespace)"] == {"default": "denied", "privileged": "succeeded"}, c.output


def test_the_stages_add_up():
    """pivot_root keeps the double chroot in; cgroups hold the fork bomb; capabilities stop mount."""
    c = card(["ns", "pivot", "cgroups", "caps"], ["double-chroot escape", "fork bomb (200, pids 64)", "mount a tmpfs"])
    assert c.outcome["double-chroot escape"] == {"ns": "succeeded", "pivot": "contained", "cgroups": "contained",
                                                  "caps": "contained"}, c.output
    assert [c.outcome["fork bomb (200, pids 64)"][k] for k in ("pivot", "cgroups")] == ["succeeded", "contained"]
    assert [c.outcome["mount a tmpfs"][k] for k in ("cgroups", "caps")] == ["contained", "denied"], c.output


def test_a_plain_process_is_probed_never_harmed():
    hostname = os.uname().nodename
    with open("/proc/self/mountinfo") as f:
        mounts = f.read().count("\n")
    c = card(["plain"], ["mount a tmpfs", "sethostname", "reboot", "write a host file via /proc/PID/root"])
    assert set(c.outcome[a]["plain"] for a in c.attempts) == {"succeeded"}, c.output
    assert os.uname().nodename == hostname
    with open("/proc/self/mountinfo") as f:
        assert f.read().count("\n") == mounts
    # every attempt that could hurt the host has a probe for the set-ups that share it
    script = scorecard._script([ATTEMPT["reboot"], ATTEMPT["mount a tmpfs"]], host=True)
    assert "reboot -f" not in script and "nb09-nofs" in script


def test_reading_the_outcomes():
    plain, default = SETUP["plain"], SETUP["default"]
    assert scorecard.read(ATTEMPT["sethostname"], plain, "YES\n") == "succeeded"
    assert scorecard.read(ATTEMPT["sethostname"], default, "YES\n") == "contained"  # its own UTS namespace
    assert scorecard.read(ATTEMPT["sethostname"], default, "hostname: Operation not permitted\n") == "denied"
    assert scorecard.read(ATTEMPT["see host processes"], default, "") == "contained"
    assert scorecard.read(ATTEMPT["reboot"], default, "") == "contained"  # killed: the namespace ended
    assert scorecard.read(ATTEMPT["reboot"], default, "reboot: Operation not permitted\nNO\n") == "denied"
    assert scorecard.read(ATTEMPT["memory hog (256M, limit 64m)"], default, "HELD\n") == "contained"


def test_a_set_up_that_cannot_run_is_na_with_its_reason():
    broken = scorecard.Setup("broken", "a flag\nlabkit lacks", scorecard.SETUPS[-1].isolates, cli=("--no-such-flag",))
    c = scorecard.run((broken,), (ATTEMPT["sethostname"],), prefix="nb09-test")
    assert c.outcome["sethostname"]["broken"] == scorecard.NA
    assert "unrecognized arguments" in c.na["broken"], c.na
    c = card(["rootless"], ["sethostname"])  # no user given
    assert c.outcome["sethostname"]["rootless"] == scorecard.NA and "user" in c.na["rootless"]


def test_the_figure_has_a_title_labels_a_legend_and_the_machine():
    from labkit.lab import plots

    setups = [SETUP["plain"], SETUP["rootless"]]
    c = scorecard.Card(["sethostname"], setups, {"sethostname": {"plain": "succeeded", "rootless": scorecard.NA}},
                       {"rootless": "no user here"})
    fig = scorecard.plot(c)
    footer = " ".join(t.get_text() for t in fig.texts).replace("\n", " ")  # wrapped to the width
    assert fig._suptitle.get_text() and plots.machine() in footer and "n/a rootless: no user here" in footer
    assert "n=1" in footer
    ax = fig.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [*scorecard.OUTCOMES, scorecard.NA]
    assert [p.get_hatch() for p in ax.patches] == [None, "//"]  # the n/a cell is hatched
