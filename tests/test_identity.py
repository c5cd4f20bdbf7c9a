"""LFW pairs parsing and skipping, verification accuracy/AUC, the embedder's training set, a tiny verify run,
and dlib's pretrained judge on real LFW pairs."""

import json
import sys

import pytest
import torch

from facesr.identity import (
    EmbedderJudge,
    EmbedderTraining,
    Pair,
    best_threshold,
    format_identity_table,
    pair_identities,
    read_pairs,
    train_embedder,
    training_faces,
    usable_pairs,
    verification_metrics,
    verify,
)
from facesr.degrade import crop_hr, degrade, quantize
from facesr.identity import dlib_judge
from facesr.identity.pairs import image_path
from facesr.imageio import read_rgb
from facesr.models import PRESETS, EmbedderConfig, FaceEmbedder, SRNet
from facesr.models.embedder import freeze
from facesr.quality import upscale
from facesr.weights import load_embedder, save_embedder

from .conftest import DATA, LFW

PAIRS = DATA / "lfw-pairs.txt"
OUTSIDE_PAIRS = ["Adel_Al-Jubeir", "Justin_Leonard", "Marc_Grossman", "Juanes"]  # LFW people in no pair


@pytest.fixture(scope="module")
def pairs():
    return read_pairs(PAIRS)


def test_read_pairs_view2(pairs):
    """6,000 pairs in 10 folds of 300 same + 300 different, in file order."""
    assert len(pairs) == 6000
    assert [sum(p.fold == k for p in pairs) for k in range(10)] == [600] * 10
    assert sum(p.same for p in pairs) == 3000
    assert pairs[0].same and pairs[0].a[0] == pairs[0].b[0] and not pairs[300].same


def test_absent_pairs_skipped_and_counted(pairs):
    """Pairs naming withheld people are skipped and counted; the counts add up to the total."""
    kept, c = usable_pairs(pairs, LFW)
    assert c["absent"] > 0 and c["used"] == len(kept) == 6000 - c["absent"]
    assert all((LFW / p.b[0]).is_dir() and (LFW / p.a[0]).is_dir() for p in kept[:50])


def test_pair_selection_and_per_fold_cap(pairs, tmp_path):
    """--ids keeps pairs whose face B (the degraded one) is a chosen person; --per-fold keeps the balance per fold."""
    kept, c = usable_pairs(pairs, LFW, per_fold=4)
    assert len(kept) == 40 and c["over_per_fold"] == c["total"] - c["absent"] - 40
    assert all(sum(p.fold == k and p.same for p in kept) == 2 for k in range(10))
    people = {p.b[0] for p in pairs[::7]}
    kept, c = usable_pairs(pairs, LFW, people)
    assert all(p.b[0] in people for p in kept)
    assert sum(p.same for p in kept) > 100 and sum(not p.same for p in kept) > 100  # both kinds survive
    assert c["outside_selection"] + c["absent"] + c["used"] == c["total"]


def test_malformed_pairs_file(tmp_path):
    """A line with the wrong number of fields is an error that names the line."""
    bad = tmp_path / "pairs.txt"
    bad.write_text("1\t1\nA\t1\t2\nB\t1\n")
    with pytest.raises(ValueError, match=":3:"):
        read_pairs(bad)


def test_best_threshold():
    """The best threshold separates what can be separated; accuracy counts both sides."""
    s = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.9])
    y = torch.tensor([0, 0, 1, 0, 1])
    thr, acc = best_threshold(s, y)
    assert acc == pytest.approx(0.8) and (0.2 < thr < 0.3 or 0.4 < thr < 0.9)  # two thresholds tie at 4 of 5
    assert ((s > thr) == y.bool()).float().mean().item() == pytest.approx(acc)  # the accuracy is the threshold's


@pytest.mark.parametrize("separation, acc_range", [(10.0, (0.99, 1.0)), (0.0, (0.3, 0.7))])
def test_verification_metrics(separation, acc_range):
    """Separable scores give accuracy and AUC 1; unrelated scores give about 0.5."""
    g = torch.Generator().manual_seed(0)
    same = torch.arange(600) % 2 == 0
    scores = torch.randn(600, generator=g) + separation * same
    folds = torch.arange(600) // 60  # 30 same + 30 different per fold, as in View 2
    m = verification_metrics(scores, same, folds)
    assert m["folds"] == 10 and m["pairs"] == 600
    assert acc_range[0] <= m["accuracy"] <= acc_range[1]
    assert acc_range[0] <= m["auc"] <= acc_range[1]
    assert m["accuracy_best"] >= m["accuracy"] - 1e-9  # fitted on the test pairs themselves: optimistic


def test_embedder_never_sees_pair_people(pairs):
    """The judge's training identities exclude every person in the LFW pairs."""
    faces, classes, counts = training_faces({"lfw": LFW}, pair_identities(pairs), min_images=2)
    assert counts["identities"] == len(classes) > 0
    assert not {c.split("/", 1)[1] for c in classes} & pair_identities(pairs)
    assert {label for label, _ in faces} == set(range(len(classes)))


def test_tiny_embedder_train_save_load_verify(pairs, tmp_path):
    """A few CE steps train; save/load keeps the embeddings; the judge stays frozen; verify reports each condition."""
    root = tmp_path / "people"
    for name in OUTSIDE_PAIRS:  # a small identity folder of links: listing all of LFW costs seconds
        (root / name).mkdir(parents=True)
        for f in sorted((LFW / name).iterdir())[:4]:
            (root / name / f.name).symlink_to(f)
    faces, classes, _ = training_faces({"lfw": root}, pair_identities(pairs), min_images=3)
    assert len(classes) == len(OUTSIDE_PAIRS) and len(faces) == 14
    cfg = EmbedderConfig(size=32)
    model = train_embedder(faces, classes, cfg, EmbedderTraining(batch_size=8, lowres_p=0.5), steps=2,
                           log=lambda m: None)
    path = save_embedder(tmp_path / "emb.safetensors", model, classes)
    loaded, meta = load_embedder(path)
    assert meta["classes"] == classes and meta["config"]["size"] == 32
    loaded.train()
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(2, 3, 192, 192)
    e = loaded(x)
    assert torch.allclose(e, model(x), atol=1e-5) and torch.allclose(e.norm(dim=1), torch.ones(2), atol=1e-5)

    kept, counts = usable_pairs(pairs, LFW, per_fold=2)  # 20 pairs, 10 same, 2 per fold
    torch.manual_seed(0)
    sr = SRNet(PRESETS["tiny"].sr).eval()
    judge = EmbedderJudge(loaded)
    res = verify(judge, kept, LFW, {"tiny": sr.deploy()}, batch_size=16)
    assert list(res) == ["hr", "bicubic", "tiny"]
    for m in res.values():
        assert m["pairs"] == 20 and "accuracy_fixed" not in m  # a judge trained here has no published threshold
    # the HR row is the LFW protocol on these pairs' own faces, embedded here one pair at a time
    hr = {f: quantize(degrade(crop_hr(read_rgb(image_path(LFW, f)))[None])["hr"]) for p in kept for f in (p.a, p.b)}
    scores = torch.stack([-judge.distance(judge.embed(hr[p.a]), judge.embed(hr[p.b]))[0] for p in kept])
    direct = verification_metrics(scores, torch.tensor([p.same for p in kept]), torch.tensor([p.fold for p in kept]))
    assert res["hr"]["accuracy"] == pytest.approx(direct["accuracy"]) and res["hr"]["auc"] == pytest.approx(direct["auc"])
    assert "drift" not in res["hr"] and res["bicubic"]["drift"]["faces"] == len({p.b for p in kept})
    text = format_identity_table({"pair_counts": counts, "results": res})
    assert "bicubic" in text and f"{counts['absent']} skipped" in text
    json.dumps(res)


def test_cli_embedder_and_identity(pairs, tmp_path, capsys):
    """`facesr eval embedder` trains on people outside the pairs; `facesr eval identity` reports HR/bicubic/SR."""
    from launch.cli import main
    from facesr.weights import save_srnet

    root = tmp_path / "people"
    for name in OUTSIDE_PAIRS + ["Abel_Pacheco"]:  # the last one is in the pairs: must be left out
        (root / name).mkdir(parents=True)
        for f in sorted((LFW / name).iterdir())[:3]:
            (root / name / f.name).symlink_to(f)
    emb = tmp_path / "emb.safetensors"
    assert main(["eval", "embedder", str(emb), "--lfw", str(root), "--celeba", "", "--size", "32",
                 "--steps", "1"]) == 0
    _, meta = load_embedder(emb)
    assert sorted(meta["classes"]) == sorted(f"lfw/{n}" for n in OUTSIDE_PAIRS)
    torch.manual_seed(0)
    save_srnet(tmp_path / "a0" / "srnet.safetensors", SRNet(PRESETS["tiny"].sr))
    save_srnet(tmp_path / "a1e-3" / "srnet.safetensors", SRNet(PRESETS["tiny"].sr))
    capsys.readouterr()
    assert main(["eval", "identity", str(tmp_path / "a0"), str(tmp_path / "a1e-3"), "--embedder", str(emb),
                 "--per-fold", "2", "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "a0" in out and "a1e-3" in out and "skipped: image absent" in out
    report = json.loads((tmp_path / "eval" / "identity.json").read_text())
    assert list(report["results"]) == ["hr", "bicubic", "a0", "a1e-3"]
    assert report["pair_counts"]["used"] == 20 and report["pair_counts"]["absent"] > 0
    assert report["judge"]["name"] == "embedder"  # --embedder given: that judge, whatever is installed


def test_pair_dataclass_is_hashable():
    """Pairs can key dictionaries (faces are embedded once however many pairs use them)."""
    p = Pair(0, True, ("A", 1), ("A", 2))
    assert {p: 1}[p] == 1


def test_embedder_files_from_before_the_split_still_load(tmp_path):
    """Weights whose config also held training settings (written before the split) load with the architecture."""
    from facesr.weights import _save

    net = FaceEmbedder(EmbedderConfig(size=32), num_classes=3)
    old = {"kind": "embedder", "config": {"arch": "resnet10t", "size": 32, "epochs": 8, "lr": 2e-3},
           "classes": list("abc")}
    _save(tmp_path / "old.safetensors", net.net.state_dict(), old)
    loaded, meta = load_embedder(tmp_path / "old.safetensors")
    assert loaded.cfg == EmbedderConfig(size=32) and meta["config"]["epochs"] == 8
    x = torch.rand(1, 3, 64, 64)
    assert torch.allclose(loaded(x), freeze(net)(x))


# ---------------------------------------------------------------- dlib's pretrained judge

needs_dlib = pytest.mark.skipif(not dlib_judge.available(), reason="the dlib extra is not installed "
                                "(pip install -e '.[dlib]'; `make venv` installs it)")


@pytest.fixture(scope="module")
def dlib():
    return dlib_judge.DlibJudge()


@needs_dlib
def test_dlib_models_found_without_importing_their_package(dlib):
    """The .dat files are located by find_spec: face_recognition_models (which needs pkg_resources) never runs."""
    assert (dlib_judge.model_dir() / dlib_judge.MODEL_FILES["recognizer"]).is_file()
    assert "face_recognition_models" not in sys.modules


@pytest.fixture(scope="module")
def dlib_report(dlib, pairs):
    """dlib's verify on 20 real pairs, with bicubic given a second time as an 'upscaler' (the rows must agree)."""
    kept, _ = usable_pairs(pairs, LFW, per_fold=2)  # 20 pairs: 10 same, 10 different, one of each kind per fold
    start = dlib.fallbacks
    res = verify(dlib, kept, LFW, {"bicubic_again": lambda lr: upscale(lr, 192, "bicubic")}, batch_size=64)
    return kept, res, dlib.fallbacks - start


@needs_dlib
def test_dlib_judge_separates_real_lfw_pairs(dlib_report):
    """At HR, dlib puts most same-person pairs under its 0.6 threshold and most different ones above, AUC ~1."""
    kept, res, _ = dlib_report
    hr = res["hr"]
    assert hr["pairs"] == 20 and hr["folds"] == 10
    assert hr["accuracy_fixed"] >= 0.9 and hr["auc"] >= 0.95
    assert -hr["score_same_mean"] < 0.6 < -hr["score_diff_mean"]  # scores are minus distances
    assert hr["fallbacks"] == 0  # the detector finds every HR face: the fixed box is never needed there


@needs_dlib
def test_dlib_judge_drift_and_consistency(dlib_report):
    """Bicubic x8 faces drift from their HR faces, less than another person is away; the same pictures, given
    again as an upscaler, give identical figures (every face is embedded deterministically)."""
    kept, res, fallbacks = dlib_report
    bic, again = res["bicubic"], res["bicubic_again"]
    assert bic["drift"]["faces"] == len({p.b for p in kept})
    assert 0.1 < bic["drift"]["mean"] < -res["hr"]["score_diff_mean"]
    again = dict(again)  # the fixture is shared: compare a copy
    # the repeated bicubic is itself compared with bicubic per face: identical pictures differ by exactly 0
    assert again.pop("drift_minus_bicubic") == {"faces": bic["drift"]["faces"], "mean": 0.0, "sem": 0.0}
    assert bic == again
    assert fallbacks == sum(m["fallbacks"] for m in res.values())


@needs_dlib
def test_dlib_judge_without_a_face_falls_back_and_counts(dlib):
    """A picture with no face is embedded from the fixed LFW box and counted as a fallback, not dropped."""
    before = dlib.fallbacks
    e = dlib.embed(torch.full((1, 3, 192, 192), 0.5))
    assert e.shape == (1, 128) and torch.isfinite(e).all() and dlib.fallbacks == before + 1


@needs_dlib
def test_dlib_judge_workers_give_the_same_embeddings(dlib, pairs):
    """Spreading a batch over worker processes changes nothing in the embeddings or the fallback count."""
    from facesr.degrade import crop_hr
    from facesr.identity import image_path
    from facesr.imageio import read_rgb

    kept, _ = usable_pairs(pairs, LFW, per_fold=2)
    faces = torch.stack([crop_hr(read_rgb(image_path(LFW, p.a))) for p in kept[:3]])  # (3, 3, 192, 192)
    faces = torch.cat([faces, torch.full((1, 3, 192, 192), 0.5)])  # and one without a face
    two = dlib_judge.DlibJudge(workers=2)
    try:
        before = dlib.fallbacks
        assert torch.equal(two.embed(faces), dlib.embed(faces))
        assert two.fallbacks == dlib.fallbacks - before == 1
    finally:
        two.close()


@needs_dlib
def test_cli_identity_judges_with_dlib_by_default(dlib, dlib_report, tiny_run, tmp_path, capsys):
    """Without --embedder, `facesr eval identity` judges with dlib (here over 2 worker processes): the table names
    it, and the JSON's HR figures are those of the same 20 pairs verified directly."""
    from launch.cli import main

    capsys.readouterr()
    assert main(["eval", "identity", str(tiny_run), "--per-fold", "2", "--workers", "2", "--out", str(tmp_path),
                 "--device", "cpu", "--precision", "fp32"]) == 0  # fp32: compared with the plain network below
    assert "judge: dlib" in capsys.readouterr().out
    report = json.loads((tmp_path / "identity.json").read_text())
    assert report["judge"]["name"] == "dlib" and report["judge"]["threshold"] == 0.6
    _, res, _ = dlib_report
    assert list(report["results"]) == ["hr", "bicubic", tiny_run.name]
    assert report["results"]["hr"] == res["hr"] and report["results"]["bicubic"] == res["bicubic"]
    sr = report["results"][tiny_run.name]
    from facesr.infer import load_cascade

    kept, _, _ = dlib_report  # the same 20 pairs, judged in this process with the same model
    direct = verify(dlib, kept, LFW, {tiny_run.name: load_cascade(tiny_run).deploy()}, batch_size=64)[tiny_run.name]
    assert sr["accuracy_fixed"] == direct["accuracy_fixed"] and sr["auc"] == pytest.approx(direct["auc"])
    assert sr["drift"]["mean"] == pytest.approx(direct["drift"]["mean"], abs=1e-4) and 0 < sr["drift"]["mean"] < 2


def test_cli_judge_embedder_needs_its_weights():
    """--judge embedder without --embedder is refused with a message saying how to get weights."""
    from argparse import Namespace

    from launch.eval import _judge

    with pytest.raises(SystemExit, match="facesr eval embedder"):
        _judge(Namespace(judge="embedder", embedder=None, workers=1, device="cpu"), [])


def test_drift_on_more_faces_and_paired_against_bicubic(pairs):
    """drift_faces widen the drift to more faces of the chosen people; an upscaler that is bicubic itself differs
    from bicubic's drift by exactly 0, a different one by a nonzero paired difference with a standard error."""
    kept, _ = usable_pairs(pairs, LFW, per_fold=2)
    extra = [(n, i) for n in OUTSIDE_PAIRS[:2] for i in (1, 2)]
    torch.manual_seed(0)
    judge = EmbedderJudge(FaceEmbedder(EmbedderConfig(size=32)).eval())
    ups = {"same": lambda lr: upscale(lr, 192, "bicubic"), "nearest": lambda lr: upscale(lr, 192, "nearest")}
    res = verify(judge, kept, LFW, ups, batch_size=16, drift_faces=extra)
    n = len({p.b for p in kept} | set(extra))
    assert res["bicubic"]["drift"]["faces"] == n and res["same"]["drift"]["faces"] == n
    assert res["same"]["drift_minus_bicubic"] == {"faces": n, "mean": 0.0, "sem": 0.0}
    d = res["nearest"]["drift_minus_bicubic"]
    assert d["mean"] != 0 and d["sem"] > 0 and "drift_minus_bicubic" not in res["bicubic"]
    assert res["hr"]["pairs"] == len(kept)  # the extra faces join no pair
    text = format_identity_table({"pair_counts": _counts(len(kept)), "results": res})
    assert f"nearest: drift minus bicubic's {d['mean']:+.4f}" in text


def _counts(used: int) -> dict:
    return {"total": 6000, "absent": 0, "outside_selection": 0, "over_per_fold": 0, "used": used}


def test_cli_drift_all_needs_chosen_people(tmp_path):
    from launch.cli import main

    with pytest.raises(SystemExit, match="--drift-all needs chosen people"):
        main(["eval", "identity", "--judge", "embedder", "--embedder", str(tmp_path / "e.safetensors"),
              "--drift-all", "--per-fold", "2"])


@needs_dlib
def test_identity_table_under_each_degradation(dlib, pairs):
    """dlib on 20 real pairs with face B's lr made the paper's way and by PIL's antialiased bicubic: each row has
    bicubic and each upscaler; an upscaler that is bicubic again differs from it by exactly 0 in every row, nearest
    drifts further than bicubic (beyond its standard error), and the PIL row's lr really differs from the paper's
    (its bicubic drift differs); the printed table names each row and says which side is better."""
    from facesr.identity import format_degradation_table, verify_degradations

    kept, counts = usable_pairs(pairs, LFW, per_fold=2)
    ups = {"bicubic_again": lambda lr: upscale(lr, 192, "bicubic"), "nearest": lambda lr: upscale(lr, 192, "nearest")}
    res = verify_degradations(dlib, kept, LFW, ups, ["paper", "bicubic_aa"], batch_size=64)
    assert list(res["rows"]) == ["paper", "bicubic_aa"]
    for row in res["rows"].values():
        assert list(row) == ["bicubic", "bicubic_again", "nearest"]
        assert row["bicubic_again"]["drift_minus_bicubic"]["mean"] == 0.0
        near = row["nearest"]["drift_minus_bicubic"]
        assert near["mean"] > 2 * near["sem"] > 0  # blocky faces lose the person more than bicubic ones
    rows = res["rows"]
    assert rows["paper"]["bicubic"]["drift"]["mean"] != rows["bicubic_aa"]["bicubic"]["drift"]["mean"]
    assert res["hr"]["auc"] > rows["paper"]["bicubic"]["auc"] - 0.05  # HR verifies at least as well
    text = format_degradation_table({"pair_counts": counts, "judge": dlib.describe(), "results": res})
    assert "bicubic_aa" in text and "worse" in text and "acc@0.6" in text
