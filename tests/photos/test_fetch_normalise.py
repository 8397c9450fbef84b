"""URL-list sources against a local HTTP server, normalisation of odd image modes, near-duplicates."""

from __future__ import annotations

import http.server
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support.photos import collect_settings
from tifactory.photos.collect import collect_photos, load_upright_rgb
from tifactory.demo.photos import package_file
from tifactory.photos.fetch import cache_path, read_url_list


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    with Image.open(package_file("skimage", "data/astronaut.png")) as image:
        return image.convert("RGB")


@pytest.fixture()
def server(astronaut, tmp_path):
    import io

    jpeg = io.BytesIO()
    astronaut.save(jpeg, format="JPEG", quality=90)
    hits: dict[str, int] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            hits[self.path] = hits.get(self.path, 0) + 1
            if self.path.startswith("/photo.jpg") or (self.path == "/flaky.jpg" and hits[self.path] > 1):
                body = jpeg.getvalue()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/flaky.jpg":
                self.send_response(503)
                self.end_headers()
            elif self.path == "/big.jpg":
                self.send_response(200)
                self.send_header("Content-Length", str(5_000_000))
                self.end_headers()
            elif self.path == "/streamed-big.jpg":  # no Content-Length: the cap must hold while reading
                self.send_response(200)
                self.end_headers()
                for _ in range(40):
                    self.wfile.write(b"\xff" * 65536)
            elif self.path == "/slow.jpg":
                time.sleep(1.0)
                self.send_response(200)
                self.end_headers()
            elif self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "file:///etc/passwd")
                self.end_headers()
            else:
                self.send_response(404)
                self.end_headers()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()
    httpd.server_close()


def test_url_list_download_cache_and_rejects(tmp_path, server):
    base, hits = server
    photos = tmp_path / "photos"
    photos.mkdir()
    urls = [f"{base}/photo.jpg?x=../../etc/passwd", f"{base}/flaky.jpg", f"{base}/big.jpg", f"{base}/missing.jpg",
            f"{base}/redirect", "ftp://example.org/a.jpg"]
    (photos / "list.txt").write_text("# my photos\n" + "\n".join(urls) + "\n", encoding="utf-8")
    assert read_url_list(photos / "list.txt") == urls
    cache = tmp_path / "cache"

    offline = collect_photos([str(photos)], tmp_path / "off.tsv", collect_settings(url_cache=cache))
    assert list(offline["source"]) == urls and not hits
    assert set(offline["status"]) == {"rejected"}
    assert offline.loc[0, "reason"].startswith("not downloaded: network disabled")
    assert offline.loc[5, "reason"] == "unsupported URL scheme (ftp; http/https only)"

    kwargs = dict(url_cache=cache, allow_network=True, max_download_mb=1, timeout_s=5, retries=1, backoff_s=0.01)
    frame = collect_photos([str(photos)], tmp_path / "raw.tsv", collect_settings(**kwargs))
    by_url = dict(zip(frame["source"], frame.to_dict("records")))
    first = by_url[urls[1]]  # retried after a 503; same bytes as urls[0], whose URL sorts later
    assert first["status"] == "kept", first["reason"]
    assert first["file"] == os.path.abspath(cache_path(cache, urls[1]))
    assert Path(first["file"]).parent == cache  # the URL's own name never becomes a path
    assert by_url[urls[0]]["reason"] == f"duplicate of {urls[1]}"
    assert hits["/flaky.jpg"] == 2
    assert by_url[urls[2]]["reason"].startswith("download failed: too large")
    assert by_url[urls[3]]["reason"] == "download failed: HTTP 404"
    assert by_url[urls[4]]["reason"].startswith("download failed")
    assert not (Path("/etc/passwd").read_bytes()[:4] in cache_path(cache, urls[4]).read_bytes()
                if cache_path(cache, urls[4]).exists() else False)
    before = dict(hits)
    again = collect_photos([str(photos)], tmp_path / "raw2.tsv", collect_settings(**kwargs))
    assert hits["/photo.jpg?x=../../etc/passwd"] == before["/photo.jpg?x=../../etc/passwd"]  # cached
    assert list(again["status"]) == list(frame["status"])


def test_streamed_size_cap_timeout_retries_and_backoff(tmp_path, server):
    base, hits = server
    photos = tmp_path / "photos"
    photos.mkdir()
    urls = [f"{base}/streamed-big.jpg", f"{base}/slow.jpg"]
    (photos / "list.txt").write_text("\n".join(urls), encoding="utf-8")
    cache = tmp_path / "cache"
    started = time.perf_counter()
    frame = collect_photos([str(photos)], tmp_path / "raw.tsv", collect_settings(
        url_cache=cache, allow_network=True, max_download_mb=1, timeout_s=0.2, retries=2, backoff_s=0.1))
    elapsed = time.perf_counter() - started
    big, slow = (frame.loc[i].to_dict() for i in range(2))
    assert big["reason"] == "download failed: too large (> 1000000 bytes)" and hits["/streamed-big.jpg"] == 1
    assert slow["reason"].startswith("download failed: ") and "timed out" in slow["reason"]
    assert slow["reason"].endswith("(after 3 attempt(s))") and hits["/slow.jpg"] == 3
    assert elapsed >= 0.1 + 0.2  # exponential backoff between the attempts
    assert not cache.exists() or not list(cache.iterdir())  # nothing partial left in the cache


def _linear_gamma_profile() -> bytes:
    """An RGB ICC profile with sRGB primaries and a linear (gamma 1.0) tone curve, named 'lin1'."""
    import struct

    from PIL import ImageCms

    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack(">I", data[128:132])[0]
    for i in range(count):
        signature, offset, _size = struct.unpack(">4sII", data[132 + 12 * i:144 + 12 * i])
        if signature in (b"rTRC", b"gTRC", b"bTRC"):
            assert data[offset:offset + 4] == b"para"
            data[offset + 8:offset + 10] = b"\x00\x00"  # function type 0: Y = X ** g
            data[offset + 12:offset + 16] = struct.pack(">I", 0x10000)  # g = 1.0
    data[84:100] = bytes(16)  # no profile ID
    return bytes(data).replace("sRGB".encode("utf-16-be"), "lin1".encode("utf-16-be"))


def test_embedded_icc_profiles_are_applied(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    linear = _linear_gamma_profile()
    Image.new("RGB", (80, 80), (128, 64, 200)).save(photos / "linear.png", icc_profile=linear)
    rgba = Image.new("RGBA", (80, 80), (128, 64, 200, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 40, 80))
    rgba.save(photos / "linear_alpha.png", icc_profile=linear)
    Image.new("RGB", (80, 80), (128, 64, 200)).save(photos / "broken.jpg", icc_profile=b"not a profile" * 20)
    Image.new("L", (80, 80), 90).save(photos / "grey.png")
    Image.new("LA", (80, 80), (90, 0)).save(photos / "grey_alpha.png")
    frame = collect_photos([str(photos)], tmp_path / "raw.tsv", collect_settings(near_duplicate_distance=-1))
    rows = {Path(s).name: r for s, r in zip(frame["source"], frame.to_dict("records"))}
    assert set(frame["status"]) == {"kept"}
    # linear-light values re-encoded for sRGB: 128 -> 188, 64 -> 137, 200 -> 229 (lcms)
    assert rows["linear.png"]["colour"] == "icc->sRGB"
    assert np.abs(np.subtract(load_upright_rgb(photos / "linear.png").getpixel((5, 5)), (188, 137, 229))).max() <= 2
    assert rows["linear_alpha.png"]["colour"] == "alpha-flattened+icc->sRGB"
    image = load_upright_rgb(photos / "linear_alpha.png")
    assert image.getpixel((5, 5)) == (255, 255, 255)  # transparent -> white (white stays white)
    assert np.abs(np.subtract(image.getpixel((60, 5)), (188, 137, 229))).max() <= 2
    assert rows["broken.jpg"]["colour"] == "icc-unusable"
    assert rows["grey.png"]["colour"] == "L->RGB" and load_upright_rgb(photos / "grey.png").getpixel((1, 1)) == (90,) * 3
    assert rows["grey_alpha.png"]["colour"] == "alpha-flattened"
    assert load_upright_rgb(photos / "grey_alpha.png").getpixel((1, 1)) == (255, 255, 255)


def test_normalisation_modes_bomb_and_animation(tmp_path, astronaut):
    photos = tmp_path / "photos"
    photos.mkdir()
    astronaut.convert("CMYK").save(photos / "cmyk.jpg", quality=95)
    grey16 = (np.asarray(astronaut.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(photos / "grey16.png")
    astronaut.convert("P", palette=Image.Palette.ADAPTIVE).save(photos / "palette.png")
    flipped = astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    frames = [flipped, astronaut]
    frames[0].save(photos / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    astronaut.save(photos / "tagged.png", icc_profile=srgb)
    Image.new("RGB", (3000, 3000)).save(photos / "huge.png")

    frame = collect_photos([str(photos)], tmp_path / "raw.tsv",
                           collect_settings(max_megapixels=5, near_duplicate_distance=-1))
    rows = {Path(s).name: r for s, r in zip(frame["source"], frame.to_dict("records"))}
    assert rows["huge.png"]["reason"].startswith("decompression-bomb guard (3000x3000")
    assert "CMYK->RGB" in rows["cmyk.jpg"]["colour"]
    assert "I;16->8bit" in rows["grey16.png"]["colour"] or "I->8bit" in rows["grey16.png"]["colour"]
    assert "P->RGB" in rows["palette.png"]["colour"]
    assert "first-of-2-frames" in rows["anim.gif"]["colour"]
    reference = np.asarray(astronaut, dtype=np.int16)
    flipped_reference = np.asarray(flipped, dtype=np.int16)
    for name, tolerance in [("cmyk.jpg", 12), ("palette.png", 12), ("anim.gif", 25), ("tagged.png", 1)]:
        assert rows[name]["status"] == "kept", (name, rows[name]["reason"])
        image = load_upright_rgb(photos / name)
        assert image.mode == "RGB" and image.size == (512, 512)
        expected = flipped_reference if name == "anim.gif" else reference
        assert np.abs(np.asarray(image, dtype=np.int16) - expected).mean() < tolerance, name
    grey = np.asarray(load_upright_rgb(photos / "grey16.png"), dtype=np.int16)
    assert np.abs(grey[..., 0] - np.asarray(astronaut.convert("L"), dtype=np.int16)).max() <= 1


def test_near_duplicates_keep_the_larger(tmp_path, astronaut):
    photos = tmp_path / "photos"
    photos.mkdir()
    astronaut.resize((300, 300), Image.Resampling.LANCZOS).save(photos / "a_small.jpg", quality=80)
    astronaut.save(photos / "b_big.png")
    astronaut.crop((0, 300, 512, 512)).save(photos / "c_other.png")
    frame = collect_photos([str(photos)], tmp_path / "raw.tsv", collect_settings())
    rows = {Path(s).name: r for s, r in zip(frame["source"], frame.to_dict("records"))}
    assert rows["b_big.png"]["status"] == "kept" and rows["c_other.png"]["status"] == "kept"
    assert rows["a_small.jpg"]["reason"].startswith(f"near-duplicate of {photos / 'b_big.png'} (phash distance ")
    off = collect_photos([str(photos)], tmp_path / "raw2.tsv", collect_settings(near_duplicate_distance=-1))
    assert set(off["status"]) == {"kept"}
