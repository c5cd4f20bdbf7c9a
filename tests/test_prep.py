"""`facesr prep`: real faces through real Ray tasks, bad inputs, splits, determinism, resume after a kill."""

from __future__ import annotations

import csv
import filecmp
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest

from launch.cli import main
from shards.manifest import read_manifest
from shards.plan import SplitConfig, label_set, split_identities
from shards.prep import PrepConfig, PrepError, check_paths
from shards.source import KINDS
from tests.fixtures_faces import N_FACES, PREP_ARGS, add_bad_inputs, prepared, real_faces

ROOT = Path(__file__).resolve().parents[1]


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.is_file())


def _same_tree(a: Path, b: Path) -> None:
    names = _files(a)
    assert names == _files(b)
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


def test_prep_real_faces_writes_valid_shards():
    """Every accepted real face is in exactly one shard with the four PNG levels, cls and its JSON record."""
    src, out, expected = prepared()
    m = read_manifest(out, verify=True)
    accepted = N_FACES + 1  # the real faces plus Bad_Person/good.jpg
    assert m["source"]["accepted"] == accepted
    assert sum(d["samples"] for d in m["splits"].values()) == accepted
    assert sum(i["images"] for i in m["identities"].values()) == accepted
    seen = []
    for split, d in m["splits"].items():
        for s in d["shards"]:
            with tarfile.open(out / s["name"]) as tar:
                names = tar.getnames()
                assert all(ti.mtime == tar.getmembers()[0].mtime and ti.uid == 0 for ti in tar.getmembers())
                keys = sorted({n.split(".", 1)[0] for n in names})
                assert len(keys) == s["samples"]
                for k in keys:
                    assert {f"{k}.{e}" for e in ("lr.png", "x2.png", "x4.png", "hr.png", "cls", "json")} <= set(names)
                    rec = json.loads(tar.extractfile(f"{k}.json").read())
                    cls = int(tar.extractfile(f"{k}.cls").read())
                    assert (src / rec["path"]).exists() and rec["path"].split("/")[0] == rec["identity"]
                    assert m["identities"][rec["identity"]]["split"] == split
                    assert cls == m["identities"][rec["identity"]]["cls"] == rec["cls"]
                    seen.append(rec["path"])
    assert len(seen) == len(set(seen)) == accepted
    assert m["degrade"]["crop"] == 192 and m["software"]["facesr"] and m["version"] == 1


def test_splits_identity_disjoint_and_classes_from_train():
    """Train/val/test share no identity; classes are exactly the train identities with >= min-images."""
    _, out, _ = prepared()
    m = read_manifest(out)
    by_split = {s: {i for i, d in m["identities"].items() if d["split"] == s} for s in ("train", "val", "test")}
    assert all(by_split.values())
    assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"]
                or by_split["val"] & by_split["test"])
    min_images = m["split"]["min_images"]
    assert m["classes"] == sorted(i for i in by_split["train"] if m["identities"][i]["images"] >= min_images)
    for name, d in m["identities"].items():
        assert d["cls"] == (m["classes"].index(name) if name in m["classes"] else -1)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_identities_deterministic_and_sized(seed):
    """Same seed, same split; fractions count identities; min-images sets the label set."""
    ids = [f"id{i:03d}" for i in range(200)]
    cfg = SplitConfig(val=0.1, test=0.2, seed=seed)
    a, b = split_identities(ids, cfg), split_identities(list(reversed(ids)), cfg)
    assert a == b
    assert sum(v == "val" for v in a.values()) == 20 and sum(v == "test" for v in a.values()) == 40
    counts = {i: n % 4 + 1 for n, i in enumerate(ids)}
    assert all(counts[c] >= 3 and a[c] == "train" for c in label_set(counts, a, 3))


def test_every_bad_input_rejected_with_reason():
    """Each bad-input kind lands in rejects.tsv with its reason, counted in the manifest; the run completes."""
    _, out, expected = prepared()
    with open(out / "rejects.tsv", newline="") as f:
        rows = {r["path"]: r for r in csv.DictReader(f, delimiter="\t")}
    assert {p: r["kind"] for p, r in rows.items()} == expected
    assert all(r["kind"] in KINDS for r in rows.values())
    m = read_manifest(out)
    assert m["rejects"]["total"] == len(expected)
    assert sum(m["rejects"]["by_kind"].values()) == len(expected)
    assert m["identities"]["Bad_Person"]["images"] == 1 and "Empty_Person" not in m["identities"]


def test_serial_run_byte_identical_to_ray_run_and_rerun_repairs(tmp_path):
    """Same input and settings give byte-identical output; a rerun keeps verified shards and redoes damaged ones."""
    src, out, _ = prepared()
    again = tmp_path / "again"
    assert main(["prep", str(src), str(again), "--no-ray", *PREP_ARGS]) == 0
    _same_tree(out, again)
    shards = sorted(again.glob("train-*.tar"))
    data = bytearray(shards[0].read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes: only the sha256 can tell
    shards[0].write_bytes(bytes(data))
    shards[1].unlink()
    (again / "manifest.json").unlink()
    (again / f".{shards[2].name}.tmp-deadbeef").write_bytes(b"leftover of a killed run")
    from shards.prep import PrepConfig, prepare

    summary = prepare(PrepConfig(src=str(src), out=str(again), shard_size=32, progress=False,
                                 split=SplitConfig(val=0.15, test=0.15, seed=3)))
    assert summary["shards_written"] == 2 and summary["shards_kept"] == summary["shards"] - 2
    _same_tree(out, again)


@pytest.mark.slow
def test_resume_after_kill_is_byte_identical(tmp_path):
    """Kill a real prep (Ray and all) mid-way: no partial shard under a final name; a rerun finishes it identically."""
    src, reference, _ = prepared()
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "launch.cli", "prep", str(src), str(out), "--address", "local", "--cpus", "2",
           *PREP_ARGS]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*-000000.tar")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole session: driver, raylet, workers
        proc.wait()
    assert not (out / "manifest.json").exists(), "killed too late: the run had finished"
    finished = sorted(p.name for p in out.glob("*.tar"))
    assert finished and len(finished) < len(list(reference.glob("*.tar")))
    for name in finished:  # whatever carries a final name is complete, byte for byte
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "already complete" in rerun.stdout
    _same_tree(reference, out)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_clear_errors_for_missing_or_empty_src_and_unwritable_out(tmp_path, capsys):
    """Non-zero exit with a message naming the problem; never a traceback."""
    assert main(["prep", str(tmp_path / "nope"), str(tmp_path / "o1"), "--no-ray"]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["prep", str(empty), str(tmp_path / "o2"), "--no-ray"]) == 2
    assert "no image files" in capsys.readouterr().err
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    add_bad_inputs(only_bad, real_faces(1)[0])
    (only_bad / "Bad_Person" / "good.jpg").unlink()
    assert main(["prep", str(only_bad), str(tmp_path / "o3"), "--no-ray", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no usable image" in err and (tmp_path / "o3" / "rejects.tsv").exists()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["prep", str(only_bad), str(blocker / "out"), "--no-ray"]) == 2
    assert "not writable" in capsys.readouterr().err


def test_import_boundaries():
    """shards/ never imports ray, deepspeed or prometheus_client (only cluster/ may)."""
    code = ("import sys, shards.prep, shards.stream, shards.manifest, launch.prep\n"
            "bad = [m for m in ('ray', 'deepspeed', 'prometheus_client') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_combined_sources_and_prior_holdout(tmp_path):
    """Two identity folders in one prep: names kept apart by source; each class's holdout lands in prior_val."""
    faces = real_faces(60)
    roots = {"lfw": tmp_path / "a" / "lfw", "celeb": tmp_path / "b" / "celeb"}
    for k, root in enumerate(roots.values()):
        for f in dict.fromkeys(faces[k * 30 : (k + 1) * 30] + faces[:6]):  # the first ones in both: not one person
            (root / f.parent.name).mkdir(parents=True, exist_ok=True)
            (root / f.parent.name / f.name).symlink_to(f)
    out = tmp_path / "out"
    args = ["prep", *map(str, roots.values()), str(out), "--no-ray", "--prior-holdout", "0.3", "--min-images", "3",
            "--shard-size", "16", "--val", "0.1", "--test", "0.1", "--seed", "1", "--no-progress"]
    assert main(args) == 0
    m = read_manifest(out, verify=True)
    assert set(m["source"]["roots"]) == {"lfw", "celeb"}
    assert all(name.split("/")[0] in roots for name in m["identities"])
    shared = faces[0].parent.name
    assert {f"lfw/{shared}", f"celeb/{shared}"} <= set(m["identities"])  # same folder name, two identities
    held = {}
    for s in m["splits"]["prior_val"]["shards"]:
        with tarfile.open(out / s["name"]) as tar:
            for ti in tar:
                if ti.name.endswith(".json"):
                    rec = json.loads(tar.extractfile(ti).read())
                    assert rec["cls"] >= 0 and m["classes"][rec["cls"]] == rec["identity"]
                    label, rest = rec["path"].split("/", 1)
                    assert (roots[label] / rest).exists()
                    held[rec["identity"]] = held.get(rec["identity"], 0) + 1
    assert held and all(m["identities"][i]["prior_val"] == n for i, n in held.items())
    pv = m["splits"]["prior_val"]
    assert pv["labelled"] == pv["samples"] == sum(held.values()) and pv["largest_class"] == max(held.values())
    for name in m["classes"]:  # every class keeps training images, and gave some to prior_val
        info = m["identities"][name]
        assert info["split"] == "train" and 0 < info["prior_val"] < info["images"]
    assert sum(d["samples"] for d in m["splits"].values()) == m["source"]["accepted"]
    from launch.eval import _manifest_identities  # eval's --manifest selection, against one of the folders

    mine = _manifest_identities(str(out), "train", str(roots["celeb"]))
    assert mine and all((roots["celeb"] / name).is_dir() for name in mine)
    assert len(mine) == sum(1 for n, d in m["identities"].items() if n.startswith("celeb/") and d["split"] == "train")
    again = tmp_path / "again"
    assert main(args[:3] + [str(again)] + args[4:]) == 0  # deterministic: same shards, byte for byte
    for name in _files(out):
        if name.endswith(".tar"):
            assert (out / name).read_bytes() == (again / name).read_bytes()


def test_prior_holdout_count_per_class_is_balanced():
    from shards.plan import sample_splits

    accepted = [(f"id{i}", f"id{i}/{j}.jpg") for i in range(4) for j in range(3 + 5 * i)]
    split_of = {f"id{i}": "train" for i in range(4)}
    cfg = SplitConfig(min_images=3, prior_holdout=2)
    where = sample_splits(accepted, split_of, [f"id{i}" for i in range(4)], cfg)
    held = Counter(p.split("/")[0] for p, s in where.items() if s == "prior_val")
    assert held == {f"id{i}": 2 for i in range(4)}  # 2 each, whatever the class size
    assert where == sample_splits(accepted, split_of, [f"id{i}" for i in range(4)], cfg)
    for bad in (2.5, -0.1, 3):  # not whole, negative, leaves no training image at min-images 3
        with pytest.raises(ValueError, match="prior-holdout"):
            SplitConfig(min_images=3, prior_holdout=bad)


def test_prior_holdout_is_stable_under_resharding():
    """The held-out images depend only on (seed, identity, its files): not on shard size, the order the images
    were found in (Ray tasks finish in any order), or other identities; and no held-out image is trained on."""
    import random

    from shards.plan import plan_shards, sample_splits

    accepted = [(f"id{i}", f"id{i}/{j:03d}.jpg") for i in range(6) for j in range(4 + 3 * i)]
    split_of = {f"id{i}": "train" for i in range(6)}
    classes = sorted(split_of)
    cfg = SplitConfig(min_images=4, prior_holdout=0.25)

    def held(acc, shard_size):
        where = sample_splits(acc, split_of, classes, cfg)
        by_split = {}
        for plan in plan_shards(acc, where, classes, shard_size, seed=0):
            by_split.setdefault(plan.split, set()).update(r.path for r in plan.samples)
        assert not by_split["prior_val"] & by_split["train"]  # disjoint from the images the priors train on
        return by_split["prior_val"]

    base = held(accepted, 5)
    shuffled = accepted[:]
    random.Random(3).shuffle(shuffled)
    assert held(shuffled, 7) == base and held(accepted, 1000) == base
    fewer = [(i, p) for i, p in accepted if i != "id5"]  # one identity fewer: the others keep their holdout
    assert held(fewer, 5) == {p for p in base if not p.startswith("id5/")}
    assert len(base) == sum(max(1, round(0.25 * (4 + 3 * i))) for i in range(6))


def test_combined_sources_with_one_folder_name_refused(tmp_path, capsys):
    a, b = tmp_path / "x" / "faces", tmp_path / "y" / "faces"
    for d in (a, b):
        d.mkdir(parents=True)
    assert main(["prep", str(a), str(b), str(tmp_path / "out"), "--no-ray", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "share the folder name 'faces'" in err and str(a) in err and str(b) in err


def test_exclude_leaves_out_the_people_another_shard_set_evaluates_on(tmp_path, capsys):
    """--exclude SHARDS: a second prep over the same folder plus another one keeps every identity of SHARDS'
    train split and none of its val/test people (matched in the folder both read, not by bare name: the other
    folder's same-named identity stays); counts in the manifest and summary. An unreadable or unrelated
    --exclude stops before anything is written, naming it."""
    faces = real_faces(60)
    roots = {"lfw": tmp_path / "a" / "lfw", "celeb": tmp_path / "b" / "celeb"}
    for k, root in enumerate(roots.values()):
        for f in dict.fromkeys(faces[k * 30 : (k + 1) * 30] + faces[:6]):
            (root / f.parent.name).mkdir(parents=True, exist_ok=True)
            (root / f.parent.name / f.name).symlink_to(f)
    first = tmp_path / "first"
    assert main(["prep", str(roots["lfw"]), str(first), "--no-ray", "--shard-size", "16", "--val", "0.2",
                 "--test", "0.2", "--no-progress"]) == 0
    m1 = read_manifest(first)
    held = {n for n, d in m1["identities"].items() if d["split"] in ("val", "test")}
    kept = {n for n, d in m1["identities"].items() if d["split"] == "train"}
    assert held and kept
    out = tmp_path / "rec"
    args = ["prep", *map(str, roots.values()), str(out), "--no-ray", "--split-by", "none", "--exclude", str(first),
            "--shard-size", "16", "--no-progress"]
    assert main(args) == 0
    assert "left out" in capsys.readouterr().out
    m2 = read_manifest(out, verify=True)
    lfw = {n.split("/", 1)[1] for n in m2["identities"] if n.startswith("lfw/")}
    celeb = {n.split("/", 1)[1] for n in m2["identities"] if n.startswith("celeb/")}
    assert lfw == kept and not lfw & held
    assert celeb == {p.name for p in roots["celeb"].iterdir()}  # the other folder loses no one
    shared = {f.parent.name for f in faces[:6]}  # folders of this name in both sources: two people
    assert shared & held and shared & held <= celeb  # held out in lfw, kept in celeb
    images = sum(m1["identities"][n]["images"] for n in held)
    assert m2["excluded"] == {"shards": str(first), "splits": ["val", "test"], "identities": len(held),
                              "images": images}
    for bad, why in ((tmp_path / "nowhere", "no readable shard manifest"), (first, "not among SRC")):
        dest = tmp_path / f"never-{bad.name}"
        assert main(["prep", str(roots["celeb"]), str(dest), "--no-ray", "--exclude", str(bad), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"--exclude {bad}" in err and why in err, err
        assert not (dest / "manifest.json").exists()
    with pytest.raises(PrepError, match="no readable shard manifest"):  # checked with the paths, before any Ray
        check_paths(PrepConfig(src=str(roots["celeb"]), out=str(tmp_path / "unmade"), exclude=str(tmp_path / "nowhere")))
    assert not (tmp_path / "unmade").exists()
