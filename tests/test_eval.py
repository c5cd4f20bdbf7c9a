"""Evaluation protocol on real LFW faces: sensible bicubic numbers, every scale in the table, JSON, grid, skips."""

import json
import math

import pytest
import torch
from PIL import Image

from facesr.evaluate import (
    add_robustness,
    build_report,
    folder_batches,
    format_robustness,
    format_table,
    list_faces,
    model_label,
    read_identities,
    score,
    score_degradations,
    select,
    write_json,
)
from facesr.grid import CELL, comparison_grid
from facesr.losses import ssim as paper_ssim
from facesr.quality import PSNR_CAP, image_scores, upscale
from facesr.vocab import SCALES
from facesr.weights import save_srnet

from .conftest import LFW, tiny_net

PEOPLE = ["Aaron_Peirsol", "Colin_Powell", "Gloria_Macapagal_Arroyo", "Jennifer_Aniston", "Serena_Williams", "Vladimir_Putin"]


@pytest.fixture(scope="module")
def faces():
    return select(list_faces(LFW, PEOPLE), 12, seed=0)


@pytest.fixture(scope="module")
def scored(faces):
    results, n = score({"tiny": tiny_net()}, folder_batches(faces, 8))
    return results, n


def test_bicubic_numbers_sensible(scored):
    """Bicubic on LFW crops: x8 PSNR 22-26 dB, SSIM 0.55-0.8; bicubic beats nearest; error grows with scale."""
    res, n = scored
    assert n == 12
    x8 = res["bicubic"]["x8"]
    assert 22 < x8["psnr"] < 26 and 0.55 < x8["ssim"] < 0.8
    for s in SCALES:
        assert res["bicubic"][s]["psnr"] > res["nearest"][s]["psnr"]
        assert res["bicubic"][s]["ssim"] > res["nearest"][s]["ssim"]
        assert res["bicubic"][s]["ssim_paper"] >= res["bicubic"][s]["ssim"]  # larger C1, C2: a little higher
    assert res["bicubic"]["x2"]["psnr"] > res["bicubic"]["x4"]["psnr"] > res["bicubic"]["x8"]["psnr"]


def test_table_and_json_have_every_scale(scored, tmp_path):
    """The printed table has a block per scale with PSNR, SSIM and SSIM*, model columns and the protocol; JSON too."""
    res, n = scored
    report = build_report(res, n, "LFW test", {"tiny": "runs/tiny"})
    text = format_table(report)
    for s in SCALES:
        assert any(line.startswith(s) and "PSNR" in line for line in text.splitlines())
    assert text.count("SSIM*") >= 3 and "tiny" in text and "RGB" in text and "24.256" in text
    back = json.loads(write_json(report, tmp_path / "q.json").read_text())
    for method in ("nearest", "bicubic", "tiny"):
        assert set(back["results"][method]) == set(SCALES)
        assert all(math.isfinite(back["results"][method][s][m]) for s in SCALES for m in ("psnr", "ssim", "ssim_paper"))
    assert back["gain_over_bicubic"]["tiny"]["x8"]["psnr"] == pytest.approx(
        back["results"]["tiny"]["x8"]["psnr"] - back["results"]["bicubic"]["x8"]["psnr"])
    assert {"crop", "degradation", "colour_space", "data_range"} <= set(back["protocol"])


def test_paper_ssim_matches_training_loss():
    """quality's SSIM with the paper's constants is the SSIM the training loss uses."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 96, 96, generator=g)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert image_scores(y, x)["ssim_paper"].item() == pytest.approx(paper_ssim(y, x).item(), abs=1e-4)


def test_psnr_capped_for_identical():
    """A pixel-identical output scores the cap, not +inf, so one face cannot swamp a mean."""
    x = torch.rand(2, 3, 48, 48)
    assert torch.all(image_scores(x, x)["psnr"] == PSNR_CAP)


def test_baselines_shapes_and_range():
    """Bicubic/nearest from 24² give the target size, clamped to [0, 1] on the 8-bit grid."""
    lr = torch.rand(2, 3, 24, 24)
    for mode in ("bicubic", "nearest"):
        out = upscale(lr, 192, mode)
        assert out.shape == (2, 3, 192, 192) and out.min() >= 0 and out.max() <= 1
        assert torch.allclose(out * 255, (out * 255).round(), atol=1e-4)


def test_unreadable_faces_skipped(tmp_path):
    """A broken image and a text file in an identity folder are skipped and listed, the rest is evaluated."""
    person = tmp_path / "Someone"
    person.mkdir()
    src = sorted((LFW / "Colin_Powell").iterdir())[0]
    (person / "ok.jpg").symlink_to(src)
    (person / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (person / "small.png").parent.mkdir(exist_ok=True)
    Image.new("RGB", (100, 100)).save(person / "small.png")  # smaller than the 192 crop
    (person / "notes.txt").write_text("not an image")
    skipped = []
    batches = list(folder_batches(list_faces(tmp_path), 4, skipped=skipped))
    assert sum(b["lr"].shape[0] for b in batches) == 1
    assert sorted(p.rsplit("/", 1)[-1] for p, _ in skipped) == ["broken.jpg", "small.png"]


def test_select_is_seeded_and_spread(faces):
    """--limit draws the same faces for the same seed, different ones for another seed, in sorted order."""
    all_faces = list_faces(LFW, PEOPLE)
    a, b, c = select(all_faces, 10, 0), select(all_faces, 10, 0), select(all_faces, 10, 1)
    assert a == b and a != c and a == sorted(a, key=all_faces.index)


def test_grid_png(faces, tmp_path):
    """The grid has LR | bicubic | SR x2, x4, x8 | HR columns per face row."""
    batch = next(folder_batches(faces[:3], 3))
    path = comparison_grid(batch, {"tiny": tiny_net()}, tmp_path / "grid.png")
    w, h = Image.open(path).size
    assert w >= 6 * CELL and w < 7 * CELL and h > 3 * CELL


def test_cli_quality_and_grid(tmp_path, capsys):
    """`facesr eval quality RUN --ids FILE --limit N --grid 2` prints the table and writes JSON and PNG."""
    from launch.cli import main

    run = tmp_path / "runs" / "demo"
    save_srnet(run / "srnet.safetensors", tiny_net())
    ids = tmp_path / "ids.txt"
    ids.write_text("# test identities\n" + "\n".join(PEOPLE[:3]) + "\n")
    assert read_identities(ids) == PEOPLE[:3]
    out = tmp_path / "eval"
    assert main(["eval", "quality", str(run), "--data", str(LFW), "--ids", str(ids), "--limit", "4",
                 "--batch-size", "4", "--out", str(out), "--grid", "2", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "x8" in text and "demo" in text
    report = json.loads((out / "quality.json").read_text())
    assert report["images"] == 4 and report["models"] == {"demo": str(run)}
    assert (out / "grid.png").is_file()
    assert model_label(run / "srnet.safetensors") == "demo"


def _write_shard_root(root, faces):
    """A one-shard test split in the prep's layout (KEY.{lr,x2,x4,hr}.png, KEY.cls + manifest.json), made with quadruplet."""
    import io
    import tarfile

    from facesr.degrade import quadruplet, to_uint8
    from facesr.infer import read_rgb

    root.mkdir(parents=True)
    tar_path = root / "test-000000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i, f in enumerate(faces):
            for level, img in quadruplet(read_rgb(f.path)).items():
                buf = io.BytesIO()
                Image.fromarray(to_uint8(img).permute(1, 2, 0).numpy()).save(buf, format="PNG")
                ti = tarfile.TarInfo(f"test-{i:08d}.{level}.png")
                ti.size = buf.tell()
                buf.seek(0)
                tar.addfile(ti, buf)
            ti = tarfile.TarInfo(f"test-{i:08d}.cls")  # test identities have no prior class, as prep writes
            ti.size = 2
            tar.addfile(ti, io.BytesIO(b"-1"))
    people = sorted({f.identity for f in faces})
    manifest = {
        "format": "facesr-shards", "version": 1, "classes": [], "num_classes": 0, "degrade": {},
        "identities": {p: {"split": "test", "images": 0, "cls": -1} for p in people},
        "splits": {"test": {"identities": len(people), "samples": len(faces), "labelled": 0, "shards": [
            {"name": tar_path.name, "samples": len(faces), "bytes": tar_path.stat().st_size, "sha256": ""}]}},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_shards_and_manifest_split_give_the_same_numbers(faces, tmp_path, capsys):
    """Scoring a shard split and re-degrading its identities from the face folder (--manifest) agree exactly."""
    from launch.cli import main

    chosen = faces[:5]
    _write_shard_root(tmp_path / "shards", chosen)
    folder = tmp_path / "faces"
    for f in chosen:  # an identity folder holding exactly these faces (links, no copies)
        (folder / f.identity).mkdir(parents=True, exist_ok=True)
        (folder / f.identity / f.path.name).symlink_to(f.path)
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["eval", "quality", "--data", str(tmp_path / "shards"), "--split", "test", "--out", str(a)]) == 0
    assert main(["eval", "quality", "--data", str(folder), "--manifest", str(tmp_path / "shards"),
                 "--split", "test", "--out", str(b)]) == 0
    ra, rb = (json.loads((d / "quality.json").read_text()) for d in (a, b))
    assert ra["images"] == rb["images"] == 5
    assert ra["results"] == rb["results"]
    assert "shards" in ra["protocol"]["source"]


ROBUST_ROWS = ["paper", "decimate0", "bicubic_aa", "area", "bilinear_noise", "jpeg50", "heldout"]


@pytest.fixture(scope="module")
def robustness(faces):
    """Every eval degradation scored on 4 real faces with the tiny net."""
    return score_degradations({"tiny": tiny_net()}, folder_batches(faces[:4], 4), ROBUST_ROWS)


def test_robustness_rows_keep_the_clean_targets(robustness, faces):
    """The paper row equals today's score; other rows change only lr (bicubic scores drop, x8 targets stay clean)
    and score x8 only, of bicubic and the model's deploy network, which gives the full cascade's x8 numbers."""
    by_deg, n = robustness
    assert n == 4 and list(by_deg) == ROBUST_ROWS
    plain, _ = score({"tiny": tiny_net()}, folder_batches(faces[:4], 4))
    assert by_deg["paper"] == plain
    for d in ROBUST_ROWS:
        want = {"nearest", "bicubic", "tiny"} if d == "paper" else {"bicubic", "tiny"}
        assert set(by_deg[d]) == want and by_deg[d]["bicubic"]["x8"]["n"] == 4
        assert 15 < by_deg[d]["bicubic"]["x8"]["psnr"] < 30
        if d != "paper":
            assert set(by_deg[d]["tiny"]) == {"x8"}
    net = tiny_net()
    batch = next(folder_batches(faces[:4], 4))
    assert torch.equal(net.deploy()(batch["lr"]), net(batch["lr"])["hr"])  # the rows' deploy path is the same x8
    x8 = {d: by_deg[d]["bicubic"]["x8"]["psnr"] for d in ROBUST_ROWS}
    assert x8["jpeg50"] < x8["bicubic_aa"]  # the same resize, then JPEG


def test_robustness_table_and_json(robustness, tmp_path):
    """The robustness table has one row per degradation with bicubic, model and gain; JSON says how each lr was made."""
    by_deg, n = robustness
    report = add_robustness(build_report(by_deg["paper"], n, "LFW test", {"tiny": "runs/tiny"}), by_deg)
    text = format_robustness(report)
    lines = text.splitlines()
    for d in ROBUST_ROWS:
        row = next(line for line in lines if line.startswith(d + " "))
        assert f"{by_deg[d]['bicubic']['x8']['psnr']:.3f}" in row and row.count("/") == 3
    assert "Δ tiny" in text and "WebP" in text
    back = json.loads(write_json(report, tmp_path / "q.json").read_text())
    assert set(back["robustness"]) == set(ROBUST_ROWS) == set(back["protocol"]["lr_degradations"])
    g = back["robustness"]["heldout"]["gain_over_bicubic"]["tiny"]["x8"]["psnr"]
    r = back["robustness"]["heldout"]["results"]
    assert g == pytest.approx(r["tiny"]["x8"]["psnr"] - r["bicubic"]["x8"]["psnr"])
    assert "clean paper cascade" in back["protocol"]["robustness"]


def test_cli_quality_degradations_and_grid(tmp_path, capsys):
    """--degradations: robustness table and JSON rows (paper included), a grid row per degradation; typos refused."""
    from launch.cli import main

    run = tmp_path / "run"
    save_srnet(run / "srnet.safetensors", tiny_net())
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(PEOPLE[:2]) + "\n")
    out = tmp_path / "eval"
    common = ["--data", str(LFW), "--ids", str(ids), "--batch-size", "2", "--device", "cpu", "--out", str(out)]
    assert main(["eval", "quality", str(run), "--limit", "2", "--degradations", "heldout", *common]) == 0
    text = capsys.readouterr().out
    assert "under each lr degradation" in text and "heldout" in text
    report = json.loads((out / "quality.json").read_text())
    assert list(report["robustness"]) == ["paper", "heldout"] and report["images"] == 2
    assert main(["eval", "grid", str(run), "--rows", "1", "--degradations", "paper,area,jpeg50", *common]) == 0
    w, h = Image.open(out / "grid.png").size
    assert h > 3 * CELL and h < 4 * CELL  # 1 face x 3 degradations
    with pytest.raises(SystemExit, match="unknown 'sharp'"):
        main(["eval", "quality", str(run), "--degradations", "paper,sharp", *common])


def test_default_quality_output_unchanged(scored):
    """Without --degradations the report has no robustness rows (today's table and JSON)."""
    res, n = scored
    report = build_report(res, n, "LFW test", {"tiny": "runs/tiny"})
    assert "robustness" not in report and "lr_degradations" not in report["protocol"]


class _RankedPrior(torch.nn.Module):
    """A stand-in prior over 8 classes that puts sample i's label at rank ``ranks[i]``: it reads the sample's
    index from its (constant) image and returns logits with the label's score below ``ranks[i]`` others."""

    input = "image"

    def __init__(self, labels: list[int], ranks: list[int]):
        super().__init__()
        self.labels, self.ranks = labels, ranks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for i in (x[:, 0, 0, 0] * 100).round().long().tolist():
            logits = torch.arange(8, 0, -1, dtype=torch.float32)  # class c scores 8 - c: class 0 ranks first
            order = [c for c in range(8) if c != self.labels[i]]
            order.insert(self.ranks[i], self.labels[i])  # the label placed at its rank
            out.append(logits[torch.tensor(order).argsort()])
        return torch.stack(out)


def test_score_priors_top1_and_top5_count_the_label_rank():
    """facesr.evaluate.score_priors on 8 classes (more than 5, so top-5 can miss): top-1 is the share of samples
    whose label ranks first, top-5 the share ranking in the first five; unlabelled samples (cls -1) are not
    counted. With 4 classes, as in the training test, top-5 is 1 whatever the prior does."""
    from facesr.evaluate import score_priors

    labels, ranks = [3, 0, 7, 5, 2, 6, 1, 4, 0, 0], [0, 0, 4, 5, 7, 1, 0, 2, 6, 0]
    cls = torch.tensor(labels[:9] + [-1])  # the last sample is unlabelled: its rank 0 must not count
    x = (torch.arange(10, dtype=torch.float32) / 100).view(10, 1, 1, 1).expand(10, 3, 48, 48)
    batches = [{"x2": x[:6], "cls": cls[:6]}, {"x2": x[6:], "cls": cls[6:]}]
    out = score_priors({"x2": _RankedPrior(labels, ranks)}, batches)
    assert out["images"] == 9
    assert out["x2"]["top1"] == pytest.approx(3 / 9)  # ranks 0 at samples 0, 1, 6
    assert out["x2"]["top5"] == pytest.approx(6 / 9)  # ranks < 5 at samples 0, 1, 2, 5, 6, 7


def test_fast_inference_computes_the_same_network():
    """infer.Fast (what evaluation runs: BatchNorm folded, channels_last, bf16 autocast where chosen) gives the
    network's own outputs:
    fp32 to float rounding at every output and through deploy(); bf16 to within a few 8-bit levels, back in fp32."""
    from facesr.infer import Fast, inference_bf16
    from facesr.quality import finish

    net = tiny_net().eval()
    g = torch.Generator().manual_seed(1)
    for m in net.modules():  # BatchNorm as training leaves it (a fresh one is the identity): folding must carry it
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    lr = torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = net(lr)
        fast = Fast(net)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())  # folded into the convs
        assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) > 0  # in a copy: net keeps its own
        got = fast(lr)
        assert set(got) == set(want)
        for k in want:
            assert got[k].dtype == torch.float32 and torch.allclose(got[k], want[k], atol=1e-5), k
        assert torch.allclose(fast.deploy()(lr), want["hr"], atol=1e-5)
        half = Fast(net, bf16=True).deploy()(lr)
        assert half.dtype == torch.float32
        levels = (finish(half) - finish(want["hr"])).abs() * 255
        assert levels.mean() < 1.0 and levels.max() <= 8, (levels.mean(), levels.max())
    assert inference_bf16("fp32", "cpu") is False and inference_bf16("bf16", "cpu") is True
    with pytest.raises(ValueError, match="precision"):
        inference_bf16("fp16", "cpu")


def _quality_of_tiny_net(tmp_path, out: str, *options: str) -> dict:
    """`facesr eval quality` of a tiny cascade (runs/demo under ``tmp_path``) on 8 LFW faces: its JSON report."""
    from launch.cli import main

    run = tmp_path / "runs" / "demo"
    if not run.exists():
        save_srnet(run / "srnet.safetensors", tiny_net())
    assert main(["eval", "quality", str(run), "--data", str(LFW), "--limit", "8", "--batch-size", "8",
                 "--out", str(tmp_path / out), "--device", "cpu", *options]) == 0
    return json.loads((tmp_path / out / "quality.json").read_text())


def test_cli_quality_precision_is_stated_and_moves_little(tmp_path, capsys):
    """--precision fp32 and bf16 score the same faces within a few hundredths of a dB, and each report says how
    the models computed."""
    psnr = {}
    for p in ("fp32", "bf16"):
        report = _quality_of_tiny_net(tmp_path, p, "--precision", p)
        assert ("bf16 autocast" in report["protocol"]["arithmetic"]) == (p == "bf16")
        psnr[p] = report["results"]["demo"]["x8"]["psnr"]
    assert "models: " in capsys.readouterr().out
    assert abs(psnr["fp32"] - psnr["bf16"]) < 0.05, psnr


def test_cli_quality_tta_both_scores_each_model_both_ways(tmp_path):
    """--tta both: every model twice on the same faces, NAME and NAME+flip, under every row asked for; the
    flip-averaged network is a different network (its scores differ), the plain one scores as without --tta."""
    reports = {tta: _quality_of_tiny_net(tmp_path, tta, "--precision", "fp32", "--degradations", "bicubic_aa",
                                         "--tta", tta) for tta in ("none", "both")}
    both = reports["both"]
    assert set(both["models"]) == {"demo", "demo+flip"} and "flip-averaged" in both["models"]["demo+flip"]
    assert both["results"]["demo"]["x8"]["psnr"] == pytest.approx(reports["none"]["results"]["demo"]["x8"]["psnr"])
    assert both["results"]["demo+flip"]["x8"]["psnr"] != pytest.approx(both["results"]["demo"]["x8"]["psnr"], abs=1e-4)
    assert set(both["robustness"]["bicubic_aa"]["gain_over_bicubic"]) == {"demo", "demo+flip"}


def test_prefetched_keeps_order_and_raises_the_producers_error():
    """Evaluation reads ahead in a thread: items arrive in order, and a reading error surfaces in the caller
    (naming what failed), not as a silently short evaluation."""
    from facesr.prefetch import prefetched

    assert list(prefetched(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("face 2: truncated JPEG")

    got = []
    with pytest.raises(ValueError, match="face 2: truncated JPEG"):
        for x in prefetched(failing()):
            got.append(x)
    assert got == [1]
