from pathlib import Path

from tifactory.fileio import empty_folder
from tifactory.jobs import run_job
from tifactory.photos.crop import CropSettings, crop_faces


def main(smk, log):
    out_dir = empty_folder(Path(smk.output.manifest).parent)  # no crop of an earlier run stays behind
    settings = CropSettings.from_config({"crop": smk.params.crop, "faces": smk.params.faces,
                                         "collect": {"max_megapixels": smk.params.max_megapixels}})
    manifest = crop_faces(smk.input[0], out_dir, smk.output.manifest, settings, workers=smk.threads, log=log,
                          reference_photos=list(smk.params.reference))
    counts = manifest["status"].value_counts().to_dict()
    log(f"cropped: {counts}; contact sheet: {out_dir / 'contact_sheet.png'}")
    for row in manifest[manifest["status"] == "rejected"].itertuples():
        log(f"rejected {row.source}: {row.reason}")


# the guard: dlib's worker processes are spawned on Windows and macOS, and a spawned worker imports this script
if __name__ == "__main__":
    run_job(snakemake, main)
