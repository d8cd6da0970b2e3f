"""vagrant/Vagrantfile's settings for the course VM test: LABKIT_BOX picks another box than
bento/ubuntu-24.04 (the one scripts/build_box.py makes), LABKIT_LIBVIRT_DRIVER=qemu libvirt's
software emulation; a bad value stops Vagrant with one line naming it and the accepted form.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_vagrantfile_box_and_libvirt_driver_from_the_environment():
    from test_provision import vagrant_validate

    good = vagrant_validate(REPO, LABKIT_BOX="labkit/debian-13", LABKIT_LIBVIRT_DRIVER="qemu")
    assert good.returncode == 0, good.stdout + good.stderr
    for name, bad, accepted in [("LABKIT_BOX", "no box!", "a box name"),
                                ("LABKIT_LIBVIRT_DRIVER", "xen", "kvm or qemu")]:
        result = vagrant_validate(REPO, **{"LABKIT_BOX": "", "LABKIT_LIBVIRT_DRIVER": "", name: bad})
        assert result.returncode != 0, f"{name}={bad} was accepted"
        assert f'{name}="{bad}"' in result.stderr and accepted in result.stderr, result.stderr
