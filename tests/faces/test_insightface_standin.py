"""The insightface adapters, run for real against a stand-in model pack built inside the test.

No insightface model pack can be downloaded here, so each test builds `<root>/models/<pack>/` from two tiny
ONNX graphs (written to tmp_path; nothing binary is committed) that insightface's own model router takes
for the real thing, then drives the project's adapters (tifactory.faces, tifactory.photos.crop, tifactory.sampling.likeness)
through insightface unchanged:

* SCRFD stand-in (`det_10g.onnx`): input `1x3xHxW` with symbolic H, W like the real det_10g, 9 outputs
  (score / bbox / kps for strides 8, 16, 32, two anchors per cell), which is what `ModelRouter` (>= 5
  outputs) and `SCRFD._init_vars` (9 outputs -> fmc 3, 2 anchors, keypoints) key on. The outputs are
  constants laid out for the 640x640 detector input both adapters use: for each face the test chooses (box,
  5 landmarks, score, in detector-input pixels) one stride-32 anchor row holds the score and the
  distances / offsets (divided by the stride) that SCRFD's `distance2bbox` / `distance2kps` decode back to
  exactly that box and those landmarks. The input is consumed: every score is multiplied by
  `ReduceMax(input) > 0`, so an image with no pixel brighter than mid-grey has "no face".
  Faces are therefore at fixed positions of the letterboxed detector input, i.e. at known positions of any
  photo whose width is its long side (image pixels = detector pixels * width / 640).
* ArcFace stand-in (`w600k_r50.onnx`): input `1x3x112x112`, output `1x512` = a fixed seeded random
  projection of the 16x16-average-pooled input (so similar aligned crops give similar embeddings; cosines
  of random projections approximate those of the pooled crops). insightface routes it to `ArcFaceONNX`
  (square input >= 112, a multiple of 16) with the w600k normalisation (mean 127.5, std 127.5).

What this cannot cover: real detection quality (the stand-in detector does not look at faces, only at
whether the image is lit) and the real recogniser's identity geometry; the other buffalo_l models
(landmark_3d_68, landmark_2d_106, genderage) are not built because neither adapter uses them
(FaceAnalysis is restricted to detection + recognition). insightface's FaceAnalysis needed nothing beyond
these two files, so the likeness adapter is tested end to end too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("insightface")
onnx = pytest.importorskip("onnx")  # a dependency of insightface itself (its model router loads graphs)
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from tifactory.photos.collect import collect_photos  # noqa: E402
from support.photos import collect_settings, run_crop as crop_faces  # noqa: E402
from tifactory.faces.detection import InsightFaceDetector  # noqa: E402
from tifactory.faces.models import FaceModelError, FaceSettings, load_detector, load_recogniser, resolve  # noqa: E402
from tifactory.faces.packs import pack_status  # noqa: E402
from tifactory.faces.recognition import ArcFaceRecogniser  # noqa: E402
from tifactory.sampling.likeness import score_subject  # noqa: E402

DET = 640  # detector input side: InsightFaceDetector's max_side (config faces.detect_side)
STRIDES = (8, 16, 32)
ANCHORS = 2
POOL = 16  # the recogniser stand-in pools 112x112 -> 7x7 before projecting to 512

# (box x0, y0, x1, y1), 5 landmarks (eyes, nose, mouth corners), score: in detector-input pixels
FACE = ((240.0, 160.0, 400.0, 360.0), ((285.0, 240.0), (355.0, 240.0), (320.0, 280.0), (290.0, 320.0),
                                       (350.0, 320.0)), 0.9)
SMALL_FACE = ((480.0, 420.0, 560.0, 520.0), ((505.0, 460.0), (535.0, 460.0), (520.0, 480.0), (507.0, 500.0),
                                             (533.0, 500.0)), 0.8)


# ---------------------------------------------------------------------------------------------
# building the stand-in pack
# ---------------------------------------------------------------------------------------------


def _save(graph, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_scrfd(path: Path, faces) -> Path:
    """An SCRFD-shaped detector whose outputs decode to `faces` at a 640x640 input (see the docstring)."""
    stride, side = 32, DET // 32
    tables = {s: [np.zeros(((DET // s) ** 2 * ANCHORS, width), np.float32) for width in (1, 4, 10)]
              for s in STRIDES}
    for (x0, y0, x1, y1), landmarks, score in faces:
        col, row = int((x0 + x1) / 2 // stride), int((y0 + y1) / 2 // stride)
        ax, ay = col * stride, row * stride  # SCRFD's anchor centre of that cell
        index = (row * side + col) * ANCHORS  # first anchor of the cell
        scores, boxes, points = tables[stride]
        assert scores[index, 0] == 0, "two stand-in faces share an anchor"
        scores[index, 0] = score
        boxes[index] = [(ax - x0) / stride, (ay - y0) / stride, (x1 - ax) / stride, (y1 - ay) / stride]
        points[index] = [v for px, py in landmarks for v in ((px - ax) / stride, (py - ay) / stride)]

    nodes = [helper.make_node("ReduceMax", ["input.1"], ["brightest"], keepdims=0, name="brightest"),
             helper.make_node("Greater", ["brightest", "zero"], ["lit"], name="lit"),
             helper.make_node("Cast", ["lit"], ["gate"], to=TensorProto.FLOAT, name="gate")]
    initialisers = [numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    outputs = []
    for component, kind in enumerate(("score", "bbox", "kps")):  # SCRFD's output order
        for s in STRIDES:
            table = tables[s][component]
            name, constant = f"{kind}_{s}", f"{kind}_{s}_table"
            if table.any():
                initialisers.append(numpy_helper.from_array(table, constant))
            else:  # all zeros: no need to store them
                initialisers.append(numpy_helper.from_array(np.array(table.shape, np.int64), constant + "_shape"))
                nodes.append(helper.make_node("ConstantOfShape", [constant + "_shape"], [constant], name=constant,
                                              value=numpy_helper.from_array(np.zeros(1, np.float32))))
            op = "Mul" if kind == "score" else "Identity"
            nodes.append(helper.make_node(op, [constant, "gate"] if kind == "score" else [constant], [name],
                                          name=name))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(table.shape)))
    graph = helper.make_graph(
        nodes, "scrfd_standin",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        outputs, initialisers)
    return _save(graph, path)


def build_arcface(path: Path, seed: int = 0) -> np.ndarray:
    """An ArcFace-shaped recogniser: 1x3x112x112 -> avg-pool 16 -> flatten (147) -> fixed random 147x512."""
    projection = np.random.default_rng(seed).standard_normal((3 * (112 // POOL) ** 2, 512)).astype(np.float32)
    nodes = [helper.make_node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[POOL, POOL],
                              strides=[POOL, POOL], name="pool"),
             helper.make_node("Flatten", ["pooled"], ["flat"], axis=1, name="flatten"),
             helper.make_node("MatMul", ["flat", "projection"], ["embedding"], name="project")]
    graph = helper.make_graph(
        nodes, "arcface_standin",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 512])],
        [numpy_helper.from_array(projection, "projection")])
    _save(graph, path)
    return projection


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """<root>/models/: standin (buffalo_l names: one face + recogniser), pair (two faces, no recogniser),
    antelope (antelopev2 names: scrfd_10g_bnkps.onnx + glintr100.onnx), nodet (recogniser only)."""
    root = tmp_path_factory.mktemp("insightface")
    models = root / "models"
    build_scrfd(models / "standin" / "det_10g.onnx", [FACE])
    projection = build_arcface(models / "standin" / "w600k_r50.onnx")
    build_scrfd(models / "pair" / "det_10g.onnx", [FACE, SMALL_FACE])
    build_scrfd(models / "antelope" / "scrfd_10g_bnkps.onnx", [FACE])
    build_arcface(models / "antelope" / "glintr100.onnx")
    build_arcface(models / "nodet" / "w600k_r50.onnx")
    return {"root": root, "projection": projection}


# ---------------------------------------------------------------------------------------------
# test images: a "face" is a smooth random colour texture at the stand-in detector's face box
# ---------------------------------------------------------------------------------------------


def texture(seed: int, size: tuple[int, int]) -> Image.Image:
    cells = np.random.default_rng(seed).integers(20, 236, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize(size, Image.Resampling.BICUBIC)


def face_photo(width: int, height: int, identity: int, *, variant: int = 0, face=FACE) -> np.ndarray:
    """A photo (width >= height) whose stand-in face shows identity `identity`'s texture; `variant` changes
    the background and adds a little noise (another photo of the same person)."""
    rng = np.random.default_rng(1000 + variant)
    photo = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(60, 200, 3)))
    scale = width / DET
    x0, y0, x1, y1 = (v * scale for v in face[0])
    margin_x, margin_y = 0.3 * (x1 - x0), 0.3 * (y1 - y0)  # the aligned 112 crop reaches past the box
    left, top = int(x0 - margin_x), int(y0 - margin_y)
    photo.paste(texture(identity, (int(x1 + margin_x) - left, int(y1 + margin_y) - top)), (left, top))
    pixels = np.asarray(photo).astype(np.int16)
    if variant:
        pixels = pixels + rng.integers(-12, 13, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def unit(vector) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64).ravel()
    return vector / np.linalg.norm(vector)


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


def test_insightface_router_takes_the_stand_ins_for_scrfd_and_arcface(packs):
    from insightface.model_zoo import model_zoo

    folder = packs["root"] / "models" / "standin"
    options = {"providers": ["CPUExecutionProvider"]}
    detector = model_zoo.get_model(str(folder / "det_10g.onnx"), **options)
    assert type(detector).__name__ == "SCRFD" and detector.taskname == "detection"
    assert detector.use_kps and detector.fmc == 3 and detector._num_anchors == 2 and not detector.batched
    assert detector.static_input_size is None  # symbolic H, W like the real det_10g
    recogniser = model_zoo.get_model(str(folder / "w600k_r50.onnx"), **options)
    assert type(recogniser).__name__ == "ArcFaceONNX" and recogniser.taskname == "recognition"
    assert recogniser.input_size == (112, 112) and (recogniser.input_mean, recogniser.input_std) == (127.5, 127.5)
    assert all(path.stat().st_size < 400_000 for path in folder.glob("*.onnx"))  # tiny


def settings(repo_config, pack, **overrides) -> FaceSettings:
    return FaceSettings.from_config(repo_config["faces"], insightface_pack=str(pack), **overrides)


def models(repo_config, pack, **overrides):
    chosen = settings(repo_config, pack, **overrides)
    return load_detector(chosen)[0], load_recogniser(chosen)[0]


def test_registry_uses_the_pack_when_present_and_says_plainly_when_not(packs, tmp_path, repo_config):
    models_dir = packs["root"] / "models"
    resolved = resolve(settings(repo_config, models_dir / "standin"))
    assert (resolved.detector, resolved.recogniser) == ("insightface", "arcface")
    assert resolved.detector_note.startswith("detector: insightface SCRFD") and "detection det_10g.onnx" in resolved.detector_note
    assert "cosine, same person >= 0.40" in resolved.recogniser_note
    detector, recogniser = models(repo_config, models_dir / "standin")
    assert isinstance(detector, InsightFaceDetector) and isinstance(recogniser, ArcFaceRecogniser)
    assert recogniser.name == "arcface:standin" and recogniser.metric.kind == "cosine"
    # a pack without a recogniser: SCRFD detects, dlib recognises
    resolved = resolve(settings(repo_config, models_dir / "pair"))
    assert (resolved.detector, resolved.recogniser) == ("insightface", "dlib")
    with pytest.raises(FaceModelError, match="no recognition model"):
        resolve(settings(repo_config, models_dir / "pair", recogniser="arcface"))
    # no pack: YuNet + dlib, said plainly
    resolved = resolve(settings(repo_config, tmp_path / "standin"))
    assert (resolved.detector, resolved.recogniser) == ("yunet", "dlib")
    assert "no insightface model pack" in resolved.detector_note and "never downloaded" in resolved.detector_note
    with pytest.raises(FaceModelError, match="never downloaded"):
        resolve(settings(repo_config, tmp_path / "standin", detector="insightface"))
    status = pack_status(models_dir / "nodet")
    assert status.detection is None and "no detection model" in status.message
    resolved = resolve(settings(repo_config, models_dir / "nodet"))
    assert (resolved.detector, resolved.recogniser) == ("yunet", "arcface")  # ArcFace aligns on YuNet's landmarks
    assert not list(Path(packs["root"]).rglob("*.zip")) and not list(tmp_path.rglob("*"))  # nothing downloaded


@pytest.mark.parametrize("width, height", [(1280, 960), (640, 480), (320, 240)])
def test_detector_returns_the_encoded_faces_in_image_pixels(packs, width, height):
    """Downscaled to 640 by the adapter (1280), as is (640), or enlarged by SCRFD's letterbox (320)."""
    detector = InsightFaceDetector(packs["root"] / "models" / "pair", score_threshold=0.5, max_side=DET)
    rgb = np.full((height, width, 3), 200, np.uint8)
    faces = detector.detect(rgb)
    scale = width / DET
    assert len(faces) == 2  # largest first
    for face, (box, landmarks, score) in zip(faces, [FACE, SMALL_FACE]):
        x0, y0, x1, y1 = box
        np.testing.assert_allclose((face.x, face.y, face.w, face.h),
                                   np.array([x0, y0, x1 - x0, y1 - y0]) * scale, atol=1e-3)
        np.testing.assert_allclose(face.landmarks, np.array(landmarks) * scale, atol=1e-3)
        assert face.score == pytest.approx(score, abs=1e-6)
    assert detector.detect(np.full((height, width, 3), 100, np.uint8)) == []  # nothing lit: no face
    assert detector.detect(np.zeros((1, 1, 3), np.uint8)) == []
    # the adapter's threshold reaches insightface: the 0.8 face drops out at 0.85
    strict = InsightFaceDetector(packs["root"] / "models" / "pair", score_threshold=0.85, max_side=DET)
    assert [round(face.score, 3) for face in strict.detect(rgb)] == [0.9]


def test_arcface_adapter_embeds_the_aligned_face_and_separates_identities(packs, repo_config):
    from insightface.utils import face_align

    detector, recogniser = models(repo_config, packs["root"] / "models" / "standin")
    rgb = face_photo(1280, 960, identity=1)
    face = detector.detect(rgb)[0]
    embedding = recogniser.embed(rgb, face)
    assert embedding.shape == (512,) and np.linalg.norm(embedding) == pytest.approx(1.0, abs=1e-9)

    # the same number computed outside insightface: align on the landmarks, RGB order, (x - 127.5) / 127.5,
    # pool, project. A colour-order or normalisation slip in the adapter would not match.
    aligned = face_align.norm_crop(rgb, landmark=np.asarray(face.landmarks, np.float32), image_size=112)
    blob = (aligned.astype(np.float64) - 127.5) / 127.5
    pooled = blob.reshape(7, POOL, 7, POOL, 3).mean(axis=(1, 3)).transpose(2, 0, 1).ravel()
    np.testing.assert_allclose(embedding, unit(pooled @ packs["projection"]), atol=1e-4)

    same_person = recogniser.embed(face_photo(1280, 960, identity=1, variant=3), face)
    someone_else = recogniser.embed(face_photo(1280, 960, identity=2), face)
    assert recogniser.metric.same(recogniser.metric.compare(embedding, same_person))
    assert float(embedding @ same_person) > 0.9
    assert float(embedding @ someone_else) < 0.4 and not recogniser.metric.same(float(embedding @ someone_else))
    with pytest.raises(ValueError, match="5 face landmarks"):
        recogniser.embed(rgb, type(face)(face.x, face.y, face.w, face.h, face.score, ()))


def test_antelopev2_names_are_found(packs, repo_config):
    """antelopev2 ships scrfd_10g_bnkps.onnx and glintr100.onnx (no 'det_' or 'w600k' in the names)."""
    detector, recogniser = models(repo_config, packs["root"] / "models" / "antelope")
    assert isinstance(detector, InsightFaceDetector) and isinstance(recogniser, ArcFaceRecogniser)
    rgb = face_photo(640, 480, identity=1)
    assert recogniser.embed(rgb, detector.detect(rgb)[0]).shape == (512,)


def _identity_photos(folder: Path) -> Path:
    """Three photos of the subject (identity 1), one of someone else (identity 2), one dark (no face); and
    the raw manifest of collect."""
    photos = folder / "photos"
    photos.mkdir()
    for variant in range(3):
        Image.fromarray(face_photo(1280, 960, identity=1, variant=variant + 1)).save(
            photos / f"subject_{variant}.jpg", quality=95)
    Image.fromarray(face_photo(1280, 960, identity=2, variant=5)).save(photos / "someone_else.jpg", quality=95)
    Image.new("RGB", (1280, 960), (40, 50, 60)).save(photos / "dark.jpg", quality=95)  # nothing lit: no face
    collect_photos([str(photos)], folder / "raw.tsv", collect_settings(near_duplicate_distance=-1))
    return folder / "raw.tsv"


def test_identity_filter_in_crop_faces_with_the_real_adapter(packs, tmp_path):
    raw = _identity_photos(tmp_path)
    said: list[str] = []
    frame = crop_faces(raw, tmp_path / "crops", tmp_path / "crops.tsv", detector="insightface", identity_filter=True,
                       insightface_pack=str(packs["root"] / "models" / "standin"), log=said.append)
    rows = {Path(source).name: row for source, row in zip(frame["source"], frame.to_dict("records"))}
    assert any(line.startswith("detector: insightface") for line in said)
    assert any("reference = the majority identity: 3 of 4 faces are one person" in line for line in said), said
    assert any(line.startswith("recogniser: arcface w600k_r50.onnx (cosine") for line in said)
    for variant in range(3):
        row = rows[f"subject_{variant}.jpg"]
        assert row["status"] == "kept" and row["detector"] == "insightface", row
        assert row["identity_score"] > 0.9
        # the stand-in face box, mapped back to the full-size photo (JPEG decoded at 1/2 for the detector)
        assert (row["face_x"], row["face_y"], row["face_w"], row["face_h"]) == (480, 320, 320, 400)
        assert Image.open(tmp_path / "crops" / row["output"]).size == (512, 512)
    other = rows["someone_else.jpg"]
    assert other["status"] == "rejected" and other["identity_score"] < 0.4
    assert other["reason"].startswith("different person (cosine ") and other["reason"].endswith(
        " < 0.40 to the subject's reference)")
    assert rows["dark.jpg"]["reason"] == "no face"


def test_identity_reference_photos_through_the_real_adapter(packs, tmp_path):
    """`reference_photos` are embedded by the same insightface detector + recogniser (detector auto)."""
    raw = _identity_photos(tmp_path)
    said: list[str] = []
    frame = crop_faces(raw, tmp_path / "crops", tmp_path / "crops.tsv", detector="auto", identity_filter=True,
                       insightface_pack=str(packs["root"] / "models" / "standin"),
                       reference_photos=[str(tmp_path / "photos" / "subject_0.jpg")], log=said.append)
    assert any("identity: 1 of 1 reference photo(s) usable" in line for line in said)
    assert any("reference = the mean of 1 face(s) in the roster's reference photo(s)" in line for line in said)
    kept = sorted(Path(source).name for source, status in zip(frame["source"], frame["status"]) if status == "kept")
    assert kept == ["subject_0.jpg", "subject_1.jpg", "subject_2.jpg"]


def test_likeness_with_the_pack_and_score_subject(packs, tmp_path, repo_config):
    chosen = settings(repo_config, packs["root"] / "models" / "standin")
    crops = tmp_path / "crops"
    crops.mkdir()
    for i in range(2):
        Image.fromarray(face_photo(512, 512, identity=1, variant=i + 1)).save(crops / f"00{i}_subject.png")
    (crops / "manifest.tsv").write_text("source\tstatus\treason\toutput\na.jpg\tkept\t\t000_subject.png\n"
                                        "b.jpg\tkept\t\t001_subject.png\nc.jpg\trejected\tno face\t\n")
    samples, checkpoints = tmp_path / "samples", tmp_path / "checkpoints"
    samples.mkdir()
    checkpoints.mkdir()
    # step 0: someone else; step 100: the subject once, once no face; step 200: the subject twice
    plan = {0: [face_photo(512, 512, 2, variant=4), face_photo(512, 512, 3, variant=5)],
            100: [face_photo(512, 512, 1, variant=6), np.zeros((512, 512, 3), np.uint8)],
            200: [face_photo(512, 512, 1, variant=7), face_photo(512, 512, 1, variant=8)]}
    lines = ["step\tcolumn\tfile"]
    for step, images in plan.items():
        for column, pixels in enumerate(images):
            Image.fromarray(pixels).save(samples / f"s{step}_{column}.png")
            lines.append(f"{step}\t{column}\ts{step}_{column}.png")
        if step:
            (checkpoints / f"eva-ti-step{step:08d}.safetensors").write_bytes(f"step {step}".encode())
    (samples / "images.tsv").write_text("\n".join(lines) + "\n")
    said: list[str] = []
    result = score_subject(subject="eva", images_tsv=samples / "images.tsv", crops_dir=crops,
                           checkpoint_dir=checkpoints, scores_tsv=samples / "scores.tsv",
                           plot_png=samples / "likeness.png", summary_json=samples / "likeness.json",
                           settings=chosen, log=said.append)
    assert result["scored"] and result["recogniser"].startswith("arcface:standin (cosine")
    assert result["reference_faces"] == 2 and result["metric"] == "cosine"
    assert result["best_step"] == 200 and result["best_checkpoint"].endswith("eva-ti-step00000200.safetensors")
    table = {int(line.split("\t")[0]): line.split("\t")
             for line in (samples / "scores.tsv").read_text().splitlines()[1:]}
    likeness = {step: float(cells[4]) for step, cells in table.items()}
    assert likeness[0] < 0.5 < 0.9 < likeness[100] and likeness[200] > 0.9
    assert table[100][3] == "0.5000" and table[200][7] == "yes" and table[200][9:] == ["arcface:standin", "cosine"]
    assert json.loads((samples / "likeness.json").read_text())["best_step"] == 200
    assert said and "best step: 200" in said[-1]
