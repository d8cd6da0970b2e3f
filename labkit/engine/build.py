"""``labkit build``: a Dockerfile, one instruction at a time, each one a new image.

As Docker's classic builder does (moby ``builder/dockerfile``), every instruction takes
the image so far and makes a new one: RUN, COPY, ADD and WORKDIR add a layer, the
others (ENV, CMD, LABEL, ...) only change the config, an "empty layer" in the history.
Each intermediate image is stored untagged; the last one gets the tag.

**The cache.** Before it runs an instruction the builder asks: was an image made
before from this same parent by this same instruction? The question is a key,

    sha256(parent image ID, created_by)

where ``created_by`` is what ``labkit history`` shows: ``/bin/sh -c #(nop)  ENV A=1``,
``/bin/sh -c make``, or for COPY and ADD ``COPY file:<sum> in /dest``, whose sum covers
the content, mode and owner of the files (``buildcontext.checksum``). So RUN is cached
on its text alone; a changed file misses the cache at its COPY and at every step after
it (their parent changed); a used ARG is part of RUN's text (``|1 V=2 /bin/sh -c ...``).

**RUN** runs in a labkit container on the image so far, as ``labkit run --network none``
would start it: overlay of the image's layers, a fresh upper directory, the command's
output shown as it comes. The upper directory then becomes the layer (``changes``).

Everything a Dockerfile can get wrong in its text is checked before the first step
runs (``check``), so a bad line stores nothing.

Layer: engine. Used by the CLI (``labkit build``); calls dockerfile, buildcontext,
changes, images and the runtime (container, spec).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from labkit import paths
from labkit.engine import buildcontext, buildsteps, changes, dockerfile, images
from labkit.engine.dockerfile import Instruction, Stage
from labkit.errors import InvalidValue, LabkitError, NotFound

NOP = "/bin/sh -c #(nop) "
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PORT = re.compile(r"\d{1,5}(/(tcp|udp|sctp))?")


class BuildError(LabkitError):
    """A step failed while it ran (a RUN exited non-zero)."""


@dataclass(frozen=True)
class Step:
    """One step as it was built: its number, text, whether the cache gave it, the
    image it made and how long it took."""

    number: int
    text: str
    cached: bool
    image_id: str
    seconds: float


@dataclass(frozen=True)
class Built:
    id: str
    ref: str
    steps: tuple[Step, ...]


@dataclass
class _Stage:
    """The image a stage has made so far: its config document and ID."""

    doc: dict
    id: str
    args: dict[str, str]

    @property
    def env(self) -> dict[str, str]:
        return dict(e.split("=", 1) for e in self.doc["config"].get("Env") or [] if "=" in e)

    def scope(self) -> dict[str, str]:
        return {**self.args, **self.env}  # ENV wins over ARG, as in Docker

    def layer_dirs(self) -> list[Path]:
        return [images._layer_dir(d) / "fs" for d in reversed(self.doc["rootfs"]["diff_ids"])]


def parse_build_args(items: list[str]) -> dict[str, str]:
    """``--build-arg K=V`` (or ``K``: the value from this environment)."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not _NAME.fullmatch(key):
            raise InvalidValue("--build-arg", item, "KEY=VALUE with KEY a name like VERSION")
        out[key] = value if eq else os.environ.get(key, "")
    return out


def check(meta: list[Instruction], stages: list[Stage]) -> None:
    """Every check that needs only the text: forms of the arguments, COPY sources
    inside the context, names of stages."""
    names = {s.name for s in stages if s.name}
    for ins in meta + [i for s in stages for i in s.instructions]:
        k = ins.keyword
        if k in ("ENV", "LABEL", "ARG"):
            dockerfile.key_values(ins, {})
        elif k in ("COPY", "ADD"):
            words = dockerfile.words(ins.args) if ins.exec_form is None else []
            if len(words) < 2:
                raise ins.error(f"{k} [--chown=USER:GROUP] SRC... DEST")
            for src in words[:-1]:
                if ins.flag("from") is None and "$" not in src:
                    norm = os.path.normpath(src).lstrip("/")
                    if norm == ".." or norm.startswith("../"):
                        raise ins.error(f"a source inside the build context, not {src!r}")
            frm = ins.flag("from")
            if frm is not None and not (frm in names or frm.isdigit() or ":" in frm or "/" in frm):
                raise ins.error("COPY --from=STAGE with a stage named by FROM ... AS, its number, or an image")
        elif k == "EXPOSE":
            for port in ins.args.split():
                if "$" not in port and not _PORT.fullmatch(port):
                    raise ins.error("EXPOSE PORT[/tcp|/udp] ...")
        elif k in ("RUN", "CMD", "ENTRYPOINT", "WORKDIR", "USER", "STOPSIGNAL", "MAINTAINER") and not ins.args:
            raise ins.error(f"{k} with an argument")


def build(context: str | os.PathLike[str], tag: str = "", file: str | os.PathLike[str] | None = None,
          build_args: dict[str, str] | None = None, no_cache: bool = False, target: str = "",
          progress: Callable[[str], None] = print) -> Built:  # fmt: skip
    """Build the Dockerfile ``file`` (default ``CONTEXT/Dockerfile``) in ``context``."""
    ctx = buildcontext.Context(context)
    path = Path(file) if file else ctx.root / "Dockerfile"
    if not path.is_file():
        raise NotFound(f"no Dockerfile at {str(path)!r} (name one with -f)")
    meta, stages = dockerfile.stages(dockerfile.parse(path.read_text()))
    if target:
        chosen = [s for s in stages if s.name == target.lower()]
        if not chosen:
            raise InvalidValue("--target", target, "a stage named by FROM ... AS: " + ", ".join(s.name for s in stages if s.name))
        stages = stages[: chosen[0].index + 1]
    check(meta, stages)
    if tag:
        images.parse_ref(tag)  # a bad name fails now, not after the build
    given = dict(build_args or {})
    meta_args = {}
    for ins in meta:
        for key, value in dockerfile.key_values(ins, meta_args):
            meta_args[key] = given.get(key, value or "")
    total = sum(1 + len(s.instructions) for s in stages)
    built: dict[str, _Stage] = {}
    steps: list[Step] = []
    used: set[str] = set(meta_args) & set(given)
    for stage in stages:
        t0 = time.monotonic()
        base = dockerfile.expand(stage.base, meta_args)
        progress(f"Step {len(steps) + 1}/{total} : {stage.frm.text}")
        state = _from(base, built, stage.frm)
        progress(f" ---> {_short(state.id) or 'scratch'}")
        steps.append(Step(len(steps) + 1, stage.frm.text, False, state.id, time.monotonic() - t0))
        for ins in stage.instructions:
            t0 = time.monotonic()
            progress(f"Step {len(steps) + 1}/{total} : {ins.text}")
            cached, state = _step(ins, state, ctx, built, meta_args, given, used, no_cache, progress)
            if cached:
                progress(" ---> Using cache")
            seconds = time.monotonic() - t0
            progress(f" ---> {_short(state.id)} ({seconds:.2f}s)")
            steps.append(Step(len(steps) + 1, ins.text, cached, state.id, seconds))
        built[stage.name or str(stage.index)] = built[str(stage.index)] = state
    unused = sorted(set(given) - used)
    if unused:
        progress(f"[Warning] One or more build-args {unused} were not consumed")
    final = steps[-1].image_id
    if not final:
        raise BuildError("the build made no image: a scratch stage needs at least one instruction")
    progress(f"Successfully built {_short(final)}")
    if tag:
        image = images.store_config(tag, _config_bytes(final))
        progress(f"Successfully tagged {image.ref}")
    return Built(final, images.parse_ref(tag) and images._key(*images.parse_ref(tag)) if tag else "", tuple(steps))


def _short(image_id: str) -> str:
    return image_id.removeprefix("sha256:")[:12]


def _config_bytes(image_id: str) -> bytes:
    return (images._store() / "configs" / f"{image_id.removeprefix('sha256:')}.json").read_bytes()


def _from(base: str, built: dict[str, _Stage], ins: Instruction) -> _Stage:
    if base.lower() in built:
        prev = built[base.lower()]
        return _Stage(json.loads(json.dumps(prev.doc)), prev.id, {})
    if base == "scratch":
        doc = {"architecture": images._oci_arch(), "os": "linux", "config": images.ImageConfig().to_oci(),
               "rootfs": {"type": "layers", "diff_ids": []}, "history": []}  # fmt: skip
        return _Stage(doc, "", {})
    image = images.get(base)
    return _Stage(images.config_doc(image.id), image.id, {})


# --- one step -----------------------------------------------------------------------


def _cache_file() -> Path:
    return paths.images_dir() / "build-cache.json"


def _cache() -> dict[str, str]:
    try:
        return json.loads(_cache_file().read_text())
    except FileNotFoundError:
        return {}


def _remember(key: str, image_id: str) -> None:
    with images._locked():
        table = _cache()
        table[key] = image_id
        images._write_atomic(_cache_file(), json.dumps(table, indent=1, sort_keys=True).encode())


def _step(ins: Instruction, state: _Stage, ctx, built, meta_args, given, used, no_cache, progress) -> tuple[bool, _Stage]:
    k = ins.keyword
    scope = state.scope()
    if k == "ARG":
        for key, default in dockerfile.key_values(ins, scope):
            value = given.get(key, meta_args.get(key, default) if default is None else default)
            if key in given:
                used.add(key)
            state.args[key] = value or ""
        return _commit_config(state, f"{NOP} ARG {dockerfile.expand(ins.args, scope)}", lambda c, d: None, no_cache)
    if k in ("COPY", "ADD"):
        return _copy(ins, state, ctx, built, scope, no_cache)
    if k == "RUN":
        argv = list(ins.exec_form) if ins.exec_form is not None else ["/bin/sh", "-c", ins.args]
        args = [f"{a}={v}" for a, v in sorted(state.args.items())]
        created_by = (f"|{len(args)} {' '.join(args)} " if args else "") + " ".join(argv)
        key = _key(state.id, created_by)
        hit = None if no_cache else _lookup(key)
        if hit:
            return True, hit
        diff_id = _run(ins, state, argv, progress)
        return False, _new(state, created_by, diff_id, key, lambda c, d: None)
    if k == "WORKDIR":
        workdir = os.path.normpath(os.path.join(state.doc["config"].get("WorkingDir") or "/", dockerfile.expand(ins.args, scope)))
        return _commit_config(state, f"{NOP} WORKDIR {workdir}", lambda c, d: c.__setitem__("WorkingDir", workdir),
                              no_cache, mkdir=workdir)  # fmt: skip
    return _commit_config(state, f"{NOP} {_describe(ins, scope)}", lambda c, d: _apply(ins, scope, c, d), no_cache)


def _describe(ins: Instruction, scope: dict[str, str]) -> str:
    """The instruction as Docker writes it into the history (values expanded)."""
    if ins.keyword in ("ENV", "LABEL"):
        pairs = dockerfile.key_values(ins, scope)
        return f"{ins.keyword} " + " ".join(f"{k}={json.dumps(v) if ' ' in v else v}" for k, v in pairs)
    if ins.keyword in ("CMD", "ENTRYPOINT"):
        return f"{ins.keyword} {json.dumps(_command(ins))}"
    if ins.keyword in dockerfile.EXPANDED:
        return f"{ins.keyword} {dockerfile.expand(ins.args, scope)}"
    return ins.text


def _command(ins: Instruction) -> list[str]:
    return list(ins.exec_form) if ins.exec_form is not None else ["/bin/sh", "-c", ins.args]


def _apply(ins: Instruction, scope: dict[str, str], config: dict, doc: dict) -> None:
    """A config-only instruction's change to the image config."""
    k = ins.keyword
    if k == "ENV":
        env = dict(e.split("=", 1) for e in config.get("Env") or [] if "=" in e)
        env.update(dockerfile.key_values(ins, scope))
        config["Env"] = [f"{a}={v}" for a, v in env.items()]
    elif k == "LABEL":
        config["Labels"] = {**(config.get("Labels") or {}), **dict(dockerfile.key_values(ins, scope))}
    elif k == "CMD":
        config["Cmd"] = _command(ins)
    elif k == "ENTRYPOINT":
        config["Entrypoint"] = _command(ins)
        config["Cmd"] = None  # Docker: a new ENTRYPOINT drops the CMD set before it
    elif k == "USER":
        config["User"] = dockerfile.expand(ins.args, scope)
    elif k == "EXPOSE":
        ports = config.get("ExposedPorts") or {}
        for port in dockerfile.words(ins.args, scope):
            ports[port if "/" in port else f"{port}/tcp"] = {}
        config["ExposedPorts"] = ports
    elif k == "STOPSIGNAL":
        config["StopSignal"] = dockerfile.expand(ins.args, scope)
    elif k == "MAINTAINER":
        doc["author"] = ins.args


def _key(parent: str, created_by: str, extra: str = "") -> str:
    return hashlib.sha256(f"{parent}\n{created_by}\n{extra}".encode()).hexdigest()


def _lookup(key: str) -> _Stage | None:
    image_id = _cache().get(key)
    if not image_id:
        return None
    try:
        doc = images.config_doc(image_id)
    except NotFound:
        return None
    return _Stage(doc, image_id, {}) if images.has_layers(doc) else None


def _commit_config(state: _Stage, created_by: str, change, no_cache: bool, mkdir: str = "") -> tuple[bool, _Stage]:
    key = _key(state.id, created_by)
    hit = None if no_cache else _lookup(key)
    if hit:
        hit.args = state.args
        return True, hit
    diff_id = _mkdir_layer(mkdir, state) if mkdir else None
    return False, _new(state, created_by, diff_id, key, change)


def _new(state: _Stage, created_by: str, diff_id: str | None, key: str, change) -> _Stage:
    """Store the next image: ``change`` edits its config; ``diff_id`` is its new layer."""
    doc = json.loads(json.dumps(state.doc))
    doc.setdefault("config", {})
    change(doc["config"], doc)
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    doc["created"] = now
    entry = {"created": now, "created_by": created_by}
    if diff_id is None:
        entry["empty_layer"] = True
    else:
        doc["rootfs"]["diff_ids"].append(diff_id)
    if "author" in doc:
        entry["author"] = doc["author"]
    doc.setdefault("history", []).append(entry)
    data = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
    image_id = images.store_untagged(data)
    _remember(key, image_id)
    return _Stage(doc, image_id, state.args)


@contextlib.contextmanager
def _scratch_file() -> Iterator[Path]:
    images._store().mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".build-", suffix=".tar", dir=images._store())
    os.close(fd)
    try:
        yield Path(name)
    finally:
        os.unlink(name)


def _mkdir_layer(path: str, state: _Stage) -> str | None:
    """WORKDIR makes its directory when the image lacks it (a small layer)."""
    rel = path.strip("/")
    if not rel or any(os.path.isdir(d / rel) for d in state.layer_dirs()):
        return None
    with tempfile.TemporaryDirectory(dir=images._store()) as tmp, _scratch_file() as tar:
        os.makedirs(os.path.join(tmp, rel), mode=0o755)
        with open(tar, "wb") as out:
            buildcontext.layer_tar([buildcontext.Source(os.path.join(tmp, rel), rel)], state.layer_dirs(), out)
        return changes.store(tar)



def _copy(ins: Instruction, state: _Stage, ctx, built: dict[str, _Stage], scope, no_cache: bool) -> tuple[bool, _Stage]:
    frm = ins.flag("from")
    source_layers = None
    if frm is not None:
        source = built.get(frm.lower()) or _Stage(images.config_doc(images.get(frm).id), "", {})
        source_layers = source.layer_dirs()
    with buildsteps.copy_plan(ins, ctx, source_layers, scope, state.doc["config"].get("WorkingDir") or "/",
                              state.layer_dirs()) as plan:  # fmt: skip
        created_by = f"{NOP} {ins.keyword} {plan.description}"
        key = _key(state.id, created_by)
        hit = None if no_cache else _lookup(key)
        if hit:
            hit.args = state.args
            return True, hit
        with _scratch_file() as tar:
            with open(tar, "wb") as out:
                buildsteps.write_layer(plan, state.layer_dirs(), out)
            diff_id = changes.store(tar)
    return False, _new(state, created_by, diff_id, key, lambda c, d: None)


def _run(ins: Instruction, state: _Stage, argv: list[str], progress) -> str:
    env = dict(state.env)
    env.setdefault("PATH", buildsteps.DEFAULT_PATH)
    env = {**state.args, **env}
    with _scratch_file() as tar:
        buildsteps.run(ins, argv, [f"{k}={v}" for k, v in env.items()], state.doc["config"], state.layer_dirs(),
                       tar, progress)  # fmt: skip
        return changes.store(tar)
