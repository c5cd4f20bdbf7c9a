"""Hostile and careless inputs, as tables: each refused in one line that names the file or key, before any
long work, with nothing already done lost; where the harm was memory, a bound on what the refusal costs.

Every case runs the real command through ``launch.cli.main`` (its top-level handler is what turns an error into
one line) on real LFW faces and real shards in a temporary folder. A refusal must print exactly one line on
stderr, bounded in length, naming the key or the file; a run folder or shard folder that existed before is
unchanged byte for byte. `facesr sr`'s own inputs (OUT = IN, colliding names, links in OUT, FIFOs, TorchScript
output shapes) are in tests/test_hostile_sr.py; prep's unusable images in tests/test_prep.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.cli import main
from tests.conftest import ROOT
from tests.fixtures_faces import make_src

CPU = "launch/configs/cpu.yaml"
PREP = ["--shard-size", "8", "--val", "0.2", "--test", "0", "--no-progress", "--no-ray"]
MAX_LINE = 800  # characters of a refusal: a value is named, never expanded


def snapshot(root: Path) -> dict[str, str]:
    """path -> sha256 of every file under ``root``: what must survive a refused command unchanged."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_line(err: str) -> str:
    """The refusal: exactly one line on stderr, bounded, no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert len(lines[0]) <= MAX_LINE, len(lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("hostile") / "faces"
    make_src(src, n=40, bad=False)
    return src


@pytest.fixture(scope="module")
def shards(faces) -> Path:
    out = faces.parent / "shards"
    assert main(["prep", str(faces), str(out), *PREP]) == 0
    return out


@pytest.fixture
def earlier_run(tmp_path) -> Path:
    """A run folder as an earlier run left it (config, metrics, a checkpoint part): must stay untouched."""
    run = tmp_path / "runs" / "cpu"
    (run / "stage1" / "checkpoint_s00000002_e0000" / "state").mkdir(parents=True)
    (run / "stage1" / "checkpoint_s00000002_e0000" / "state" / "mp_rank_00_model_states.pt").write_bytes(b"\1" * 64)
    (run / "config.yaml").write_text("preset: tiny\n")
    (run / "metrics.jsonl").write_text(json.dumps({"stage": 1, "split": "train", "step": 1, "loss": 1.0}) + "\n")
    return run


# ---------------------------------------------------------------- `facesr train`: values and config files


def _bomb(field: str, depth: int) -> str:
    """A YAML billion-laughs under ``field`` (dotted, one section deep): 9**depth strings once expanded."""
    section, key = field.split(".")
    items = ["    - &b0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    items += [f"    - &b{i} [{', '.join([f'*b{i - 1}'] * 9)}]" for i in range(1, depth + 1)]
    return f"{section}:\n  {key}:\n" + "\n".join(items) + "\n"


# (case, overrides, config text appended to cpu.yaml, the one line's pattern)
TRAIN = [
    ("betas out of range", ["stage1.betas=[2.0,-1.0]"], "", r"stage1\.betas\[0\]: an Adam beta in \[0, 1\), got 2\.0"),
    ("one-element betas", ["stage2.betas=[0.9]"], "", r"stage2\.betas: expected two Adam betas"),
    ("NaN lr", ["stage1.lr=.nan"], "", r"stage1\.lr: expected a finite number, got nan"),
    ("inf lr", ["stage2.lr=.inf"], "", r"stage2\.lr: expected a finite number, got inf"),
    ("NaN inside data.degradation", ["data.degradation={noise: {gaussian: {sigma: [.nan, 3]}}}"], "",
     r"data\.degradation\.noise\.gaussian\.sigma\[0\]: expected a finite number, got nan"),
    ("negative weight decay", ["stage2.weight_decay=-0.1"], "", r"stage2\.weight_decay: must be 0 or more"),
    ("negative lr_gamma", ["stage1.lr_gamma=-0.5"], "", r"stage1\.lr_gamma: a decay factor in \(0, 1\]"),
    ("weight average that never moves", ["stage2.ema_decay=1"], "", r"stage2\.ema_decay: 0 \(off\) or a decay in \(0, 1\)"),
    ("detail of zero", ["stage2.detail=0"], "", r"stage2\.detail: the corrections' scale must be positive"),
    ("detail for a peer", ["stage2.model=srcnn", "stage2.loss=mse", "stage2.alpha=0", "stage2.detail=0.7"], "",
     r"stage2\.detail: scales the cascade's corrections to bicubic; srcnn has none"),
    ("negative cpus_per_worker", ["cluster.cpus_per_worker=-1"], "", r"cluster\.cpus_per_worker: must be positive"),
    ("negative shuffle_buffer", ["data.shuffle_buffer=-1"], "", r"data\.shuffle_buffer: must be 0 or more"),
    ("negative loader_workers", ["data.loader_workers=-1"], "", r"data\.loader_workers: must be 0 or more"),
    ("log_every 0", ["run.log_every=0"], "", r"run\.log_every: must be 1 or more, got 0"),
    ("val_every 0", ["run.val_every=0"], "", r"run\.val_every: must be 1 or more, got 0"),
    ("max_failures -1", ["cluster.max_failures=-1"], "", r"cluster\.max_failures: must be 0 or more, got -1"),
    ("seed past torch's range", ["run.seed=99999999999999999999"], "", r"run\.seed: must be below 2\*\*63"),
    ("batch no split fits", ["stage2.batch_size=7"], "", r"stage2\.batch_size: global batch 7 cannot be split over 2"),
    ("batch under the workers", ["stage1.batch_size=1"], "", r"stage1\.batch_size: global batch 1 is smaller than"),
    ("batch over the data", ["stage1.batch_size=4096", "stage1.max_micro_batch=4096"], "",
     r"stage1\.batch_size: 4096 exceeds the \d+ usable training samples"),
    ("batch 0", ["stage2.batch_size=0"], "", r"stage2\.batch_size: must be at least 1"),
    ("unknown key", [], "stage2:\n  lrr: 0.1\n", r"stage2\.lrr: unknown key \(known: .*\blr\b"),
    ("unknown section", [], "trainer:\n  epochs: 3\n", r"trainer: unknown key"),
    ("wrong type", [], "stage2:\n  epochs: three\n", r"stage2\.epochs: expected an integer, got 'three'"),
    ("YAML that does not parse", [], "stage2: [epochs: 3\n", r"--config: .*(?i:yaml)"),
    ("alias bomb in run.seed", [], _bomb("run.seed", 9), r"run\.seed: holds over 10,000 values .*alias bomb"),
    ("alias bomb in data.degradation", [], _bomb("data.degradation", 9),
     r"data\.degradation: holds over 10,000 values .*alias bomb"),
    ("a huge string value", [], f"data:\n  degradation: {'x' * 200_000}\n", r"data\.degradation: unknown degradation"),
]


@pytest.mark.parametrize("case, overrides, text, pattern", TRAIN, ids=[c[0] for c in TRAIN])
def test_train_refuses_bad_values_in_one_line(capsys, tmp_path, shards, earlier_run, case, overrides, text, pattern):
    """Every impossible number, wrong key or type, and alias bomb is refused by `facesr train` before Ray starts:
    exit 2, one bounded line naming the dotted key, the earlier run folder unchanged, nothing written."""
    config = CPU
    if text:
        config = tmp_path / "bad.yaml"
        config.write_text((ROOT / CPU).read_text() + text)
    before = snapshot(earlier_run)
    rc = main(["train", "--config", str(config), f"data.shards={shards}", f"cluster.storage_path={earlier_run.parent}",
               "run.name=fresh", *overrides])
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and line.startswith("facesr train: config error: ") and re.search(pattern, line), line
    assert snapshot(earlier_run) == before and not (earlier_run.parent / "fresh").exists()


def _binary(tmp: Path) -> Path:
    (tmp / "model.yaml").write_bytes(bytes(range(256)) * 8)
    return tmp / "model.yaml"


def _python_tag(tmp: Path) -> Path:
    """A config whose value would run code if a non-safe loader built it (touches ``tmp/pwned``)."""
    (tmp / "evil.yaml").write_text(f"run:\n  name: !!python/object/apply:pathlib.Path.touch "
                                   f"[!!python/object/apply:pathlib.Path ['{tmp / 'pwned'}']]\n")
    return tmp / "evil.yaml"


CONFIG_FILES = [
    ("missing", lambda tmp: tmp / "nope.yaml", r"--config: .*nope\.yaml: no such file"),
    ("binary", _binary, r"--config: .*model\.yaml: not a UTF-8 text file"),
    ("/etc/passwd", lambda tmp: Path("/etc/passwd"), r"--config: /etc/passwd: expected a YAML mapping of sections"),
    ("python tag", _python_tag, r"--config: .*evil\.yaml: not valid YAML .*python/object"),
]


@pytest.mark.parametrize("case, make, pattern", CONFIG_FILES, ids=[c[0] for c in CONFIG_FILES])
def test_train_refuses_a_file_that_is_no_run_config(capsys, tmp_path, earlier_run, case, make, pattern):
    """`--config` given a missing file, a binary, /etc/passwd (which parses as one long string) or a YAML
    payload tag: one line naming --config and the file, never its contents; nothing runs, nothing is touched."""
    before = snapshot(earlier_run)
    rc = main(["train", "--config", str(make(tmp_path)), f"cluster.storage_path={earlier_run.parent}"])
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and re.search(pattern, line), line
    assert "root:" not in line and not (tmp_path / "pwned").exists() and snapshot(earlier_run) == before


# ---------------------------------------------------------------- shard folders and manifests


def _edit_manifest(root: Path, edit) -> None:
    m = json.loads((root / "manifest.json").read_text())
    edit(m)
    (root / "manifest.json").write_text(json.dumps(m))


def _first_train_shard(root: Path) -> Path:
    return root / json.loads((root / "manifest.json").read_text())["splits"]["train"]["shards"][1]["name"]


SHARD_DAMAGE = [
    ("a listed shard missing", lambda r: _first_train_shard(r).unlink(),
     r"data\.shards: .*shard listed in .*manifest\.json is missing"),
    ("a shard truncated", lambda r: _first_train_shard(r).write_bytes(_first_train_shard(r).read_bytes()[:-4096]),
     r"data\.shards: .*bytes, .*manifest\.json says \d+ \(truncated or replaced\?\)"),
    ("manifest cut short", lambda r: (r / "manifest.json").write_text((r / "manifest.json").read_text()[:-200]),
     r"data\.shards: .*cannot read manifest"),
    ("no manifest (interrupted prep)", lambda r: (r / "manifest.json").unlink(),
     r"data\.shards: .*no manifest .*interrupted prep"),
    ("manifest identities a list", lambda r: _edit_manifest(r, lambda m: m.update(identities=list(m["identities"]))),
     r"data\.shards: .*manifest\.json: identities: expected a mapping"),
    ("manifest shard named ../../../../etc/passwd",
     lambda r: _edit_manifest(r, lambda m: m["splits"]["train"]["shards"][0].update(name="../../../../etc/passwd")),
     r"data\.shards: .*splits\.train\.shards\[0\]\.name '\.\./\.\./\.\./\.\./etc/passwd' is not a shard file name"),
    ("manifest shards not a list", lambda r: _edit_manifest(r, lambda m: m["splits"]["val"].update(shards="all")),
     r"data\.shards: .*splits\.val\.shards: expected a list of shards"),
    ("manifest a JSON list", lambda r: (r / "manifest.json").write_text("[1, 2]"), r"data\.shards: .*a JSON object"),
]

_OPENED: list[str] | None = None  # paths opened while a case runs (an audit hook cannot be removed, only idled)


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@pytest.mark.parametrize("case, damage, pattern", SHARD_DAMAGE, ids=[c[0] for c in SHARD_DAMAGE])
def test_train_refuses_a_broken_shard_folder(capsys, tmp_path, shards, earlier_run, case, damage, pattern):
    """A shard folder whose manifest is missing, cut, of the wrong shape, or names a file outside the folder, or
    whose shards do not match it: `facesr train` exits 2 before Ray starts with one line naming data.shards and
    the file; no file outside the shard folder is ever opened; shards and the earlier run are unchanged."""
    global _OPENED
    root = tmp_path / "shards"
    shutil.copytree(shards, root)
    damage(root)
    before, shards_before = snapshot(earlier_run), snapshot(root)
    _OPENED = []
    try:
        rc = main(["train", "--config", CPU, f"data.shards={root}", f"cluster.storage_path={earlier_run.parent}"])
        opened = [p for p in _OPENED if p.endswith("passwd") or (p.endswith(".tar") and Path(p).parent != root)]
    finally:
        _OPENED = None
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and re.search(pattern, line), line
    assert not opened, opened
    assert snapshot(earlier_run) == before and snapshot(root) == shards_before


@pytest.mark.parametrize("case", ["missing", "corrupt", "identities a list"])
def test_eval_refuses_a_bad_manifest_in_one_line(capsys, tmp_path, shards, faces, case):
    """`facesr eval quality --manifest` given a folder with no manifest, a corrupt one, or one whose identities
    are a list: one line naming the manifest file (it was a 28-line traceback), nothing written."""
    root = tmp_path / "shards"
    shutil.copytree(shards, root)
    if case == "missing":
        (root / "manifest.json").unlink()
    elif case == "corrupt":
        (root / "manifest.json").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    else:
        _edit_manifest(root, lambda m: m.update(identities=list(m["identities"])))
    rc = main(["eval", "quality", "--data", str(faces), "--manifest", str(root), "--split", "val",
               "--out", str(tmp_path / "eval")])
    line = one_line(capsys.readouterr().err)
    assert rc == 1 and f"{root / 'manifest.json'}" in line, line
    assert not (tmp_path / "eval").exists()


# ---------------------------------------------------------------- weights files


def _srnet_file(tmp: Path, tensors: dict, meta: dict, name: str = "srnet.safetensors") -> Path:
    from safetensors.torch import save_file

    path = tmp / name
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in meta.items()})
    return path


def _vdsr_bomb(tmp: Path) -> Path:
    """The issue's 164-byte file: one 1-element tensor, metadata asking for a VDSR of width 12000 (5.2 GB a layer)."""
    import torch

    path = _srnet_file(tmp, {"x": torch.zeros(1)}, {"kind": "srnet", "model": "vdsr", "sr": {"depth": 5, "width": 12000}})
    assert path.stat().st_size == 164
    return path


def _tiny_state(model: str = "vdsr") -> dict:
    from facesr.models import build_sr

    return {k: v.contiguous() for k, v in build_sr(model, preset="tiny").state_dict().items()}


def _wrong_shapes(tmp: Path) -> Path:
    """A real tiny VDSR's tensors under metadata saying width 8 (the file's are 16 wide)."""
    return _srnet_file(tmp, _tiny_state(), {"kind": "srnet", "model": "vdsr", "sr": {"depth": 5, "width": 8}})


def _wrong_keys(tmp: Path) -> Path:
    state = _tiny_state()
    state["body.99.weight"] = state.pop("body.0.weight")
    return _srnet_file(tmp, state, {"kind": "srnet", "model": "vdsr", "sr": {"depth": 5, "width": 16}})


def _bad_meta_types(tmp: Path) -> Path:
    return _srnet_file(tmp, _tiny_state(), {"kind": "srnet", "model": "vdsr", "sr": {"depth": "five", "width": 16}})


def _unknown_model(tmp: Path) -> Path:
    return _srnet_file(tmp, _tiny_state(), {"kind": "srnet", "model": "gpt", "sr": {}})


def _random(tmp: Path) -> Path:
    (tmp / "srnet.safetensors").write_bytes(os.urandom(4096))
    return tmp / "srnet.safetensors"


def _pickle(tmp: Path) -> Path:
    """A torch.save pickle under a weights file's name whose unpickling would create ``tmp/pwned``."""
    import torch

    torch.save({"body.0.weight": torch.zeros(1), "evil": _Payload(str(tmp / "pwned"))}, tmp / "srnet.safetensors")
    return tmp / "srnet.safetensors"


class _Payload:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path(self.target).touch, ())


def _priors_as_srnet(tmp: Path) -> Path:
    from facesr.models import build_prior, get_preset
    from facesr.weights import save_priors

    prior = get_preset("tiny").prior
    save_priors(tmp / "srnet.safetensors", {k: build_prior(prior, 3) for k in ("x2", "x4", "hr")}, prior, list("abc"))
    return tmp / "srnet.safetensors"


MODELS = [
    ("missing", lambda tmp: tmp / "srnet.safetensors", r"srnet\.safetensors: no such"),
    ("random bytes", _random, r"srnet\.safetensors: not a safetensors weights file"),
    ("a pickle", _pickle, r"srnet\.safetensors: not a safetensors weights file"),
    ("metadata asks for width 12000", _vdsr_bomb, r"srnet\.safetensors: metadata asks for a network with a size of "
     r"12,000, but the file's 1 tensors are at most 1 wide"),
    ("shapes unlike the metadata", _wrong_shapes, r"srnet\.safetensors: tensor body\.0\.weight has shape \[16, 3, 3, 3\], "
     r"its metadata builds \[8, 3, 3, 3\]"),
    ("keys unlike the metadata", _wrong_keys, r"srnet\.safetensors: tensors do not match its metadata \(1 missing"),
    ("metadata of the wrong type", _bad_meta_types, r"srnet\.safetensors: metadata does not describe a network"),
    ("an unknown model", _unknown_model, r"srnet\.safetensors: SR model 'gpt' unknown"),
    ("priors given as the SR net", _priors_as_srnet, r"srnet\.safetensors: holds 'priors', not an SR network"),
]
COMMANDS = {
    "export": lambda m, tmp, faces: ["export", str(m), str(tmp / "out"), "--format", "torchscript"],
    "eval quality": lambda m, tmp, faces: ["eval", "quality", str(m), "--data", str(faces), "--limit", "2",
                                           "--device", "cpu", "--out", str(tmp / "out")],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("case, make, pattern", MODELS, ids=[c[0] for c in MODELS])
def test_model_files_refused_in_one_line_before_anything_is_built(capsys, tmp_path, faces, command, case, make,
                                                                  pattern):
    """`facesr export` and `facesr eval quality` given a missing, random, pickled or lying weights file: one line
    naming the file and what is wrong with it (metadata and shapes are checked against the file's tensors
    before any network is built), no output written, no pickle payload run."""
    model = make(tmp_path)
    rc = main(COMMANDS[command](model, tmp_path, faces))
    line = one_line(capsys.readouterr().err)
    assert rc == 1 and line.startswith(f"facesr {command.split()[0]}: error: ") and re.search(pattern, line), line
    assert not (tmp_path / "out").exists() and not (tmp_path / "pwned").exists()


PRIORS = [  # (case, make, the reason after "<file>: ")
    ("a pickle", lambda tmp, classes: _pickle(tmp).rename(tmp / "priors.safetensors"),
     r"not a safetensors weights file"),
    ("another class map", lambda tmp, classes: _priors(tmp, classes[:-1] + ["Someone_Else"]),
     r"priors were trained on another class map"),
    ("metadata asks for 10**6 classes", lambda tmp, classes: _priors(tmp, classes, num_classes=10**6),
     r"metadata asks for a network with a size of 1,000,000"),
    ("metadata keys not priors", lambda tmp, classes: _priors(tmp, classes, keys=["x2", "x2", "lr"]),
     r"metadata keys .* are not distinct names among"),
]


def _priors(tmp: Path, classes: list[str], **meta) -> Path:
    """Priors of the tiny preset for ``classes``, their metadata then overwritten with ``meta``."""
    from safetensors.torch import load_file, save_file

    from facesr.models import build_prior, get_preset
    from facesr.weights import save_priors

    prior, path = get_preset("tiny").prior, tmp / "priors.safetensors"
    save_priors(path, {k: build_prior(prior, len(classes)) for k in ("x2", "x4", "hr")}, prior, classes)
    if meta:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            old = f.metadata()
        save_file(load_file(str(path)), str(path), metadata={**old, **{k: json.dumps(v) for k, v in meta.items()}})
    return path


@pytest.mark.parametrize("case, make, reason", PRIORS, ids=[c[0] for c in PRIORS])
def test_stage2_refuses_bad_priors_before_ray(capsys, tmp_path, shards, earlier_run, case, make, reason):
    """Stage 2 pointed at a pickle, priors of another class map, or a priors file whose metadata lies about its
    tensors: exit 2 naming stage2.priors and the file, before any worker; no payload runs, nothing touched.
    The loader every worker and `facesr eval priors` use refuses the same file with the same reason."""
    from facesr.weights import load_priors
    from shards.manifest import read_manifest

    classes = read_manifest(shards)["classes"]
    path = make(tmp_path, classes)
    before, priors_before = snapshot(earlier_run), path.read_bytes()
    rc = main(["train", "--config", CPU, f"data.shards={shards}", f"cluster.storage_path={earlier_run.parent}",
               "run.stages=[2]", f"stage2.priors={path}"])
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and re.search(rf"stage2\.priors: {re.escape(str(path))}: {reason}", line), line
    assert snapshot(earlier_run) == before and path.read_bytes() == priors_before and not (tmp_path / "pwned").exists()
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: {reason}"):
        load_priors(path, classes=classes)


# ---------------------------------------------------------------- prep: names, links, interrupts


def test_prep_rejects_symlink_loops_and_carries_on(capsys, tmp_path, faces):
    """A symlink loop as an identity folder and as an image (ELOOP when followed) used to abort the whole prep:
    each is now a row of rejects.tsv with its reason, and the faces around them are sharded."""
    src = tmp_path / "src"
    shutil.copytree(faces, src, symlinks=True)
    (src / "Loop_Identity").symlink_to(src / "Loop_Identity")
    person = sorted(p for p in src.iterdir() if p.is_dir())[0]
    (person / "loop.jpg").symlink_to(person / "loop.jpg")
    out = tmp_path / "out"
    assert main(["prep", str(src), str(out), *PREP]) == 0, capsys.readouterr().err
    rows = {r.split("\t")[0]: r.split("\t") for r in (out / "rejects.tsv").read_text().splitlines()[1:]}
    assert rows["Loop_Identity"][1:] == ["unreadable", "symlink loop: Too many levels of symbolic links"]
    assert rows[f"{person.name}/loop.jpg"][1] == "unreadable" and "symbolic links" in rows[f"{person.name}/loop.jpg"][2]
    assert json.loads((out / "manifest.json").read_text())["source"]["accepted"] == 40


def test_prep_names_escaped_and_rejects_tsv_valid_utf8(capfd, tmp_path, faces):
    """File names with control characters (one forging a "wrote 999 PNGs" line), and bytes that are not UTF-8,
    reach rejects.tsv escaped (valid UTF-8, one row each) and never reach the terminal raw."""
    src = tmp_path / "src"
    shutil.copytree(faces, src, symlinks=True)
    person = sorted(p for p in src.iterdir() if p.is_dir())[0]
    forged = "x\nwrote 999 PNGs\n\x1b[2J.jpg"
    (person / forged).write_bytes(b"not an image")
    os.close(os.open(os.path.join(os.fsencode(person), b"caf\xe9\xff.jpg"), os.O_CREAT | os.O_WRONLY))
    out = tmp_path / "out"
    assert main(["prep", str(src), str(out), *PREP]) == 0
    captured = capfd.readouterr()
    assert "wrote 999" not in captured.out + captured.err and "\x1b" not in captured.out + captured.err
    text = (out / "rejects.tsv").read_bytes().decode("utf-8")  # strict: raises on any byte that is not UTF-8
    rows = {r.split("\t")[0]: r.split("\t")[1] for r in text.splitlines()[1:]}
    assert rows[f"{person.name}/x\\nwrote 999 PNGs\\n\\x1b[2J.jpg"] == "not-an-image"
    assert rows[f"{person.name}/caf\\xe9\\xff.jpg"] == "zero-byte"
    assert len(text.splitlines()) == 3


def test_sigint_during_prep_one_line_and_resumable(tmp_path, faces):
    """Ctrl-C while prep writes shards: one line saying it was interrupted and that the same command resumes
    (exit 130), complete shards kept; the same command then keeps them and finishes, every shard matching the
    sha256 its manifest records."""
    from shards.manifest import read_manifest

    # ten copies of the 40 faces under other identity names: ~150 shards of 2, seconds of writing left when the
    # first one is complete
    src = tmp_path / "faces"
    for copy in range(10):
        for ident in sorted(p for p in faces.iterdir() if p.is_dir()):
            shutil.copytree(ident, src / f"{ident.name}-{copy}")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "launch.cli", "prep", str(src), str(out), *PREP, "--shard-size", "2"]
    # started as from a terminal: an ignored SIGINT is inherited through exec, and something earlier in a full
    # suite (a library in this process) leaves it ignored, so the child would never see the Ctrl-C
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)  # a handled signal is reset to default at exec
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, saved)
    deadline = time.time() + 300
    while not list(out.glob(".parts/*.json")):  # the first shard's record: the interrupt lands mid-prep
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)
    records = len(list(out.glob(".parts/*.json")))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 or (out / "manifest.json").exists() is False, \
        f"prep finished before the interrupt ({records} records when it was sent; {err[-500:]})"
    line = one_line(err)
    assert proc.returncode == 130 and line == "facesr prep: interrupted; what finished is kept, the same command resumes"
    # finished = a shard and its completion record (one whose record the interrupt cut off is written again)
    kept = sorted(p.stem for p in out.glob(".parts/*.json") if (out / f"{p.stem}.tar").is_file())
    assert kept and not (out / "manifest.json").exists()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert re.search(rf"\b{len(kept)} already complete", again.stdout), again.stdout
    read_manifest(out, verify=True)  # every shard's bytes and sample count as recorded


# ---------------------------------------------------------------- decoding: pixel limits and labels


def _peak_mb(code: str, setup: str = "") -> tuple[float, str]:
    """Peak resident memory (MB) that ``code`` adds in a fresh interpreter after ``setup`` (imports) ran."""
    prog = (f"import resource\n{setup}\nbase = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"try:\n    {code}\n    out = 'accepted'\nexcept Exception as e:\n    out = str(e)[:300]\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\nprint(out)")
    res = subprocess.run([sys.executable, "-c", prog], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    mb, out = res.stdout.strip().splitlines()[-2:]
    return float(mb), out


def test_memory_bounds_of_hostile_files(tmp_path):
    """What the issue measured in GB now costs a bounded amount: a depth-9 alias bomb in run.seed is refused
    (was an 80 MB message at depth 7, a MemoryError at 9); a 16-bit 9450² PNG (174 KB) decodes to RGB under
    1 GB more than the interpreter (was 3.3 GB: an int64 copy); a 13000² PNG in a shard is refused from its
    header (was decoded whole, 507 MB); the 164-byte `vdsr width=12000` file is refused without allocating."""
    import numpy as np
    from PIL import Image

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_bomb("run.seed", 9))
    mb, out = _peak_mb(f"load_config({str(bomb)!r})", "from cluster.config import load_config")
    assert out.startswith("run.seed: holds over 10,000 values") and mb < 50, (mb, out)

    grey = np.zeros((9450, 9450), dtype=np.uint16)
    grey[::97, ::89] = 40000
    Image.fromarray(grey).save(tmp_path / "deep.png", compress_level=9)
    assert (tmp_path / "deep.png").stat().st_size < 200_000
    mb, out = _peak_mb(f"x = read_rgb({str(tmp_path / 'deep.png')!r}); assert int(x.max()) == 156",
                       "from facesr.imageio import read_rgb")
    assert out == "accepted" and mb < 1024, (mb, out)

    Image.new("RGB", (13000, 13000)).save(tmp_path / "huge.png", compress_level=9)
    code = (f"decode_sample({{'__key__': 'k', 'cls': b'0', 'hr.png': open({str(tmp_path / 'huge.png')!r}, 'rb')"
            ".read()}, ('hr',))")
    mb, out = _peak_mb(code, "from shards.stream import decode_sample")
    assert out == "k: hr.png: expected a 192x192 RGB PNG, got 13000x13000 RGB" and mb < 50, (mb, out)

    mb, out = _peak_mb(f"load_srnet({str(_vdsr_bomb(tmp_path))!r})", "from facesr.weights import load_srnet")
    assert "metadata asks for a network with a size of 12,000" in out and mb < 50, (mb, out)


def test_cls_out_of_range_refused_when_decoded():
    """A sample whose cls lies outside -1..num_classes-1 (a shard written for another class map, or forged) is a
    decode error naming the sample, not an out-of-range target inside the loss; -1 and the last class pass."""
    from shards.stream import DecodeError, check_members

    for good in (b"-1", b"0", b"3"):
        assert check_members({"__key__": "k", "cls": good}, num_classes=4) == int(good)
    for bad in (b"4", b"-2", b"99999999999999999999"):
        with pytest.raises(DecodeError, match=rf"k: cls {int(bad)} outside -1\.\.3"):
            check_members({"__key__": "k", "cls": bad}, num_classes=4)


def test_damaged_shard_in_eval_priors_is_reported(capsys, tmp_path, shards):
    """`facesr eval priors` over shards one of which is damaged (same size, garbled bytes: the manifest's size
    check passes) scores what it can and says how much it skipped: a line on stderr and ``damaged`` in the
    report, where the evaluation used to shrink silently."""
    from facesr.models import build_prior, get_preset
    from facesr.weights import save_priors
    from shards.manifest import read_manifest

    root = tmp_path / "shards"
    shutil.copytree(shards, root)
    classes = read_manifest(root)["classes"]
    prior = get_preset("tiny").prior
    save_priors(tmp_path / "priors.safetensors", {k: build_prior(prior, len(classes)) for k in ("x2", "x4", "hr")},
                prior, classes)
    shard = root / read_manifest(root)["splits"]["train"]["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 8192):
        data[i] ^= 0x5A
    shard.write_bytes(bytes(data))
    out = tmp_path / "report.json"
    rc = main(["eval", "priors", str(tmp_path / "priors.safetensors"), "--shards", str(root), "--split", "train",
               "--out", str(out)])
    err = capsys.readouterr().err
    report = json.loads(out.read_text())
    labelled = read_manifest(root)["splits"]["train"]["labelled"]
    assert rc == 0 and report["damaged"] > 0 and report["images"] < labelled
    assert re.search(rf"warning: {report['damaged']} damaged samples or shards skipped, scored {report['images']} "
                     rf"of the split's {labelled} labelled images \(first: ", err), err


# ---------------------------------------------------------------- the handler itself


def test_debug_keeps_the_traceback(capsys, monkeypatch, tmp_path):
    """The one-line handler hides the traceback; `--debug` (before or after the command, at any level of
    subcommands) or FACESR_DEBUG=1 lets the exception through, so the traceback prints."""
    args = ["export", str(_vdsr_bomb(tmp_path)), str(tmp_path / "out")]
    assert main(args) == 1 and "size of 12,000" in one_line(capsys.readouterr().err)
    for argv in (["--debug", *args], [*args, "--debug"]):
        with pytest.raises(ValueError, match="size of 12,000"):
            main(argv)
    with pytest.raises(FileNotFoundError, match="none.safetensors"):  # a subcommand's subcommand takes it too
        main(["eval", "quality", str(tmp_path / "none.safetensors"), "--debug"])
    monkeypatch.setenv("FACESR_DEBUG", "1")
    with pytest.raises(ValueError, match="size of 12,000"):
        main(args)
