"""`facesr sr` on photos and the Upscaler API: faces found, aligned to the training framing, super-resolved and
pasted back; on real LFW faces of the test identities, in scenes made by `facesr bench faces`' compositor."""

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from facesr.faces.align import REFERENCE, align, similarity, warp
from facesr.faces.detect import DetectConfig, FaceDetector
from facesr.faces.paste import enlarge
from facesr.quality import image_scores
from facesr.upscaler import Upscaler
from facesr.weights import save_srnet
from launch.bench.faces import compose, lfw_test_faces

from .conftest import LFW, tiny_net

HOG = DetectConfig(detectors=("hog",))  # the CNN finds the same faces here ~100x slower; the benchmark runs both


@pytest.fixture(scope="module")
def faces():
    """Eight LFW test-identity photos with HOG's box and landmarks on each (the demo's split: never trained on)."""
    return lfw_test_faces(LFW, 8, 0, FaceDetector(DetectConfig(detectors=("hog",), hog_upsample=1)))


@pytest.fixture(scope="module")
def bgs():
    """Backgrounds without faces (the benchmark cuts its own from CelebA photos, faces and all, and counts only
    the pasted face; here every face found must be one of ours): smooth colour fields with fine texture."""
    g = np.random.default_rng(0)
    out = []
    for _ in range(4):
        coarse = torch.from_numpy(g.uniform(0, 1, (1, 3, 6, 6))).float()
        field = torch.nn.functional.interpolate(coarse, size=(250, 250), mode="bicubic", align_corners=False)[0]
        field = field + torch.from_numpy(g.normal(0, 0.04, (3, 250, 250))).float()
        out.append((field.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy().copy())
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model that beats bicubic: a tiny cascade trained here (tests/faces_model.py; about a CPU minute), the same
    on every machine whatever runs/ holds."""
    from .faces_model import train_model

    d = tmp_path_factory.mktemp("trained")
    save_srnet(d / "srnet.safetensors", train_model())
    return d


def two_faces(faces, bgs, d: float, size=(96, 48), factor: int = 8, seed: int = 0):
    """A photo (W, H = ``size``) with two test faces, ``d`` px between the outer eye corners, one in each half;
    its composite at ``factor`` x (the full-resolution truth), the faces' boxes and landmarks."""
    w, h = size
    rng = random.Random(seed)
    left, right = [f for f in faces if f["eye"] >= factor * d * (factor > 1)][:2]
    scene_l, photo_l, box_l, lm_l = compose(left, bgs[0], d, (w // 2, h), factor, rng)
    scene_r, photo_r, box_r, lm_r = compose(right, bgs[1], d, (w // 2, h), factor, rng)
    shift = np.array([w // 2, 0, w // 2, 0])
    return (np.concatenate([scene_l, scene_r], 1), np.concatenate([photo_l, photo_r], 1),
            [tuple(box_l), tuple(np.array(box_r) + shift)], [lm_l, lm_r + shift[:2]])


def test_alignment_puts_real_landmarks_where_the_framing_has_them(faces):
    """Eight test faces turned up to ±12°, scaled 0.7-1.3x and moved inside a 320² photo: after detection and
    alignment, dlib's landmarks found again in the aligned 192² view are within 4 px (mean over the 5 points and
    the faces; 6 px for any one face) of REFERENCE, LFW's own mean: LFW's faces spread by 5-6.5 px (RMS)."""
    det = FaceDetector(DetectConfig(detectors=("hog",), hog_upsample=1))
    rng = np.random.default_rng(0)
    errors = []
    for f in faces:
        angle, scale = math.radians(rng.uniform(-12, 12)), rng.uniform(0.7, 1.3)
        c, s = scale * math.cos(angle), scale * math.sin(angle)
        m = np.array([[c, -s, 0], [s, c, 0]])
        m[:, 2] = rng.uniform(130, 190, 2) - m[:, :2] @ np.array([124.5, 124.5])  # the centre lands inside
        img = torch.from_numpy(f["img"].copy()).permute(2, 0, 1).float() / 255
        photo = (warp(img, m, (320, 320)).clamp(0, 1) * 255).round().to(torch.uint8)  # (3, 320, 320)
        found = det.detect(photo.permute(1, 2, 0).numpy().copy())
        assert found, f["id"]
        face = min(found, key=lambda g: np.linalg.norm(g.landmarks.mean(0) - (m[:, :2] @ f["lm"].mean(0) + m[:, 2])))
        view = (align(photo, face.landmarks).hr * 255).round().to(torch.uint8).permute(1, 2, 0).numpy().copy()
        again = FaceDetector(DetectConfig(detectors=("hog",), hog_upsample=1)).detect(view)
        assert again, f"{f['id']}: no face in the aligned view"
        pts = min((g.landmarks for g in again), key=lambda p: np.abs(p - REFERENCE).mean())
        errors.append(float(np.linalg.norm(pts - REFERENCE, axis=1).mean()))
    assert max(errors) < 6 and np.mean(errors) < 4, errors


def test_paste_leaves_every_pixel_outside_the_masks_as_the_enlarged_photo(faces, bgs):
    """Outside the masks the faces were pasted through, the composite equals the bicubic-enlarged photo exactly;
    inside, the faces changed it."""
    _, photo, boxes, _ = two_faces(faces, bgs, 12, size=(160, 80), factor=1)
    res = Upscaler(tiny_net().deploy(), "cpu", detect=HOG).enhance(photo, boxes=boxes)
    plain = enlarge(photo, 8)
    covered = np.zeros(plain.shape[:2], bool)
    for f in res.faces:
        assert f.error is None, f.error
        x0, y0, x1, y1 = f.region
        covered[y0:y1, x0:x1] |= f.alpha > 0
    assert res.image.shape == plain.shape == (640, 1280, 3)
    assert np.array_equal(res.image[~covered], plain[~covered])
    assert covered.mean() > 0.1 and (res.image[covered] != plain[covered]).mean() > 0.5


@pytest.mark.slow
def test_two_faces_each_closer_to_its_own_face_than_bicubic(faces, bgs, trained):
    """A photo with two test faces 6 px between the eye corners (boxes given): each face's x8 output, in the face's
    box, is closer (PSNR and SSIM) to the full-resolution composite than the photo's bicubic x8."""
    scene, photo, boxes, _ = two_faces(faces, bgs, 6)
    res = Upscaler.load(trained, "cpu", detect=HOG).enhance(photo, boxes=boxes)
    bicubic = enlarge(photo, 8)
    assert len(res.faces) == 2
    for f, box in zip(res.faces, boxes):
        assert f.error is None and f.sr.shape == (192, 192, 3) and f.lr.shape == (24, 24, 3)
        x0, y0, x1, y1 = (math.floor(box[0] * 8), math.floor(box[1] * 8), math.ceil(box[2] * 8), math.ceil(box[3] * 8))
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a[y0:y1, x0:x1])).permute(2, 0, 1)[None] / 255  # noqa
        sr, bic = image_scores(t(res.image), t(scene)), image_scores(t(bicubic), t(scene))
        assert sr["psnr"] > bic["psnr"] and sr["ssim"] > bic["ssim"], (box, sr, bic)


def test_cli_finds_two_faces_and_writes_photo_faces_and_json(faces, bgs, tiny_run, tmp_path, capsys):
    """`facesr sr MODEL PHOTO OUT` on a photo with two faces 16 px between the eye corners: the photo x8, two
    aligned 192² faces with their 24² inputs, and a JSON whose boxes are the faces'."""
    from launch.cli import main

    _, photo, boxes, _ = two_faces(faces, bgs, 16, size=(192, 96), factor=2)
    Image.fromarray(photo).save(tmp_path / "two.jpg", quality=95)
    assert main(["sr", str(tiny_run), str(tmp_path / "two.jpg"), str(tmp_path / "out"), "--detector", "hog",
                 "--device", "cpu"]) == 0
    out = tmp_path / "out"
    assert Image.open(out / "two.png").size == (192 * 8, 96 * 8)
    for i in (0, 1):
        assert Image.open(out / "two-faces" / f"{i}.png").size == (192, 192)
        assert Image.open(out / "two-faces" / f"{i}-lr.png").size == (24, 24)
    report = json.loads((out / "two.json").read_text())
    assert report["boxes"] == "detected" and len(report["faces"]) == 2
    for face, box in zip(report["faces"], boxes):
        got = np.array(face["box"])
        assert np.abs(got - np.array(box)).max() < 0.25 * (box[2] - box[0]), (got, box)
        assert 13 < face["eye_px"] < 19 and face["scores"]["hog"] > 0 and face["error"] is None
    assert "2 faces from 1 photos" in capsys.readouterr().out


def test_no_face_says_so_and_writes_no_picture(bgs, tiny_run, tmp_path, capsys):
    """A photo without a face (a background) exits 1, says no face was found and how small the detectors
    go, and writes only its JSON with no faces: no enlarged photo that could pass for a result."""
    from launch.cli import main

    Image.fromarray(np.ascontiguousarray(bgs[2][:60, :80])).save(tmp_path / "wall.png")
    assert main(["sr", str(tiny_run), str(tmp_path / "wall.png"), str(tmp_path / "out"), "--detector", "hog",
                 "--device", "cpu"]) == 1
    cap = capsys.readouterr()
    assert "no face found" in cap.err and "--boxes" in cap.err and "0 faces from 0 photos" in cap.out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["wall.json"]
    report = json.loads((tmp_path / "out" / "wall.json").read_text())
    assert report["faces"] == [] and report["detectable_eye_px"] > 0


def test_boxes_for_faces_below_the_detectors(faces, bgs, tiny_run, tmp_path, capsys):
    """--boxes: two faces 5 px between the eye corners, which HOG does not find, are super-resolved from the boxes
    given; console and JSON say they are smaller than the detectors find; a bad boxes file is one line, rc 2."""
    from launch.cli import main

    _, photo, boxes, _ = two_faces(faces, bgs, 5, size=(64, 32), factor=1)
    Image.fromarray(photo).save(tmp_path / "tiny.png")
    assert FaceDetector(HOG).detect(photo) == []  # what --boxes is for
    (tmp_path / "boxes.json").write_text(json.dumps({"tiny.png": [list(b) for b in boxes]}))
    rc = main(["sr", str(tiny_run), str(tmp_path / "tiny.png"), str(tmp_path / "out"), "--boxes",
               str(tmp_path / "boxes.json"), "--detector", "hog", "--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 0 and "smaller than the detectors find" in cap.err
    report = json.loads((tmp_path / "out" / "tiny.json").read_text())
    assert report["boxes"] == "given" and [f["detector"] for f in report["faces"]] == ["given", "given"]
    assert all(f["eye_px"] < report["detectable_eye_px"] for f in report["faces"])
    assert (tmp_path / "out" / "tiny-faces" / "1.png").is_file()
    (tmp_path / "bad.json").write_text(json.dumps({"tiny.png": [[10, 10, 5, 20]]}))
    rc = main(["sr", str(tiny_run), str(tmp_path / "tiny.png"), str(tmp_path / "out2"), "--boxes",
               str(tmp_path / "bad.json"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "bad.json" in err[0] and "box 0" in err[0], err
    assert not (tmp_path / "out2").exists()


def test_a_failing_face_does_not_lose_the_others(faces, bgs, tiny_run, tmp_path):
    """Of three boxes, one lies wholly outside the photo: that face reports why, the other two are written."""
    from launch.cli import main

    _, photo, boxes, _ = two_faces(faces, bgs, 12, size=(160, 80), factor=1)
    Image.fromarray(photo).save(tmp_path / "p.png")
    given = [list(boxes[0]), [500, 500, 520, 520], list(boxes[1])]
    (tmp_path / "b.json").write_text(json.dumps(given))
    assert main(["sr", str(tiny_run), str(tmp_path / "p.png"), str(tmp_path / "out"), "--boxes",
                 str(tmp_path / "b.json"), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "out" / "p.json").read_text())
    assert [f["error"] is None for f in report["faces"]] == [True, False, True]
    assert "outside" in report["faces"][1]["error"]
    assert sorted(p.name for p in (tmp_path / "out" / "p-faces").iterdir()) == ["0-lr.png", "0.png", "2-lr.png",
                                                                                 "2.png"]
    assert (tmp_path / "out" / "p.png").is_file()


def test_api_faces_batch_and_inputs(faces, bgs):
    """Upscaler.faces: one call for a batch, tensor in -> tensor out in [0, 1], NumPy uint8 in -> uint8 out, the
    same pixels; a wrong shape is refused; enhance takes a PIL image as well as an array."""
    up = Upscaler(tiny_net().deploy(), "cpu", detect=HOG)
    x = torch.rand(3, 3, 24, 24)
    x8 = (x * 255).round().to(torch.uint8)
    out = up.faces(x8.float() / 255)
    assert out.shape == (3, 3, 192, 192) and 0 <= out.min() and out.max() <= 1
    arr = up.faces(x8.permute(0, 2, 3, 1).numpy())
    assert arr.dtype == np.uint8 and arr.shape == (3, 192, 192, 3)
    assert np.array_equal(arr, (out * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    with pytest.raises(ValueError, match="expected"):
        up.faces(torch.rand(2, 3, 32, 32))
    _, photo, boxes, _ = two_faces(faces, bgs, 12, size=(160, 80), factor=1)
    a, b = up.enhance(photo, boxes=boxes), up.enhance(Image.fromarray(photo), boxes=boxes)
    assert np.array_equal(a.image, b.image) and len(a.faces) == 2


def test_similarity_recovers_a_known_transform():
    """similarity() returns the rotation-scale-shift that made the points (up to float error)."""
    m = np.array([[1.2 * math.cos(0.3), -1.2 * math.sin(0.3), 14.0], [1.2 * math.sin(0.3), 1.2 * math.cos(0.3), -3]])
    src = REFERENCE * 0.7 + 5
    assert np.allclose(similarity(src, src @ m[:, :2].T + m[:, 2]), m, atol=1e-9)
