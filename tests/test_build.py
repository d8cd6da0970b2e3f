"""labkit build, its layer cache and output; history, commit, rmi and image prune.

Builds run for real: RUN steps are labkit containers on the real kernel, layers land in
a store of this test's own (LABKIT_ROOT under the session's temp root). The lecture's
own Dockerfile (solutions/10-files/lecture, notebook 10's copy) is built from its stand-in files.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from labkit.engine import dockerfile, images

REPO = Path(__file__).resolve().parent.parent
LECTURE = REPO / "solutions" / "10-files" / "lecture"  # the one copy: notebook 10 builds it too


@pytest.fixture
def store(tmp_dir, monkeypatch):
    monkeypatch.setenv("LABKIT_ROOT", str(tmp_dir))
    yield tmp_dir
    for line in lk("ps", "-a", "-q").stdout.split():
        lk("rm", "-f", line)


def lk(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "labkit", *args], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def stored(root: Path) -> list[str]:
    """Every file of the image store, to show that a failed build added none."""
    base = root / "lib" / "images"
    return sorted(str(p.relative_to(base)) for p in base.rglob("*") if ".lock" not in p.name) if base.exists() else []


def context(tmp: Path, text: str, **files: str | bytes) -> Path:
    ctx = tmp / "ctx"
    ctx.mkdir(parents=True, exist_ok=True)
    (ctx / "Dockerfile").write_text(text)
    for name, body in files.items():
        path = ctx / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body if isinstance(body, bytes) else body.encode())
    return ctx


# --- the parser -------------------------------------------------------------------


def test_parser_reads_any_case_continuations_comments_and_both_forms():
    text = 'from busybox\n# a comment\nRUN echo a \\\n  # inside\n  b\nCMD ["sh", "-c", "x"]\nadd a /b\n'
    found = dockerfile.parse(text)
    assert [(i.line, i.keyword) for i in found] == [(1, "FROM"), (3, "RUN"), (6, "CMD"), (7, "ADD")]
    assert found[1].args == "echo a  b" and found[1].exec_form is None
    assert found[2].exec_form == ("sh", "-c", "x")
    assert dockerfile.key_values(dockerfile.parse('ENV A "x y"')[0], {}) == [("A", "x y")]
    assert dockerfile.key_values(dockerfile.parse("ENV A=1 B='$A' C=$A")[0], {"A": "1"}) == [
        ("A", "1"), ("B", "$A"), ("C", "1")]  # fmt: skip


@pytest.mark.parametrize("path, out", [
    ("app.log", True), ("logs/app.log", False), ("keep.log", False), ("secret/key", True),
    ("a/b/c.tmp", True), ("src/main.py", False),
])  # fmt: skip
def test_dockerignore_patterns(path, out):
    rules = dockerfile.ignore_rules("# comment\n*.log\n!keep.log\nsecret\n**/*.tmp\n")
    assert dockerfile.ignored(rules, path) is out


# --- the lecture's Dockerfile ------------------------------------------------------------


def test_lecture_dockerfile_builds_and_its_secret_stays_in_the_history(store, tmp_dir):
    r = lk("build", "-t", "lecture", str(LECTURE), check=True)
    assert "Step 1/11 : FROM busybox" in r.stdout
    assert "Step 8/11 : ADD tomcat-users.xml $CATALINA_HOME/conf/" in r.stdout
    assert re.search(r"^ ---> [0-9a-f]{12} \(\d+\.\d\ds\)$", r.stdout, re.M)
    assert re.search(r"^Successfully built [0-9a-f]{12}$", r.stdout, re.M)
    assert "Successfully tagged lecture:latest" in r.stdout
    out = lk("run", "--rm", "lecture", "sh", "-c", "ls $CATALINA_HOME/webapps; ls $CATALINA_HOME/bin; ls /tamr; "
             "echo $CORE_SQL_PASSWORD", check=True).stdout.split()  # fmt: skip
    assert out == ["tamr.war", "catalina.sh", "12345"]
    history = lk("history", "--no-trunc", "lecture", check=True).stdout
    assert "ENV CORE_SQL_PASSWORD=12345" in history
    assert '"Author": "Jeff Ellin jeff.ellin@example.com"' in lk("image", "inspect", "lecture", check=True).stdout

    # a later RUN rm hides the file, but the earlier layer still has it
    ctx = context(tmp_dir, "FROM lecture\nRUN rm $CATALINA_HOME/conf/tomcat-users.xml\n")
    lk("build", "-t", "lecture:scrubbed", str(ctx), check=True)
    gone = lk("run", "--rm", "lecture:scrubbed", "sh", "-c", "ls $CATALINA_HOME/conf | wc -l", check=True)
    assert gone.stdout.strip() == "0"
    top, *below = images.get("lecture:scrubbed").layers
    whiteout = os.lstat(top / "usr/local/tomcat/conf/tomcat-users.xml")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert any((d / "usr/local/tomcat/conf/tomcat-users.xml").is_file() for d in below)


# --- the cache ---------------------------------------------------------------------------


def test_cache_follows_content_mode_and_owner_not_mtime(store, tmp_dir):
    shutil.copytree(LECTURE, tmp_dir / "ctx")
    ctx = tmp_dir / "ctx"
    lk("build", "-t", "l", str(ctx), check=True)
    again = lk("build", "-t", "l", str(ctx), check=True).stdout
    assert again.count(" ---> Using cache") == 10
    os.utime(ctx / "tamr.war", (1, 1))  # mtime alone: still cached
    assert lk("build", "-t", "l", str(ctx), check=True).stdout.count("Using cache") == 10
    (ctx / "tamr.war").write_text("a new war\n")  # the 9th step and after miss
    third = lk("build", "-t", "l", str(ctx), check=True).stdout
    assert third.count("Using cache") == 7
    assert "Step 9/11" in third.split("Using cache")[-1]
    (ctx / "catalina.sh").chmod(0o700)  # the mode: step 10 and after
    assert lk("build", "-t", "l", str(ctx), check=True).stdout.count("Using cache") == 8
    assert "Using cache" not in lk("build", "--no-cache", "-t", "l", str(ctx), check=True).stdout
    out = lk("run", "--rm", "l", "cat", "/usr/local/tomcat/webapps/tamr.war", check=True).stdout
    assert out == "a new war\n"


def test_a_used_arg_changes_the_key_from_there_on(store, tmp_dir):
    ctx = context(tmp_dir, "FROM busybox\nARG V=1\nRUN echo v=$V > /v\nCMD cat /v\n")
    lk("build", "-t", "a", str(ctx), check=True)
    assert lk("build", "-t", "a", str(ctx), check=True).stdout.count("Using cache") == 3
    two = lk("build", "--build-arg", "V=2", "-t", "a", str(ctx), check=True).stdout
    assert two.count("Using cache") == 1  # ARG itself; RUN and CMD run again
    assert lk("run", "--rm", "a", check=True).stdout == "v=2\n"
    assert lk("build", "--build-arg", "V=1", "-t", "a", str(ctx), check=True).stdout.count("Using cache") == 3


# --- the instructions --------------------------------------------------------------------


def test_multi_stage_scratch_copy_from_chown_globs_add_tar_and_dockerignore(store, tmp_dir):
    tar_src = tmp_dir / "t"
    (tar_src / "pkg").mkdir(parents=True)
    (tar_src / "pkg" / "lib.txt").write_text("lib\n")
    with tarfile.open(tmp_dir / "files.tar.gz", "w:gz") as t:
        t.add(tar_src / "pkg", arcname="pkg")
    ctx = context(tmp_dir, """\
FROM busybox AS build
WORKDIR /src
RUN echo built > out.txt
FROM scratch AS final
COPY --from=build /src/out.txt /out.txt
COPY --chown=1000:1001 *.txt /data/
ADD files.tar.gz /unpacked/
COPY dir /tree/
LABEL course="containers" step=10
EXPOSE 8080 53/udp
STOPSIGNAL SIGINT
ENTRYPOINT ["/app"]
FROM busybox
RUN false
""", **{"a.txt": "a\n", "b.txt": "b\n", "c.log": "log\n", "dir__sub__f": "f\n", "dir__x.log": "x\n",
        ".dockerignore": "*.log\n**/*.log\n"})  # fmt: skip
    shutil.copy(tmp_dir / "files.tar.gz", ctx)
    lk("build", "--target", "final", "-t", "multi:1", str(ctx), check=True)
    image = images.get("multi:1")
    top_down = image.layers

    def find(rel):
        return next(d / rel for d in top_down if os.path.lexists(d / rel))

    assert find("out.txt").read_text() == "built\n"
    assert (os.stat(find("data/a.txt")).st_uid, os.stat(find("data/b.txt")).st_gid) == (1000, 1001)
    assert find("unpacked/pkg/lib.txt").read_text() == "lib\n"
    assert find("tree/sub/f").read_text() == "f\n"
    assert not any(os.path.lexists(d / "data/c.log") or os.path.lexists(d / "tree/x.log") for d in top_down)
    cfg = image.config
    assert cfg.labels == {"course": "containers", "step": "10"} and cfg.stop_signal == "SIGINT"
    assert cfg.exposed_ports == ["53/udp", "8080/tcp"] and cfg.entrypoint == ["/app"]
    assert len(top_down) == 4  # scratch: the two COPYs, the ADD and the tree; no busybox
    failed = lk("build", "-t", "multi:2", str(ctx))  # the last stage's RUN false
    assert failed.returncode == 1 and "returned a non-zero code: 1" in failed.stderr
    assert lk("image", "inspect", "multi:2").returncode == 1


@pytest.mark.parametrize("text, args, says", [
    ("FROM busybox\nFOO bar\n", [], "Dockerfile line 2 'FOO bar': expected an instruction: FROM"),
    ("RUN true\n", [], "Dockerfile line 1 'RUN true': expected FROM first"),
    ("# nothing\n", [], "at least one FROM line"),
    ("FROM busybox\nRUN true\nCOPY ../etc/passwd /x\n", [], "Dockerfile line 3"),
    ("FROM busybox\nCOPY --frm=a x /\n", [], "Dockerfile line 2 'COPY --frm=a x /': expected COPY with --from="),
    ("FROM busybox\nARG V\nRUN echo $V\n", ["--build-arg", "1V=x"], "invalid --build-arg '1V=x': expected KEY=VALUE"),
    ("FROM busybox\nENV\n", [], "Dockerfile line 2"),
])  # fmt: skip
def test_bad_input_is_one_line_and_stores_nothing(store, tmp_dir, text, args, says):
    lk("images", check=True)  # the built-in busybox, before
    before = stored(store)
    ctx = context(tmp_dir, text)
    r = lk("build", *args, "-t", "bad", str(ctx))
    assert r.returncode != 0 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, r.stderr
    assert stored(store) == before


# --- commit, history, rmi, prune ---------------------------------------------------------


def test_commit_makes_a_layer_with_whiteouts_that_can_be_saved(store, tmp_dir):
    # /mnt replaced by a new directory (overlay: opaque); /etc/hosts and friends are the
    # engine's bind mounts, as in Docker, and must not end up in the image
    lk("run", "--name", "c1", "busybox", "sh", "-c", "echo hi > /new; rm /bin/ls; rm -r /mnt; mkdir /mnt; "
       "echo x > /mnt/only; echo 10.9.9.9 extra >> /etc/hosts", check=True)  # fmt: skip
    image_id = lk("commit", "-m", "by hand", "c1", "changed:v1", check=True).stdout.strip()
    assert image_id.startswith("sha256:")
    out = lk("run", "--rm", "changed:v1", "sh", "-c", "cat /new; ls /mnt; test -e /bin/ls || echo not found; "
             "grep -c extra /etc/hosts || true", check=True).stdout  # fmt: skip
    assert out.splitlines() == ["hi", "only", "not found", "0"], out
    assert "by hand" in lk("history", "changed:v1", check=True).stdout
    lk("save", "-o", str(tmp_dir / "c.tar"), "changed:v1", check=True)
    with tarfile.open(tmp_dir / "c.tar") as outer:
        names = [m.name for m in outer]
        layer_tars = [outer.extractfile(n).read() for n in names if n.startswith("blobs/") and outer.getmember(n).size > 1000]
    inner = set()
    import io

    for data in layer_tars:
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as t:
                names = set(t.getnames())
        except tarfile.TarError:
            continue
        if "new" in names:  # the committed layer
            inner = names
    assert {"bin/.wh.ls", "mnt/.wh..wh..opq", "mnt/only", "new"} <= inner
    assert not inner & {"etc/hosts", "etc/hostname", "etc/resolv.conf"}, "the engine's bind mounts"


def test_rmi_and_prune_keep_what_a_container_uses(store, tmp_dir):
    ctx = context(tmp_dir, "FROM busybox\nRUN echo one > /one\nENV X=1\n")
    lk("build", "-t", "p:1", str(ctx), check=True)
    ctx2 = context(tmp_dir / "b", "FROM busybox\nRUN echo two > /two\nENV X=2\n")
    lk("build", "-t", "p:2", str(ctx2), check=True)
    layer_two, layer_one = images.get("p:2").layers[0], images.get("p:1").layers[0]
    lk("run", "--name", "user2", "p:2", "true", check=True)  # stopped, not removed: it keeps its layers
    lk("rmi", "p:1", "p:2", check=True)
    pruned = lk("image", "prune", "-f", check=True).stdout
    assert pruned.count("deleted: sha256:") == 2 and "Total reclaimed space:" in pruned  # the RUN images
    assert not layer_one.exists()
    assert layer_two.is_dir()  # a container still has it as a lowerdir
    assert lk("history", "p:1").returncode == 1
    lk("rm", "user2", check=True)
    lk("image", "prune", check=True)
    assert not layer_two.exists()
    left = {p.name for p in (store / "lib" / "images" / "layers").iterdir()}
    assert left == {images.get("busybox").layers[0].parent.name}


def test_run_honours_the_image_config_and_stop_its_stop_signal(store, tmp_dir):
    ctx = context(tmp_dir, """\
FROM busybox
ENV GREETING=hello
WORKDIR /srv/app
USER 1000:1000
ENTRYPOINT ["sh", "-c", "echo $GREETING from $(pwd) as $(id -u) \\"$@\\"", "-"]
CMD ["default"]
STOPSIGNAL SIGUSR1
""")
    lk("build", "-t", "cfg", str(ctx), check=True)
    assert lk("run", "--rm", "cfg", check=True).stdout == "hello from /srv/app as 1000 default\n"
    assert lk("run", "--rm", "cfg", "given", check=True).stdout == "hello from /srv/app as 1000 given\n"
    assert lk("run", "--rm", "--entrypoint", "echo", "cfg", "plain", check=True).stdout == "plain\n"
    # PID 1 ignores a signal it has no handler for: with a trap on USR1 it exits at once
    ctx2 = context(tmp_dir / "s", "FROM cfg\nENTRYPOINT []\nCMD [\"sh\", \"-c\", \"trap 'exit 7' USR1; "
                   "while true; do sleep 0.1; done\"]\n")  # fmt: skip
    lk("build", "-t", "cfg:stop", str(ctx2), check=True)
    cid = lk("run", "-d", "cfg:stop", check=True).stdout.strip()
    import time

    t0 = time.monotonic()
    lk("stop", "-t", "20", cid, check=True)
    assert time.monotonic() - t0 < 10
    assert "Exited (7)" in lk("ps", "-a", check=True).stdout


def test_the_engines_empty_mount_points_are_no_change(tmp_dir):
    """An image without /etc/hosts gets an empty mount point for the engine's bind mount in
    the container's upper directory; commit leaves it out (Docker's init layer). A hosts
    file the container's command really wrote there (not empty) stays."""
    from labkit.engine import changes

    upper = tmp_dir / "upper"
    (upper / "etc").mkdir(parents=True)
    for name in ("hosts", "hostname", "resolv.conf"):
        (upper / "etc" / name).touch()
    (upper / "etc" / "motd").write_text("hello\n")
    out = tmp_dir / "layer.tar"
    with open(out, "wb") as f:
        changes.pack(upper, f, skip_mount_points=True)
    with tarfile.open(out) as t:
        assert sorted(t.getnames()) == ["etc", "etc/motd"]
    (upper / "etc" / "hosts").write_text("10.0.0.1 mine\n")
    with open(out, "wb") as f:
        changes.pack(upper, f, skip_mount_points=True)
    with tarfile.open(out) as t:
        assert "etc/hosts" in t.getnames()
